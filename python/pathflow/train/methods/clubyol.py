"""CluBYOL (Wu et al., ICCV 2023, "Improving Representation Learning for Histopathologic
Images with Cluster Constraints"; reference code wwyi1828/CluSiam ``main_clubyol.py``): BYOL
plus a cluster term on the online projections.

:class:`~pathflow.train.methods.byol.BYOL` (``online`` = backbone + projector, ``predictor``,
EMA ``target``) gets a cluster head (:class:`~pathflow.train.heads.cluster_head.ClusterHead`)
on each view's online projection (one pass per view). With ``z`` the two views' online
projections stacked, ``a`` their assigner logits and ``t1``, ``t2`` the target projections::

    invariance = (1 - cos(p1, sg(t2))) + (1 - cos(p2, sg(t1)))                in [0, 4]
    cluster    = ClusterLoss(sg(z), a)   mean cosine of the cluster centroids, in [-1, 1]
    loss       = alpha * cluster + (1 - alpha) * invariance                   alpha = 0.9

The invariance term is the reference's ``2 - cos - cos``, half of BYOL's ``2 - 2 cos`` sum.
The target follows ``target <- m target + (1 - m) online`` with a constant ``m = 0.99`` (the
reference's ``momentum_update``; options ``momentum``, ``momentum_schedule``).

Differences from the reference: the projector is BYOL's (2 layers, ``dim -> 4096 -> 256``)
where the reference reuses SimSiam's 3-layer projector (output BatchNorm without affine) with
a 256-d output; the views are the symmetric ``simclr`` preset (the reference trains CluBYOL
on the same MoCo v2-style augmentation as CluSiam, not BYOL's asymmetric one).

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("test_vit")  # doctest: +SKIP
    >>> cfg = TrainConfig(method="clubyol", steps=10).resolve()
    >>> cfg.options.alpha, cfg.options.momentum, cfg.options.momentum_schedule, cfg.views
    (0.9, 0.99, 'constant', 'simclr')
    >>> clubyol = create_method("clubyol", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    >>> clubyol(views, step=0)["loss"].backward()  # doctest: +SKIP
    >>> clubyol.after_step(0)  # EMA update of the target  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pathflow.train.heads.cluster_head import ClusterHead
from pathflow.train.losses.cluster_loss import ClusterLoss
from pathflow.train.losses.negative_cosine import cosine_rows
from pathflow.train.methods.byol import BYOL, BYOLConfig
from pathflow.train.methods.clusiam import CLUSTER_HELP, ClusterOptions, cluster_logits
from pathflow.train.methods.registry import register_method
from pathflow.train.monitors import embedding_std
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan


@dataclass
class CluBYOLConfig(ClusterOptions, BYOLConfig):
    """CluBYOL's options (YAML section ``clubyol:``, flags ``--clubyol.NAME``): BYOL's (with
    the reference's constant 0.99 momentum) plus the cluster term's (:class:`ClusterOptions`,
    with the reference's alpha 0.9 and a 256-wide cluster projector)."""

    momentum: float = field(default=0.99, metadata=_h("target EMA momentum"))
    momentum_schedule: str = field(
        default="constant", metadata=_h("target EMA momentum: constant or cosine (to 1)")
    )
    alpha: float = field(default=0.9, metadata=_h(CLUSTER_HELP["alpha"]))
    cluster_hidden_dim: int = field(default=256, metadata=_h(CLUSTER_HELP["cluster_hidden_dim"]))


@register_method("clubyol")
class CluBYOL(BYOL):
    """BYOL + ``cluster_head`` and the cluster term (:class:`ClusterLoss`)."""

    views_preset = "simclr"
    config_class = CluBYOLConfig

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: CluBYOLConfig,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__(backbone, embed_dim, opts, plan, channels_last)
        self.cluster_head = ClusterHead(opts.proj_dim, opts.cluster_hidden_dim, opts.num_clusters)
        self.cluster_loss = ClusterLoss(tau=opts.gumbel_tau)
        self.alpha = opts.alpha

    def invariance_loss(self, p1: Tensor, p2: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
        """The reference's ``(1 - cos(p1, sg(t2))) + (1 - cos(p2, sg(t1)))``, averaged over
        the batch."""
        return 2.0 - cosine_rows(p1, t2).mean() - cosine_rows(p2, t1).mean()

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        z1, z2 = self.project(views)
        t1, t2 = self.project_target(views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        invariance = self.invariance_loss(p1, p2, t1, t2)
        term = self.cluster_loss(torch.cat([z1, z2]), cluster_logits(self.cluster_head, z1, z2))
        return {
            "loss": self.alpha * term.loss + (1.0 - self.alpha) * invariance,
            "cluster_loss": term.loss.detach(),
            "invariance_loss": invariance.detach(),
            "clusters_used": term.clusters_used,
            "clusters_used_gumbel": term.clusters_used_gumbel,
            "momentum": torch.tensor(self.momentum(step), dtype=torch.float64),
            "z_std": embedding_std(z1),
        }
