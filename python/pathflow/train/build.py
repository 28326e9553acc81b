"""What trains, built from the config and the run's plan: this rank's loader
(:func:`open_data`), the method around its backbone (:func:`build_method`), the optimiser
(:func:`build_optimizer`), DDP (:func:`wrap_ddp`) and compilation (:func:`compile_backbones`).
The loop that uses them is :mod:`pathflow.train.trainer`.

Example:
    >>> import torch
    >>> from pathflow.train import TrainConfig
    >>> from pathflow.train.build import runtime_settings
    >>> cfg = TrainConfig(method="simclr", steps=10).resolve()
    >>> runtime_settings(cfg, torch.device("cpu"))  # auto: bf16 and compiled on CUDA only
    ('fp32', False)
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from pathflow.exceptions import ConfigError
from pathflow.train.backbones import create_backbone
from pathflow.train.config import TrainConfig
from pathflow.train.distributed import DistInfo
from pathflow.train.methods import SSLMethod, create_method, method_class
from pathflow.train.plan import RunPlan


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def runtime_settings(cfg: TrainConfig, device: torch.device) -> tuple[str, bool]:
    """The device-dependent ``auto`` settings: precision (bf16 on CUDA) and compile (on
    CUDA), for the run's :class:`RunPlan`."""
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return precision, device.type == "cuda" if cfg.compile is None else bool(cfg.compile)


def resolve_runtime(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """A copy of ``cfg`` with the device-dependent ``auto`` settings filled
    (:func:`runtime_settings`); ``cfg`` itself is left as it is."""
    precision, compile_ = runtime_settings(cfg, device)
    return dataclasses.replace(cfg, precision=precision, compile=compile_)


def recorded_config(cfg: TrainConfig, plan: RunPlan) -> TrainConfig:
    """The config a run saves (``config.yaml``, the checkpoint's ``config``): ``cfg`` with
    the run's precision, compile, steps per epoch and world size. A copy."""
    return dataclasses.replace(
        cfg,
        precision=plan.precision,
        compile=plan.compile,
        steps_per_epoch=plan.steps_per_epoch,
        world_size=plan.world_size,
    )


class TrainData(NamedTuple):
    """The loader of this rank and what the model needs from the data: ``in_dim``, the width
    of region features (None for images); ``mean``/``std``, the views' normalisation
    (exported with the backbone, for ``--norm auto``; None for region features)."""

    loader: Any
    in_dim: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def open_data(cfg: TrainConfig, info: DistInfo, precision: str) -> TrainData:
    """The :func:`pathflow.data.make_loader` loader of this rank, with the method's view
    preset unless ``cfg.views`` names another (region features: :func:`build_feature_loader`)."""
    from pathflow.data import create_views, make_loader

    output = "bfloat16" if precision == "bf16" and info.device.type == "cuda" else "float"
    if method_class(cfg.method).data_kind == "region_features":
        if cfg.views not in (None, "hipt4k"):
            raise ConfigError(
                f"--views {cfg.views}: {cfg.method} trains on region-feature crops (views "
                "hipt4k; sizes with --global-size/--local-size/--num-local in grid cells)"
            )
        loader = build_feature_loader(cfg, info, output)
        return TrainData(loader, int(loader.features.dim), None, None)
    views = create_views(
        cfg.views or method_class(cfg.method).views_preset,
        global_size=cfg.global_size,
        local_size=cfg.local_size,
        num_local=cfg.num_local,
    )
    loader = make_loader(
        cfg.data,
        views=views,
        batch_size=cfg.batch_size,
        device=str(info.device),
        backend=cfg.loader_backend,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        num_workers=cfg.num_workers,
        output=output,
        positives=cfg.positives,
        neighbour_radius=cfg.neighbour_radius,
    )
    return TrainData(loader, None, tuple(views.mean), tuple(views.std))


def build_loader(cfg: TrainConfig, info: DistInfo) -> Any:
    """The loader of :func:`open_data` (``cfg.precision`` as given)."""
    return open_data(cfg, info, cfg.precision).loader


def build_feature_loader(cfg: TrainConfig, info: DistInfo, output: str) -> Any:
    """The region-feature loader of this rank (HIPT ViT-4K views; ``--global-size``,
    ``--local-size``, ``--num-local`` in grid cells override HIPT's 14 / 6 / 8)."""
    from pathflow.data.features import FeatureCropSpec, RegionFeatureSet, make_feature_loader

    features = RegionFeatureSet(cfg.data)
    overrides = {
        k: v
        for k, v in (
            ("global_size", cfg.global_size),
            ("local_size", cfg.local_size),
            ("num_local", cfg.num_local),
        )
        if v is not None
    }
    return make_feature_loader(
        features,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        device=str(info.device),
        output=output,
        spec=FeatureCropSpec.for_grid(features.grid, **overrides),
    )


def build_method(
    cfg: TrainConfig,
    device: torch.device,
    in_dim: int | None = None,
    plan: RunPlan | None = None,
) -> SSLMethod:
    """Backbone + method, initialised from ``cfg.seed`` (identical on every rank), planned
    by ``plan`` (default: :meth:`RunPlan.from_config` of ``cfg``, whose ``steps`` or
    ``steps_per_epoch`` is then known). ``in_dim``: width of the input features of
    feature-grid backbones (``vit4k_xs``)."""
    kwargs: dict[str, Any] = {}
    if in_dim is not None:
        kwargs["in_dim"] = in_dim
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    plan = plan if plan is not None else RunPlan.from_config(cfg)
    seed_everything(cfg.seed)
    backbone, embed_dim = create_backbone(
        str(cfg.arch), pretrained=cfg.pretrained, channels_last=cfg.channels_last, **kwargs
    )
    method = create_method(cfg.method, backbone, embed_dim, cfg.options, plan)
    return method.to(device)


def build_optimizer(method: SSLMethod, cfg: TrainConfig, device: torch.device) -> Any:
    """``cfg.optimizer`` over the method's parameter groups: AdamW or SGD with momentum
    (fused kernels on CUDA, foreach on CPU), or :class:`~pathflow.train.optim.LARS` (groups
    flagged ``lars_exclude``, biases and norms, without trust ratio nor weight decay)."""
    from pathflow.train.optim import LARS

    assert cfg.weight_decay is not None
    groups = method.param_groups(cfg.weight_decay)
    fused = device.type == "cuda"
    if cfg.optimizer == "lars":
        assert cfg.momentum is not None, "resolve() first"
        return LARS(groups, lr=0.0, momentum=cfg.momentum, eta=cfg.lars_eta)
    if cfg.optimizer == "sgd":
        assert cfg.momentum is not None, "resolve() first"
        return torch.optim.SGD(
            groups, lr=0.0, momentum=cfg.momentum, fused=fused, foreach=not fused
        )
    return torch.optim.AdamW(groups, lr=0.0, fused=fused, foreach=not fused)


def wrap_ddp(method: SSLMethod, info: DistInfo) -> nn.Module:
    """DDP over the method: only the student's parameters need gradients, so only they are
    all-reduced; the EMA teacher then updates identically on every rank. On CUDA the
    BatchNorm layers become ``SyncBatchNorm`` (as dino does; same parameters, so an optimiser
    built before stays valid); on CPU (gloo, where ``SyncBatchNorm`` is unavailable) only the
    SimCLR projector's BatchNorms use global statistics."""
    if not info.distributed:
        return method
    from torch.nn.parallel import DistributedDataParallel as DDP

    if info.device.type == "cuda":
        nn.SyncBatchNorm.convert_sync_batchnorm(method)
        device_ids: list[int] | None = [info.device.index or 0]
    else:
        device_ids = None
    local = [name for name, _ in method.named_buffers() if name in method.ddp_local_buffers]
    if local:
        # Large or self-synchronised buffers (queues, banks, DINO's all-reduced centre) are
        # not re-broadcast from rank 0 before every forward.
        DDP._set_params_and_buffers_to_ignore_for_model(method, local)
    return DDP(method, device_ids=device_ids)


def compile_backbones(method: SSLMethod) -> None:
    """``torch.compile`` each encoder's backbone in place (state-dict keys unchanged); one
    static graph per crop resolution."""
    for enc in method.encoders():
        enc.backbone.compile(dynamic=False)


__all__ = [
    "TrainData",
    "build_feature_loader",
    "build_loader",
    "build_method",
    "build_optimizer",
    "compile_backbones",
    "open_data",
    "recorded_config",
    "resolve_runtime",
    "runtime_settings",
    "seed_everything",
    "wrap_ddp",
]
