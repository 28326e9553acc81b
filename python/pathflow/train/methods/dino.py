"""DINO (Caron et al. 2021): self-distillation with no labels, as facebookresearch/dino.

The student (backbone + :class:`~pathflow.train.heads.DINOHead`) sees every view (2 global +
N local crops); the teacher, an exponential moving average of the student (momentum
0.996 -> 1 on a cosine), sees only the 2 global views. :class:`~pathflow.train.losses.DINOLoss`
matches the student to the centred and sharpened teacher. The last layer of the head is not
trained during the first ``freeze_last_layer`` epoch(s). The teacher backbone is the result.

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig, create_backbone, create_method
    >>> net, dim = create_backbone("vit_tiny_patch16_224", img_size=32)  # doctest: +SKIP
    >>> cfg = TrainConfig(method="dino", steps=10, out_dim=256).resolve()
    >>> dino = create_method("dino", net, dim, cfg)  # doctest: +SKIP
    >>> views = [torch.randn(2, 3, 32, 32)] * 2 + [torch.randn(2, 3, 16, 16)] * 4
    >>> dino(views, step=0)["loss"].backward()  # doctest: +SKIP
    >>> dino.after_step(0)  # EMA update of the teacher  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pathflow.train.backbones import is_cnn
from pathflow.train.heads import DINOHead
from pathflow.train.losses import DINOLoss
from pathflow.train.methods.base import MultiCropEncoder, SSLMethod
from pathflow.train.methods.registry import register_method
from pathflow.train.schedules import cosine_schedule, warmup_constant_schedule

if TYPE_CHECKING:
    from pathflow.train.config import TrainConfig


def disable_stochastic_layers(module: nn.Module) -> None:
    """Turn off dropout and stochastic depth (the teacher has neither, as in dino)."""
    from timm.layers import DropPath

    for m in module.modules():
        if isinstance(m, DropPath):
            m.drop_prob = 0.0
        elif isinstance(m, nn.Dropout):
            m.p = 0.0


@register_method("dino")
class DINO(SSLMethod):
    """Student/teacher pair and the DINO loss (its centre is a buffer of ``loss``)."""

    views_preset = "dino"
    export_prefix = "teacher.backbone."

    def __init__(self, backbone: nn.Module, embed_dim: int, cfg: TrainConfig) -> None:
        super().__init__()
        channels_last = cfg.channels_last if cfg.channels_last is not None else is_cnn(backbone)
        head = DINOHead(embed_dim, cfg.out_dim, norm_last_layer=cfg.norm_last_layer)
        self.student = MultiCropEncoder(backbone, head, channels_last)
        self.teacher = copy.deepcopy(self.student)  # same initial weights, as dino
        disable_stochastic_layers(self.teacher)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        total = cfg.total_steps
        self.loss = DINOLoss(
            cfg.out_dim,
            teacher_temps=warmup_constant_schedule(
                cfg.warmup_teacher_temp,
                cfg.teacher_temp,
                total,
                cfg.epochs_to_steps(cfg.warmup_teacher_temp_epochs),
            ),
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )
        self.momentum_schedule = cosine_schedule(cfg.momentum_teacher, 1.0, total)
        self.freeze_last_layer_steps = cfg.epochs_to_steps(cfg.freeze_last_layer)

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        with torch.no_grad():
            teacher_out = self.teacher(views[:2])  # global views only
        student_out = self.student(views)
        loss = self.loss(student_out, teacher_out, step)
        return {
            "loss": loss,
            "teacher_temp": torch.tensor(self.teacher_temp(step)),
            "momentum": torch.tensor(self.momentum(step)),
        }

    def before_optimizer_step(self, step: int) -> None:
        if step < self.freeze_last_layer_steps:
            last_layer: nn.Module = self.student.head.last_layer  # type: ignore[assignment]
            for p in last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        m = float(self.momentum_schedule[min(step, len(self.momentum_schedule) - 1)])
        teacher = [p.data for p in self.teacher.parameters()]
        student = [p.detach().data for p in self.student.parameters()]
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, student, alpha=1.0 - m)

    def backbone_for_export(self) -> nn.Module:
        return self.teacher.backbone

    def teacher_temp(self, step: int) -> float:
        return self.loss.teacher_temp(step)

    def momentum(self, step: int) -> float:
        return float(self.momentum_schedule[min(step, len(self.momentum_schedule) - 1)])
