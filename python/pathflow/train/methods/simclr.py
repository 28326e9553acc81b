"""SimCLR (Chen et al. 2020): two views of each image, backbone + 2048-2048-128 projector
(:class:`~pathflow.train.heads.SimCLRProjectionHead`), NT-Xent with ``2N - 2`` negatives
(gathered from all ranks under DDP). The backbone is the result.

Optimiser: the defaults are AdamW's, pathflow's default optimiser (lr 1e-3 x batch / 256,
weight decay 0.05, 10 warmup epochs, global-norm clipping off), not SimCLR's LARS recipe
(weight decay 1e-6, which with AdamW's decoupled decay means no regularisation at all); the
paper's is ``--optimizer lars --lr 0.3 --weight-decay 1e-6 --weight-decay-end 1e-6``.
Logged beside the loss: ``embed_std`` and ``eff_rank`` (:mod:`~pathflow.train.monitors`) of
the projections ``z`` of both views (this rank's), collapse monitors.

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("resnet18")  # doctest: +SKIP
    >>> cfg = TrainConfig(method="simclr", steps=10).resolve()
    >>> cfg.weight_decay, cfg.options.temperature
    (0.05, 0.1)
    >>> simclr = create_method("simclr", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)]
    >>> simclr(views, step=0)["loss"]  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.heads import SimCLRProjectionHead
from pathflow.train.losses import NTXentLoss
from pathflow.train.methods.base import MethodConfig, MultiCropEncoder, SSLMethod
from pathflow.train.methods.registry import register_method
from pathflow.train.monitors import effective_rank, embedding_std
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan


@dataclass
class SimCLRConfig(MethodConfig):
    """SimCLR's options (YAML section ``simclr:``, flags ``--simclr.NAME``)."""

    recipe: ClassVar[dict[str, Any]] = {
        "lr": 1e-3,
        "weight_decay": 0.05,
        "weight_decay_end": 0.05,
        "warmup_epochs": 10.0,
        "drop_path_rate": 0.0,
        "clip_grad": 0.0,
    }

    temperature: float = field(default=0.1, metadata=_h("NT-Xent temperature"))
    proj_hidden_dim: int = field(default=2048, metadata=_h("projector hidden width"))
    proj_dim: int = field(default=128, metadata=_h("projector output dimension"))

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"simclr temperature must be > 0, got {self.temperature}")


@register_method("simclr")
class SimCLR(SSLMethod):
    """Backbone + projector (``encoder``) and the NT-Xent loss."""

    views_preset = "simclr"
    export_prefix = "encoder.backbone."
    config_class = SimCLRConfig

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: SimCLRConfig,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        head = SimCLRProjectionHead(embed_dim, opts.proj_hidden_dim, opts.proj_dim)
        self.encoder = MultiCropEncoder(backbone, head, channels_last)
        self.loss = NTXentLoss(opts.temperature)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"SimCLR needs 2 views per image, got {len(views)}")
        z = self.encoder(views[:2])
        z_a, z_b = z.chunk(2)
        return {
            "loss": self.loss(z_a, z_b),
            "embed_std": embedding_std(z),  # collapse monitors of this rank's projections
            "eff_rank": effective_rank(z),
        }

    def backbone_for_export(self) -> nn.Module:
        return self.encoder.backbone
