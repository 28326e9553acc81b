"""MoCo v3 (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised Vision
Transformers"; facebookresearch/moco-v3): symmetrised InfoNCE between a predictor's queries and
a momentum encoder's keys of the other view, the other keys of the global batch as negatives
(no queue).

Base encoder (``base``): backbone + projector ``MLPHead(dim, 4096, 256, 3, bn_last=True)``
(Linear layers without bias, BatchNorm + ReLU between them, a BatchNorm without affine
parameters at the end, moco-v3's ``_build_mlp(3, dim, 4096, 256)``); predictor
``MLPHead(256, 4096, 256, 2, last_bias=False)`` (no final BatchNorm); momentum encoder
(``momentum_encoder``): an EMA copy of the base encoder, momentum 0.99 raised to 1 on a half
cosine over the run (moco-v3's ``--moco-m-cos``). For l2-normalised queries ``q`` of this
rank's ``N`` images and the keys ``k`` of the other view gathered from all ``R`` ranks
(``R N`` rows, no gradient)::

    ctr(q, k) = 2 T * mean_i  -log softmax(q_i . k / T)[N r + i]     (r: this rank)
    loss      = ctr(q1, k2) + ctr(q2, k1)

with temperature ``T = 0.2`` (ViT; moco-v3 uses 1.0 for ResNets). Each view goes through the
encoders in its own pass (BatchNorm statistics per view; the BatchNorms are
:class:`~pathflow.train.heads.GlobalBatchNorm1d`, SyncBN-like under DDP). For ViTs the patch
projection is frozen at its random initialisation (moco-v3's ``--stop-grad-conv1``, "random
patch projection"), which the paper found to stabilise training; ``freeze_patch_embed=false``
trains it.

Recipe (moco-v3's ViT-S/B one): AdamW, lr 1.5e-4 x batch / 256, weight decay 0.1, 40 warmup
epochs, cosine decay. The base backbone is the result.

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("test_vit")  # doctest: +SKIP
    >>> cfg = TrainConfig(method="mocov3", steps=10).resolve()
    >>> cfg.options.temperature, cfg.options.momentum, cfg.optimizer, cfg.weight_decay
    (0.2, 0.99, 'adamw', 0.1)
    >>> moco = create_method("mocov3", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    >>> moco(views, step=0)["loss"].backward()  # doctest: +SKIP
    >>> moco.after_step(0)  # EMA update of the momentum encoder  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.distributed import get_rank
from pathflow.train.ema import EMA, EMA_SCHEDULES, ema_copy
from pathflow.train.heads import MLPHead
from pathflow.train.methods.base import MethodConfig, MultiCropEncoder, SSLMethod
from pathflow.train.methods.mocov2 import concat_all_gather
from pathflow.train.methods.registry import register_method
from pathflow.train.monitors import effective_rank, embedding_std
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan


@dataclass
class MoCoV3Config(MethodConfig):
    """MoCo v3's options (YAML section ``mocov3:``, flags ``--mocov3.NAME``)."""

    recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "adamw",
        "lr": 1.5e-4,
        "weight_decay": 0.1,
        "weight_decay_end": 0.1,
        "warmup_epochs": 40.0,
        "drop_path_rate": 0.0,
        "clip_grad": 0.0,
    }

    temperature: float = field(default=0.2, metadata=_h("InfoNCE temperature (1.0 for ResNets)"))
    momentum: float = field(default=0.99, metadata=_h("momentum encoder EMA at step 0"))
    momentum_schedule: str = field(
        default="cosine", metadata=_h("EMA momentum: cosine (to 1) or constant")
    )
    proj_hidden_dim: int = field(default=4096, metadata=_h("projector/predictor hidden width"))
    proj_dim: int = field(default=256, metadata=_h("projector output dimension"))
    freeze_patch_embed: bool = field(
        default=True, metadata=_h("ViTs: keep the random patch projection frozen")
    )

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"mocov3 temperature must be > 0, got {self.temperature}")
        if self.proj_hidden_dim < 1 or self.proj_dim < 1:
            raise ConfigError("mocov3 proj_hidden_dim and proj_dim must be >= 1")
        if not 0 <= self.momentum <= 1:
            raise ConfigError(f"mocov3 momentum must be in [0, 1], got {self.momentum}")
        if self.momentum_schedule not in EMA_SCHEDULES:
            raise ConfigError(
                f"mocov3 momentum_schedule must be one of {', '.join(EMA_SCHEDULES)}, "
                f"got {self.momentum_schedule!r}"
            )


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """``2 T`` x cross-entropy of this rank's queries against the keys of every rank, the
    positive of query ``i`` being key ``N rank + i`` (moco-v3's ``contrastive_loss``);
    float32, no gradient to the keys."""
    q = F.normalize(q.float(), dim=1)
    k = concat_all_gather(F.normalize(k.detach().float(), dim=1))
    logits = q @ k.T / temperature
    n = q.shape[0]
    labels = torch.arange(n, device=q.device) + n * get_rank()
    return F.cross_entropy(logits, labels) * (2 * temperature)


@register_method("mocov3")
class MoCoV3(SSLMethod):
    """Base encoder (``base``), ``predictor``, EMA ``momentum_encoder`` and the symmetrised
    contrastive loss."""

    views_preset = "byol"  # moco-v3 uses BYOL's two asymmetric views
    export_prefix = "base.backbone."
    config_class = MoCoV3Config

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: MoCoV3Config,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        patch_embed = getattr(backbone, "patch_embed", None)
        if opts.freeze_patch_embed and patch_embed is not None:
            for p in patch_embed.parameters():
                p.requires_grad_(False)
        projector = MLPHead(embed_dim, opts.proj_hidden_dim, opts.proj_dim, 3, bn_last=True)
        self.base = MultiCropEncoder(backbone, projector, channels_last)
        self.predictor = MLPHead(
            opts.proj_dim, opts.proj_hidden_dim, opts.proj_dim, 2, last_bias=False
        )
        self.momentum_encoder = ema_copy(self.base)  # same initial weights
        self.temperature = opts.temperature
        self.ema = EMA(opts.momentum, plan.total_steps, opts.momentum_schedule)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"MoCo v3 needs 2 views per image, got {len(views)}")
        z1, z2 = self.base([views[0]]), self.base([views[1]])
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            k1, k2 = self.momentum_encoder([views[0]]), self.momentum_encoder([views[1]])
        t = self.temperature
        loss = contrastive_loss(q1, k2, t) + contrastive_loss(q2, k1, t)
        z = torch.cat([z1, z2]).detach()
        return {
            "loss": loss,
            "momentum": torch.tensor(self.ema.momentum(step), dtype=torch.float64),
            "embed_std": embedding_std(z),
            "eff_rank": effective_rank(z),
        }

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """EMA update of the momentum encoder with the next step's momentum: moco-v3 updates
        at the start of iteration ``i`` with ``m(i)`` (a no-op at ``i = 0``), which is this
        update after step ``i - 1``."""
        self.ema.update(self.momentum_encoder, self.base, step + 1)

    def backbone_for_export(self) -> nn.Module:
        return self.base.backbone
