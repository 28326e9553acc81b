"""The interface every self-supervised method implements, and the multi-crop encoder.

A method is an ``nn.Module`` holding everything that trains (backbone(s), heads, loss state
such as DINO's centre), so one ``state_dict`` checkpoints it and DDP can wrap it: only
parameters with ``requires_grad`` (the student's) are all-reduced.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from pathflow.train.methods.base import MultiCropEncoder
    >>> enc = MultiCropEncoder(nn.Sequential(nn.Flatten(), nn.LazyLinear(8)), nn.Identity())
    >>> enc([torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)]).shape
    torch.Size([4, 8])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class MultiCropEncoder(nn.Module):
    """Backbone + head over a list of views, as dino's ``MultiCropWrapper``: consecutive views
    of the same resolution go through the backbone in one batch, then the concatenated
    features through the head. Output rows: view 0's batch, then view 1's, and so on."""

    def __init__(self, backbone: nn.Module, head: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.channels_last = channels_last

    def forward(self, views: list[Tensor]) -> Tensor:
        feats: list[Tensor] = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            x = torch.cat(views[start:end]) if end - start > 1 else views[start]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = self.backbone(x)
            feats.append(out[0] if isinstance(out, tuple) else out)
            start = end
        return self.head(torch.cat(feats) if len(feats) > 1 else feats[0])


def split_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups as dino's ``get_params_groups``: weights decay, biases and
    1-d parameters (norm scales/shifts) do not. Frozen parameters are left out. Each group
    carries ``apply_wd`` so the trainer's weight-decay schedule only touches the first."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "apply_wd": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
    ]


class SSLMethod(nn.Module):
    """Base class of self-supervised methods.

    Subclasses set ``views_preset`` (the loader's view preset they expect, ``"dino"`` or
    ``"simclr"``) and implement :meth:`forward` and :meth:`backbone_for_export`.
    """

    views_preset: str = ""
    #: Prefix of the exported backbone's keys in this module's ``state_dict``.
    export_prefix: str = "backbone."

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:  # pragma: no cover
        """Loss (key ``"loss"``) and other scalars to log, for one batch of views."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after ``optimizer.step()`` of step ``step`` (e.g. EMA teacher update)."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward and gradient clipping, before ``optimizer.step()`` (e.g.
        DINO drops the last layer's gradients during its first epoch)."""

    def backbone_for_export(self) -> nn.Module:  # pragma: no cover
        """The backbone whose weights are the result of training."""
        raise NotImplementedError

    def encoders(self) -> list[MultiCropEncoder]:
        """The encoders whose backbones the trainer may ``torch.compile``."""
        return [m for m in self.modules() if isinstance(m, MultiCropEncoder)]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups: no weight decay on biases and norm parameters."""
        return split_decay_groups(self, weight_decay)
