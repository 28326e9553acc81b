"""DINO projection head (Caron et al. 2021, facebookresearch/dino ``DINOHead``).

MLP ``in_dim -> 2048 -> 2048 -> 256`` with GELU, l2-normalisation of the 256-d bottleneck,
then a weight-normalised linear layer to ``out_dim`` (65536) prototypes. With
``norm_last_layer=True`` the weight-norm gain ``weight_g`` is fixed to 1, so the logits are
cosine similarities. Parameter names (``mlp.*``, ``last_layer.weight_g``,
``last_layer.weight_v``) are those of the official checkpoints.

Example:
    >>> import torch
    >>> from pathflow.train.heads import DINOHead
    >>> head = DINOHead(384, out_dim=1024)
    >>> head(torch.randn(4, 384)).shape
    torch.Size([4, 1024])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer ``W = g * v / ||v||`` with one gain per output row, as
    ``torch.nn.utils.weight_norm(nn.Linear(...), dim=0)`` (same parameter names)."""

    def __init__(self, in_features: int, out_features: int, fix_gain: bool = True) -> None:
        super().__init__()
        v = torch.empty(out_features, in_features)
        nn.init.kaiming_uniform_(v, a=5**0.5)  # nn.Linear's default initialisation
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=not fix_gain)

    def weight(self) -> Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """``mlp`` (nlayers Linear+GELU, optional BatchNorm) -> l2-normalise -> ``last_layer``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp: nn.Module
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_gain=norm_last_layer)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
