"""SwAV's projection head and prototypes (facebookresearch/swav ``src/resnet50.py``).

``SwAVHead``: ``Linear(in, 2048) - BN - ReLU - Linear(2048, 128)`` then l2 normalisation of
each row (the reference's ``normalize=True``); the BatchNorm uses the global batch under
``torch.distributed`` (:class:`~pathflow.train.heads.GlobalBatchNorm1d`, the reference's
SyncBatchNorm). ``Prototypes``: ``K`` (3000) prototype vectors, a ``Linear`` without bias
whose rows are kept l2-normalised (:meth:`Prototypes.normalize_` after each optimiser step),
so its outputs are cosine similarities.

Example:
    >>> import torch
    >>> from pathflow.train.heads.swav_head import Prototypes, SwAVHead
    >>> z = SwAVHead(64, hidden_dim=32, out_dim=16)(torch.randn(4, 64))
    >>> z.shape, bool(torch.allclose(z.norm(dim=1), torch.ones(4)))
    (torch.Size([4, 16]), True)
    >>> protos = Prototypes(16, 10)
    >>> bool(protos(z).abs().max() <= 1 + 1e-6)  # cosines
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathflow.train.heads.mlp import MLPHead


class SwAVHead(nn.Module):
    """Two-layer projector (BatchNorm + ReLU in the hidden layer) and l2 normalisation."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> None:
        super().__init__()
        self.mlp = MLPHead(in_dim, hidden_dim, out_dim, num_layers=2)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=1)


class Prototypes(nn.Module):
    """``n_prototypes`` vectors of ``dim`` (rows of ``weight``), l2-normalised at creation."""

    def __init__(self, dim: int, n_prototypes: int = 3000) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, n_prototypes, bias=False)
        self.normalize_()

    @property
    def weight(self) -> Tensor:
        return self.layer.weight

    @torch.no_grad()
    def normalize_(self) -> None:
        """Rescale each prototype to unit l2 norm, in place."""
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))

    def forward(self, z: Tensor) -> Tensor:
        return self.layer(z)


__all__ = ["Prototypes", "SwAVHead"]
