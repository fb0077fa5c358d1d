"""Tests of cascade_rcnn.io.torch_checkpoint: peer checkpoint layouts, the restricted reader, format sniffing.

The central invariants: the restricted reader returns exactly what torch.load returns, for both file formats; and a
pickle that would run code when loaded normally never runs it here (each payload is first shown to fire under
torch.load(weights_only=False), so the safety tests can fail).
"""

from __future__ import annotations

import builtins
import os
import pickle
import shlex
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io import torch_checkpoint
from cascade_rcnn.io.torch_checkpoint import read_torch_checkpoint, restricted_torch_load, sniff_checkpoint_format

FORMATS = {"zip": True, "legacy": False}  # value: torch.save's _use_new_zipfile_serialization


class FakeConfigDict(dict):
    """Stands for mmcv's ConfigDict: a dict subclass that weights_only refuses."""


class FakeMessageHub:
    """Stands for mmengine state objects of arbitrary classes stored next to the weights."""

    def __init__(self) -> None:
        self.log = np.arange(3.0)


class SystemPayload:
    """Runs `touch <marker>` through os.system when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class ExecPayload:
    """Creates <marker> through builtins.exec when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def _tensors() -> OrderedDict[str, torch.Tensor]:
    """Tensors that exercise the reader: several dtypes, views sharing one storage, 0-d and empty tensors."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 5, generator=g)
    return OrderedDict(
        weight=base,
        transposed=base.t(),  # same storage, other strides
        window=base[1:3, 2:],  # same storage, nonzero offset
        half=torch.randn(3, generator=g).half(),
        bf16=torch.randn(3, generator=g).bfloat16(),
        f64=torch.randn(2, 2, generator=g).double(),
        long=torch.arange(7),
        int8=torch.tensor([-3, 5], dtype=torch.int8),
        flags=torch.tensor([True, False, True]),
        scalar=torch.tensor(2.5),
        empty=torch.empty(0, 3),
    )


def _assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def _save(obj: object, path: Path, fmt: str) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_restricted_reader_equals_torch_load(tmp_path: Path, fmt: str) -> None:
    obj = {"state_dict": _tensors(), "param": torch.nn.Parameter(torch.ones(2)), "meta": {"epoch": 3}}
    path = _save(obj, tmp_path / "plain.pth", fmt)
    want = torch.load(path, map_location="cpu", weights_only=True)
    got = restricted_torch_load(path)
    _assert_same_tensors(got["state_dict"], want["state_dict"])
    assert isinstance(got["state_dict"], OrderedDict)
    assert torch.equal(got["param"], want["param"].detach())
    assert got["meta"] == {"epoch": 3}


@pytest.mark.parametrize("fmt", FORMATS)
def test_mmdet2_checkpoint(tmp_path: Path, fmt: str) -> None:
    classes = ("person", "bicycle", "car")
    checkpoint = {
        "meta": {"mmdet_version": "2.0.0", "CLASSES": classes, "epoch": 12, "iter": 87936, "config": "model = dict()"},
        "state_dict": _tensors(),
        "optimizer": {"state": {0: {"momentum_buffer": torch.ones(4, 5)}}, "param_groups": [{"lr": 0.02}]},
    }
    path = _save(checkpoint, tmp_path / "mmdet2.pth", fmt)
    state_dict, meta = read_torch_checkpoint(path)
    _assert_same_tensors(state_dict, _tensors())
    assert meta == checkpoint["meta"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_mmdet3_checkpoint_with_foreign_objects_falls_back(tmp_path: Path, fmt: str) -> None:
    checkpoint = {
        "meta": {
            "dataset_meta": {"classes": ("person", "car"), "palette": [(220, 20, 60), (0, 0, 142)]},
            "seed": np.int64(42),  # numpy scalar: refused by weights_only, dropped from meta
            "cfg": FakeConfigDict(model={"type": "CascadeRCNN"}, work_dir="/tmp/x"),
            "epoch": 12,
        },
        "state_dict": _tensors(),
        "message_hub": FakeMessageHub(),
        "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(0.02)}]},
    }
    path = _save(checkpoint, tmp_path / "mmdet3.pth", fmt)
    # The premise: torch's own reader refuses this file, so the restricted reader is what is under test.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    state_dict, meta = read_torch_checkpoint(path)
    _assert_same_tensors(state_dict, _tensors())
    assert meta == {
        "dataset_meta": {"classes": ("person", "car"), "palette": [(220, 20, 60), (0, 0, 142)]},
        "cfg": {"model": {"type": "CascadeRCNN"}, "work_dir": "/tmp/x"},
        "epoch": 12,
    }


def test_detectron2_trainer_checkpoint(tmp_path: Path) -> None:
    checkpoint = {
        "model": _tensors(),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.02}]},
        "scheduler": {"last_epoch": 10},
        "iteration": 89999,
    }
    state_dict, meta = read_torch_checkpoint(_save(checkpoint, tmp_path / "model_final.pth", "zip"))
    _assert_same_tensors(state_dict, _tensors())
    assert meta == {"iteration": 89999}


def test_bare_state_dict_drops_non_tensors(tmp_path: Path) -> None:
    bare = OrderedDict(_tensors())
    bare["_metadata_version"] = 2
    bare["nested"] = {"a": torch.ones(1)}
    state_dict, meta = read_torch_checkpoint(_save(bare, tmp_path / "bare.pth", "zip"))
    _assert_same_tensors(state_dict, _tensors())
    assert meta == {}


def test_parameters_come_back_as_plain_tensors(tmp_path: Path) -> None:
    module = torch.nn.Linear(3, 2)
    path = _save({"state_dict": dict(module.named_parameters()), "x": FakeMessageHub()}, tmp_path / "p.pth", "zip")
    state_dict, _ = read_torch_checkpoint(path)
    assert set(state_dict) == {"weight", "bias"}
    assert all(type(t) is torch.Tensor and not t.requires_grad for t in state_dict.values())
    assert torch.equal(state_dict["weight"], module.weight.detach())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("payload_type", [SystemPayload, ExecPayload])
def test_code_in_meta_never_runs(tmp_path: Path, fmt: str, payload_type: type) -> None:
    marker = tmp_path / "pwned"
    path = _save({"state_dict": _tensors(), "meta": {"evil": payload_type(marker), "epoch": 1}}, tmp_path / "x", fmt)
    # Control: an unrestricted load runs the payload, so the assertions below can fail.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()

    state_dict, meta = read_torch_checkpoint(path)
    assert not marker.exists()
    _assert_same_tensors(state_dict, _tensors())
    assert meta == {"epoch": 1}


@pytest.mark.parametrize("fmt", FORMATS)
def test_code_at_top_level_never_runs(tmp_path: Path, fmt: str) -> None:
    marker = tmp_path / "pwned"
    path = _save(SystemPayload(marker), tmp_path / "x.pth", fmt)
    with pytest.raises(CheckpointError, match=r"posix\.system|expected a dict"):
        read_torch_checkpoint(path)
    assert not marker.exists()


def _legacy_file(path: Path, object_pickle: bytes) -> Path:
    """A legacy-format torch file whose object pickle is given as raw bytes (and which has no storages)."""
    header = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (torch_checkpoint._LEGACY_MAGIC_NUMBER, torch_checkpoint._LEGACY_PROTOCOL_VERSION, {"x": 1})
    )
    path.write_bytes(header + object_pickle + pickle.dumps([], protocol=2))
    return path


def test_build_on_an_admitted_object_is_refused(tmp_path: Path) -> None:
    # OrderedDict() then BUILD with {'a': 1}: would set attributes on a real object; only placeholders take state.
    crafted = b"\x80\x02ccollections\nOrderedDict\n)R}X\x01\x00\x00\x00aK\x01sb."
    with pytest.raises(CheckpointError, match="refused to set the state of a OrderedDict"):
        restricted_torch_load(_legacy_file(tmp_path / "build.pth", crafted))


def test_tensor_view_outside_its_storage_is_refused(tmp_path: Path) -> None:
    path = _save({"w": torch.arange(4.0)}, tmp_path / "w.pth", "zip")
    with zipfile.ZipFile(path) as zf:
        records = {name: zf.read(name) for name in zf.namelist()}
    pickle_name = next(n for n in records if n.endswith("/data.pkl"))
    # The pickle stores size (4,) as `K\x04\x85`; claim 400 elements in a 4-element storage.
    records[pickle_name] = records[pickle_name].replace(b"K\x04\x85", b"M\x90\x01\x85", 1)
    forged = tmp_path / "forged.pth"
    with zipfile.ZipFile(forged, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    with pytest.raises(CheckpointError, match="forged.pth"):
        restricted_torch_load(forged)


def test_foreign_byte_order_is_swapped() -> None:
    values = torch.tensor([1.5, -2.25, 3.0e8], dtype=torch.float32)
    foreign = "big" if sys.byteorder == "little" else "little"
    raw = values.numpy().astype(values.numpy().dtype.newbyteorder(">" if foreign == "big" else "<")).tobytes()
    got = torch_checkpoint._tensor_from_bytes(raw, torch.float32, 3, foreign)
    assert torch.equal(got, values)


def test_not_a_torch_file(tmp_path: Path) -> None:
    plain_pickle = tmp_path / "model_final.pkl"
    plain_pickle.write_bytes(pickle.dumps({"model": {}}, protocol=4))
    with pytest.raises(CheckpointError, match="pickle file.*read_detectron2_pkl"):
        read_torch_checkpoint(plain_pickle)
    with pytest.raises(CheckpointError, match="no such file"):
        read_torch_checkpoint(tmp_path / "missing.pth")


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no tensors"):
        read_torch_checkpoint(_save({"meta": {"epoch": 1}}, tmp_path / "empty.pth", "zip"))


def test_truncated_file(tmp_path: Path) -> None:
    path = _save({"state_dict": _tensors(), "x": FakeMessageHub()}, tmp_path / "t.pth", "legacy")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="t.pth"):
        read_torch_checkpoint(path)


# --- sniff_checkpoint_format ---------------------------------------------------------------------------------------


def test_sniff_formats(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    pickle_path = tmp_path / "w.pkl"
    pickle_path.write_bytes(pickle.dumps({"model": {"w": np.ones(2)}}, protocol=2))
    zip_path = tmp_path / "other.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("readme.txt", "not a checkpoint")
    (tmp_path / "text.bin").write_bytes(b"neither weights nor a pickle\n" * 4)
    (tmp_path / "empty.bin").write_bytes(b"")

    assert sniff_checkpoint_format(_save({"w": torch.ones(2)}, tmp_path / "z.pth", "zip")) == "torch"
    assert sniff_checkpoint_format(_save({"w": torch.ones(2)}, tmp_path / "l.pth", "legacy")) == "torch"
    assert sniff_checkpoint_format(tmp_path / "w.safetensors") == "safetensors"
    assert sniff_checkpoint_format(pickle_path) == "pickle"
    assert sniff_checkpoint_format(zip_path) == "unknown"
    assert sniff_checkpoint_format(tmp_path / "text.bin") == "unknown"
    assert sniff_checkpoint_format(tmp_path / "empty.bin") == "unknown"


def test_sniff_a_safetensors_header_length_that_starts_like_a_pickle(tmp_path: Path) -> None:
    """A safetensors header of 0x..80 bytes (1 file in 32: headers are padded to a multiple of 8) starts the file
    with 0x80, pickle's PROTO opcode; it is still safetensors (a saved cascade_rcnn_r50_fpn_detectron2 model with the
    benchmark's settings was read as a pickle). A pickle whose ninth byte happens to be '{' stays a pickle."""
    from safetensors.torch import load_file, save_file

    path = tmp_path / "w.safetensors"
    for pad in range(64):
        save_file({"w": torch.ones(2)}, path, metadata={"pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert sniff_checkpoint_format(path) == "safetensors" and torch.equal(load_file(path)["w"], torch.ones(2))
    lookalike = tmp_path / "w.pkl"
    lookalike.write_bytes(b"\x80\x02" + bytes(6) + b"{" + bytes(40))  # a plausible length, no JSON after it
    assert sniff_checkpoint_format(lookalike) == "pickle"


def test_sniff_recognises_a_mindspore_ckpt_by_its_first_record(tmp_path: Path) -> None:
    from cascade_rcnn.io.mindspore_ckpt import write_mindspore_ckpt

    ckpt = tmp_path / "weights.bin"
    write_mindspore_ckpt(ckpt, {"conv.weight": np.ones((2, 3), np.float32)})
    assert sniff_checkpoint_format(ckpt) == "mindspore"  # by content, whatever the suffix
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:6])  # the first record's header cut short
    assert sniff_checkpoint_format(cut) == "unknown"
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x0a\x10" + bytes(32))  # a protobuf-like start that is no checkpoint record
    assert sniff_checkpoint_format(other) == "unknown"


def test_sniff_names_a_cut_safetensors_file_safetensors(tmp_path: Path) -> None:
    """A download cut inside the header is still sent to the safetensors reader, whose error says what is wrong."""
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:12])
    assert sniff_checkpoint_format(tmp_path / "cut.safetensors") == "safetensors"