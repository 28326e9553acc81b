"""CluSiam / CluBYOL's cluster term (Wu et al., ICCV 2023, "Improving Representation Learning
for Histopathologic Images with Cluster Constraints"; reference code wwyi1828/CluSiam,
``utils.final_cluster_similarity``).

The rows of both views are stacked (``[2N, .]``, as the reference concatenates view 1 and
view 2) and, with ``Z`` the L2-normalised, *detached* projector outputs and ``a`` the
assigner logits::

    S = softmax((a + g) / tau)           g ~ Gumbel(0, 1), fresh every call, tau = 1
    H = onehot(argmax S) - sg(S) + S     straight-through hard assignment (value: one-hot)
    n_k = sum_b H[b, k]                  cluster sizes
    C_k = normalise(H[:, k]^T Z / max(n_k, 1))
    loss = mean_{j < k, n_j > 0, n_k > 0} cos(C_j, C_k)        in [-1, 1]

so only the assignments carry the gradient (through ``S`` into the assigner and the layers
below it); ``Z`` is a constant. Minimising the loss pushes the centroids of the clusters in
use apart. Dividing by ``n_k`` before the normalisation does not change ``C_k`` nor its
gradient (``normalise(x / c) = normalise(x)`` for ``c > 0``); it is kept as in the reference.

Differences from the reference, both on measure-zero or degenerate cases: the pairs are
those of distinct non-empty clusters (the reference keeps the non-zero entries of the upper
triangle of the cosine matrix, which drops empty clusters and, in addition, pairs whose
cosine is exactly 0); with fewer than two clusters in use the loss is ``1`` (the
reference's ``nan_to_num(mean([]), 1)``), without gradient.

Monitors (as the reference's log lines): the number of clusters in use without the Gumbel
noise (distinct ``argmax a``) and with it (distinct ``argmax S`` of this call's ``S``).
Everything is computed in float32 (safe under bf16 autocast). Under DDP the term is computed
on each rank's local batch (the reference trains on one GPU).

Example:
    >>> import torch
    >>> from pathflow.train.losses.cluster_loss import ClusterLoss
    >>> z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    >>> logits = torch.tensor([[9.0, 0.0], [9.0, 0.0], [0.0, 9.0]])
    >>> out = ClusterLoss()(z, logits, noise=torch.zeros(3, 2))
    >>> round(float(out.loss), 4), int(out.clusters_used), int(out.clusters_used_gumbel)
    (0.0, 2, 2)
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ClusterTerm(NamedTuple):
    """The cluster loss and its monitors (scalar float tensors, the monitors detached)."""

    loss: Tensor
    clusters_used: Tensor
    clusters_used_gumbel: Tensor


def sample_gumbel(
    shape: torch.Size, device: torch.device, generator: torch.Generator | None = None
) -> Tensor:
    """Standard Gumbel noise ``-log(E)``, ``E ~ Exp(1)`` (as ``F.gumbel_softmax``), float32."""
    e = torch.empty(shape, device=device, dtype=torch.float32).exponential_(generator=generator)
    return -e.log()


def hard_assignments(soft: Tensor) -> Tensor:
    """Straight-through one-hot of the row-wise argmax of ``soft``: the value is the one-hot,
    the gradient that of ``soft``."""
    index = soft.argmax(dim=-1, keepdim=True)
    onehot = torch.zeros_like(soft).scatter_(-1, index, 1.0)
    return onehot - soft.detach() + soft


def count_clusters(logits: Tensor) -> Tensor:
    """Number of distinct row-wise argmax indices of ``logits`` (a float scalar, computed on
    the device without a host sync)."""
    onehot = F.one_hot(logits.detach().argmax(dim=-1), logits.shape[-1])
    return onehot.amax(dim=0).sum().float()


class ClusterLoss(nn.Module):
    """Mean pairwise cosine of the cluster centroids of a Gumbel-softmax hard assignment.

    Args:
        tau: Gumbel-softmax temperature (the reference's default 1).
        eps: epsilon of the L2 normalisations (the reference's ``--eps`` 1e-8).
        generator: optional RNG of the Gumbel noise, on the logits' device (default:
            torch's global RNG, which the trainer checkpoints, so a resumed run is exact).
    """

    def __init__(
        self, tau: float = 1.0, eps: float = 1e-8, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if tau <= 0:
            raise ValueError(f"Gumbel-softmax temperature must be > 0, got {tau}")
        self.tau, self.eps, self.generator = tau, eps, generator

    def forward(self, z: Tensor, logits: Tensor, noise: Tensor | None = None) -> ClusterTerm:
        """``z``: ``[B, D]`` projector outputs (detached here), ``logits``: ``[B, K]``
        assigner outputs, ``noise``: ``[B, K]`` Gumbel noise to use instead of a fresh draw
        (tests)."""
        if z.shape[0] != logits.shape[0]:
            raise ValueError(f"z has {z.shape[0]} rows, logits {logits.shape[0]}")
        logits = logits.float()
        if noise is None:
            noise = sample_gumbel(logits.shape, logits.device, self.generator)
        soft = F.softmax((logits + noise.float()) / self.tau, dim=-1)
        hard = hard_assignments(soft)
        reps = F.normalize(z.detach().float(), dim=-1, eps=self.eps)
        counts = hard.sum(dim=0)
        centroids = hard.T @ reps / counts.clamp_min(1.0).unsqueeze(1)
        centroids = F.normalize(centroids, dim=-1, eps=self.eps)
        # mean over the pairs of distinct non-empty clusters, as masks (no host sync)
        used = (counts.detach() > 0.5).float()
        pairs = torch.triu(torch.outer(used, used), diagonal=1)
        n_pairs = pairs.sum()
        mean_cos = ((centroids @ centroids.T) * pairs).sum() / n_pairs.clamp_min(1.0)
        loss = torch.where(n_pairs > 0, mean_cos, 1.0 + 0.0 * mean_cos)
        return ClusterTerm(
            loss=loss,
            clusters_used=count_clusters(logits),
            clusters_used_gumbel=count_clusters(soft),
        )


__all__ = ["ClusterLoss", "ClusterTerm", "count_clusters", "hard_assignments", "sample_gumbel"]
