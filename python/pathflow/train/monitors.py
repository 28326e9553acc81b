"""Collapse monitors of self-supervised training, computed on one batch of embeddings.

* :func:`embedding_std`: the mean over dimensions of the per-dimension standard deviation
  (unbiased, over the batch) of the L2-normalised embeddings, as SimSiam monitors collapse:
  0 when every embedding is the same, about ``1 / sqrt(d)`` for well spread ``d``-d ones;
* :func:`effective_rank`: RankMe (Garrido et al. 2023), the exponential of the Shannon
  entropy of the singular values of the ``[N, d]`` embedding matrix normalised to sum to 1
  (plus ``eps = 1e-7``; no centring): 1 for collapsed embeddings, up to ``min(N, d)``;
* :func:`cluster_usage`: entropy of how often each of ``k`` clusters (prototypes) is chosen,
  and how many are chosen at all: ``log k`` and ``k`` for uniform use, 0 and 1 for a single
  cluster.

All run without gradients in float32 (inputs in bf16 are cast) and return 0-d tensors on the
input's device, so a method can return them with its loss (the trainer logs every scalar
tensor of the outputs) without a device sync.

Example:
    >>> import torch
    >>> from pathflow.train.monitors import cluster_usage, effective_rank, embedding_std
    >>> z = torch.eye(4)
    >>> float(embedding_std(z)), round(float(effective_rank(z)), 4)  # 1 / sqrt(4), 4
    (0.5, 4.0)
    >>> entropy, used = cluster_usage(torch.tensor([0, 0, 0]), k=8)
    >>> float(entropy), int(used)
    (0.0, 1)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: RankMe's epsilon for float32.
RANKME_EPS = 1e-7


@torch.no_grad()
def embedding_std(z: Tensor) -> Tensor:
    """Mean over the ``d`` dimensions of the batch standard deviation (unbiased; biased for a
    batch of one) of the L2-normalised rows of ``z`` ``[N, d]``."""
    z = F.normalize(z.detach().float().flatten(1), dim=1)
    return z.std(dim=0, correction=1 if z.shape[0] > 1 else 0).mean()


@torch.no_grad()
def effective_rank(z: Tensor, eps: float = RANKME_EPS) -> Tensor:
    """RankMe of ``z`` ``[N, d]``: ``exp(-sum p log p)`` with ``p = s / sum(s) + eps``, ``s``
    the singular values of ``z`` (not centred). A zero matrix gives 1; a matrix with a
    non-finite value gives NaN."""
    z = z.detach().float().flatten(1)
    finite = torch.isfinite(z).all()  # NaN/inf (a diverged step): NaN, without a host sync
    s = torch.linalg.svdvals(torch.where(finite, z, torch.zeros_like(z)))
    p = s / s.sum().clamp_min(torch.finfo(torch.float32).tiny) + eps
    rank = torch.exp(-(p * torch.log(p)).sum())
    return torch.where(finite, rank, torch.full_like(rank, float("nan")))


@torch.no_grad()
def cluster_usage(assign: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(entropy in nats of the usage distribution, number of clusters used) of ``k``
    clusters. ``assign``: the cluster index of each sample ``[N]`` (integers), or scores /
    probabilities ``[N, k]`` whose argmax is the sample's cluster."""
    if assign.ndim == 2:
        assign = assign.detach().float().argmax(dim=1)
    counts = torch.bincount(assign.detach().flatten().long(), minlength=k)[:k].float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = torch.special.entr(p).sum() + 0.0  # -p log p, 0 at p = 0; + 0.0: no -0.0
    return entropy, (counts > 0).sum()


__all__ = ["RANKME_EPS", "cluster_usage", "effective_rank", "embedding_std"]
