"""DINO (Caron et al. 2021): self-distillation with no labels, as facebookresearch/dino.

The student (backbone + :class:`~pathflow.train.heads.DINOHead`) sees every view (2 global +
N local crops); the teacher, an exponential moving average of the student (momentum
0.996 -> 1 on a cosine), sees only the 2 global views. :class:`~pathflow.train.losses.DINOLoss`
matches the student to the centred and sharpened teacher. The last layer of the head is not
trained during the first ``freeze_last_layer`` epoch(s). The teacher backbone is the result.

Gradients are clipped per parameter (each parameter's gradient norm to ``clip_grad``, 3 by
default), as dino's ``clip_gradients``; the centre is updated after the optimiser step, so a
step stopped by a non-finite loss changes nothing. Logged beside the loss: the collapse
monitors ``embed_std`` and ``eff_rank`` (:mod:`~pathflow.train.monitors`) of the teacher's
backbone features of the global views (this rank's), kept by a hook on the teacher's head.

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("vit_tiny_patch16_224", img_size=32)  # doctest: +SKIP
    >>> cfg = TrainConfig(method="dino", steps=10, options={"out_dim": 256}).resolve()
    >>> dino = create_method("dino", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 4
    >>> dino(views, step=0)["loss"].backward()  # doctest: +SKIP
    >>> dino.after_step(0)  # EMA update of the teacher  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from pathflow.exceptions import ConfigError
from pathflow.train.ema import EMA, ema_copy
from pathflow.train.heads import DINOHead
from pathflow.train.losses import DINOLoss
from pathflow.train.methods.base import (
    MethodConfig,
    MultiCropEncoder,
    SSLMethod,
    clip_per_parameter,
)
from pathflow.train.methods.registry import register_method
from pathflow.train.monitors import effective_rank, embedding_std
from pathflow.train.plan import h as _h
from pathflow.train.schedules import warmup_constant_schedule

if TYPE_CHECKING:
    from pathflow.train.plan import RunPlan, StepClock


@dataclass
class DINOConfig(MethodConfig):
    """DINO's options (YAML section ``dino:``, flags ``--dino.NAME``); defaults of the
    official ViT-S/16 recipe."""

    recipe: ClassVar[dict[str, Any]] = {
        "lr": 5e-4,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "warmup_epochs": 10.0,
        "drop_path_rate": 0.1,
        "clip_grad": 3.0,
    }

    out_dim: int = field(default=65536, metadata=_h("head output dimension (prototypes)"))
    norm_last_layer: bool = field(
        default=True, metadata=_h("fix the weight-norm gain of the last layer to 1")
    )
    momentum_teacher: float = field(default=0.996, metadata=_h("teacher EMA momentum, cosine to 1"))
    teacher_temp: float = field(default=0.07, metadata=_h("teacher temperature"))
    warmup_teacher_temp: float = field(default=0.04, metadata=_h("initial teacher temperature"))
    warmup_teacher_temp_epochs: float = field(
        default=30.0, metadata=_h("epochs of teacher temperature warmup")
    )
    warmup_teacher_temp_steps: int | None = field(
        default=None, metadata=_h("teacher temperature warmup in steps (overrides epochs)")
    )
    student_temp: float = field(default=0.1, metadata=_h("student temperature"))
    center_momentum: float = field(default=0.9, metadata=_h("centre EMA momentum"))
    freeze_last_layer: float = field(
        default=1.0, metadata=_h("epochs during which the last layer is not trained")
    )
    freeze_last_layer_steps: int | None = field(
        default=None, metadata=_h("steps during which the last layer is not trained")
    )

    def validate(self) -> None:
        if min(self.teacher_temp, self.warmup_teacher_temp, self.student_temp) <= 0:
            raise ConfigError("dino temperatures must be > 0")
        if not 0 <= self.momentum_teacher <= 1 or not 0 <= self.center_momentum <= 1:
            raise ConfigError("dino momentum_teacher and center_momentum must be in [0, 1]")

    def schedule_lengths(self, clock: StepClock) -> dict[str, int]:
        return {
            "teacher_temp_warmup": clock.steps_or_epochs(
                self.warmup_teacher_temp_steps, self.warmup_teacher_temp_epochs
            ),
            "frozen_last_layer": clock.steps_or_epochs(
                self.freeze_last_layer_steps, self.freeze_last_layer
            ),
        }


@register_method("dino")
class DINO(SSLMethod):
    """Student/teacher pair and the DINO loss (its centre is a buffer of ``loss``)."""

    views_preset = "dino"
    export_prefix = "teacher.backbone."
    config_class = DINOConfig
    ddp_local_buffers = ("loss.center",)  # all-reduced by the loss itself

    def __init__(
        self,
        backbone: nn.Module,
        embed_dim: int,
        opts: DINOConfig,
        plan: RunPlan,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        head = DINOHead(embed_dim, opts.out_dim, norm_last_layer=opts.norm_last_layer)
        self.student = MultiCropEncoder(backbone, head, channels_last)
        self.teacher = ema_copy(self.student)  # same initial weights, as dino
        total = plan.total_steps
        lengths = opts.schedule_lengths(plan)
        self.loss = DINOLoss(
            opts.out_dim,
            teacher_temps=warmup_constant_schedule(
                opts.warmup_teacher_temp,
                opts.teacher_temp,
                total,
                lengths["teacher_temp_warmup"],
            ),
            student_temp=opts.student_temp,
            center_momentum=opts.center_momentum,
        )
        self.ema = EMA(opts.momentum_teacher, total, "cosine")
        self.freeze_last_layer_steps = lengths["frozen_last_layer"]
        self._teacher_out: Tensor | None = None
        # The teacher's backbone features (its head's input), kept for the collapse monitors.
        self._teacher_feats: Tensor | None = None
        self.teacher.head.register_forward_pre_hook(self._keep_teacher_features)

    def _keep_teacher_features(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        self._teacher_feats = args[0].detach()

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        with torch.no_grad():
            teacher_out = self.teacher(views[:2])  # global views only
        student_out = self.student(views)
        loss = self.loss(student_out, teacher_out, step, update_center=False)
        self._teacher_out = teacher_out.detach()
        out = {
            "loss": loss,
            "teacher_temp": torch.tensor(self.teacher_temp(step), dtype=torch.float64),
            "momentum": torch.tensor(self.momentum(step), dtype=torch.float64),
        }
        feats, self._teacher_feats = self._teacher_feats, None
        if feats is not None:
            out["embed_std"] = embedding_std(feats)
            out["eff_rank"] = effective_rank(feats)
        return out

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_last_layer_steps:
            last_layer: nn.Module = self.student.head.last_layer  # type: ignore[assignment]
            for p in last_layer.parameters():
                p.grad = None

    def clip_gradients(self, max_norm: float) -> Tensor:
        """Per parameter, as dino's ``clip_gradients`` (not the global norm)."""
        return clip_per_parameter(list(self.student.parameters()), max_norm)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """Centre update with this step's teacher outputs, then the EMA teacher update."""
        if self._teacher_out is not None:
            self.loss.update_center(self._teacher_out.float())
            self._teacher_out = None
        self.ema.update(self.teacher, self.student, step)

    def backbone_for_export(self) -> nn.Module:
        return self.teacher.backbone

    def teacher_temp(self, step: int) -> float:
        return self.loss.teacher_temp(step)

    def momentum(self, step: int) -> float:
        return self.ema.momentum(step)
