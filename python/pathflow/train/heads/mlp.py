"""Projector and predictor MLPs of BYOL, SimSiam and MoCo v2 (and the methods built on them).

``MLPHead(in_dim, hidden_dim, out_dim, num_layers)`` is ``num_layers`` linear layers with
BatchNorm + ReLU after all but the last::

    BYOL projector    MLPHead(dim, 4096, 256, 2)                  (Grill et al. 2020)
    BYOL predictor    MLPHead(256, 4096, 256, 2)
    SimSiam projector MLPHead(dim, 2048, 2048, 3, bn_last=True)   (facebookresearch/simsiam)
    SimSiam predictor MLPHead(2048, 512, 2048, 2)
    MoCo v2 neck      MLPHead(dim, dim, 128, 2, batch_norm=False) (facebookresearch/moco --mlp)
    MoCo v3 projector MLPHead(dim, 4096, 256, 3, bn_last=True)    (facebookresearch/moco-v3)
    MoCo v3 predictor MLPHead(256, 4096, 256, 2, last_bias=False)

Linear layers followed by a BatchNorm have no bias (it would be cancelled by the mean
subtraction); ``bn_last`` adds SimSiam's BatchNorm without affine parameters after the last
layer. The BatchNorms are :class:`~pathflow.train.heads.GlobalBatchNorm1d`: statistics of the
batch gathered from all ranks under ``torch.distributed`` (BYOL's cross-replica BN, SimSiam's
SyncBN), also on gloo.

Example:
    >>> import torch
    >>> from pathflow.train.heads import MLPHead
    >>> MLPHead(64, 128, 32, num_layers=3, bn_last=True)(torch.randn(8, 64)).shape
    torch.Size([8, 32])
    >>> [type(m).__name__ for m in MLPHead(64, 64, 16, batch_norm=False).layers]
    ['Linear', 'ReLU', 'Linear']
"""

from __future__ import annotations

from torch import Tensor, nn

from pathflow.train.heads.projection_head import GlobalBatchNorm1d


class MLPHead(nn.Module):
    """``num_layers`` linear layers (``in_dim -> hidden_dim ... -> out_dim``) with
    BatchNorm (``batch_norm``) and ReLU between them; ``bn_last``: a BatchNorm without
    affine parameters after the last layer (SimSiam's projector); ``last_bias=False``: no
    bias on the last layer either (MoCo v3's predictor)."""

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        num_layers: int = 2,
        batch_norm: bool = True,
        bn_last: bool = False,
        last_bias: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            last = i == num_layers - 1
            norm_after = batch_norm and not last
            layers.append(
                nn.Linear(
                    dims[i],
                    dims[i + 1],
                    bias=not (norm_after or (last and (bn_last or not last_bias))),
                )
            )
            if norm_after:
                layers.append(GlobalBatchNorm1d(dims[i + 1]))
            if not last:
                layers.append(nn.ReLU(inplace=True))
        if bn_last:
            layers.append(GlobalBatchNorm1d(out_dim, affine=False))
        self.layers = nn.Sequential(*layers)
        self.in_dim, self.out_dim = in_dim, out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)
