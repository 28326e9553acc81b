"""BYOL (Grill et al. 2020): an online network predicts the projection of the other view by
a target network, the exponential moving average of the online one.

Online: backbone + projector (``dim -> 4096 -> 256``, BatchNorm + ReLU in the hidden layer)
(``online``), then the predictor (``256 -> 4096 -> 256``). Target (``target``): a copy of
``online`` updated after each step with ``target <- m target + (1 - m) online``, ``m`` from
0.996 to 1 on a cosine. Loss (:class:`~pathflow.train.losses.BYOLLoss`), symmetrised over
the two views, averaged over the batch::

    loss = (2 - 2 cos(p1, sg(z2'))) + (2 - 2 cos(p2, sg(z1')))

Each view goes through the networks in its own forward pass (BatchNorm statistics per view,
as the reference). The online backbone is the result.

Recipe (the paper's): LARS (momentum 0.9, trust coefficient 0.001; biases and norm
parameters without adaptation nor decay), lr 0.2 x batch / 256 on a cosine after a 10-epoch
warmup (10% of the run with ``--steps``), weight decay 1.5e-6.

Subclasses (e.g. CluBYOL) reuse :meth:`BYOL.project`, :meth:`BYOL.project_target`,
``predictor`` and :meth:`BYOL.invariance_loss` and add their own terms in ``forward``; the
``momentum_schedule`` option makes the EMA constant.

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("test_vit")  # doctest: +SKIP
    >>> cfg = TrainConfig(method="byol", steps=10).resolve()
    >>> cfg.options.proj_dim, cfg.options.momentum, cfg.views, cfg.optimizer
    (256, 0.996, 'byol', 'lars')
    >>> byol = create_method("byol", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    >>> byol(views, step=0)["loss"].backward()  # doctest: +SKIP
    >>> byol.after_step(0)  # EMA update of the target  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.ema import EMA, EMA_SCHEDULES, ema_copy
from pathflow.train.heads import MLPHead
from pathflow.train.losses import BYOLLoss
from pathflow.train.methods.base import MethodConfig, MultiCropEncoder, SSLMethod
from pathflow.train.methods.registry import register_method
from pathflow.train.monitors import embedding_std
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan


@dataclass
class BYOLConfig(MethodConfig):
    """BYOL's options (YAML section ``byol:``, flags ``--byol.NAME``)."""

    recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "lars",
        "lr": 0.2,
        "weight_decay": 1.5e-6,
        "weight_decay_end": 1.5e-6,
        "warmup_epochs": 10.0,
        "drop_path_rate": 0.0,
        "clip_grad": 0.0,
    }

    proj_hidden_dim: int = field(default=4096, metadata=_h("projector hidden width"))
    proj_dim: int = field(default=256, metadata=_h("projector output dimension"))
    pred_hidden_dim: int = field(default=4096, metadata=_h("predictor hidden width"))
    momentum: float = field(default=0.996, metadata=_h("target EMA momentum at step 0"))
    momentum_schedule: str = field(
        default="cosine", metadata=_h("target EMA momentum: cosine (to 1) or constant")
    )

    def validate(self) -> None:
        for name in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"byol {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.momentum <= 1:
            raise ConfigError(f"byol momentum must be in [0, 1], got {self.momentum}")
        if self.momentum_schedule not in EMA_SCHEDULES:
            raise ConfigError(
                f"byol momentum_schedule must be one of {', '.join(EMA_SCHEDULES)}, "
                f"got {self.momentum_schedule!r}"
            )


@register_method("byol")
class BYOL(SSLMethod):
    """Online encoder (``online``: backbone + ``projector``), ``predictor``, EMA ``target``
    and the symmetrised ``2 - 2 cos`` loss (:meth:`invariance_loss`)."""

    views_preset = "byol"
    export_prefix = "online.backbone."
    config_class = BYOLConfig

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: BYOLConfig,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        projector = MLPHead(embed_dim, opts.proj_hidden_dim, opts.proj_dim, 2)
        self.online = MultiCropEncoder(backbone, projector, channels_last)
        self.predictor = MLPHead(opts.proj_dim, opts.pred_hidden_dim, opts.proj_dim, 2)
        self.target = ema_copy(self.online)  # same initial weights
        self.criterion = BYOLLoss()
        self.ema = EMA(opts.momentum, plan.total_steps, opts.momentum_schedule)

    @property
    def projector(self) -> nn.Module:
        """The online projector (``online.head``)."""
        return self.online.head

    def _two_views(self, views: list[Tensor]) -> None:
        if len(views) < 2:
            raise ValueError(f"{type(self).__name__} needs 2 views per image, got {len(views)}")

    def project(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Online projections ``z1``, ``z2`` of the first two views (one pass per view)."""
        self._two_views(views)
        return self.online([views[0]]), self.online([views[1]])

    @torch.no_grad()
    def project_target(self, views: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Target projections ``z1'``, ``z2'`` of the first two views (no gradient)."""
        self._two_views(views)
        return self.target([views[0]]), self.target([views[1]])

    def invariance_loss(self, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
        """``(2 - 2 cos(p1, sg(t2))) + (2 - 2 cos(p2, sg(t1)))``, averaged over the batch."""
        return self.criterion(p1, p2, t1, t2)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        z1, z2 = self.project(views)
        t1, t2 = self.project_target(views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return {
            "loss": self.invariance_loss(p1, p2, t1, t2),
            "momentum": torch.tensor(self.momentum(step), dtype=torch.float64),
            "z_std": embedding_std(z1),
        }

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update of the target with this step's momentum."""
        self.ema.update(self.target, self.online, step)

    def momentum(self, step: int) -> float:
        return self.ema.momentum(step)

    def backbone_for_export(self) -> nn.Module:
        return self.online.backbone
