"""SimCLR (Chen et al. 2020): two views of each image, backbone + 2048-2048-128 projector
(:class:`~pathflow.train.heads.SimCLRProjectionHead`), NT-Xent with ``2N - 2`` negatives
(gathered from all ranks under DDP). The backbone is the result.

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("resnet18")  # doctest: +SKIP
    >>> cfg = TrainConfig(method="simclr", steps=10).resolve()
    >>> simclr = create_method("simclr", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)]
    >>> simclr(views, step=0)["loss"]  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from pathflow.train.backbones import is_cnn
from pathflow.train.heads import SimCLRProjectionHead
from pathflow.train.losses import NTXentLoss
from pathflow.train.methods.base import MultiCropEncoder, SSLMethod
from pathflow.train.methods.registry import register_method

if TYPE_CHECKING:
    from pathflow.train.config import TrainConfig


@register_method("simclr")
class SimCLR(SSLMethod):
    """Backbone + projector (``encoder``) and the NT-Xent loss."""

    views_preset = "simclr"
    export_prefix = "encoder.backbone."

    def __init__(self, backbone: nn.Module, embed_dim: int, cfg: TrainConfig) -> None:
        super().__init__()
        channels_last = cfg.channels_last if cfg.channels_last is not None else is_cnn(backbone)
        head = SimCLRProjectionHead(embed_dim, cfg.proj_hidden_dim, cfg.proj_dim)
        self.encoder = MultiCropEncoder(backbone, head, channels_last)
        self.loss = NTXentLoss(cfg.temperature)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"SimCLR needs 2 views per image, got {len(views)}")
        z_a, z_b = self.encoder(views[:2]).chunk(2)
        return {"loss": self.loss(z_a, z_b)}

    def backbone_for_export(self) -> nn.Module:
        return self.encoder.backbone
