"""SwAV loss (Caron et al. 2020): swapped prediction of Sinkhorn-Knopp cluster codes, as
facebookresearch/swav's ``main_swav.py``.

``scores`` are the prototype scores of every crop, ``[n_crops * B, K]`` (cosines of the
l2-normalised projections with the l2-normalised prototypes), crops stacked in order. For each
crop ``a`` used for assignment (the 2 global crops), the codes ``q_a`` come from
:func:`sinkhorn_knopp` on its scores (no gradient), preceded by the scores of the queued past
projections when a queue is given (their codes are computed and dropped). Each other crop
``v`` predicts them::

    loss = mean_a  mean_{v != a}  mean_b  - sum_k q_a[b, k] log softmax(scores_v[b] / T)_k

with the temperature ``T = 0.1``.

**Sinkhorn-Knopp** (``distributed_sinkhorn``): ``Q = exp(scores / epsilon)^T`` (``[K, B]``,
``epsilon = 0.05``) is divided by its total; then, ``iterations`` (3) times, each prototype's
row is divided by its sum and by ``K`` (rows sum to ``1 / K``), and each sample's column by
its sum and by ``B`` (columns sum to ``1 / B``); finally ``Q * B`` is returned transposed,
``[B, K]``. Under ``torch.distributed`` the total and the row sums are all-reduced, so
``B`` is the global batch (plus the global queue) and the codes are those of one process on
the concatenated batch. Exact marginals of the result: every sample's code sums to 1 (the last
operation is the column normalisation); each prototype's total over the global batch is
``B / K`` only in the limit of many iterations (after 3, approximately).

Example:
    >>> import torch, torch.nn.functional as F
    >>> from pathflow.train.losses.swav_loss import SwAVLoss, sinkhorn_knopp
    >>> scores = F.normalize(torch.randn(6, 4), dim=1) @ F.normalize(torch.randn(5, 4), dim=1).T
    >>> q = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    >>> q.shape, torch.allclose(q.sum(1), torch.ones(6))
    (torch.Size([6, 5]), True)
    >>> loss, codes = SwAVLoss()(torch.randn(4 * 3, 5), batch=3)  # 4 crops of 3 images
    >>> loss.ndim, codes.shape  # codes of the 2 assignment crops
    (0, torch.Size([2, 3, 5]))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathflow.train.distributed import all_reduce_sum, get_world_size


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Equipartitioned soft assignments ``[B_local, K]`` of the rows of ``scores``
    (``[B_local, K]``) to the ``K`` prototypes, over the global batch (see the module
    docstring). In float32 (float64 scores stay float64); no gradient."""
    dtype = torch.promote_types(scores.dtype, torch.float32)  # float32, or float64 if given
    q = torch.exp(scores.detach().to(dtype) / epsilon).T  # [K, B]
    k = q.shape[0]
    b = q.shape[1] * get_world_size()
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.T


class SwAVLoss(nn.Module):
    """Args:
    temperature: of the softmax over the prototype scores of the predicting crops (0.1).
    epsilon: Sinkhorn-Knopp entropic regularisation (0.05).
    sinkhorn_iterations: (3).
    crops_for_assign: indices of the crops whose codes are predicted (the 2 global crops).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        crops_for_assign: Sequence[int] = (0, 1),
    ) -> None:
        super().__init__()
        if temperature <= 0 or epsilon <= 0:
            raise ValueError(f"temperature and epsilon must be > 0, got {temperature}, {epsilon}")
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.crops_for_assign = tuple(crops_for_assign)

    def forward(
        self, scores: Tensor, batch: int, queue_scores: Sequence[Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """``scores``: ``[n_crops * batch, K]``; ``queue_scores``: for each assignment crop,
        the scores of its queued projections (``[L, K]``) or None. Returns the scalar loss and
        the codes ``[len(crops_for_assign), batch, K]``."""
        n_crops = scores.shape[0] // batch
        if n_crops < 2 or n_crops * batch != scores.shape[0]:
            raise ValueError(f"scores of {scores.shape[0]} rows are not >= 2 crops of {batch}")
        with torch.autocast(device_type=scores.device.type, enabled=False):
            log_p = F.log_softmax(scores.float() / self.temperature, dim=1).chunk(n_crops)
            total = scores.new_zeros((), dtype=torch.float32)
            codes = []
            for i, crop in enumerate(self.crops_for_assign):
                out = scores[crop * batch : (crop + 1) * batch].detach().float()
                if queue_scores is not None:
                    out = torch.cat([queue_scores[i].detach().float(), out])
                q = sinkhorn_knopp(out, self.epsilon, self.sinkhorn_iterations)[-batch:]
                codes.append(q)
                sub = sum(
                    -torch.sum(q * log_p[v], dim=1).mean() for v in range(n_crops) if v != crop
                )
                total = total + sub / (n_crops - 1)
        return total / len(self.crops_for_assign), torch.stack(codes)


__all__ = ["SwAVLoss", "sinkhorn_knopp"]
