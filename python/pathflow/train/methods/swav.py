"""SwAV (Caron et al. 2020): swapping assignments between multi-crop views, as
facebookresearch/swav's ``main_swav.py``.

Every crop (2 global 224 px + 6 local 96 px) goes through the backbone and the projector
(``dim -> 2048 -> 128``, l2-normalised, :class:`~pathflow.train.heads.swav_head.SwAVHead`);
its cosine scores with 3000 l2-normalised prototypes
(:class:`~pathflow.train.heads.swav_head.Prototypes`) feed
:class:`~pathflow.train.losses.swav_loss.SwAVLoss`: the Sinkhorn-Knopp codes of each global
crop (epsilon 0.05, 3 iterations over the global batch) are predicted from every other crop
(softmax at temperature 0.1). The backbone is the result.

- **Prototypes** are re-normalised after each optimiser step and frozen (their gradients
  dropped) during the first ``freeze_prototypes`` epoch(s) (the reference's 313 iterations,
  one ImageNet epoch at batch 4096). Frozen, they are not updated, so they stay normalised.
- **Queue** (``queue_length``, 3840 as the reference's small-batch recipe; 0 = none): the
  projections of the 2 global crops of past batches, newest first, a buffer
  ``queue [2, queue_length / world_size, proj_dim]`` of each rank (global length rounded down
  to a multiple of the global batch, as the reference). It is filled from
  ``queue_start_epoch`` (15) on and, once full, its scores are put before the batch's in the
  Sinkhorn-Knopp input (their codes are dropped): the equipartition then spans
  ``queue + batch`` samples. Filled after the optimiser step, so a step stopped by a
  non-finite loss changes nothing; saved in the checkpoint.
- Epoch-based lengths follow :class:`~pathflow.train.config.TrainConfig`'s rule
  (``*_steps`` options override them).

**Views**: ``dino`` with 6 local crops (``num_local`` 6 in the recipe): 2 x 224 + 6 x 96 px as
SwAV, but with DINO's crop scales (global 0.4-1, local 0.05-0.4; SwAV: 0.14-1 and
0.05-0.14) and DINO's colour, blur and solarisation.

**Optimiser**: LARS (``--optimizer lars``, eta 0.001, momentum 0.9), lr 0.3 x batch / 256 (the
reference's 4.8 at batch 4096) after a 10-epoch warmup, weight decay 1e-6. The reference's
LARC also adapts (and decays) biases and norm parameters; here they get plain SGD.

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> cfg = TrainConfig(method="swav", steps=1000, batch_size=64).resolve()
    >>> cfg.views, cfg.num_local, cfg.optimizer, cfg.options.n_prototypes
    ('dino', 6, 'lars', 3000)
    >>> cfg.schedule_lengths()["queue_start"]  # 15 of 100 epochs -> 15% of 1000 steps
    150
    >>> net, dim = create_backbone("test_vit", img_size=32)  # doctest: +SKIP
    >>> swav = create_method("swav", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 6
    >>> swav(views, step=0)["loss"].backward()  # doctest: +SKIP
    >>> swav.after_step(0)  # prototypes re-normalised, queue filled  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.heads.swav_head import Prototypes, SwAVHead
from pathflow.train.losses.swav_loss import SwAVLoss
from pathflow.train.methods.base import MethodConfig, MultiCropEncoder, SSLMethod
from pathflow.train.methods.registry import register_method
from pathflow.train.plan import h as _h

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan, StepClock

#: The crops whose codes are predicted (the 2 global crops), as the reference.
CROPS_FOR_ASSIGN = (0, 1)


@dataclass
class SwAVConfig(MethodConfig):
    """SwAV's options (YAML section ``swav:``, flags ``--swav.NAME``)."""

    recipe: ClassVar[dict[str, Any]] = {
        "optimizer": "lars",
        "lr": 0.3,
        "weight_decay": 1e-6,
        "weight_decay_end": 1e-6,
        "warmup_epochs": 10.0,
        "drop_path_rate": 0.0,
        "clip_grad": 0.0,
        "num_local": 6,
    }

    proj_hidden_dim: int = field(default=2048, metadata=_h("projector hidden width"))
    proj_dim: int = field(default=128, metadata=_h("projection (feature) dimension"))
    n_prototypes: int = field(default=3000, metadata=_h("number of prototypes"))
    temperature: float = field(default=0.1, metadata=_h("softmax temperature of the loss"))
    epsilon: float = field(default=0.05, metadata=_h("Sinkhorn-Knopp regularisation"))
    sinkhorn_iterations: int = field(default=3, metadata=_h("Sinkhorn-Knopp iterations"))
    queue_length: int = field(
        default=3840, metadata=_h("global queue of past projections (0 = no queue)")
    )
    queue_start_epoch: float = field(
        default=15.0, metadata=_h("epoch from which the queue is filled")
    )
    queue_start_steps: int | None = field(
        default=None, metadata=_h("step from which the queue is filled (overrides epochs)")
    )
    freeze_prototypes: float = field(
        default=1.0, metadata=_h("epochs during which the prototypes are not trained")
    )
    freeze_prototypes_steps: int | None = field(
        default=None, metadata=_h("steps during which the prototypes are not trained")
    )

    def validate(self) -> None:
        if self.temperature <= 0 or self.epsilon <= 0:
            raise ConfigError("swav temperature and epsilon must be > 0")
        if self.sinkhorn_iterations < 1:
            raise ConfigError("swav sinkhorn_iterations must be >= 1")
        if min(self.proj_hidden_dim, self.proj_dim, self.n_prototypes) < 1:
            raise ConfigError("swav proj_hidden_dim, proj_dim and n_prototypes must be >= 1")
        if self.queue_length < 0:
            raise ConfigError(f"swav queue_length must be >= 0, got {self.queue_length}")

    def schedule_lengths(self, clock: StepClock) -> dict[str, int]:
        lengths = {
            "frozen_prototypes": clock.steps_or_epochs(
                self.freeze_prototypes_steps, self.freeze_prototypes
            )
        }
        if self.queue_length > 0:
            lengths["queue_start"] = clock.steps_or_epochs(
                self.queue_start_steps, self.queue_start_epoch
            )
        return lengths


def local_queue_rows(queue_length: int, batch_size: int, world_size: int) -> int:
    """Rows of each rank's queue: the global length rounded down to a multiple of the global
    batch, shared between the ranks (``main_swav.py``)."""
    global_batch = batch_size * world_size
    return (queue_length - queue_length % global_batch) // world_size


@register_method("swav")
class SwAV(SSLMethod):
    """Backbone + projector (``encoder``), ``prototypes``, the SwAV loss and the queue."""

    views_preset = "dino"
    export_prefix = "encoder.backbone."
    config_class = SwAVConfig
    # each rank queues its own projections; the fill count is identical on every rank
    ddp_local_buffers = ("queue", "queue_filled")

    queue: Tensor
    queue_filled: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: SwAVConfig,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        head = SwAVHead(embed_dim, opts.proj_hidden_dim, opts.proj_dim)
        self.encoder = MultiCropEncoder(backbone, head, channels_last)
        self.prototypes = Prototypes(opts.proj_dim, opts.n_prototypes)
        self.loss = SwAVLoss(
            opts.temperature, opts.epsilon, opts.sinkhorn_iterations, CROPS_FOR_ASSIGN
        )
        rows = local_queue_rows(opts.queue_length, plan.batch_size, plan.world_size)
        self.register_buffer("queue", torch.zeros(len(CROPS_FOR_ASSIGN), rows, opts.proj_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        lengths = opts.schedule_lengths(plan)
        self.freeze_prototypes_steps = lengths["frozen_prototypes"]
        self.queue_start_steps = lengths.get("queue_start", plan.total_steps)
        self._pending: Tensor | None = None
        #: The codes of the last forward, ``[2, B_local, K]`` (diagnostics and tests).
        self.last_codes: Tensor | None = None

    def queue_in_use(self) -> bool:
        """The queue is full (the reference's test: its last row is not zero)."""
        rows = self.queue.shape[1]
        return rows > 0 and int(self.queue_filled) >= rows

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        if len(views) < 2:
            raise ValueError(f"SwAV needs at least 2 views per image, got {len(views)}")
        batch = views[0].shape[0]
        z = self.encoder(views)
        use_queue = self.queue_in_use()
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            scores = self.prototypes(z)  # float32 cosines: exp(score / 0.05) needs them exact
            queue_scores = None
            if use_queue:
                with torch.no_grad():
                    queue_scores = [self.prototypes(q) for q in self.queue]
            loss, codes = self.loss(scores, batch, queue_scores)
        self._pending = torch.stack(
            [z[c * batch : (c + 1) * batch].detach() for c in CROPS_FOR_ASSIGN]
        )
        self.last_codes = codes
        return {"loss": loss, "queue_in_use": torch.tensor(float(use_queue))}

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_prototypes_steps:
            for p in self.prototypes.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Prototypes back to unit norm (once they train); this batch's global-crop
        projections into the queue (from ``queue_start``)."""
        if step >= self.freeze_prototypes_steps:
            self.prototypes.normalize_()
        pending, self._pending = self._pending, None
        rows = self.queue.shape[1]
        if pending is None or rows == 0 or step < self.queue_start_steps:
            return
        n = min(pending.shape[1], rows)
        self.queue[:, n:] = self.queue[:, : rows - n].clone()
        self.queue[:, :n] = pending[:, :n].to(self.queue.dtype)
        self.queue_filled.add_(n).clamp_(max=rows)

    def backbone_for_export(self) -> nn.Module:
        return self.encoder.backbone
