"""Barlow Twins loss (Zbontar et al. 2021), as facebookresearch/barlowtwins.

The projections ``z1``, ``z2`` of the two views (``[N, D]``, ``N`` the global batch) are
normalised per dimension over the batch (a BatchNorm without affine parameters: mean 0,
biased variance 1, ``eps = 1e-5``), then::

    C    = bn(z1)^T bn(z2) / N                       [D, D] cross-correlation
    loss = sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2         lambda = 5e-3

Under ``torch.distributed`` the normalisation uses the statistics of the global batch and each
rank's ``bn(z1_r)^T bn(z2_r) / N`` is summed over the ranks with an all-reduce, as the
reference does (its SyncBatchNorm + ``all_reduce(c)``). Here both reductions are
differentiable (the backward all-reduces the gradients), so DDP's gradient averaging gives
exactly the gradient of one process on the concatenated batch (the reference's plain
``all_reduce`` gives 1 / world_size of it). Computed in float32 with autocast off.

Example:
    >>> import torch
    >>> from pathflow.train.losses.barlow_loss import BarlowTwinsLoss
    >>> z = torch.randn(16, 8)
    >>> loss = BarlowTwinsLoss(lambd=5e-3)
    >>> bool(loss(z, z) < loss(z, torch.randn(16, 8)))  # identical views: C_ii = 1
    True
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pathflow.train.distributed import get_world_size, is_dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (each rank's input
    contributes to every rank's output)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Differentiable sum over ranks (identity without a process group)."""
    if not is_dist():
        return x
    out: Tensor = _AllReduceSum.apply(x)
    return out


def batch_standardize(z: Tensor, eps: float = 1e-5) -> Tensor:
    """``BatchNorm1d(affine=False)`` in training mode over the global batch: each column minus
    its mean, divided by ``sqrt(biased variance + eps)``; the mean and variance are those of
    the rows of every rank."""
    n = z.new_tensor(float(z.shape[0] * get_world_size()))
    mean = all_reduce_with_grad(z.sum(0)) / n
    centred = z - mean
    var = all_reduce_with_grad(centred.pow(2).sum(0)) / n
    return centred / torch.sqrt(var + eps)


def off_diagonal(c: Tensor) -> Tensor:
    """The off-diagonal entries of a square matrix, flattened (as the reference)."""
    n, m = c.shape
    assert n == m, c.shape
    return c.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


class BarlowTwinsLoss(nn.Module):
    """Args:
    lambd: weight of the off-diagonal (redundancy reduction) term, 5e-3 (the reference
        code's default is 0.0051).
    eps: the BatchNorm epsilon of the per-dimension normalisation.
    """

    def __init__(self, lambd: float = 5e-3, eps: float = 1e-5) -> None:
        super().__init__()
        if lambd < 0:
            raise ValueError(f"lambd must be >= 0, got {lambd}")
        self.lambd = lambd
        self.eps = eps

    def cross_correlation(self, z1: Tensor, z2: Tensor) -> Tensor:
        """``C = bn(z1)^T bn(z2) / N`` over the global batch ``N`` (``[D, D]``, identical on
        every rank)."""
        with torch.autocast(device_type=z1.device.type, enabled=False):
            a = batch_standardize(z1.float(), self.eps)
            b = batch_standardize(z2.float(), self.eps)
            n = z1.shape[0] * get_world_size()
            return all_reduce_with_grad(a.T @ b / n)

    def loss_from_correlation(self, c: Tensor) -> Tensor:
        on_diag = (torch.diagonal(c) - 1).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        return on_diag + self.lambd * off_diag

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        """``z1``, ``z2``: ``[N_local, D]`` projections of the two views (rows pair up)."""
        return self.loss_from_correlation(self.cross_correlation(z1, z2))


__all__ = ["BarlowTwinsLoss", "all_reduce_with_grad", "batch_standardize", "off_diagonal"]
