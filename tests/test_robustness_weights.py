"""Untrusted and damaged weights files, through `Detector.from_weights` and `cascade-rcnn predict --weights`.

The readers' own tests (test_torch_checkpoint.py, test_detectron2_pkl.py, test_mindspore_ckpt.py) feed them crafted
records directly; here the same kinds of files enter where a user hands them over, by the API and by the CLI, and the
contract is the user's: code in a pickle never runs (a marker file proves it, and each payload is first shown to run
under a plain unpickler, so the proof can fail), and a file that cannot be used gives one line naming it, with no
traceback.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shlex
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from cascade_rcnn.api import Detector
from cascade_rcnn.cli import main
from cascade_rcnn.config import config_to_dict
from cascade_rcnn.errors import CascadeRCNNError, CheckpointError
from cascade_rcnn.io.mindspore_ckpt import write_mindspore_ckpt
from cascade_rcnn.io.weights import FORMAT, save_weights
from tests.helpers import tiny_config

SMALL = {"transform.min_size": 64, "transform.max_size": 96, "fpn.out_channels": 32, "cascade.fc_dim": 64}


# --- payloads ---------------------------------------------------------------------------------------------------------


class ExecPayload:
    """Unpickles as `exec(...)` of code that creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class ShellPayload:
    """Unpickles as `os.system("touch <marker>")`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _torch_zip(payload: object, path: Path) -> None:
    torch.save({"state_dict": {"conv.weight": torch.ones(2, 2)}, "meta": {"note": payload}}, path)


def _torch_zip_top_level(payload: object, path: Path) -> None:
    torch.save(payload, path)


def _torch_legacy(payload: object, path: Path) -> None:
    torch.save({"state_dict": {"conv.weight": torch.ones(2, 2)}, "meta": payload}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip


def _plain_pickle(protocol: int) -> Callable[[object, Path], None]:
    def write(payload: object, path: Path) -> None:
        path.write_bytes(pickle.dumps({"model": {"conv1.weight": np.ones((2, 2), np.float32)}, "__author__": payload},
                                      protocol=protocol))  # fmt: skip

    return write


def _load_unsafely(path: Path) -> None:
    """What `torch.load(weights_only=False)` or `pickle.load` would do with the file: run the payload."""
    try:
        torch.load(path, weights_only=False)
    except Exception:  # noqa: BLE001 - not a torch file: a plain pickle
        with open(path, "rb") as f:
            pickle.load(f)


# name -> (file name, writer): the extension says nothing; the readers look at the content.
CONTAINERS: dict[str, tuple[str, Callable[[object, Path], None]]] = {
    "torch-zip-meta": ("epoch_12.pth", _torch_zip),
    "torch-zip-top-level": ("model.pth", _torch_zip_top_level),
    "torch-legacy": ("old_format.pth", _torch_legacy),
    "pickle-protocol-2": ("model_final.pkl", _plain_pickle(2)),
    "pickle-protocol-4": ("model_final_v4.pkl", _plain_pickle(4)),
    "pickle-named-safetensors": ("looks_safe.safetensors", _plain_pickle(4)),
    "pickle-named-ckpt": ("mindspore_like.ckpt", _plain_pickle(4)),
}
PAYLOADS = {"exec": ExecPayload, "os.system": ShellPayload}


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("image") / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def _predict(weights: Path, image: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["predict", "--weights", str(weights), str(image), "--out", str(out), "--device", "cpu"])
    return code, capsys.readouterr().err


def _assert_one_line_error_naming(err: str, path: Path) -> None:
    assert "Traceback" not in err and 'File "' not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], err


# --- code in pickles never runs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("payload_name", PAYLOADS)
@pytest.mark.parametrize("container", CONTAINERS)
def test_pickled_code_never_runs(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], container: str, payload_name: str
) -> None:
    marker = tmp_path / "code_ran"
    file_name, write = CONTAINERS[container]
    path = tmp_path / file_name
    write(PAYLOADS[payload_name](marker), path)

    # Control: an ordinary loader runs the payload, so the assertions below can fail.
    _load_unsafely(path)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(CascadeRCNNError) as excinfo:  # refused, or read without the payload and then not a model
        Detector.from_weights(path)
    assert str(path) in str(excinfo.value)
    assert not marker.exists()

    code, err = _predict(path, image, tmp_path / "out", capsys)
    assert code == 2
    _assert_one_line_error_naming(err, path)
    assert not marker.exists()


# --- damaged safetensors ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_project_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project weights file (our metadata, a real config) whose tensors are a few small ones: enough for every
    failure that happens before the tensors meet a model, at a fraction of a real file's size."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("small") / "small.safetensors"
    return save_weights(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 3)), tiny_config(3, **SMALL), path)


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize("cut", ["inside-length", "inside-header", "after-header", "inside-data", "last-byte"])
def test_truncated_safetensors(
    small_project_file: Path, tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], cut: str
) -> None:
    data = small_project_file.read_bytes()
    header_end = 8 + _header_length(small_project_file)
    keep = {"inside-length": 5, "inside-header": header_end // 2, "after-header": header_end,
            "inside-data": (header_end + len(data)) // 2, "last-byte": len(data) - 1}[cut]  # fmt: skip
    path = tmp_path / "downloaded.safetensors"
    path.write_bytes(data[:keep])

    with pytest.raises(CheckpointError, match=str(path)):
        Detector.from_weights(path)
    code, err = _predict(path, image, tmp_path / "out", capsys)
    assert code == 2
    _assert_one_line_error_naming(err, path)


def _write_with_metadata(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def _project_metadata(config_text: str) -> dict[str, str]:
    return {"format": FORMAT, "config": config_text, "class_names": "[]", "preset": ""}


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [
        ({"format": FORMAT}, "has no 'config' entry"),
        (_project_metadata('{"num_classes": 3,'), "not valid JSON"),
        (_project_metadata("[1, 2, 3]"), "expected a mapping"),
        (_project_metadata('{"num_classes": 3, "anchor_sizes": [32]}'), "unknown config key 'anchor_sizes'"),
        (_project_metadata('{"num_classes": "three"}'), "the metadata's 'config' does not fit"),
        (_project_metadata('{"backbone": {"depth": 34.5}}'), "the metadata's 'config' does not fit"),
        ({"format": "something-else"}, "missing"),  # not ours: taken as a bare state dict, which lacks the model
        ({}, "missing"),
    ],
    ids=["no-config", "config-not-json", "config-not-mapping", "unknown-key", "wrong-type", "wrong-nested-type",
         "foreign-format", "no-metadata"],
)
def test_safetensors_with_wrong_metadata(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], metadata: dict[str, str], fragment: str
) -> None:
    path = _write_with_metadata(tmp_path / "model.safetensors", {"conv.weight": torch.ones(2, 2)}, metadata)

    with pytest.raises(CheckpointError) as excinfo:
        Detector.from_weights(path)
    assert str(path) in str(excinfo.value) and fragment in str(excinfo.value), str(excinfo.value)
    code, err = _predict(path, image, tmp_path / "out", capsys)
    assert code == 2
    _assert_one_line_error_naming(err, path)
    assert fragment in err


def test_metadata_class_count_that_does_not_fit_the_tensors(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real model tensors for 3 classes under a config that says 7: the mismatch names the file and the tensor."""
    torch.manual_seed(0)
    detector = Detector(config=tiny_config(3, **SMALL))
    tensors = {k: v.contiguous() for k, v in detector.model.state_dict().items()}
    config = config_to_dict(tiny_config(7, **SMALL))
    path = _write_with_metadata(tmp_path / "relabelled.safetensors", tensors, _project_metadata(json.dumps(config)))

    with pytest.raises(CheckpointError, match=r"relabelled\.safetensors: tensor .*fc_cls.* shape"):
        Detector.from_weights(path)
    code, err = _predict(path, image, tmp_path / "out", capsys)
    assert code == 2
    _assert_one_line_error_naming(err, path)


def test_file_of_an_earlier_version_with_fpn_extra_level_loads(tmp_path: Path) -> None:
    """Weights saved before `FPNConfig.extra_level` was removed store `"fpn": {..., "extra_level": "maxpool"}`: the
    one legacy key is dropped on reading, and the detector is the one the file describes."""
    torch.manual_seed(0)
    detector = Detector(config=tiny_config(3, **SMALL))
    tensors = {k: v.contiguous() for k, v in detector.model.state_dict().items()}
    config = config_to_dict(detector.config)
    assert "extra_level" not in config["fpn"]
    config["fpn"]["extra_level"] = "maxpool"
    path = _write_with_metadata(tmp_path / "earlier.safetensors", tensors, _project_metadata(json.dumps(config)))

    loaded = Detector.from_weights(path)
    assert loaded.config == detector.config
    image = torch.rand(3, 80, 100, generator=torch.Generator().manual_seed(1)) * 255
    expected, got = detector.predict(image), loaded.predict(image)
    assert torch.equal(expected.boxes, got.boxes) and torch.equal(expected.scores, got.scores)


def test_legacy_key_with_a_value_it_never_had_is_still_unknown(tmp_path: Path) -> None:
    config = config_to_dict(tiny_config(3, **SMALL))
    config["fpn"]["extra_level"] = "conv"  # never a valid value: not an earlier version's file
    metadata = _project_metadata(json.dumps(config))
    path = _write_with_metadata(tmp_path / "odd.safetensors", {"w": torch.ones(1)}, metadata)
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: .*unknown config key 'fpn\.extra_level'"):
        Detector.from_weights(path)


def test_small_file_with_a_valid_project_header_but_other_tensors(small_project_file: Path) -> None:
    """The intact small file reads, then fails where its tensors meet the model: still named."""
    with pytest.raises(CheckpointError, match=f"{small_project_file}: checkpoint is missing"):
        Detector.from_weights(small_project_file)


# --- damaged MindSpore .ckpt ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A well-formed checkpoint of 24 small records, so that most cuts fall after the first record (the part the format
    sniffer reads) and reach the reader, as with a real checkpoint of hundreds of records cut short by a download."""
    path = tmp_path_factory.mktemp("ckpt") / "seed.ckpt"
    rng = np.random.default_rng(0)
    tensors = {f"backbone.layer1.{i}.conv1.weight": rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
               for i in range(23)}  # fmt: skip
    tensors["learning_rate"] = np.array(0.02, np.float32)
    write_mindspore_ckpt(path, tensors)
    return path.read_bytes()


@pytest.mark.parametrize("fraction", [0.01, 0.5, 0.97])
def test_truncated_ckpt(
    ckpt_bytes: bytes, tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], fraction: float
) -> None:
    path = tmp_path / "cascadercnn_ascend.ckpt"
    path.write_bytes(ckpt_bytes[: int(len(ckpt_bytes) * fraction)])

    with pytest.raises(CascadeRCNNError, match=str(path)):
        Detector.from_weights(path)
    code, err = _predict(path, image, tmp_path / "out", capsys)
    assert code == 2
    _assert_one_line_error_naming(err, path)


def test_intact_ckpt_of_another_model_is_named_too(
    ckpt_bytes: bytes, tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "not_cascade_rcnn.ckpt"
    path.write_bytes(ckpt_bytes)
    code, err = _predict(path, image, tmp_path / "out", capsys)
    assert code == 2
    _assert_one_line_error_naming(err, path)


# --- other files given as weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"", b"\x00" * 64, b"<html>404 Not Found</html>", b"PK\x03\x04 not really a zip", b"\xff" * 8 + b"{" + b"x" * 40],
    ids=["empty", "zeros", "html-error-page", "broken-zip", "absurd-header-length"],
)
def test_files_that_are_not_weights(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=str(path)):
        Detector.from_weights(path)
    code, err = _predict(path, image, tmp_path / "out", capsys)
    assert code == 2
    _assert_one_line_error_naming(err, path)
