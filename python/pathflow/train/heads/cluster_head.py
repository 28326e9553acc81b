"""CluSiam / CluBYOL's cluster head (wwyi1828/CluSiam ``models/cluster_projector.py``): a
cluster projector ``Linear + BatchNorm + ReLU`` on the (online) projector output and an
assigner ``Linear(hidden_dim, K)`` giving the cluster logits. The reference's widths: CluSiam
``Linear(2048, 512)`` (its predictor's hidden width), CluBYOL ``Linear(256, 256)``; K = 100.

The BatchNorm is :class:`~pathflow.train.heads.GlobalBatchNorm1d` (statistics of the batch
gathered from all ranks under ``torch.distributed``; a plain ``BatchNorm1d`` otherwise).

Example:
    >>> import torch
    >>> from pathflow.train.heads.cluster_head import ClusterHead
    >>> head = ClusterHead(64, hidden_dim=32, num_clusters=10)
    >>> head(torch.randn(8, 64)).shape
    torch.Size([8, 10])
"""

from __future__ import annotations

from torch import Tensor, nn

from pathflow.train.heads.projection_head import GlobalBatchNorm1d


class ClusterHead(nn.Module):
    """``projector`` (Linear + BN + ReLU) then ``assigner`` (Linear to ``num_clusters``
    logits)."""

    def __init__(self, in_dim: int, hidden_dim: int = 512, num_clusters: int = 100) -> None:
        super().__init__()
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}")
        self.projector = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), GlobalBatchNorm1d(hidden_dim), nn.ReLU(inplace=True)
        )
        self.assigner = nn.Linear(hidden_dim, num_clusters)
        self.num_clusters = num_clusters

    def forward(self, x: Tensor) -> Tensor:
        return self.assigner(self.projector(x))
