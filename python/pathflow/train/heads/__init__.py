"""Projection heads put on top of a backbone during self-supervised training (not exported).

Example:
    >>> from pathflow.train.heads import DINOHead, SimCLRProjectionHead
    >>> DINOHead(192, out_dim=256).last_layer.weight_g.requires_grad
    False
"""

from __future__ import annotations

from pathflow.train.heads.dino_head import DINOHead, WeightNormLinear
from pathflow.train.heads.mlp import MLPHead
from pathflow.train.heads.projection_head import GlobalBatchNorm1d, SimCLRProjectionHead

__all__ = ["DINOHead", "GlobalBatchNorm1d", "MLPHead", "SimCLRProjectionHead", "WeightNormLinear"]
