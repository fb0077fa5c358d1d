"""Tests of the MindSpore `.ckpt` reader/writer: the real MindSpore file, hand-built records, corruption, round trips.

The hand-built records use a tiny encoder written here, independently of the module's writer, so a bug shared by
the module's reader and writer cannot hide behind a round trip.
"""

from __future__ import annotations

import os
import random
import tempfile
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io.mindspore_ckpt import (
    is_mindspore_ckpt,
    is_optimizer_state,
    read_mindspore_ckpt,
    write_mindspore_ckpt,
)

SHARED = Path(os.environ.get("CASCADE_RCNN_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared"))
REFERENCE = SHARED / "reference" / "mindspore"
needs_reference = pytest.mark.skipif(
    not (REFERENCE / "formats.ckpt").is_file() or not (REFERENCE / "formats.npz").is_file(),
    reason=f"MindSpore reference files not found in {REFERENCE} (set CASCADE_RCNN_SHARED to the shared folder)",
)
# The model parameters of formats.ckpt, in file order: everything except the optimizer/bookkeeping entries and the
# `note` str (listed by hand from formats.json, not derived from the module's own rule).
FORMATS_MODEL_NAMES = [
    "f32.vec", "f16.mat", "f64.vec", "bf16.mat", "i8.vec", "i16.vec", "i32.vec", "i64.vec", "u8.vec", "u16.vec",
    "u32.vec", "u64.vec", "bool.vec", "scalar.f32", "scalar.i64", "nd.f32", "backbone.conv1.weight",
    "rcnn.cls_scores.bias",
]


# --- an independent minimal encoder -------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf writes a negative int64
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _record(name: str, tensor_type: str, dims: list[int], content: bytes, *, packed: bool = False,
            tensor_extra: bytes = b"", value_extra: bytes = b"") -> bytes:
    """One serialized `Checkpoint{value: [Value{tag, tensor}]}`; `*_extra` are raw extra fields to inject."""
    if packed:
        dims_bytes = _ld(1, b"".join(_varint(d) for d in dims)) if dims else b""
    else:
        dims_bytes = b"".join(b"\x08" + _varint(d) for d in dims)
    tensor = dims_bytes + tensor_extra + _ld(2, tensor_type.encode()) + _ld(3, content)
    return _ld(1, _ld(1, name.encode()) + value_extra + _ld(2, tensor))


def _write(tmp_path: Path, data: bytes, name: str = "x.ckpt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _record_ends(data: bytes) -> list[int]:
    """Byte offsets where each top-level record ends (every record is `0x0A <varint len> <body>`)."""
    ends, pos = [], 0
    while pos < len(data):
        assert data[pos] == 0x0A
        pos, length, shift = pos + 1, 0, 0
        while True:
            length |= (data[pos] & 0x7F) << shift
            pos, shift = pos + 1, shift + 7
            if data[pos - 1] < 0x80:
                break
        pos += length
        ends.append(pos)
    return ends


def _read_or_checkpoint_error(path: Path) -> dict[str, np.ndarray] | None:
    """Read `path`; a CheckpointError gives None, any other exception fails the test by propagating."""
    try:
        return read_mindspore_ckpt(path, include_optimizer=True)
    except CheckpointError as error:
        assert str(path) in str(error), f"error does not name the file: {error}"
        return None


# --- the real MindSpore file ----------------------------------------------------------------------------------------
@needs_reference
def test_formats_ckpt_equals_npz_for_every_entry() -> None:
    expected = np.load(REFERENCE / "formats.npz")
    got = read_mindspore_ckpt(REFERENCE / "formats.ckpt", include_optimizer=True)
    assert list(got) == list(expected.files)  # file order, nothing missing or extra
    for name in expected.files:
        value = got[name]
        if name == "bf16.mat":  # upcast to float32; formats.npz holds the float32 bit pattern as uint32
            assert value.dtype == np.float32
            value = value.view(np.uint32)
        assert value.dtype == expected[name].dtype, name
        assert value.shape == expected[name].shape, name
        assert value.tobytes() == expected[name].tobytes(), name
        assert value.flags.writeable and value.flags.c_contiguous, name


@needs_reference
def test_default_read_returns_model_parameters_only() -> None:
    got = read_mindspore_ckpt(REFERENCE / "formats.ckpt")
    assert list(got) == FORMATS_MODEL_NAMES


def test_optimizer_state_names() -> None:
    for name in ["accum.rcnn.cls_scores.bias", "stat.backbone.conv1.weight", "moments.backbone.bn1.gamma",
                 "global_step", "learning_rate", "momentum", "epoch_num", "step_num"]:
        assert is_optimizer_state(name), name
    # Model names that merely contain an optimizer word must stay model parameters.
    for name in ["backbone.bn1.moving_mean", "rcnn.stat.weight", "momentum.weight", "backbone.layer1.0.conv1.weight"]:
        assert not is_optimizer_state(name), name


# --- hand-built records -----------------------------------------------------------------------------------------------
def test_scalar_written_either_way_reads_as_0d(tmp_path: Path) -> None:
    one = np.float32(0.25).tobytes()
    data = _record("v2", "Float32", [], one) + _record("v1", "Float32", [0], one)
    data += _record("empty", "Float32", [0], b"")
    got = read_mindspore_ckpt(_write(tmp_path, data))
    assert got["v2"].shape == () and got["v1"].shape == () and got["v1"] == np.float32(0.25)
    assert got["empty"].shape == (0,)  # dims [0] with no content can only be an empty vector


def test_packed_dims_old_unsigned_spelling_and_unknown_fields(tmp_path: Path) -> None:
    values = np.arange(6, dtype=np.uint16).reshape(2, 3)
    unknown = b"\x20\x05" + b"\x29" + bytes(8) + b"\x35" + bytes(4) + _ld(9, b"future")  # wire types 0, 1, 5, 2
    data = _record("w", "Uint16", [2, 3], values.tobytes(), packed=True, tensor_extra=unknown, value_extra=unknown)
    data = unknown + data  # an unknown top-level Checkpoint field too
    got = read_mindspore_ckpt(_write(tmp_path, data))
    assert got["w"].dtype == np.uint16 and np.array_equal(got["w"], values)


def test_maptensor_record_is_skipped(tmp_path: Path) -> None:
    map_record = _ld(1, _ld(1, b"embedding.table") + _ld(3, _ld(1, b"")))
    data = map_record + _record("w", "Int32", [1], np.int32(7).tobytes())
    assert list(read_mindspore_ckpt(_write(tmp_path, data), include_optimizer=True)) == ["w"]


def test_split_records_are_concatenated(tmp_path: Path) -> None:
    values = np.arange(10, dtype=np.float32).reshape(5, 2)
    raw = values.tobytes()
    data = b"".join(_record("w", "Float32", [5, 2], raw[a:b]) for a, b in [(0, 16), (16, 24), (24, 40)])
    got = read_mindspore_ckpt(_write(tmp_path, data))
    assert np.array_equal(got["w"], values)


def test_nonzero_bool_bytes_read_as_true(tmp_path: Path) -> None:
    got = read_mindspore_ckpt(_write(tmp_path, _record("b", "Bool", [3], bytes([0, 1, 2]))))
    assert got["b"].tolist() == [False, True, True]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x0a" + b"\x80" * 10 + b"\x01", "longer than 10 bytes"),
        (b"\x0a" + b"\xff" * 9 + b"\x02", "overflows 64 bits"),
        (b"\x0a\x05\x0a\x01", "exceeds the 2 bytes that remain"),
        (_record("w", "Int4", [2], b"\x12"), "unsupported tensor_type 'Int4'"),
        (_record("w", "Float32", [3], bytes(8)), "need 12 bytes"),
        (_record("w", "Float32", [1 << 40, 1 << 40], bytes(4)), "the content has 4"),  # no allocation from dims
        (_record("w", "Float32", [-1], bytes(4)), "negative dimension"),
        (_record("", "Float32", [1], bytes(4)), "no tag"),
        (_ld(1, _ld(1, b"w")), "no tensor"),
        (_ld(1, _ld(1, b"w") + _ld(2, _ld(3, bytes(4)))), "no tensor_type"),
        (_ld(1, _ld(1, b"\xff\xfe") + _ld(2, b"")), "utf-8"),
        (_record("a", "Int8", [1], b"\x01") + _record("b", "Int8", [1], b"\x01") + _record("a", "Int8", [1], b"\x01"),
         "name repeated"),
        (_record("w", "Int8", [2], b"\x01") + _record("w", "Int16", [2], b"\x01\x00"), "slices disagree"),
        (b"\x0b", "unsupported wire type 3"),
        (_record("note", "str", [0], b"\x01\x00\x00"), "malformed str"),
        (_record("note", "str", [0], b"\x00\x00\x11\x00"), "not UTF-32"),
    ],
)
def test_malformed_records_raise_checkpoint_error(tmp_path: Path, data: bytes, message: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(CheckpointError) as info:
        read_mindspore_ckpt(path, include_optimizer=True)
    assert str(path) in str(info.value) and message.lower() in str(info.value).lower()
    assert "record" in str(info.value)


def test_truncated_record_error_names_index_and_name(tmp_path: Path) -> None:
    first = _record("a", "Float32", [2], bytes(8))
    data = first + _record("rcnn.cls_scores.bias", "Float32", [81], bytes(324))
    path = _write(tmp_path, data[: len(first) + 40])
    with pytest.raises(CheckpointError, match=r"record 1 \('rcnn.cls_scores.bias'\)"):
        read_mindspore_ckpt(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="empty"):
        read_mindspore_ckpt(_write(tmp_path, b""))
    with pytest.raises(CheckpointError, match="cannot open"):
        read_mindspore_ckpt(tmp_path / "missing.ckpt")


# --- corruption of the real file --------------------------------------------------------------------------------------
@needs_reference
def test_every_truncation_is_an_error_or_an_exact_prefix(tmp_path: Path) -> None:
    data = (REFERENCE / "formats.ckpt").read_bytes()
    expected = np.load(REFERENCE / "formats.npz")
    ends = _record_ends(data)
    assert len(ends) == len(expected.files) and ends[-1] == len(data)
    path = tmp_path / "cut.ckpt"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        got = _read_or_checkpoint_error(path)
        if cut not in ends:
            assert got is None, f"a cut at byte {cut} (inside a record) was accepted"
        else:  # a cut between records is a well-formed, shorter checkpoint
            assert got is not None and list(got) == expected.files[: ends.index(cut) + 1]


@needs_reference
def test_bit_flips_give_checkpoint_error_or_arrays(tmp_path: Path) -> None:
    data = (REFERENCE / "formats.ckpt").read_bytes()
    rng = random.Random(0)
    path = tmp_path / "flip.ckpt"
    errors = 0
    for position in range(len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        path.write_bytes(flipped)
        got = _read_or_checkpoint_error(path)
        errors += got is None
        assert got is None or all(isinstance(v, np.ndarray) for v in got.values())
        assert isinstance(is_mindspore_ckpt(path), bool)
    # Flips in headers must be caught; only flips inside tensor bytes (about 3/4 of the file) can go unnoticed.
    assert errors > len(data) // 10


@pytest.fixture(scope="module")
def scratch_file() -> Iterator[Path]:
    """One file, rewritten by each hypothesis example (function-scoped tmp_path would be shared across examples)."""
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder) / "fuzz.ckpt"


def _small_ckpt_bytes() -> bytes:
    return (_record("a", "Float32", [2, 2], np.arange(4, dtype=np.float32).tobytes())
            + _record("b", "Int64", [], np.int64(-3).tobytes()) + _record("c", "Bool", [0], b"\x01"))


@settings(max_examples=200, deadline=timedelta(seconds=1), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=300))
def test_random_bytes_only_raise_checkpoint_error(scratch_file: Path, data: bytes) -> None:
    scratch_file.write_bytes(data)
    _read_or_checkpoint_error(scratch_file)
    assert isinstance(is_mindspore_ckpt(scratch_file), bool)


@settings(max_examples=200, deadline=timedelta(seconds=1), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
       cut=st.integers(0, 10**6))
def test_mutated_checkpoints_only_raise_checkpoint_error(scratch_file: Path, edits: list[tuple[int, int]],
                                                         cut: int) -> None:
    mutated = bytearray(_small_ckpt_bytes())
    for position, byte in edits:
        mutated[position % len(mutated)] = byte
    scratch_file.write_bytes(bytes(mutated[: max(1, cut % (len(mutated) + 1))]))
    _read_or_checkpoint_error(scratch_file)
    assert isinstance(is_mindspore_ckpt(scratch_file), bool)


# --- writer round trip and the content sniff --------------------------------------------------------------------------
WRITABLE_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                   np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]
arrays = st.sampled_from(WRITABLE_DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)))
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)


@settings(max_examples=60, deadline=timedelta(seconds=1), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.dictionaries(names, arrays, min_size=1, max_size=6), max_record_bytes=st.integers(1, 64))
def test_write_then_read_round_trip(scratch_file: Path, tensors: dict[str, np.ndarray], max_record_bytes: int) -> None:
    write_mindspore_ckpt(scratch_file, tensors, max_record_bytes=max_record_bytes)
    got = read_mindspore_ckpt(scratch_file, include_optimizer=True)
    assert list(got) == list(tensors)
    for name, value in tensors.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name  # bitwise, so NaN payloads and -0.0 count too


def test_writer_splits_large_tensors_and_writes_str(tmp_path: Path) -> None:
    path = tmp_path / "split.ckpt"
    weight = np.arange(100, dtype=np.float32).reshape(25, 4)
    note = np.array("format ✓ coverage")
    write_mindspore_ckpt(path, {"split.weight": weight, "note": note}, max_record_bytes=128)
    assert path.read_bytes().count(b"split.weight") == 4  # 400 bytes in records of at most 128 bytes
    got = read_mindspore_ckpt(path, include_optimizer=True)
    assert np.array_equal(got["split.weight"], weight)
    assert got["note"].dtype == note.dtype and got["note"].item() == note.item()
    assert list(read_mindspore_ckpt(path)) == ["split.weight"]  # a str record is never a model parameter


@needs_reference
def test_is_mindspore_ckpt_sniffs_content_not_extension(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    assert is_mindspore_ckpt(REFERENCE / "formats.ckpt")
    renamed = _write(tmp_path, (REFERENCE / "formats.ckpt").read_bytes(), "weights.bin")
    assert is_mindspore_ckpt(renamed)
    save_file({"w": np.zeros(3, np.float32)}, str(tmp_path / "w.ckpt"))
    with zipfile.ZipFile(tmp_path / "w.pth.ckpt", "w") as archive:  # torch.save's format is a zip archive
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    not_ckpt = {
        "safetensors": tmp_path / "w.ckpt",
        "torch": tmp_path / "w.pth.ckpt",
        "npz": REFERENCE / "formats.npz",
        "empty": _write(tmp_path, b"", "empty.ckpt"),
        "text": _write(tmp_path, b"\n\nnot a checkpoint\n", "text.ckpt"),
        "unknown dtype": _write(tmp_path, _record("w", "Float128", [1], bytes(16)), "odd.ckpt"),
        "missing": tmp_path / "missing.ckpt",
        "folder": tmp_path,
    }
    for kind, path in not_ckpt.items():
        assert not is_mindspore_ckpt(path), kind
