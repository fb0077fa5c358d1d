"""A checkpoint or weights write that fails half-way (a full disk) leaves the previous file intact and loadable."""

import errno

import pytest
import torch

from cascade_rcnn.io import weights as weights_module
from cascade_rcnn.config import get_preset
from cascade_rcnn.training import checkpoint as checkpoint_module


def full_disk_after(nbytes: int):
    """A stand-in writer that writes `nbytes` bytes, then fails as a full disk does."""

    def write(obj, f, *args, **kwargs):
        if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__"):
            f = open(f, "wb")
        f.write(b"\x00" * nbytes)
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    return write


def test_failed_training_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    state = {"model": {"w": torch.arange(10.0)}, "iteration": 7}
    checkpoint_module.save_atomic(state, path)
    before = path.read_bytes()

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk_after(100))
    with pytest.raises(OSError, match="No space left"):
        checkpoint_module.save_atomic({"model": {"w": torch.zeros(10)}, "iteration": 8}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no partial temporary file left behind
    loaded = torch.load(path, weights_only=True)
    assert loaded["iteration"] == 7 and torch.equal(loaded["model"]["w"], torch.arange(10.0))


def test_failed_weights_write_keeps_the_previous_file(tmp_path, monkeypatch):
    cfg = get_preset("cascade_rcnn_r50_fpn", num_classes=2)
    model = torch.nn.Linear(3, 2)
    path = weights_module.save_weights(model, cfg, tmp_path / "model.safetensors")
    before = path.read_bytes()

    def failing_save_file(tensors, filename, metadata=None):
        full_disk_after(64)(None, filename)

    monkeypatch.setattr(weights_module, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        weights_module.save_weights(torch.nn.Linear(3, 2), cfg, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    state_dict, metadata = weights_module.read_safetensors(path)
    assert torch.equal(state_dict["weight"], model.weight.detach())
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
