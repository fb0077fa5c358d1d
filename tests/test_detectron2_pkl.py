"""Tests of cascade_rcnn.io.detectron2_pkl: model-zoo layouts from Python 2 and 3, and refusal of anything else.

Each malicious payload is first shown to fire under a plain `pickle.load`, so that the refusal tests can fail.
"""

from __future__ import annotations

import _compat_pickle
import builtins
import hashlib
import json
import os
import pickle
import shlex
import struct
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from cascade_rcnn.errors import CheckpointError
from cascade_rcnn.io.detectron2_pkl import read_detectron2_pkl

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CASCADE_RCNN_SHARED", REPO_ROOT.parent / "shared"))
D2_REFERENCE = SHARED / "reference" / "detectron2"


def _model() -> OrderedDict[str, np.ndarray]:
    """Arrays as a model-zoo file holds them, plus the corner cases numpy pickles differently."""
    rng = np.random.default_rng(0)
    return OrderedDict(
        [
            ("backbone.bottom_up.stem.conv1.weight", rng.standard_normal((8, 3, 7, 7)).astype(np.float32)),
            ("backbone.bottom_up.stem.conv1.norm.running_var", rng.random(8).astype(np.float32) + 0.5),
            ("roi_heads.box_predictor.0.cls_score.bias", -rng.random(81).astype(np.float32)),  # bytes >= 0x80
            ("float64", rng.standard_normal((2, 3))),
            ("fortran_order", np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32))),
            ("int64", np.arange(5, dtype=np.int64)),
            ("scalar_array", np.array(3.5, dtype=np.float32)),
        ]
    )


def _assert_same_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.mark.parametrize("protocol", [2, 4])
def test_model_zoo_layout(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "model_final_abcdef.pkl"
    checkpoint = {"model": _model(), "__author__": "Detectron2 Model Zoo", "matching_heuristics": True}
    with open(path, "wb") as f:
        pickle.dump(checkpoint, f, protocol=protocol)
    model, info = read_detectron2_pkl(path)
    _assert_same_arrays(model, _model())
    assert info == {"__author__": "Detectron2 Model Zoo", "matching_heuristics": True}


def _py2_str(data: bytes) -> bytes:
    """A Python 2 `str` as cPickle protocol 2 writes it (SHORT_BINSTRING / BINSTRING): raw bytes, no encoding."""
    return b"U" + bytes([len(data)]) + data if len(data) < 256 else b"T" + struct.pack("<i", len(data)) + data


def _py2_array(array: np.ndarray) -> bytes:
    """The opcodes Python 2's cPickle writes for a C-ordered numpy array (numpy 1.x paths, byte strings as `str`)."""
    shape = b"(" + b"".join(b"J" + struct.pack("<i", n) for n in array.shape) + b"t"
    dtype_state = b"(K\x03" + _py2_str(b"<") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    dtype = b"cnumpy\ndtype\n" + _py2_str(array.dtype.str[1:].encode()) + b"K\x00K\x01\x87R" + dtype_state
    return (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + _py2_str(b"b") + b"\x87R"
        + b"(K\x01" + shape + dtype + b"\x89" + _py2_str(np.ascontiguousarray(array).tobytes()) + b"tb"
    )


def test_python2_pickle_needs_latin1_and_reads(tmp_path: Path) -> None:
    # Caffe2-era zoo files came from Python 2: keys and raw array bytes are byte strings that Python 3 can only
    # decode as latin1 (the raw bytes include values >= 0x80, invalid as ASCII or UTF-8).
    model = {name: a for name, a in _model().items() if a.flags.c_contiguous and a.ndim > 0}
    entries = b"".join(_py2_str(name.encode()) + _py2_array(a) for name, a in model.items())
    data = (
        b"\x80\x02}(" + _py2_str(b"model") + b"}(" + entries + b"u"
        + _py2_str(b"__author__") + _py2_str(b"Detectron Model Zoo") + b"u."
    )
    path = tmp_path / "py2.pkl"
    path.write_bytes(data)
    # Premise: the default ASCII decoding fails on these bytes, so latin1 is what makes the read work.
    with pytest.raises(UnicodeDecodeError):
        pickle.loads(data)
    got, info = read_detectron2_pkl(path)
    _assert_same_arrays(got, model)
    assert info == {"__author__": "Detectron Model Zoo"}


class WritesOnSetstate:
    """A class whose unpickling has a side effect (it creates the file named in its state)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).touch()


class Payload:
    """Pickles as a call of `func(*args)`."""

    def __init__(self, func: object, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> tuple:
        return (self.func, self.args)


def _payloads(marker: Path) -> dict[str, tuple[object, str]]:
    """name -> (object whose unpickling creates `marker`, the global the reader must name when refusing it)."""
    quoted = shlex.quote(str(marker))
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (Payload(os.system, (f"touch {quoted}",)), f"{os.system.__module__}.system"),
        "builtins.eval": (Payload(builtins.eval, (touch,)), "builtins.eval"),
        "subprocess.Popen": (Payload(subprocess.Popen, (["touch", str(marker)],)), "subprocess.Popen"),
        "class": (WritesOnSetstate(marker), f"{WritesOnSetstate.__module__}.WritesOnSetstate"),
    }


def _as_pickled(qualified_name: str, protocol: int) -> str:
    """The `module.name` that pickle writes for a global: below protocol 3 it uses Python 2 names (fix_imports)."""
    module, name = qualified_name.rsplit(".", 1)
    if protocol < 3:
        if (module, name) in _compat_pickle.REVERSE_NAME_MAPPING:
            module, name = _compat_pickle.REVERSE_NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)
    return f"{module}.{name}"


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "subprocess.Popen", "class"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, kind: str, protocol: int) -> None:
    marker = tmp_path / "pwned"
    payload, refused = _payloads(marker)[kind]
    path = tmp_path / "model_final_evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": np.ones(2, np.float32)}, "__author__": payload}, f, protocol=protocol)

    # Control: a plain pickle.load runs the payload, so the assertions below can fail.
    with open(path, "rb") as f:
        result = pickle.load(f, encoding="latin1")
    if isinstance(result["__author__"], subprocess.Popen):
        result["__author__"].wait()
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CheckpointError) as excinfo:
        read_detectron2_pkl(path)
    message = str(excinfo.value)
    assert str(path) in message
    assert f"'{_as_pickled(refused, protocol)}'" in message
    assert not marker.exists()


def test_other_layouts_are_refused(tmp_path: Path) -> None:
    detectron1 = tmp_path / "detectron1.pkl"
    detectron1.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.ones(2)}}, protocol=2))
    with pytest.raises(CheckpointError, match=r"expected a dict with 'model'.*blobs"):
        read_detectron2_pkl(detectron1)

    not_arrays = tmp_path / "lists.pkl"
    not_arrays.write_bytes(pickle.dumps({"model": {"w": [1.0, 2.0]}}, protocol=4))
    with pytest.raises(CheckpointError, match="'w' is a list"):
        read_detectron2_pkl(not_arrays)

    objects = tmp_path / "objects.pkl"
    objects.write_bytes(pickle.dumps({"model": {"w": np.array([1, "a"], dtype=object)}}, protocol=4))
    with pytest.raises(CheckpointError, match="not a numeric array"):
        read_detectron2_pkl(objects)

    torch_file = tmp_path / "model.pth"
    torch.save({"model": {"w": torch.ones(2)}}, torch_file)
    with pytest.raises(CheckpointError, match="model.pth"):
        read_detectron2_pkl(torch_file)

    with pytest.raises(CheckpointError, match="no such file"):
        read_detectron2_pkl(tmp_path / "missing.pkl")


@pytest.mark.skipif(not D2_REFERENCE.is_dir(), reason=f"detectron2 reference folder absent: {D2_REFERENCE}")
def test_reference_checkpoint(tmp_path: Path) -> None:
    """The shared reference `.pkl` (rebuilt by its own script) reads with every key, shape, dtype and value."""
    out = tmp_path / "reference.pkl"
    subprocess.run(
        [sys.executable, str(D2_REFERENCE / "make_checkpoint.py"), str(out), "--matching-heuristics"],
        check=True, capture_output=True, timeout=120,
    )
    model, info = read_detectron2_pkl(out)
    assert info == {"__author__": "Detectron2 Model Zoo", "matching_heuristics": True}

    # checkpoint_keys.txt: `name<TAB>(shape)<TAB>torch.<dtype>` per tensor, in state_dict order.
    expected = [line.split("\t") for line in (D2_REFERENCE / "checkpoint_keys.txt").read_text().splitlines() if line]
    got = [[name, str(tuple(a.shape)), f"torch.{a.dtype}"] for name, a in model.items()]
    assert got == expected
    # The recipe's checksum over every tensor's bytes, in state_dict order, pins the values.
    sha256 = hashlib.sha256()
    for array in model.values():
        sha256.update(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    recipe = json.loads((D2_REFERENCE / "recipe.json").read_text())
    assert sha256.hexdigest() == recipe["state_dict_sha256"]
