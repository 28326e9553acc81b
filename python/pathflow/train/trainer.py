"""The training loop of ``pathflow train`` (facebookresearch/dino's ``train_dino``, for any
registered method).

One step::

    views  = next batch of the loader (on the device)
    lr, wd = schedules[step]                      per-step cosine schedules with warmup
    loss   = model(views, step)["loss"]           bf16 autocast; DDP all-reduces the gradients
    stop if the loss is not finite on any rank    (the last checkpoint stays as it was; the
                                                  loss averaged over ranks is logged)
    loss.backward(); clip the gradient norm
    method.before_optimizer_step(step)            DINO: no last-layer update in epoch 0
    optimizer.step()                              AdamW (fused on CUDA, foreach on CPU)
    method.after_step(step)                       DINO: EMA teacher update

Run with ``torchrun --nproc-per-node N -m pathflow train ...`` for DDP (NCCL on GPUs, gloo on
CPU); every rank reads its own share of the shards. Outputs in ``OUT/``: ``config.yaml``
(resolved), ``checkpoint.pt`` (atomic, every ``save_every`` steps and at the end),
``metrics.jsonl``/``metrics.csv``, ``tb/`` (TensorBoard), ``backbone.safetensors`` (timm
weights of the trained backbone) and ``summary.json`` (throughput, peak memory).

Example:
    >>> from pathflow.train import TrainConfig, train
    >>> cfg = TrainConfig(method="dino", arch="vit_small_patch16_224", data="run/shards",
    ...                   out="run/dino", epochs=100, batch_size=64)
    >>> summary = train(cfg)  # doctest: +SKIP
    >>> summary.images_per_s  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
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
from pathflow.train.backbones import create_backbone
from pathflow.train.checkpoint import (
    load_checkpoint,
    rank_state,
    restore_rng,
    save_checkpoint,
    unpack_rank_state,
)
from pathflow.train.config import TrainConfig
from pathflow.train.distributed import DistInfo, init_distributed
from pathflow.train.export import export_backbone
from pathflow.train.io import atomic_write_text
from pathflow.train.methods import SSLMethod, create_method, method_class
from pathflow.train.metrics import MetricsLogger
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
    final_loss: float
    device: str
    world_size: int
    precision: str
    compile: bool
    batch_size: int
    finished: bool
    out: str

    def line(self) -> str:
        mem = f", peak GPU memory {self.peak_memory_gb:.2f} GB" if self.peak_memory_gb else ""
        return (
            f"pathflow train: {self.method}/{self.arch} steps {self.start_step}->{self.steps}, "
            f"{self.images} images in {self.seconds:.1f} s: {self.images_per_s:.1f} img/s "
            f"(steady {self.images_per_s_steady:.1f}){mem}, final loss {self.final_loss:.4f}"
        )


# ---------------------------------------------------------------------------- building blocks
def say(message: str) -> None:
    """A line for the user on stderr (the progress bar's stream)."""
    print(message, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
        output="bfloat16" if cfg.precision == "bf16" and info.device.type == "cuda" else "float",
    )


def build_method(cfg: TrainConfig, device: torch.device) -> SSLMethod:
    """Backbone + method, initialised from ``cfg.seed`` (identical on every rank)."""
    kwargs: dict[str, Any] = {}
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    seed_everything(cfg.seed)
    backbone, embed_dim = create_backbone(
        cfg.arch, pretrained=cfg.pretrained, channels_last=cfg.channels_last, **kwargs
    )
    method = create_method(cfg.method, backbone, embed_dim, cfg)
    return method.to(device)


def build_optimizer(method: SSLMethod, cfg: TrainConfig, device: torch.device) -> Any:
    """AdamW over the method's parameter groups; fused kernels on CUDA, foreach on CPU."""
    assert cfg.weight_decay is not None
    groups = method.param_groups(cfg.weight_decay)
    if device.type == "cuda":
        return torch.optim.AdamW(groups, lr=0.0, fused=True)
    return torch.optim.AdamW(groups, lr=0.0, foreach=True)


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


def set_schedules(optimizer: Any, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
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
) -> tuple[float, dict[str, Tensor], Tensor | None]:
    """One optimisation step. Returns the loss averaged over ranks, the method's outputs
    and the gradient norm (before clipping; None without clipping). Raises
    :class:`NonFiniteLossError` before touching the weights if the loss is NaN/inf on any
    rank."""
    set_schedules(optimizer, lr, wd)
    with autocast(cfg, info.device):
        outputs = model(views, step)
    loss = outputs["loss"]
    loss_value = mean_over_ranks(loss, info)
    if not math.isfinite(loss_value):
        raise NonFiniteLossError(f"loss is {loss_value} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = None
    if cfg.clip_grad:
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in method.parameters() if p.grad is not None], cfg.clip_grad
        )
    method.before_optimizer_step(step)
    optimizer.step()
    method.after_step(step)
    return loss_value, outputs, grad_norm


# ---------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, progress: bool | None = None) -> TrainSummary:
    """Run (or resume) a training run described by ``cfg``; returns its summary.

    ``progress``: True for a progress bar, False for none (only the first and last lines),
    None for a bar on a terminal and one line per logged step otherwise.

    Raises :class:`NonFiniteLossError` if the loss becomes NaN/inf (the last checkpoint is
    left as it was), :class:`~pathflow.exceptions.ConfigError` for invalid settings.
    """
    cfg = cfg.resolve()
    created_group = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.device)
    try:
        return _train(cfg, info, progress)
    finally:
        if created_group and info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: TrainConfig, info: DistInfo, progress: bool | None) -> TrainSummary:
    device = info.device
    cfg = resolve_runtime(cfg, device)
    if device.type == "cpu":
        # The loader's workers take cores too: oversubscribed OpenMP threads spin and can make
        # a CPU step many times slower, so the trainer keeps only the cores that are left.
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local - cfg.num_workers))
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    resuming = cfg.resume and ckpt_path.exists()
    if ckpt_path.exists() and not cfg.resume:
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue it, or another --out")
    if not cfg.data:
        raise ConfigError("no training data: --data DIR/shards (from pathflow tile --shards)")

    # ---- data: the schedules are counted in the loader's batches
    loader = build_loader(cfg, info)
    cfg.steps_per_epoch = len(loader)
    cfg.world_size = info.world_size
    if cfg.steps is None:
        cfg.steps = cfg.epochs * cfg.steps_per_epoch
    total = cfg.total_steps
    stop_at = min(total, cfg.stop_after or total)

    # ---- model, optimiser, schedules
    method = build_method(cfg, device)
    optimizer = build_optimizer(method, cfg, device)
    assert cfg.weight_decay is not None and cfg.weight_decay_end is not None
    lr_schedule = cosine_schedule(cfg.scaled_lr(info.world_size), cfg.min_lr, total, cfg.warmup())
    wd_schedule = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total)

    # ---- resume: weights, optimiser, position, loader and RNG states
    step, epoch, last_saved = 0, 0, -1
    seed_everything(cfg.seed + info.rank)
    if resuming:
        ckpt = load_checkpoint(ckpt_path)
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
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
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
            f"{cfg.precision} on {device}{', compiled' if cfg.compile else ''}"
            f"{f', resuming at step {step}' if resuming else ''}; outputs in {out}"
        )

    # ---- the loop
    images_per_step = cfg.batch_size * info.world_size
    start_step = step
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
                    "world_size": info.world_size,
                    "rank_states": blobs,
                },
            )
        if info.distributed:
            dist.barrier()

    with logger, progress_bar(stop_at, step, show_bar) as bar:
        while step < stop_at:
            loader.set_epoch(epoch)
            seen = False
            for batch in rng_isolated(loader):
                seen = True
                views = [v.to(device, non_blocking=True) for v in batch.views]
                try:
                    loss_value, outputs, grad_norm = train_step(
                        model, method, optimizer, views, step, cfg, info,
                        lr=float(lr_schedule[step]), wd=float(wd_schedule[step]),
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
                    if show_lines:
                        say(
                            f"step {step}/{total} epoch {epoch} loss {last_loss:.4f} "
                            f"lr {record['lr']:.2e} {ips:.1f} img/s"
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
        arch=cfg.arch,
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
        final_loss=last_loss,
        device=str(device),
        world_size=info.world_size,
        precision=cfg.precision,
        compile=bool(cfg.compile),
        batch_size=cfg.batch_size,
        finished=step >= total,
        out=str(out),
    )
    if info.is_main:
        export_backbone(method, out / "backbone.safetensors", arch=cfg.arch)
        atomic_write_text(out / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")
        if not math.isnan(last_loss):
            say(summary.line())
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
