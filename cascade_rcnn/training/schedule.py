"""Optimiser and learning-rate schedule: SGD with momentum and weight decay, linear warm-up, step decay.

The schedule is a function of the iteration only (`lr_factor`), wrapped in a `LambdaLR` stepped once per iteration, so
its state is one integer and a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

# Module types whose parameters are a normalisation's affine (detectron2's `get_default_optimizer_params` list, plus
# the frozen batch norm that a backbone with trainable affine may keep).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    FrozenBatchNorm2d,
)


def lr_factor(
    iteration: int,
    warmup_iters: int,
    warmup_factor: float,
    step_iters: Sequence[int],
    gamma: float,
    warmup_end: str = "last_iter",
) -> float:
    """Multiplier of the base lr at `iteration` (0-based, the iteration about to run).

    Linear warm-up from `warmup_factor` at iteration 0 to 1, over the first `warmup_iters` iterations:
      - warmup_end "last_iter": 1 at iteration warmup_iters - 1 (mmengine `LinearLR(begin=0, end=warmup_iters)`,
        whose ramp has end - begin - 1 steps: factor = f + (1 - f) * i / (warmup_iters - 1));
      - warmup_end "after": 1 at iteration warmup_iters (detectron2: factor = f + (1 - f) * i / warmup_iters).
    Step decay: times gamma for every step in `step_iters` that `iteration` has reached. The two multiply, as the
    chained mmengine schedulers and detectron2's `WarmupParamScheduler` do.
    """
    factor = gamma ** sum(iteration >= s for s in step_iters)
    if iteration < warmup_iters:
        ramp = warmup_iters - 1 if warmup_end == "last_iter" else warmup_iters
        alpha = iteration / ramp if ramp > 0 else 0.0
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


@dataclass(frozen=True)
class ParameterGroups:
    """Which trained parameters get which weight decay (names, for the recipe report)."""

    decayed: list[str]
    norm: list[str]  # norm-layer affine parameters (their own weight decay)
    frozen: list[str]  # requires_grad=False: not given to the optimiser


def split_parameters(model: nn.Module) -> ParameterGroups:
    """The model's parameters by weight-decay group: norm-layer affine parameters (`NORM_TYPES`, or any module type
    whose name contains "Norm"), the other trained ones, and the frozen ones."""
    decayed, norm, frozen = [], [], []
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower()
        for name, param in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if not param.requires_grad:
                frozen.append(full)
            elif is_norm:
                norm.append(full)
            else:
                decayed.append(full)
    return ParameterGroups(decayed, norm, frozen)


def build_optimizer(
    model: nn.Module, lr: float, momentum: float, weight_decay: float, weight_decay_norm: float | None = None
) -> torch.optim.SGD:
    """SGD over the trainable parameters (frozen backbone stages and frozen batch norm have none).

    Weight decay on all of them, biases and norm affine included, as mmdetection's default optimiser wrapper (its
    cascade configs have no paramwise_cfg); with `weight_decay_norm` set, norm-layer affine parameters get that
    instead, in a second parameter group (detectron2's WEIGHT_DECAY_NORM).
    """
    groups = split_parameters(model)
    params = dict(model.named_parameters())
    if weight_decay_norm is None or weight_decay_norm == weight_decay or not groups.norm:
        trained = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(trained, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.SGD(
        [{"params": [params[n] for n in groups.decayed], "weight_decay": weight_decay},
         {"params": [params[n] for n in groups.norm], "weight_decay": weight_decay_norm}],
        lr=lr, momentum=momentum, weight_decay=weight_decay,
    )  # fmt: skip


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_iters: int,
    warmup_factor: float,
    step_iters: Sequence[int],
    gamma: float,
    warmup_end: str = "last_iter",
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration `LambdaLR` of `lr_factor`; its state_dict holds plain numbers only (the function is rebuilt
    from the config on resume, not saved)."""
    steps = tuple(int(s) for s in step_iters)

    def factor(iteration: int) -> float:
        return lr_factor(iteration, warmup_iters, warmup_factor, steps, gamma, warmup_end)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
