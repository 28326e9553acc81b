"""Barlow Twins (Zbontar et al. 2021): redundancy reduction between two views, as
facebookresearch/barlowtwins.

Each view goes through the backbone and the projector on its own (BatchNorm statistics per
view, as the reference's two forward passes): ``Linear - BN - ReLU`` twice, then a
``Linear``; :class:`~pathflow.train.losses.barlow_loss.BarlowTwinsLoss` normalises each
projection dimension over the (global) batch and pushes the cross-correlation matrix of the
two views to the identity (``lambda = 5e-3`` on the off-diagonal). The backbone is the result.

**Projector width** (``proj_dims``, ``"H1-H2-OUT"`` as the reference's ``--projector``):
``auto`` is ``4 x embed_dim`` per layer, at most 8192, i.e. the reference's
``8192-8192-8192`` for a ResNet-50 (2048-d), ``1536-1536-1536`` for a ViT-S (384-d): the
loss sums ``D`` diagonal and ``D^2`` off-diagonal terms, and a 8192-d projector on a 384-d
backbone costs 150M parameters and a 256 MB ``D x D`` matrix for little gain. Give the
widths explicitly to change it (e.g. ``--barlowtwins.proj-dims 8192-8192-8192``).

**Views**: ``byol`` (BYOL's asymmetric pair: blur 1.0 / 0.1, solarisation 0 / 0.2), the
reference's ``Transform``.

**Optimiser**: LARS as the reference (``--optimizer lars``, momentum 0.9, eta 0.001; biases and
norm parameters without trust ratio or weight decay), weight decay 1.5e-6 (the paper's), lr
0.2 x batch / 256 after a 10-epoch warmup. The reference gives biases and BatchNorm
parameters their own lr (0.0048); here every group follows the one lr (0.2).

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> cfg = TrainConfig(method="barlowtwins", steps=10).resolve()
    >>> cfg.views, cfg.optimizer, cfg.lr, cfg.options.lambd
    ('byol', 'lars', 0.2, 0.005)
    >>> cfg.options.projector_dims(2048), cfg.options.projector_dims(384)
    ([8192, 8192, 8192], [1536, 1536, 1536])
    >>> net, dim = create_backbone("test_vit", img_size=32)  # doctest: +SKIP
    >>> barlow = create_method("barlowtwins", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    >>> barlow(views, step=0)["loss"].backward()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.heads.mlp import MLPHead
from pathflow.train.losses.barlow_loss import BarlowTwinsLoss
from pathflow.train.methods.base import MethodConfig, MultiCropEncoder, SSLMethod
from pathflow.train.methods.registry import register_method
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan


@dataclass
class BarlowTwinsConfig(MethodConfig):
    """Barlow Twins' options (YAML section ``barlowtwins:``, flags ``--barlowtwins.NAME``)."""

    recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "lars",
        "lr": 0.2,
        "weight_decay": 1.5e-6,
        "weight_decay_end": 1.5e-6,
        "warmup_epochs": 10.0,
        "drop_path_rate": 0.0,
        "clip_grad": 0.0,
    }

    proj_dims: str = field(
        default="auto",
        metadata=_h(
            "projector widths H1-H2-...-OUT (reference 8192-8192-8192); auto: 4 x the "
            "backbone width per layer, at most 8192"
        ),
    )
    lambd: float = field(default=5e-3, metadata=_h("weight of the off-diagonal terms"))

    def validate(self) -> None:
        if self.lambd < 0:
            raise ConfigError(f"barlowtwins lambd must be >= 0, got {self.lambd}")
        self.projector_dims(1)

    def projector_dims(self, embed_dim: int) -> list[int]:
        """The projector's layer widths for a backbone of ``embed_dim`` features."""
        if self.proj_dims == "auto":
            return [min(8192, 4 * embed_dim)] * 3
        try:
            dims = [int(d) for d in self.proj_dims.split("-")]
        except ValueError:
            dims = []
        if not dims or min(dims) < 1 or len(set(dims[:-1])) > 1:
            raise ConfigError(
                "barlowtwins proj_dims must be auto or widths like 8192-8192-8192 (the "
                f"hidden ones equal), got {self.proj_dims!r}"
            )
        return dims


@register_method("barlowtwins")
class BarlowTwins(SSLMethod):
    """Backbone + projector (``encoder``) and the Barlow Twins loss."""

    views_preset = "byol"
    export_prefix = "encoder.backbone."
    config_class = BarlowTwinsConfig

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: BarlowTwinsConfig,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        dims = opts.projector_dims(embed_dim)
        hidden = dims[0] if len(dims) > 1 else dims[-1]
        head = MLPHead(embed_dim, hidden, dims[-1], num_layers=len(dims))
        self.encoder = MultiCropEncoder(backbone, head, channels_last)
        self.loss = BarlowTwinsLoss(opts.lambd)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"Barlow Twins needs 2 views per image, got {len(views)}")
        z1 = self.encoder(views[:1])  # one view per pass: per-view BatchNorm statistics
        z2 = self.encoder(views[1:2])
        c = self.loss.cross_correlation(z1, z2)
        with torch.no_grad():
            on_diag = torch.diagonal(c).mean()
        return {"loss": self.loss.loss_from_correlation(c), "corr_diag": on_diag}

    def backbone_for_export(self) -> nn.Module:
        return self.encoder.backbone
