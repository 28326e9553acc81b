"""Per-step schedules (learning rate, weight decay, teacher momentum, teacher temperature).

Each function returns a NumPy array with one value per optimisation step, as
facebookresearch/dino's ``cosine_scheduler``: a linear warmup from ``start_warmup_value`` to
``base_value`` over ``warmup_steps`` steps (``np.linspace``, both ends included), then a half
cosine from ``base_value`` to ``final_value`` over the remaining steps (the last value is one
step short of ``final_value``, as in dino).

Example:
    >>> from pathflow.train.schedules import cosine_schedule
    >>> cosine_schedule(1.0, 0.0, total_steps=4).round(3).tolist()
    [1.0, 0.854, 0.5, 0.146]
    >>> cosine_schedule(1.0, 0.0, total_steps=4, warmup_steps=2).round(3).tolist()
    [0.0, 1.0, 1.0, 0.5]
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def cosine_schedule(
    base_value: float,
    final_value: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup_value: float = 0.0,
) -> npt.NDArray[np.float64]:
    """Linear warmup then cosine decay, ``total_steps`` values (dino's ``cosine_scheduler``
    with ``epochs * niter_per_ep`` = ``total_steps``)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    warmup = np.linspace(start_warmup_value, base_value, warmup_steps)
    iters = np.arange(total_steps - warmup_steps)
    decay = final_value + 0.5 * (base_value - final_value) * (
        1 + np.cos(np.pi * iters / max(len(iters), 1))
    )
    out = np.concatenate((warmup, decay)).astype(np.float64)
    assert len(out) == total_steps
    return out


def warmup_constant_schedule(
    start_value: float, value: float, total_steps: int, warmup_steps: int
) -> npt.NDArray[np.float64]:
    """Linear ramp ``start_value -> value`` over ``warmup_steps`` (both included), then
    constant: DINO's teacher temperature (0.04 -> 0.07)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup_steps = max(0, min(int(warmup_steps), total_steps))
    return np.concatenate(
        (
            np.linspace(start_value, value, warmup_steps),
            np.full(total_steps - warmup_steps, value, dtype=np.float64),
        )
    ).astype(np.float64)


__all__ = ["cosine_schedule", "warmup_constant_schedule"]
