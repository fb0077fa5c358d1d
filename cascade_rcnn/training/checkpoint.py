"""Training checkpoints: everything a run needs to continue bit for bit, written atomically, the last K kept.

A checkpoint is a `torch.save` of plain data only (tensors, numbers, strings, lists, dicts), so it is read back with
`torch.load(weights_only=True)`: no code from the file ever runs. It holds

- `model`, `optimizer`, `scheduler`, `scaler`: the state_dicts (the model's without a DDP wrapper);
- `iteration` (optimiser steps done), `epoch` and `epoch_iteration` (batches of that epoch consumed): the data order
  position, since the batch order is a function of (seed, epoch);
- `rng`: the python, numpy, torch (and CUDA) generator states and the data loader's generator state;
- `experiment`: the run's config as JSON, `world_size`, and `best` (the best evaluation so far).

Files are `checkpoints/iter_<iteration:08d>.pt` in the run's output folder. Each is written to a temporary file in the
same folder, flushed to disk, then renamed over the final name (`os.replace` is atomic on POSIX and Windows), so a
run killed at any moment leaves either the previous set of checkpoints or the new one, never a truncated file.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cascade_rcnn.errors import CheckpointError

FORMAT = "cascade_rcnn_train"
VERSION = 1
_NAME = re.compile(r"iter_(\d{8})\.pt")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_path(output_dir: str | Path, iteration: int) -> Path:
    return checkpoint_dir(output_dir) / f"iter_{iteration:08d}.pt"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The run's training checkpoints, oldest first (by iteration)."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(path: str | Path) -> Path:
    """A checkpoint file as is, or the latest checkpoint of a run's output folder.

    Raises:
        CheckpointError: nothing to resume from there.
    """
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None and path.name == "checkpoints":
            latest = latest_checkpoint(path.parent)
        if latest is not None:
            return latest
        raise CheckpointError(f"{path}: no training checkpoints (checkpoints/iter_*.pt) to resume from")
    raise CheckpointError(f"{path}: no such checkpoint file or output folder")


def save_atomic(state: dict[str, Any], path: str | Path) -> Path:
    """`torch.save(state)` to `path` through a temporary file in the same folder, fsync, then `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on Windows.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def prune_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; returns the deleted paths."""
    found = list_checkpoints(output_dir)
    removed = found[: max(len(found) - keep, 0)]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def load_training_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint with `torch.load(weights_only=True)` and check its format.

    Raises:
        CheckpointError: unreadable, or not a training checkpoint of this project.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any failure of the reader is a bad file to the user
        raise CheckpointError(f"{path}: not a readable training checkpoint ({str(error)[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a training checkpoint of this project (to start from model weights, use --weights)"
        )
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: training checkpoint version {state.get('version')}, expected {VERSION}")
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Random generator states, as plain data


def capture_rng_states(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """The states of every random generator the process uses, as tensors and plain values."""
    version, mt_state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    if loader_generator is not None:
        states["loader"] = loader_generator.get_state()
    return states


def restore_rng_states(states: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Put back what `capture_rng_states` saved."""
    py = states["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = states["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        cuda_states = states["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    if loader_generator is not None and "loader" in states:
        loader_generator.set_state(states["loader"])
