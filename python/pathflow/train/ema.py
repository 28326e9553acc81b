"""Exponential-moving-average targets (DINO's teacher, BYOL's target, MoCo's key encoder).

``target <- m * target + (1 - m) * online`` after each optimiser step, with ``m`` from a
per-step schedule: DINO and BYOL raise it from a base value to 1 on a half cosine
(``1 - (1 - base) * (cos(pi k / K) + 1) / 2``, as facebookresearch/dino's ``cosine_scheduler``
and BYOL's ``tau``), MoCo v2 (0.999) and CluBYOL (0.99) keep it constant.

Example:
    >>> import torch
    >>> from pathflow.train.ema import EMA, ema_copy
    >>> online = torch.nn.Linear(2, 2)
    >>> target = ema_copy(online)
    >>> ema = EMA(0.99, total_steps=10, schedule="constant")
    >>> ema.update(target, online, step=0)
    >>> ema.momentum(5)
    0.99
"""

from __future__ import annotations

import copy
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from pathflow.train.schedules import cosine_schedule

#: Values of ``schedule``.
EMA_SCHEDULES = ("cosine", "constant")


def disable_stochastic_layers(module: nn.Module) -> None:
    """Turn off dropout and stochastic depth (EMA targets have neither, as in dino/BYOL)."""
    from timm.layers import DropPath

    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
        elif isinstance(m, nn.Dropout):
            m.p = 0.0


M = TypeVar("M", bound=nn.Module)


def ema_copy(module: M) -> M:
    """A frozen deep copy of ``module`` (same initial weights; no gradients, no dropout or
    stochastic depth) to serve as an EMA target."""
    target = copy.deepcopy(module)
    disable_stochastic_layers(target)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class EMA:
    """The momentum schedule of an EMA target and its update.

    Args:
        base: momentum at step 0.
        total_steps: steps of the run (length of the schedule).
        schedule: ``"cosine"`` (base -> 1 on a half cosine) or ``"constant"``.
    """

    def __init__(self, base: float, total_steps: int, schedule: str = "cosine") -> None:
        if schedule not in EMA_SCHEDULES:
            raise ValueError(f"schedule must be one of {EMA_SCHEDULES}, got {schedule!r}")
        if not 0.0 <= base <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {base}")
        self.schedule: npt.NDArray[np.float64] = (
            cosine_schedule(base, 1.0, total_steps)
            if schedule == "cosine"
            else np.full(max(1, total_steps), base, dtype=np.float64)
        )

    def momentum(self, step: int) -> float:
        return float(self.schedule[min(max(step, 0), len(self.schedule) - 1)])

    @torch.no_grad()
    def update(self, target: nn.Module, online: nn.Module, step: int) -> None:
        """``target <- m * target + (1 - m) * online`` for every parameter (same order).
        Buffers (BatchNorm running statistics) are left to the target's own forward passes,
        as in dino and BYOL."""
        m = self.momentum(step)
        tp = [p.data for p in target.parameters()]
        op = [p.detach().data for p in online.parameters()]
        if len(tp) != len(op):
            raise ValueError(f"EMA target has {len(tp)} parameters, online model {len(op)}")
        torch._foreach_mul_(tp, m)
        torch._foreach_add_(tp, op, alpha=1.0 - m)


__all__ = ["EMA", "EMA_SCHEDULES", "disable_stochastic_layers", "ema_copy"]
