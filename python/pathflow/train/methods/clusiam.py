"""CluSiam (Wu et al., ICCV 2023, "Improving Representation Learning for Histopathologic
Images with Cluster Constraints"; reference code wwyi1828/CluSiam ``main_clusiam.py``):
SimSiam plus a cluster term on the projections.

:class:`~pathflow.train.methods.simsiam.SimSiam` (``online`` = backbone + 3-layer projector,
``predictor``) gets a cluster head (:class:`~pathflow.train.heads.cluster_head.ClusterHead`:
``Linear + BN + ReLU`` then an assigner ``Linear(., K)``) on each view's projection (one
pass per view, BatchNorm statistics per view, as the reference). With ``z`` the two views'
projections stacked and ``a`` their assigner logits::

    invariance = -(cos(p1, sg(z2)) + cos(p2, sg(z1)))                         in [-2, 2]
    cluster    = ClusterLoss(sg(z), a)   mean cosine of the cluster centroids, in [-1, 1]
    loss       = alpha * cluster + (1 - alpha) * invariance                   alpha = 0.5

The invariance term is the reference's: the sum of the two directions, twice SimSiam's
halved loss. The cluster term's gradient reaches the assigner, the cluster projector and,
through the (non-detached) projections fed to the head, the projector and backbone; see
:mod:`pathflow.train.losses.cluster_loss`. Logged: both terms, the number of clusters in use
without and with the Gumbel noise, ``z_std``. As SimSiam, the predictor trains at a fixed
learning rate (the reference's ``fix_lr`` covers the predictor only).

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("test_vit")  # doctest: +SKIP
    >>> cfg = TrainConfig(method="clusiam", steps=10).resolve()
    >>> cfg.options.alpha, cfg.options.num_clusters, cfg.options.cluster_hidden_dim
    (0.5, 100, 512)
    >>> clusiam = create_method("clusiam", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    >>> clusiam(views, step=0)["loss"].backward()  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.heads.cluster_head import ClusterHead
from pathflow.train.losses.cluster_loss import ClusterLoss
from pathflow.train.losses.negative_cosine import cosine_rows
from pathflow.train.methods.base import MethodConfig
from pathflow.train.methods.registry import register_method
from pathflow.train.methods.simsiam import SimSiam, SimSiamConfig
from pathflow.train.monitors import embedding_std
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan


def validate_cluster_options(
    method: str, alpha: float, num_clusters: int, hidden: int, tau: float
) -> None:
    """Shared checks of CluSiam's and CluBYOL's cluster options."""
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"{method} alpha must be in [0, 1], got {alpha}")
    if num_clusters < 2:
        raise ConfigError(f"{method} num_clusters must be >= 2, got {num_clusters}")
    if hidden < 1:
        raise ConfigError(f"{method} cluster_hidden_dim must be >= 1, got {hidden}")
    if tau <= 0:
        raise ConfigError(f"{method} gumbel_tau must be > 0, got {tau}")


#: ``--help`` of the cluster options.
CLUSTER_HELP = {
    "alpha": "weight of the cluster term (1 - alpha: invariance)",
    "num_clusters": "clusters K of the assigner",
    "cluster_hidden_dim": "cluster projector width",
    "gumbel_tau": "Gumbel-softmax temperature",
}


@dataclass
class ClusterOptions(MethodConfig):
    """The cluster term's options, shared by CluSiam and CluBYOL (a mixin before the base
    method's options: ``class CluSiamConfig(ClusterOptions, SimSiamConfig)``; the fields
    come after the base method's). A method with other defaults redeclares those fields
    with their :data:`CLUSTER_HELP`."""

    alpha: float = field(default=0.5, metadata=_h(CLUSTER_HELP["alpha"]))
    num_clusters: int = field(default=100, metadata=_h(CLUSTER_HELP["num_clusters"]))
    cluster_hidden_dim: int = field(default=512, metadata=_h(CLUSTER_HELP["cluster_hidden_dim"]))
    gumbel_tau: float = field(default=1.0, metadata=_h(CLUSTER_HELP["gumbel_tau"]))

    def validate(self) -> None:
        super().validate()
        name = type(self).__name__.removesuffix("Config").lower()  # clusiam, clubyol
        validate_cluster_options(
            name, self.alpha, self.num_clusters, self.cluster_hidden_dim, self.gumbel_tau
        )


def cluster_logits(head: nn.Module, z1: Tensor, z2: Tensor) -> Tensor:
    """Assigner logits of both views, stacked (one head pass per view)."""
    return torch.cat([head(z1), head(z2)])


@dataclass
class CluSiamConfig(ClusterOptions, SimSiamConfig):
    """CluSiam's options (YAML section ``clusiam:``, flags ``--clusiam.NAME``): SimSiam's
    plus the cluster term's (:class:`ClusterOptions`)."""


@register_method("clusiam")
class CluSiam(SimSiam):
    """SimSiam + ``cluster_head`` and the cluster term (:class:`ClusterLoss`)."""

    config_class = CluSiamConfig

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: CluSiamConfig,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__(backbone, embed_dim, opts, plan, channels_last)
        self.cluster_head = ClusterHead(opts.proj_dim, opts.cluster_hidden_dim, opts.num_clusters)
        self.cluster_loss = ClusterLoss(tau=opts.gumbel_tau)
        self.alpha = opts.alpha

    def invariance_loss(self, p1: Tensor, p2: Tensor, z1: Tensor, z2: Tensor) -> Tensor:
        """The reference's ``-(cos(p1, sg(z2)) + cos(p2, sg(z1)))``, averaged over the batch."""
        return -(cosine_rows(p1, z2).mean() + cosine_rows(p2, z1).mean())

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        z1, z2 = self.project(views)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        invariance = self.invariance_loss(p1, p2, z1, z2)
        term = self.cluster_loss(torch.cat([z1, z2]), cluster_logits(self.cluster_head, z1, z2))
        return {
            "loss": self.alpha * term.loss + (1.0 - self.alpha) * invariance,
            "cluster_loss": term.loss.detach(),
            "invariance_loss": invariance.detach(),
            "clusters_used": term.clusters_used,
            "clusters_used_gumbel": term.clusters_used_gumbel,
            "z_std": embedding_std(z1),
        }
