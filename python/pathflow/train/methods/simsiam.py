"""SimSiam (Chen & He 2021): two views, one encoder, a predictor and a stop-gradient, as
facebookresearch/simsiam.

Each view goes through the online encoder (``online``: backbone + 3-layer projector
``dim -> 2048 -> 2048 -> 2048``, BatchNorm after every layer, the last one without affine
parameters) and the predictor (``2048 -> 512 -> 2048``, BatchNorm in the hidden layer); the
loss is the symmetrised negative cosine of each view's prediction with the other view's
projection, which gets no gradient (:class:`~pathflow.train.losses.NegativeCosineLoss`)::

    loss = -cos(p1, sg(z2)) / 2 - cos(p2, sg(z1)) / 2

As in the reference, each view is encoded in its own forward pass (BatchNorm statistics per
view), and the predictor trains at a fixed learning rate (the schedule's peak, ``fixed_lr``
in its parameter groups) while everything else follows the cosine schedule. The backbone is
the result. The logged ``z_std`` (standard deviation of the l2-normalised projections over the
batch, averaged over channels) falls towards 0 if the representation collapses; about
``1 / sqrt(proj_dim)`` is healthy.

Recipe (the paper's): SGD with momentum 0.9, lr 0.05 x batch / 256 on a cosine without
warmup, weight decay 1e-4 (not on biases and norm parameters).

Subclasses (e.g. CluSiam) reuse :meth:`SimSiam.project`, ``predictor`` and
:meth:`SimSiam.invariance_loss` and add their own terms in ``forward``.

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("test_vit")  # doctest: +SKIP
    >>> cfg = TrainConfig(method="simsiam", steps=10).resolve()
    >>> cfg.options.proj_dim, cfg.options.pred_hidden_dim, cfg.views, cfg.optimizer
    (2048, 512, 'simclr', 'sgd')
    >>> simsiam = create_method("simsiam", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    >>> simsiam(views, step=0)["loss"].backward()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.heads import MLPHead
from pathflow.train.losses import NegativeCosineLoss
from pathflow.train.methods.base import (
    MethodConfig,
    MultiCropEncoder,
    SSLMethod,
    split_decay_groups,
)
from pathflow.train.methods.registry import register_method
from pathflow.train.monitors import embedding_std
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan


@dataclass
class SimSiamConfig(MethodConfig):
    """SimSiam's options (YAML section ``simsiam:``, flags ``--simsiam.NAME``)."""

    recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd",
        "lr": 0.05,
        "weight_decay": 1e-4,
        "weight_decay_end": 1e-4,
        "warmup_epochs": 0.0,
        "drop_path_rate": 0.0,
        "clip_grad": 0.0,
    }

    proj_hidden_dim: int = field(default=2048, metadata=_h("projector hidden width"))
    proj_dim: int = field(default=2048, metadata=_h("projector output dimension"))
    proj_layers: int = field(default=3, metadata=_h("projector linear layers"))
    pred_hidden_dim: int = field(default=512, metadata=_h("predictor bottleneck width"))
    fix_pred_lr: bool = field(
        default=True, metadata=_h("train the predictor at the peak lr, not the schedule's")
    )

    def validate(self) -> None:
        for name in ("proj_hidden_dim", "proj_dim", "proj_layers", "pred_hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"simsiam {name} must be >= 1, got {getattr(self, name)}")


@register_method("simsiam")
class SimSiam(SSLMethod):
    """Online encoder (``online``: backbone + ``projector``), ``predictor`` and the
    symmetrised negative cosine (:meth:`invariance_loss`)."""

    views_preset = "simclr"
    export_prefix = "online.backbone."
    config_class = SimSiamConfig

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: SimSiamConfig,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        projector = MLPHead(
            embed_dim, opts.proj_hidden_dim, opts.proj_dim, opts.proj_layers, bn_last=True
        )
        self.online = MultiCropEncoder(backbone, projector, channels_last)
        self.predictor = MLPHead(opts.proj_dim, opts.pred_hidden_dim, opts.proj_dim, 2)
        self.criterion = NegativeCosineLoss()
        self.fix_pred_lr = opts.fix_pred_lr

    @property
    def projector(self) -> nn.Module:
        """The projector (``online.head``)."""
        return self.online.head

    def project(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Projections ``z1``, ``z2`` of the first two views, one forward pass per view."""
        if len(views) < 2:
            raise ValueError(f"{type(self).__name__} needs 2 views per image, got {len(views)}")
        return self.online([views[0]]), self.online([views[1]])

    def invariance_loss(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        """``-cos(p1, sg(z2)) / 2 - cos(p2, sg(z1)) / 2``, averaged over the batch."""
        return self.criterion(p1, p2, z1, z2)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        z1, z2 = self.project(views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return {"loss": self.invariance_loss(p1, p2, z1, z2), "z_std": embedding_std(z1)}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Decay / no-decay groups, each split again into the predictor's (``fixed_lr``
        with ``fix_pred_lr``) and the rest's; empty groups left out."""
        predictor = {id(p) for p in self.predictor.parameters()}
        groups: list[dict[str, Any]] = []
        for g in split_decay_groups(self, weight_decay):
            groups.append({**g, "params": [p for p in g["params"] if id(p) not in predictor]})
            groups.append(
                {
                    **g,
                    "params": [p for p in g["params"] if id(p) in predictor],
                    "fixed_lr": self.fix_pred_lr,
                }
            )
        return [g for g in groups if g["params"]]

    def backbone_for_export(self) -> nn.Module:
        return self.online.backbone
