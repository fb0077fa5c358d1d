"""Distributed training helpers: process-group set-up from torchrun's environment, and the few collectives the
trainer needs.

`torchrun --nproc_per_node N -m cascade_rcnn train ...` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `init_distributed` reads them and joins the group: NCCL when training on CUDA (one GPU per process,
`cuda:LOCAL_RANK`), Gloo on CPU. Without those variables (or with WORLD_SIZE=1) everything here is a no-op, so the
single-process path runs the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes checkpoints and runs the COCO evaluation."""
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that torchrun describes in the environment (or none when WORLD_SIZE is 1).

    Returns the process's rank information; an already initialised group (tests, notebooks) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)),
                        dist.get_backend())  # fmt: skip
    world_size = env_world_size()
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, backend)


def shutdown_distributed(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def collective_device(info: DistInfo, device: torch.device) -> torch.device:
    """Where collective tensors must live: the GPU for NCCL, the CPU for Gloo."""
    return device if info.backend == "nccl" else torch.device("cpu")


def any_flags(flags: list[bool], info: DistInfo, device: torch.device) -> list[bool]:
    """For each flag, whether any process raised it (one all-reduce); the flags themselves without a group."""
    if not info.enabled:
        return list(flags)
    tensor = torch.tensor([float(f) for f in flags], device=collective_device(info, device))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(v) for v in tensor.tolist()]


def mean_over_processes(values: dict[str, float], info: DistInfo, device: torch.device) -> dict[str, float]:
    """The mean of each value over all processes (for logging; keys must be the same on every process)."""
    if not info.enabled or not values:
        return dict(values)
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=collective_device(info, device))
    dist.all_reduce(tensor)
    return {k: v / info.world_size for k, v in zip(keys, tensor.tolist())}


def gather_to_main(obj: Any, info: DistInfo) -> list[Any] | None:
    """Every process's `obj` on rank 0 (in rank order), None elsewhere; `[obj]` without a group."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size if info.is_main else []
    dist.gather_object(obj, gathered if info.is_main else None, dst=0)
    return gathered if info.is_main else None


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
