"""MoCo v2 (Chen et al. 2020; He et al. 2020): contrast each query with its key and a queue of
past keys, as facebookresearch/moco with ``--mlp --moco-t 0.2 --aug-plus --cos``.

The query encoder (``query``: backbone + MLP neck ``Linear(dim, dim) - ReLU - Linear(dim,
128)``) encodes view 1; the key encoder (``key``), an exponential moving average of the query
encoder (momentum 0.999, constant), encodes view 2 without gradient. The loss is InfoNCE at
temperature 0.2 with the key as positive and the 65,536 keys of the queue as negatives
(:class:`~pathflow.train.losses.InfoNCELoss`); after the optimiser step the keys of the
whole batch, gathered from all ranks, replace the oldest ones in the queue
(:class:`~pathflow.train.losses.KeyQueue`, buffers ``queue.keys`` and ``queue.ptr``: the
queue is checkpointed, and identical on every rank without DDP re-broadcasting it), and the
key encoder is updated.

Shuffling BN: under DDP the key views are shuffled across ranks before the key encoder and
the keys unshuffled after (facebookresearch/moco's ``_batch_shuffle_ddp``: all-gather, a
permutation broadcast from rank 0), so the BatchNorm statistics of a key never come from the
batch its query saw; a no-op in one process. (On CUDA the trainer converts BatchNorms to
SyncBatchNorm, which makes it moot; ViT backbones and the neck have no BatchNorm.) The query
backbone is the result.

Recipe (MoCo v2's): SGD with momentum 0.9, lr 0.03 x batch / 256 on a cosine without warmup,
weight decay 1e-4 (not on biases and norm parameters).

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("test_vit")  # doctest: +SKIP
    >>> cfg = TrainConfig(method="mocov2", steps=10, options={"queue_size": 64}).resolve()
    >>> cfg.options.temperature, cfg.options.momentum, cfg.optimizer
    (0.2, 0.999, 'sgd')
    >>> moco = create_method("mocov2", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    >>> moco(views, step=0)["loss"].backward()  # doctest: +SKIP
    >>> moco.after_step(0)  # enqueue the keys, EMA update of the key encoder  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.distributed import get_rank, get_world_size, is_dist
from pathflow.train.ema import EMA, ema_copy
from pathflow.train.heads import MLPHead
from pathflow.train.losses import InfoNCELoss, KeyQueue
from pathflow.train.methods.base import MethodConfig, MultiCropEncoder, SSLMethod
from pathflow.train.methods.registry import register_method
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan


@dataclass
class MoCoV2Config(MethodConfig):
    """MoCo v2's options (YAML section ``mocov2:``, flags ``--mocov2.NAME``)."""

    recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "sgd",
        "lr": 0.03,
        "weight_decay": 1e-4,
        "weight_decay_end": 1e-4,
        "warmup_epochs": 0.0,
        "drop_path_rate": 0.0,
        "clip_grad": 0.0,
    }

    temperature: float = field(default=0.2, metadata=_h("InfoNCE temperature"))
    queue_size: int = field(default=65536, metadata=_h("negative keys in the queue (K)"))
    momentum: float = field(default=0.999, metadata=_h("key encoder EMA momentum (constant)"))
    proj_hidden_dim: int | None = field(
        default=None, metadata=_h("neck hidden width (default: the backbone's feature width)")
    )
    proj_dim: int = field(default=128, metadata=_h("neck output dimension (keys)"))
    shuffle_bn: bool = field(
        default=True, metadata=_h("shuffle the key views across ranks (MoCo's shuffling BN)")
    )

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"mocov2 temperature must be > 0, got {self.temperature}")
        if self.queue_size < 1 or self.proj_dim < 1:
            raise ConfigError("mocov2 queue_size and proj_dim must be >= 1")
        if self.proj_hidden_dim is not None and self.proj_hidden_dim < 1:
            raise ConfigError(f"mocov2 proj_hidden_dim must be >= 1, got {self.proj_hidden_dim}")
        if not 0 <= self.momentum <= 1:
            raise ConfigError(f"mocov2 momentum must be in [0, 1], got {self.momentum}")


@torch.no_grad()
def concat_all_gather(x: Tensor) -> Tensor:
    """``x`` of every rank concatenated along dim 0 (no gradient); ``x`` in one process."""
    if not is_dist():
        return x
    out = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out)


@torch.no_grad()
def batch_shuffle(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """This rank's share of the global batch in an order drawn by rank 0, and the permutation
    that undoes it (facebookresearch/moco's ``_batch_shuffle_ddp``). In one process: ``x``
    and None."""
    if not is_dist():
        return x, None
    full = concat_all_gather(x)
    perm = torch.randperm(full.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    return full[perm.view(get_world_size(), -1)[get_rank()]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(x: Tensor, unshuffle: Tensor | None) -> Tensor:
    """Undo :func:`batch_shuffle` on its outputs (rows back to this rank's own images)."""
    if unshuffle is None:
        return x
    full = concat_all_gather(x)
    return full[unshuffle.view(get_world_size(), -1)[get_rank()]]


@register_method("mocov2")
class MoCoV2(SSLMethod):
    """Query encoder (``query``), EMA key encoder (``key``), queue of keys (``queue``) and
    the InfoNCE loss."""

    views_preset = "simclr"
    export_prefix = "query.backbone."
    config_class = MoCoV2Config
    ddp_local_buffers = ("queue.keys", "queue.ptr")  # kept identical by the all-gathered keys

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: MoCoV2Config,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        hidden = opts.proj_hidden_dim or embed_dim
        neck = MLPHead(embed_dim, hidden, opts.proj_dim, 2, batch_norm=False)
        self.query = MultiCropEncoder(backbone, neck, channels_last)
        self.key = ema_copy(self.query)  # same initial weights
        self.queue = KeyQueue(opts.queue_size, opts.proj_dim)
        self.loss = InfoNCELoss(opts.temperature)
        self.ema = EMA(opts.momentum, plan.total_steps, "constant")
        self.shuffle_bn = opts.shuffle_bn
        self._keys: Tensor | None = None

    @torch.no_grad()
    def encode_keys(self, x: Tensor) -> Tensor:
        """l2-normalised keys of the images ``x`` (key encoder, shuffled BN), float32."""
        x, unshuffle = batch_shuffle(x) if self.shuffle_bn else (x, None)
        k = F.normalize(self.key([x]).float(), dim=1)
        return batch_unshuffle(k, unshuffle)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"MoCo v2 needs 2 views per image, got {len(views)}")
        q = self.query([views[0]])
        k = self.encode_keys(views[1])
        loss = self.loss(q, k, self.queue.keys)
        self._keys = k
        return {
            "loss": loss,
            "momentum": torch.tensor(self.ema.momentum(step), dtype=torch.float64),
        }

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The keys of the global batch into the queue, then the key encoder's EMA update
        (which facebookresearch/moco does at the start of the next forward: same result)."""
        if self._keys is not None:
            self.queue.enqueue(concat_all_gather(self._keys))
            self._keys = None
        self.ema.update(self.key, self.query, step)

    def backbone_for_export(self) -> nn.Module:
        return self.query.backbone
