"""LARS (You et al. 2017) as the self-supervised references train with it.

SGD with momentum whose update of each parameter ``w`` is rescaled by a trust ratio, as
facebookresearch/barlowtwins' ``LARS`` (and SimCLR's / BYOL's TensorFlow ``LARSOptimizer``)::

    d   = g + wd * w                                  weight decay added to the gradient
    q   = eta * ||w|| / ||d||   (1 if ||w|| or ||d|| is 0)
    mu  = momentum * mu + q * d                       mu starts at 0
    w  -= lr * mu

The norm in the ratio's denominator is the norm of the decayed gradient ``||g + wd w||``
(the references), not the paper's ``||g|| + wd ||w||``. Parameter groups flagged
``lars_exclude`` (biases and norm layers: the no-decay group of
:func:`~pathflow.train.methods.base.split_decay_groups`) get neither the adaptation nor weight
decay, i.e. plain SGD with momentum, as BYOL and Barlow Twins exclude them.

Example:
    >>> import torch
    >>> from pathflow.train.optim import LARS
    >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    >>> opt = LARS([w], lr=1.0, momentum=0.9, eta=0.001)
    >>> w.grad = torch.tensor([0.0, 1.0])                  # ||g|| = 1: q = 0.005
    >>> opt.step()
    >>> w.detach().tolist()
    [3.0, 3.994999885559082]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling over SGD with momentum (see the module docstring).

    Args:
        params: parameters or parameter groups; a group with ``lars_exclude: True`` is
            updated by plain SGD with momentum (no trust ratio, no weight decay).
        lr: learning rate (the trainer sets it every step).
        momentum: momentum of the update buffer (0.9 in the references).
        weight_decay: L2 penalty added to the gradient before the trust ratio.
        eta: trust coefficient (0.001 in Barlow Twins and BYOL).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(
                f"LARS: invalid lr {lr}, momentum {momentum}, weight_decay {weight_decay} "
                f"or eta {eta}"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars_exclude": False,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            if not params:
                continue
            if group["lars_exclude"]:
                updates = grads
            else:
                wd = float(group["weight_decay"])
                updates = (
                    list(torch._foreach_add(grads, params, alpha=wd))
                    if wd
                    else [g.clone() for g in grads]
                )
                w_norm = torch.stack(torch._foreach_norm(params))
                d_norm = torch.stack(torch._foreach_norm(updates))
                trust = torch.where(
                    (w_norm > 0) & (d_norm > 0),
                    group["eta"] * w_norm / d_norm,
                    torch.ones_like(w_norm),
                )
                torch._foreach_mul_(updates, list(trust.unbind()))
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, updates)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


__all__ = ["LARS"]
