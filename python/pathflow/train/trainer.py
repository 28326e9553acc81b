"""The training loop of ``pathflow train`` (facebookresearch/dino's ``train_dino``, for any
registered method).

One step::

    views  = next batch of the loader (on the device)
    lr, wd = schedules[step]                      per-step cosine schedules with warmup
    loss   = model(views, step)["loss"]           bf16 autocast; DDP all-reduces the gradients
    stop if the loss is not finite on any rank    (the last checkpoint stays as it was; the
                                                  loss averaged over ranks is logged)
    loss.backward()
    method.before_optimizer_step(step)            DINO: no last-layer update in epoch 0
    method.clip_gradients(clip_grad)              DINO: per parameter; others: global norm
    optimizer.step()                              AdamW (fused on CUDA, foreach on CPU)
    method.after_step(step)                       DINO: centre and EMA teacher updates

Methods with ``uses_meta`` get the batch's metadata (``model(views, step, meta=...)``; SGCL:
its bank's sample indices); a method's ``start_epoch(epoch)``, if it has one, runs before
each epoch's first batch (SGCL: k-means refit, skipped when resumed within the epoch).

Run with ``torchrun --nproc-per-node N -m pathflow train ...`` for DDP (NCCL on GPUs, gloo on
CPU); every rank reads its own share of the shards. Outputs in ``OUT/``: ``config.yaml``
(resolved), ``checkpoint.pt`` (atomic, every ``save_every`` steps and at the end),
``metrics.jsonl``/``metrics.csv``, ``tb/`` (TensorBoard), ``backbone.safetensors`` (timm
weights of the trained backbone) and ``summary.json`` (throughput, peak memory).

Faults: Ctrl-C (once the loop runs) finishes the step, checkpoints and stops (``pathflow
train`` exits 130; a second Ctrl-C leaves at once), like the ``--signal-checkpoint`` signal
(:mod:`~pathflow.train.preemption`); a checkpoint that cannot be written (a full disk) raises
:class:`~pathflow.train.checkpoint.CheckpointWriteError`, one line naming the file, the
reason and the intact previous checkpoint. Without a progress bar, each logged step prints a
line with images/s, steps/s and the time left of this job
(:func:`~pathflow.train.metrics.progress_line`).

Example:
    >>> from pathflow.train import TrainConfig, train
    >>> cfg = TrainConfig(method="dino", arch="vit_small_patch16_224", data="run/shards",
    ...                   out="run/dino", epochs=100, batch_size=64)
    >>> summary = train(cfg)  # doctest: +SKIP
    >>> summary.images_per_s  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pathflow.exceptions import ConfigError, PathflowError
from pathflow.outputs import atomic_write_text
from pathflow.train.backbones import create_backbone
from pathflow.train.checkpoint import (
    CheckpointWriteError,
    load_checkpoint,
    rank_state,
    restore_rng,
    save_checkpoint,
    unpack_rank_state,
)
from pathflow.train.config import TrainConfig
from pathflow.train.distributed import DistInfo, available_cpus, init_distributed
from pathflow.train.export import export_backbone
from pathflow.train.methods import SSLMethod, create_method, method_class
from pathflow.train.metrics import MetricsLogger, StepRate, progress_line
from pathflow.train.preemption import StopSignal
from pathflow.train.schedules import cosine_schedule


class NonFiniteLossError(PathflowError):
    """The loss became NaN or infinite; the run stopped before updating the weights."""


@dataclass
class TrainSummary:
    """What a run did; also written to ``OUT/summary.json``."""

    method: str
    arch: str
    steps: int
    start_step: int
    images: int
    seconds: float
    images_per_s: float
    images_per_s_steady: float
    peak_memory_gb: float
    peak_rss_gb: float
    slides_per_batch_mean: float | None
    slides_per_batch_min: int | None
    final_loss: float | None
    device: str
    world_size: int
    precision: str
    compile: bool
    batch_size: int
    finished: bool
    out: str
    stopped_by: str | None = None  # the --signal-checkpoint signal or SIGINT (Ctrl-C) that
    # stopped the run after its checkpoint

    def line(self) -> str:
        mem = f", peak GPU memory {self.peak_memory_gb:.2f} GB" if self.peak_memory_gb else ""
        loss = "n/a" if self.final_loss is None else f"{self.final_loss:.4f}"
        mix = (
            f", {self.slides_per_batch_mean:.1f} slides per batch (min {self.slides_per_batch_min})"
            if self.slides_per_batch_mean is not None
            else ""
        )
        return (
            f"pathflow train: {self.method}/{self.arch} steps {self.start_step}->{self.steps}, "
            f"{self.images} images in {self.seconds:.1f} s: {self.images_per_s:.1f} img/s "
            f"(steady {self.images_per_s_steady:.1f}){mem}{mix}, final loss {loss}"
        )


# ---------------------------------------------------------------------------- building blocks
def say(message: str) -> None:
    """A line for the user on stderr (the progress bar's stream)."""
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def naming_os_errors(path: Path) -> Iterator[None]:
    """Give an ``OSError`` raised without a file name (a failed write: ``No space left on
    device``) the name of the output being written, for a one-line error that says which."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_data(data: str, kind: str = "images") -> Path:
    """The source of ``--data``. Images: a shard folder, ``shards.json``, a ``.tar``, or the
    output folder of ``pathflow tile --shards`` (its ``shards/``). Region features: a folder
    of ``pathflow extract --model regions`` files, or the extract output folder holding
    ``features/``."""
    if kind == "region_features":
        from pathflow.data.features import is_region_feature_folder

        p = Path(data) if data else Path()
        if not data or not p.exists():
            raise ConfigError(
                f"{data or '--data'}: region features not found (--data DIR, output of "
                "pathflow extract --model regions)"
            )
        if not (p.is_file() and p.suffix == ".h5") and not is_region_feature_folder(p):
            raise ConfigError(
                f"{p}: no region-feature .h5 files (region_features [M, G*G, D]); make them "
                "with pathflow extract SHARDS --model regions"
            )
        return p
    if not data:
        raise ConfigError("no training data: --data DIR (output of pathflow tile --shards)")
    p = Path(data)
    sub = p / "shards"
    if (
        p.is_dir()
        and not (p / "shards.json").is_file()
        and sub.is_dir()
        and ((sub / "shards.json").is_file() or any(sub.glob("*.tar")))
    ):
        return sub
    if not p.exists():
        raise ConfigError(f"{p}: training data not found")
    return p


def data_fingerprint(data: Path) -> str:
    """sha256 of the data's index: ``shards.json`` when there is one, else the names and
    sizes of the ``.tar`` files. A re-tiled folder gets another fingerprint."""
    h = hashlib.sha256()
    manifest = data if data.name == "shards.json" else data / "shards.json"
    if data.is_dir() and not manifest.is_file() and not any(data.glob("*.tar")):
        # region-feature files: names, sizes and modification times
        for f in sorted(data.rglob("*.h5")):
            st = f.stat()
            h.update(f"{f.relative_to(data)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    elif manifest.is_file():
        h.update(manifest.read_bytes())
    else:
        tars = [data] if data.is_file() else sorted(data.glob("*.tar"))
        for tar in tars:
            h.update(f"{tar.name}\t{tar.stat().st_size}\n".encode())
    return h.hexdigest()


def check_resume(cfg: TrainConfig, ckpt: dict[str, Any], ckpt_path: Path, fingerprint: str) -> None:
    """Refuse to resume with settings that change what trains: any option but run control
    (``RUN_CONTROL``) that differs from the checkpoint's, unless listed in
    ``--allow-changed``; and data whose fingerprint differs."""
    saved = ckpt.get("config") or {}
    allowed = set(cfg.allow_changed)
    diffs = [
        d for d in cfg.differences(saved)
        if d not in allowed and d.split(".", 1)[0] not in allowed
    ]  # fmt: skip
    if diffs:
        name = diffs[0]
        head, _, sub = name.partition(".")
        mine = cfg.to_dict()
        old = (saved.get(head) or {}).get(sub) if sub else saved.get(name)
        new = (mine.get(head) or {}).get(sub) if sub else mine.get(name)
        more = f" (and {', '.join(diffs[1:])})" if len(diffs) > 1 else ""
        raise ConfigError(
            f"{ckpt_path}: --resume with {name} = {new!r}, the run was started with {old!r}"
            f"{more}; use the same settings, or pass --allow-changed {' '.join(diffs)}"
        )
    saved_fp = ckpt.get("data_fingerprint")
    if saved_fp is not None and saved_fp != fingerprint and "data" not in allowed:
        raise ConfigError(
            f"{ckpt_path}: the training data changed since the run started ({cfg.data}: "
            "shards.json differs, e.g. re-tiled); resume on the same data, or pass "
            "--allow-changed data"
        )


def resolve_runtime(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill the device-dependent ``auto`` settings: bf16 and compile on CUDA."""
    if cfg.precision == "auto":
        cfg.precision = "bf16" if device.type == "cuda" else "fp32"
    if cfg.compile is None:
        cfg.compile = device.type == "cuda"
    return cfg


def build_loader(cfg: TrainConfig, info: DistInfo) -> Any:
    """The :func:`pathflow.data.make_loader` loader of this rank, with the method's view
    preset unless ``cfg.views`` names another."""
    from pathflow.data import create_views, make_loader

    output = "bfloat16" if cfg.precision == "bf16" and info.device.type == "cuda" else "float"
    if method_class(cfg.method).data_kind == "region_features":
        if cfg.views not in (None, "hipt4k"):
            raise ConfigError(
                f"--views {cfg.views}: {cfg.method} trains on region-feature crops (views "
                "hipt4k; sizes with --global-size/--local-size/--num-local in grid cells)"
            )
        return build_feature_loader(cfg, info, output)
    views = create_views(
        cfg.views or method_class(cfg.method).views_preset,
        global_size=cfg.global_size,
        local_size=cfg.local_size,
        num_local=cfg.num_local,
    )
    return make_loader(
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


def build_method(cfg: TrainConfig, device: torch.device, in_dim: int | None = None) -> SSLMethod:
    """Backbone + method, initialised from ``cfg.seed`` (identical on every rank).
    ``in_dim``: width of the input features of feature-grid backbones (``vit4k_xs``)."""
    kwargs: dict[str, Any] = {}
    if in_dim is not None:
        kwargs["in_dim"] = in_dim
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    seed_everything(cfg.seed)
    backbone, embed_dim = create_backbone(
        str(cfg.arch), pretrained=cfg.pretrained, channels_last=cfg.channels_last, **kwargs
    )
    method = create_method(cfg.method, backbone, embed_dim, cfg)
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


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if cfg.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_schedules(optimizer: Any, lr: float, wd: float, peak_lr: float | None = None) -> None:
    """This step's learning rate and weight decay in every parameter group. Groups marked
    ``fixed_lr`` (SimSiam's predictor) keep ``peak_lr``, the peak of the schedule (``lr``
    when not given); groups with ``apply_wd`` False keep their weight decay."""
    for group in optimizer.param_groups:
        fixed = group.get("fixed_lr", False) and peak_lr is not None
        group["lr"] = peak_lr if fixed else lr
        if group.get("apply_wd", True):
            group["weight_decay"] = wd


def mean_over_ranks(loss: Tensor, info: DistInfo) -> float:
    """The loss averaged over ranks (one small all-reduce, one sync); NaN/inf if it is
    NaN/inf on any rank."""
    value = loss.detach().float().reshape(1)
    if info.distributed:
        value = value / info.world_size
        dist.all_reduce(value)
    return float(value.item())


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return 0.0


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def gather_rank_states(blob: bytes, info: DistInfo) -> list[bytes]:
    if not info.distributed:
        return [blob]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, blob)
    return [bytes(b) for b in out]


def rng_isolated(iterable: Any) -> Iterator[Any]:
    """Iterate ``iterable`` without letting it draw from the global torch RNG.

    A ``DataLoader`` with workers draws its base seed from that RNG whenever an epoch's
    iterator starts; the model's stochastic depth draws from it too. Isolating the loader keeps
    the model's draws independent of where a run was interrupted and resumed.
    """
    it = iter(iterable)
    try:
        while True:
            with torch.random.fork_rng(devices=[]):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def progress_bar(total: int, initial: int, enabled: bool) -> Iterator[Any]:
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=initial,
        disable=not enabled,
        unit="step",
        dynamic_ncols=True,
        desc="train",
    )
    try:
        yield bar
    finally:
        bar.close()


def train_step(
    model: nn.Module,
    method: SSLMethod,
    optimizer: Any,
    views: list[Tensor],
    step: int,
    cfg: TrainConfig,
    info: DistInfo,
    lr: float,
    wd: float,
    meta: dict[str, Any] | None = None,
) -> tuple[float, dict[str, Tensor], Tensor | None]:
    """One optimisation step. Returns the loss averaged over ranks, the method's outputs
    and the global gradient norm (before clipping; None without clipping). Raises
    :class:`NonFiniteLossError` before touching the weights if the loss is NaN/inf on any
    rank. ``meta``: the batch's metadata, passed to methods whose ``uses_meta`` is True
    (SGCL: sample indices of its memory bank)."""
    set_schedules(optimizer, lr, wd, peak_lr=cfg.scaled_lr(info.world_size))
    with autocast(cfg, info.device):
        if getattr(method, "uses_meta", False):
            outputs = model(views, step, meta=meta)
        else:
            outputs = model(views, step)
    loss = outputs["loss"]
    loss_value = mean_over_ranks(loss, info)
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"loss is {loss_value} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.before_optimizer_step(step)
    grad_norm = method.clip_gradients(cfg.clip_grad) if cfg.clip_grad else None
    optimizer.step()
    method.after_step(step)
    return loss_value, outputs, grad_norm


# ---------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, progress: bool | None = None) -> TrainSummary:
    """Run (or resume) a training run described by ``cfg``; returns its summary.

    ``progress``: True for a progress bar, False for none (only the first and last lines),
    None for a bar on a terminal and one line per logged step otherwise.

    Raises :class:`NonFiniteLossError` if the loss becomes NaN/inf (the last checkpoint is
    left as it was), :class:`~pathflow.exceptions.ConfigError` for invalid settings,
    :class:`~pathflow.train.checkpoint.CheckpointWriteError` when a checkpoint cannot be
    written (the previous one stays intact), ``KeyboardInterrupt`` on a Ctrl-C before the
    first step or a second one (a first one during the loop checkpoints and returns, with
    ``stopped_by="SIGINT"``).
    """
    cfg = cfg.resolve()
    created_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.device)
    try:
        with StopSignal(cfg.signal_checkpoint, info) as stop:  # SLURM's pre-timeout signal
            return _train(cfg, info, progress, stop)
    finally:
        if created_group and info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig, info: DistInfo, progress: bool | None, stop: StopSignal
) -> TrainSummary:
    device = info.device
    cfg = resolve_runtime(cfg, device)
    if device.type == "cpu":
        # The loader's workers take cores too: oversubscribed OpenMP threads spin and can make
        # a CPU step many times slower, so the trainer keeps only the cores that are left.
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, available_cpus() // local - cfg.num_workers))
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    resuming = cfg.resume and ckpt_path.exists()
    if ckpt_path.exists() and not cfg.resume:
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue it, or another --out")
    data = resolve_data(cfg.data, method_class(cfg.method).data_kind)
    fingerprint = data_fingerprint(data)
    ckpt = load_checkpoint(ckpt_path) if resuming else None
    if ckpt is not None:
        check_resume(cfg, ckpt, ckpt_path, fingerprint)
        if int(ckpt["step"]) >= _saved_total(ckpt):
            return _finished(cfg, ckpt, out, info)

    # ---- data: the schedules are counted in the loader's batches
    loader = build_loader(dataclasses.replace(cfg, data=str(data)), info)
    cfg.steps_per_epoch = len(loader)
    cfg.world_size = info.world_size
    total = cfg.total_steps
    if info.is_main:
        for warning in cfg.schedule_warnings():
            say(f"pathflow train: warning: {warning}")

    # ---- model, optimiser, schedules
    features = getattr(loader, "features", None)  # region features: the grid's width
    method = build_method(cfg, device, getattr(features, "dim", None))
    optimizer = build_optimizer(method, cfg, device)
    assert cfg.weight_decay is not None and cfg.weight_decay_end is not None
    lr_schedule = cosine_schedule(cfg.scaled_lr(info.world_size), cfg.min_lr, total, cfg.warmup())
    wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)

    # ---- resume: weights, optimiser, position, loader and RNG states
    step, epoch, last_saved = 0, 0, -1
    seed_everything(cfg.seed + info.rank)
    if ckpt is not None:
        if int(ckpt["world_size"]) != info.world_size:
            raise ConfigError(
                f"{ckpt_path} was written by {ckpt['world_size']} process(es), this run has "
                f"{info.world_size}: resume with the same number of processes"
            )
        method.load_state_dict(ckpt["method"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, last_saved = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["step"])
        private = unpack_rank_state(ckpt, info.rank)
        loader.set_epoch(epoch)
        if private["loader"] is not None:
            loader.load_state_dict(private["loader"])
        restore_rng(private["rng"])
        del ckpt
    # --stop-after counts the steps of this job, from where it starts
    stop_at = min(total, step + cfg.stop_after) if cfg.stop_after else total
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with naming_os_errors(out / "config.yaml"):
            cfg.save(out / "config.yaml")

    model = wrap_ddp(method, info)
    if cfg.compile:
        compile_backbones(method)
    method.train()

    n_params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    if info.is_main:
        say(
            f"pathflow train: {cfg.method}/{cfg.arch}, {n_params / 1e6:.1f}M trainable "
            f"parameters, {total} steps of {cfg.batch_size} x {info.world_size} images "
            f"({cfg.steps_per_epoch} per epoch), peak lr {lr_schedule.max():.2e}, "
            f"schedules {_lengths_text(cfg)}, "
            f"{cfg.precision} on {device}{', compiled' if cfg.compile else ''}"
            f"{f', resuming at step {step}' if resuming else ''}; outputs in {out}"
        )

    # ---- the loop
    images_per_step = cfg.batch_size * info.world_size
    start_step = step
    slide_counts: list[int] = []
    last_loss = float("nan")
    t_start = time.perf_counter()
    t_steady: float | None = None
    steady_from = start_step + min(3, max(stop_at - start_step - 1, 0))
    t_log, step_log = time.perf_counter(), step
    # progress None: a bar on a terminal, else a line per log step; False: neither
    show_bar = info.is_main and (progress if progress is not None else sys.stderr.isatty())
    show_lines = info.is_main and progress is None and not show_bar
    logger = MetricsLogger(
        out,
        enabled=info.is_main,
        tensorboard=cfg.tensorboard,
        resume_step=step if resuming else None,
    )

    def checkpoint(epoch_next: int, loader_state: dict[str, Any] | None) -> None:
        blobs = gather_rank_states(rank_state(loader_state), info)
        if info.is_main:
            try:
                _save(epoch_next, blobs)
            except CheckpointWriteError as exc:
                before = (
                    f"{ckpt_path} still holds step {last_saved}, intact"
                    if last_saved >= 0
                    else "no earlier checkpoint was written"
                )
                raise CheckpointWriteError(
                    f"{ckpt_path}: cannot write the checkpoint of step {step}: {exc.reason}; "
                    f"stopped, {before}: free space, then run the same command with --resume",
                    exc.errno,
                    exc.reason,
                ) from None
        if info.distributed:
            dist.barrier()

    def _save(epoch_next: int, blobs: list[bytes]) -> None:
        save_checkpoint(
            ckpt_path,
            {
                "method_name": cfg.method,
                "arch": cfg.arch,
                "export_prefix": method.export_prefix,
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": step,
                "epoch": epoch_next,
                "config": cfg.to_dict(),
                "data_fingerprint": fingerprint,
                "world_size": info.world_size,
                "rank_states": blobs,
            },
        )

    rate = StepRate(step, t_start)
    stop.arm()  # from here a Ctrl-C finishes the step and checkpoints (a second one: at once)
    with logger, progress_bar(stop_at, step, show_bar) as bar:
        while step < stop_at:
            loader.set_epoch(epoch)
            start_epoch = getattr(method, "start_epoch", None)
            if start_epoch is not None:  # e.g. SGCL's k-means refit (skipped when resumed)
                start_epoch(epoch)
            seen = False
            for batch in rng_isolated(loader):
                seen = True
                slides = len(set(batch.meta["slide"]))  # this rank's batch
                slide_counts.append(slides)
                views = [v.to(device, non_blocking=True) for v in batch.views]
                try:
                    loss_value, outputs, grad_norm = train_step(
                        model, method, optimizer, views, step, cfg, info,
                        lr=float(lr_schedule[step]), wd=float(wd_schedule[step]),
                        meta=batch.meta,
                    )  # fmt: skip
                except NonFiniteLossError as exc:
                    last = (
                        f"Last good checkpoint: {ckpt_path} (step {last_saved})."
                        if last_saved >= 0
                        else "No checkpoint was written."
                    )
                    raise NonFiniteLossError(
                        f"{exc} (epoch {epoch}); stopped. {last} Try a lower --lr, a longer "
                        "warmup, or --precision fp32."
                    ) from None
                step += 1
                rate.done(step, time.perf_counter())
                if stop.requested():  # on every rank alike: checkpoint below, then leave
                    stop_at = step
                last_loss = loss_value
                if step == steady_from:
                    t_steady = time.perf_counter()
                epoch_done = batch.index + 1 >= len(loader)

                if step % cfg.log_every == 0 or step == stop_at:
                    now = time.perf_counter()
                    ips = images_per_step * (step - step_log) / max(now - t_log, 1e-9)
                    t_log, step_log = now, step
                    record: dict[str, Any] = {
                        "step": step,
                        "epoch": epoch,
                        "loss": last_loss,
                        "lr": float(lr_schedule[step - 1]),
                        "wd": float(wd_schedule[step - 1]),
                    }
                    for k, v in outputs.items():
                        if k != "loss" and isinstance(v, Tensor) and v.numel() == 1:
                            record[k] = float(v.item())
                    if grad_norm is not None:
                        record["grad_norm"] = float(grad_norm.item())
                    record["slides_per_batch"] = slides
                    record["img_per_s"] = round(ips, 2)
                    record["mem_gb"] = round(peak_memory_gb(device), 3)
                    record["time"] = round(now - t_start, 3)
                    logger.log(record)
                    bar.set_postfix(
                        loss=f"{last_loss:.4f}",
                        lr=f"{record['lr']:.2e}",
                        img_s=f"{ips:.1f}",
                        **({"mem": f"{record['mem_gb']:.1f}G"} if device.type == "cuda" else {}),
                    )
                    if show_lines:  # with steps/s and the time left (ETA) of this job
                        say(
                            progress_line(
                                step, total, epoch, last_loss, record["lr"], ips, rate, stop_at
                            )
                        )
                bar.update(1)

                if step % cfg.save_every == 0 or step == stop_at:
                    checkpoint(
                        epoch + 1 if epoch_done else epoch,
                        None if epoch_done else loader.state_dict(),
                    )
                    last_saved = step
                if step >= stop_at:
                    break
            else:  # the epoch is over
                if not seen:
                    raise PathflowError(f"the loader yielded no batch in epoch {epoch}")
                epoch += 1

    # ---- outputs
    seconds = time.perf_counter() - t_start
    done = step - start_step
    steady_steps = step - steady_from
    steady_s = time.perf_counter() - t_steady if t_steady is not None else 0.0
    summary = TrainSummary(
        method=cfg.method,
        arch=str(cfg.arch),
        steps=step,
        start_step=start_step,
        images=done * images_per_step,
        seconds=round(seconds, 3),
        images_per_s=round(done * images_per_step / max(seconds, 1e-9), 2),
        images_per_s_steady=round(
            steady_steps * images_per_step / steady_s if steady_s > 0 and steady_steps > 0 else 0,
            2,
        ),
        peak_memory_gb=round(peak_memory_gb(device), 3),
        peak_rss_gb=round(peak_rss_gb(), 3),
        slides_per_batch_mean=round(float(np.mean(slide_counts)), 3) if slide_counts else None,
        slides_per_batch_min=min(slide_counts) if slide_counts else None,
        final_loss=None if math.isnan(last_loss) else last_loss,
        device=str(device),
        world_size=info.world_size,
        precision=cfg.precision,
        compile=bool(cfg.compile),
        batch_size=cfg.batch_size,
        finished=step >= total,
        out=str(out),
        stopped_by=stop.reason if stop.stopped and step < total else None,
    )
    if info.is_main:
        spec = getattr(loader, "spec", None)  # the training normalisation, for --norm auto
        with naming_os_errors(out / "backbone.safetensors"):
            export_backbone(
                method, out / "backbone.safetensors", arch=str(cfg.arch),
                mean=getattr(spec, "mean", None), std=getattr(spec, "std", None),
            )  # fmt: skip
        with naming_os_errors(out / "summary.json"):
            atomic_write_text(out / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
        say(summary.line())
        if summary.stopped_by:
            say(stop.message(step, ckpt_path))
    if summary.stopped_by and info.distributed:
        dist.barrier()  # no rank exits (75) before rank 0's outputs: srun --kill-on-bad-exit
    return summary


def _lengths_text(cfg: TrainConfig) -> str:
    return ", ".join(f"{k} {v}" for k, v in cfg.schedule_lengths().items())


def _saved_total(ckpt: dict[str, Any]) -> int:
    """Total steps of the run that wrote ``ckpt``."""
    saved = ckpt["config"]
    if saved.get("steps"):
        return int(saved["steps"])
    return int(saved["epochs"]) * int(saved["steps_per_epoch"])


def _finished(cfg: TrainConfig, ckpt: dict[str, Any], out: Path, info: DistInfo) -> TrainSummary:
    """``--resume`` of a run that is already complete: say so, change nothing, return the
    run's summary (``summary.json``, rewritten only if it is missing or unreadable)."""
    step = int(ckpt["step"])
    path = out / "summary.json"
    summary = None
    if path.is_file():
        with contextlib.suppress(ValueError, TypeError):
            summary = TrainSummary(**json.loads(path.read_text()))
    if summary is None:
        saved = ckpt["config"]
        summary = TrainSummary(
            method=str(ckpt.get("method_name", cfg.method)), arch=str(ckpt.get("arch", cfg.arch)),
            steps=step, start_step=step, images=0, seconds=0.0, images_per_s=0.0,
            images_per_s_steady=0.0, peak_memory_gb=0.0, peak_rss_gb=0.0,
            slides_per_batch_mean=None, slides_per_batch_min=None, final_loss=None,
            device=str(info.device), world_size=int(ckpt["world_size"]),
            precision=str(saved.get("precision")), compile=bool(saved.get("compile")),
            batch_size=int(saved.get("batch_size", cfg.batch_size)), finished=True, out=str(out),
        )  # fmt: skip
        if info.is_main:
            atomic_write_text(path, json.dumps(asdict(summary), indent=2) + "\n")
    if info.is_main:
        say(f"pathflow train: {out} is already finished ({step} of {step} steps); nothing to do")
    return summary


__all__ = [
    "NonFiniteLossError",
    "TrainSummary",
    "build_loader",
    "build_method",
    "build_optimizer",
    "train",
    "train_step",
    "wrap_ddp",
]
