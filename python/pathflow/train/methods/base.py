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

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from pathflow.config import YamlConfig
from pathflow.exceptions import ConfigError

if TYPE_CHECKING:
    from pathflow.train.plan import StepClock


@dataclasses.dataclass
class MethodConfig(YamlConfig):
    """Base of each method's own options (a dataclass in the method's file).

    ``recipe`` holds the method's defaults for the shared :class:`TrainConfig` fields left
    ``None`` (lr, weight decay, warmup, clipping, drop path). Fields are the YAML keys of the
    method's section and the ``--METHOD.NAME`` flags. ``older_behaviour``: options added
    after runs were first saved, and the value that reproduces how those runs trained (a
    checkpoint without the option resumes when the option has this value).
    """

    recipe: ClassVar[dict[str, Any]] = {}
    older_behaviour: ClassVar[dict[str, Any]] = {}

    @classmethod
    def from_value(cls, value: Any, method: str) -> Any:
        """An instance from ``None`` (defaults), a dict of fields (typed, unknown names
        rejected) or an instance."""
        if isinstance(value, cls):
            value = dataclasses.asdict(value)
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"options of method {method} must be a mapping, got {value!r}")
        unknown = sorted(set(value) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"unknown option(s) of method {method}: {', '.join(unknown)} "
                f"(expected {', '.join(cls.field_names()) or 'none'})"
            )
        opts = cls(**cls.coerce_values(value, method))
        opts.validate()
        return opts

    def schedule_lengths(self, clock: StepClock) -> dict[str, int]:
        """The method's own schedule lengths in steps (e.g. DINO's temperature warmup), from
        the run's length (``clock.steps_or_epochs``: a :class:`~pathflow.train.plan.RunPlan`
        or a config's :meth:`~pathflow.train.config.TrainConfig.clock`)."""
        return {}


def default_channels_last(backbone: nn.Module, setting: bool | None) -> bool:
    """``--channels-last`` as given, else on for CNNs (the layout their kernels prefer)."""
    from pathflow.train.backbones import is_cnn

    return setting if setting is not None else is_cnn(backbone)


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


@torch.no_grad()
def clip_per_parameter(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """facebookresearch/dino's ``clip_gradients``: each parameter's gradient whose L2 norm
    exceeds ``max_norm`` is scaled to ``max_norm / (norm + 1e-6)`` of itself, the others are
    left alone. Returns the global norm before clipping (sqrt of the sum of squares).

    Example:
        >>> import torch
        >>> a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
        >>> a.grad, b.grad = torch.tensor([6.0, 8.0]), torch.tensor([1.0])
        >>> round(float(clip_per_parameter([a, b], 5.0) ** 2), 4)
        101.0
        >>> round(a.grad.norm().item(), 4), b.grad.item()  # a clipped to 5, b left alone
        (5.0, 1.0)
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    for g, n in zip(grads, norms, strict=True):
        g.mul_(torch.clamp(max_norm / (n + 1e-6), max=1.0))
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def split_decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW parameter groups as dino's ``get_params_groups``: weights decay, biases and
    1-d parameters (norm scales/shifts) do not. Frozen parameters are left out. Each group
    carries ``apply_wd`` so the trainer's weight-decay schedule only touches the first; the
    second is flagged ``lars_exclude`` (:class:`~pathflow.train.optim.LARS` updates it by
    plain SGD with momentum, no trust ratio, as BYOL and Barlow Twins)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "apply_wd": True},
        {"params": no_decay, "weight_decay": 0.0, "apply_wd": False, "lars_exclude": True},
    ]


class SSLMethod(nn.Module):
    """Base class of self-supervised methods.

    Subclasses set ``views_preset`` (the loader's view preset they expect, ``"dino"`` or
    ``"simclr"``) and ``config_class``, and implement :meth:`forward` and
    :meth:`backbone_for_export`. They are built as ``cls(backbone, embed_dim, options,
    plan, channels_last)``: the backbone and its feature width, the method's options (an
    instance of ``config_class``), the run's :class:`~pathflow.train.plan.RunPlan` (total
    steps, schedule lengths, world size, ...) and whether views go in channels-last.
    Every hook the trainer calls is declared here, with a default.
    """

    views_preset: str = ""
    #: Whether :meth:`forward` takes the batch's metadata (``meta=``; SGCL: the sample
    #: indices of its memory bank).
    uses_meta: ClassVar[bool] = False
    #: What the method trains on: ``"images"`` (WebDataset shards, :mod:`pathflow.data`) or
    #: ``"region_features"`` (HIPT region-feature files, :mod:`pathflow.data.features`).
    data_kind: ClassVar[str] = "images"
    #: Prefix of the exported backbone's keys in this module's ``state_dict``.
    export_prefix: str = "backbone."
    #: The method's own options (a :class:`MethodConfig` dataclass).
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    #: Buffers that DDP must not broadcast from rank 0 every step (large queues or banks,
    #: or state the method keeps identical on every rank itself, e.g. DINO's all-reduced
    #: centre). Names as in ``state_dict``.
    ddp_local_buffers: ClassVar[tuple[str, ...]] = ()

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:  # pragma: no cover
        """Loss (key ``"loss"``) and other scalars to log, for one batch of views (methods
        with ``uses_meta`` take ``meta=`` too)."""
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> None:
        """Called before each epoch's first batch (SGCL: its k-means refit)."""

    def after_step(self, step: int) -> None:
        """Called after ``optimizer.step()`` of step ``step`` (e.g. EMA teacher update)."""

    def before_optimizer_step(self, step: int) -> None:
        """Called after backward, before gradient clipping and ``optimizer.step()`` (e.g.
        DINO drops the last layer's gradients during its first epoch)."""

    def clip_gradients(self, max_norm: float) -> Tensor:
        """Clip the gradients before ``optimizer.step()``; returns the global gradient norm
        before clipping (logged as ``grad_norm``). Default: the global norm of all
        gradients is clipped to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``)."""
        return torch.nn.utils.clip_grad_norm_(
            [p for p in self.parameters() if p.grad is not None], max_norm
        )

    def backbone_for_export(self) -> nn.Module:  # pragma: no cover
        """The backbone whose weights are the result of training."""
        raise NotImplementedError

    def encoders(self) -> list[MultiCropEncoder]:
        """The encoders whose backbones the trainer may ``torch.compile``."""
        return [m for m in self.modules() if isinstance(m, MultiCropEncoder)]

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups: no weight decay on biases and norm parameters."""
        return split_decay_groups(self, weight_decay)
