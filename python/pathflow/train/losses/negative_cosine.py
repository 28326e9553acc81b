"""Cosine-similarity losses of the non-contrastive siamese methods (no negatives).

SimSiam (Chen & He 2021, facebookresearch/simsiam), with ``D(p, z) = -mean_b cos(p_b, z_b)``
and the stop-gradient ``sg`` on the projections::

    loss = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2                          in [-1, 1]

BYOL (Grill et al. 2020): the squared distance of the l2-normalised prediction of one view
and the (stop-gradient) target projection of the other, ``||p^ - z^||^2 = 2 - 2 cos(p, z)``,
summed over the two directions and averaged over the batch::

    loss = mean_b [ (2 - 2 cos(p1_b, sg(z2'_b))) + (2 - 2 cos(p2_b, sg(z1'_b))) ]   in [0, 8]

Both compute in float32 (safe under bf16 autocast) and return a scalar.

Example:
    >>> import torch
    >>> from pathflow.train.losses import BYOLLoss, NegativeCosineLoss
    >>> p = torch.randn(4, 8)
    >>> round(float(NegativeCosineLoss()(p, p, -p, -p)), 4)  # opposite directions
    1.0
    >>> round(float(BYOLLoss()(p, p, -p, -p)), 4)
    8.0
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def cosine_rows(p: Tensor, z: Tensor) -> Tensor:
    """Cosine similarity of each row of ``p`` with the same row of ``z`` (no gradient
    through ``z``), in float32; shape ``[N]``."""
    return F.cosine_similarity(p.float(), z.detach().float(), dim=-1)


class NegativeCosineLoss(nn.Module):
    """SimSiam's symmetrised negative cosine: ``D(p1, z2) / 2 + D(p2, z1) / 2``."""

    def forward(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        return -(cosine_rows(p1, z2).mean() + cosine_rows(p2, z1).mean()) / 2


class BYOLLoss(nn.Module):
    """BYOL's symmetrised ``2 - 2 cos`` between online predictions ``p1``, ``p2`` and
    target projections ``t1``, ``t2`` (view 1's prediction against view 2's target and
    vice versa)."""

    def forward(self, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
        return (2 - 2 * cosine_rows(p1, t2)).mean() + (2 - 2 * cosine_rows(p2, t1)).mean()


__all__ = ["BYOLLoss", "NegativeCosineLoss", "cosine_rows"]
