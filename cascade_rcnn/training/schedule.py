"""Optimiser and learning-rate schedule: SGD with momentum and weight decay, linear warm-up, step decay.

The schedule is a function of the iteration only (`lr_factor`), wrapped in a `LambdaLR` stepped once per iteration, so
its state is one integer and a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def lr_factor(
    iteration: int, warmup_iters: int, warmup_factor: float, step_iters: Sequence[int], gamma: float
) -> float:
    """Multiplier of the base lr at `iteration` (0-based, the iteration about to run).

    Linear warm-up (mmdetection `LinearLR`): warmup_factor at iteration 0, rising linearly to 1 at `warmup_iters`.
    Step decay: times gamma for every step in `step_iters` that `iteration` has reached.
    """
    factor = gamma ** sum(iteration >= s for s in step_iters)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor


def build_optimizer(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    """SGD over the trainable parameters (frozen backbone stages and frozen batch norm have none), weight decay on
    all of them, biases included, as mmdetection's default optimiser wrapper."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_iters: int,
    warmup_factor: float,
    step_iters: Sequence[int],
    gamma: float,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration `LambdaLR` of `lr_factor`; its state_dict holds plain numbers only (the function is rebuilt
    from the config on resume, not saved)."""
    steps = tuple(int(s) for s in step_iters)

    def factor(iteration: int) -> float:
        return lr_factor(iteration, warmup_iters, warmup_factor, steps, gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
