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
its bank's sample indices); a method's ``start_epoch(epoch)`` runs before each epoch's first
batch (SGCL: k-means refit, skipped when resumed within the epoch). Every hook is declared on
:class:`~pathflow.train.methods.base.SSLMethod`.

The run, top to bottom (as facebookresearch/dino's ``main_dino.py``)::

    train(cfg)                     resolve, distributed init, the stop signal
      open_run                     data, its fingerprint, the checkpoint to resume (checked)
      setup -> Run                 loader, RunPlan (steps per epoch, schedules), method,
                                   optimiser, lr / wd schedules
      resume(run, ckpt)            weights, optimiser, position, loader and RNG states
      start(run)                   config.yaml, DDP, compile, the first line
      run_epoch(run, ...) ...      train_one_epoch: steps, StepLogger, Checkpointer
      summarise(run, ...)          backbone.safetensors, summary.json, the last line

The config is never changed: the facts of the run (device, precision, world size, steps per
epoch, schedule lengths) are its :class:`~pathflow.train.plan.RunPlan`. The loader, method,
optimiser and DDP are built in :mod:`pathflow.train.build`; checkpoints are written by
:class:`~pathflow.train.checkpoint.Checkpointer`.

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
import json
import math
import os
import resource
import sys
import time
from collections.abc import Generator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pathflow.data.sources import data_fingerprint, resolve_data
from pathflow.exceptions import ConfigError, PathflowError
from pathflow.outputs import atomic_write_text
from pathflow.train.build import (
    TrainData,
    build_feature_loader,
    build_loader,
    build_method,
    build_optimizer,
    compile_backbones,
    open_data,
    recorded_config,
    resolve_runtime,
    runtime_settings,
    seed_everything,
    wrap_ddp,
)
from pathflow.train.checkpoint import (
    Checkpointer,
    load_checkpoint,
    restore_rng,
    unpack_rank_state,
)
from pathflow.train.checkpoint import gather_rank_states as _gather
from pathflow.train.config import TrainConfig
from pathflow.train.distributed import DistInfo, available_cpus, init_distributed
from pathflow.train.export import export_backbone
from pathflow.train.methods import SSLMethod, method_class
from pathflow.train.metrics import MetricsLogger, StepRate, progress_line
from pathflow.train.plan import RunPlan
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
    """Every rank's checkpoint blob (:func:`pathflow.train.checkpoint.gather_rank_states`)."""
    return _gather(blob, info.world_size if info.distributed else 1)


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
        if isinstance(it, Generator):  # the loaders' iterators: stop their workers
            it.close()


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
        outputs = model(views, step, meta=meta) if method.uses_meta else model(views, step)
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


# ---------------------------------------------------------------------------------- training
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


# ---------------------------------------------------------------------------------- the run
@dataclass
class Opened:
    """What :func:`open_run` found: the resolved data, its fingerprint, the checkpoint to
    resume (None: a fresh run) and the run's precision and compile settings."""

    data: Path
    fingerprint: str
    ckpt: dict[str, Any] | None
    precision: str
    compile: bool


@dataclass
class Run:
    """A run in progress: the user's config (never changed), its plan, the objects that
    train, and the position (``step``, ``epoch``; ``stop_at``: the last step of this job)."""

    cfg: TrainConfig
    plan: RunPlan
    record: TrainConfig  # the config as saved: cfg with the plan's facts (recorded_config)
    info: DistInfo
    out: Path
    data: TrainData
    method: SSLMethod
    optimizer: Any
    lr_schedule: np.ndarray
    wd_schedule: np.ndarray
    fingerprint: str
    resuming: bool
    model: nn.Module | None = None
    step: int = 0
    epoch: int = 0
    start_step: int = 0
    stop_at: int = 0

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def images_per_step(self) -> int:
        return self.plan.batch_size * self.plan.world_size

    def checkpoint_content(self) -> dict[str, Any]:
        """The part of a checkpoint shared by every rank (:class:`Checkpointer` adds the
        position and the ranks' states)."""
        return {
            "method_name": self.cfg.method,
            "arch": self.cfg.arch,
            "export_prefix": self.method.export_prefix,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "config": self.record.to_dict(),
            "data_fingerprint": self.fingerprint,
        }


def use_cpu_cores(cfg: TrainConfig, device: torch.device) -> None:
    """On CPU, the loader's workers take cores too: oversubscribed OpenMP threads spin and can
    make a step many times slower, so the trainer keeps only the cores that are left."""
    if device.type == "cpu":
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, available_cpus() // local - cfg.num_workers))


def open_run(cfg: TrainConfig, info: DistInfo) -> Opened | TrainSummary:
    """The data, its fingerprint and the checkpoint to resume, checked against ``cfg``
    (:func:`check_resume`); the run's summary if the checkpoint is already finished."""
    precision, compile_ = runtime_settings(cfg, info.device)
    ckpt_path = Path(cfg.out) / "checkpoint.pt"
    if ckpt_path.exists() and not cfg.resume:
        raise ConfigError(f"{ckpt_path} exists: pass --resume to continue it, or another --out")
    data = resolve_data(cfg.data, method_class(cfg.method).data_kind)
    fingerprint = data_fingerprint(data)
    ckpt = load_checkpoint(ckpt_path) if cfg.resume and ckpt_path.exists() else None
    if ckpt is not None:
        as_run = dataclasses.replace(cfg, precision=precision, compile=compile_)
        check_resume(as_run, ckpt, ckpt_path, fingerprint)
        if int(ckpt["step"]) >= _saved_total(ckpt):
            return _finished(cfg, ckpt, Path(cfg.out), info)
    return Opened(data, fingerprint, ckpt, precision, compile_)


def setup(cfg: TrainConfig, info: DistInfo, opened: Opened) -> Run:
    """Open the data (the schedules are counted in the loader's batches), plan the run, build
    the method, the optimiser and the lr / weight-decay schedules."""
    data = open_data(dataclasses.replace(cfg, data=str(opened.data)), info, opened.precision)
    plan = RunPlan.from_config(
        cfg,
        device=str(info.device),
        precision=opened.precision,
        compile=opened.compile,
        world_size=info.world_size,
        steps_per_epoch=len(data.loader),
        data=str(opened.data),
    )
    if info.is_main:
        for warning in plan.warnings():
            say(f"pathflow train: warning: {warning}")
    method = build_method(cfg, info.device, data.in_dim, plan)
    optimizer = build_optimizer(method, cfg, info.device)
    assert cfg.weight_decay is not None and cfg.weight_decay_end is not None
    total = plan.total_steps
    return Run(
        cfg=cfg,
        plan=plan,
        record=recorded_config(cfg, plan),
        info=info,
        out=Path(cfg.out),
        data=data,
        method=method,
        optimizer=optimizer,
        lr_schedule=cosine_schedule(plan.peak_lr, cfg.min_lr, total, plan.lr_warmup),
        wd_schedule=cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total),
        fingerprint=opened.fingerprint,
        resuming=opened.ckpt is not None,
    )


def resume(run: Run, ckpt: dict[str, Any] | None) -> None:
    """Seed this rank, then (resuming) restore the weights, the optimiser, the position, the
    loader's and the RNG states; set the last step of this job (``--stop-after`` counts
    from where it starts)."""
    seed_everything(run.cfg.seed + run.info.rank)
    if ckpt is not None:
        if int(ckpt["world_size"]) != run.info.world_size:
            raise ConfigError(
                f"{run.ckpt_path} was written by {ckpt['world_size']} process(es), this run "
                f"has {run.info.world_size}: resume with the same number of processes"
            )
        run.method.load_state_dict(ckpt["method"])
        run.optimizer.load_state_dict(ckpt["optimizer"])
        run.step, run.epoch = int(ckpt["step"]), int(ckpt["epoch"])
        private = unpack_rank_state(ckpt, run.info.rank)
        run.data.loader.set_epoch(run.epoch)
        if private["loader"] is not None:
            run.data.loader.load_state_dict(private["loader"])
        restore_rng(private["rng"])
    total = run.plan.total_steps
    run.start_step = run.step
    run.stop_at = min(total, run.step + run.cfg.stop_after) if run.cfg.stop_after else total


def start(run: Run) -> None:
    """Write ``config.yaml``, wrap the method in DDP, compile, and say what trains."""
    info, out, plan = run.info, run.out, run.plan
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with naming_os_errors(out / "config.yaml"):
            run.record.save(out / "config.yaml")
    run.model = wrap_ddp(run.method, info)
    if plan.compile:
        compile_backbones(run.method)
    run.method.train()
    if info.is_main:
        n_params = sum(p.numel() for p in run.method.parameters() if p.requires_grad)
        lengths = ", ".join(f"{k} {v}" for k, v in plan.lengths().items())
        say(
            f"pathflow train: {plan.method}/{plan.arch}, {n_params / 1e6:.1f}M trainable "
            f"parameters, {plan.total_steps} steps of {plan.batch_size} x {plan.world_size} "
            f"images ({plan.steps_per_epoch} per epoch), peak lr "
            f"{run.lr_schedule.max():.2e}, schedules {lengths}, {plan.precision} on "
            f"{info.device}{', compiled' if plan.compile else ''}"
            f"{f', resuming at step {run.step}' if run.resuming else ''}; outputs in {out}"
        )


class StepLogger:
    """Metrics of the steps (``metrics.jsonl``/``.csv``, TensorBoard), the progress bar or a
    line per logged step, and the timings of the summary (throughput, steady throughput from
    the 4th step of the job, slides per batch)."""

    def __init__(self, run: Run, progress: bool | None) -> None:
        info = run.info
        self.run = run
        # progress None: a bar on a terminal, else a line per log step; False: neither
        self.show_bar = info.is_main and (progress if progress is not None else sys.stderr.isatty())
        self.show_lines = info.is_main and progress is None and not self.show_bar
        self.metrics = MetricsLogger(
            run.out,
            enabled=info.is_main,
            tensorboard=run.cfg.tensorboard,
            resume_step=run.step if run.resuming else None,
        )
        self.slide_counts: list[int] = []
        self.last_loss = float("nan")
        self.t_start = time.perf_counter()
        self.t_steady: float | None = None
        self.steady_from = run.start_step + min(3, max(run.stop_at - run.start_step - 1, 0))
        self.t_log, self.step_log = self.t_start, run.step
        self.rate = StepRate(run.step, self.t_start)
        self._stack = contextlib.ExitStack()
        self.bar: Any = None

    def __enter__(self) -> StepLogger:
        self._stack.enter_context(self.metrics)
        self.bar = self._stack.enter_context(
            progress_bar(self.run.stop_at, self.run.step, self.show_bar)
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def step_done(self, step: int, loss: float) -> None:
        """Step ``step`` is done (before the stop check and the log)."""
        self.rate.done(step, time.perf_counter())
        self.last_loss = loss
        if step == self.steady_from:
            self.t_steady = time.perf_counter()

    def log(self, outputs: dict[str, Tensor], grad_norm: Tensor | None, slides: int) -> None:
        """Log the step just done when it is a log step (every ``log_every`` and the last);
        advance the bar."""
        run = self.run
        step = run.step
        if step % run.cfg.log_every == 0 or step == run.stop_at:
            now = time.perf_counter()
            ips = run.images_per_step * (step - self.step_log) / max(now - self.t_log, 1e-9)
            self.t_log, self.step_log = now, step
            record = self.record(outputs, grad_norm, slides, ips, now)
            self.metrics.log(record)
            device = run.info.device
            self.bar.set_postfix(
                loss=f"{self.last_loss:.4f}",
                lr=f"{record['lr']:.2e}",
                img_s=f"{ips:.1f}",
                **({"mem": f"{record['mem_gb']:.1f}G"} if device.type == "cuda" else {}),
            )
            if self.show_lines:  # with steps/s and the time left (ETA) of this job
                say(
                    progress_line(
                        step, run.plan.total_steps, run.epoch, self.last_loss, record["lr"],
                        ips, self.rate, run.stop_at,
                    )
                )  # fmt: skip
        self.bar.update(1)

    def record(
        self,
        outputs: dict[str, Tensor],
        grad_norm: Tensor | None,
        slides: int,
        ips: float,
        now: float,
    ) -> dict[str, Any]:
        """The metrics row of the step just done."""
        run = self.run
        record: dict[str, Any] = {
            "step": run.step,
            "epoch": run.epoch,
            "loss": self.last_loss,
            "lr": float(run.lr_schedule[run.step - 1]),
            "wd": float(run.wd_schedule[run.step - 1]),
        }
        for k, v in outputs.items():
            if k != "loss" and isinstance(v, Tensor) and v.numel() == 1:
                record[k] = float(v.item())
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm.item())
        record["slides_per_batch"] = slides
        record["img_per_s"] = round(ips, 2)
        record["mem_gb"] = round(peak_memory_gb(run.info.device), 3)
        record["time"] = round(now - self.t_start, 3)
        return record


def run_epoch(run: Run, log: StepLogger, checkpointer: Checkpointer, stop: StopSignal) -> None:
    """``train_one_epoch``: the batches of epoch ``run.epoch`` left (all of them, or up to
    ``run.stop_at``); a checkpoint every ``save_every`` steps and at the last step of the job;
    ``run.epoch`` advances when the epoch is over."""
    loader, method = run.data.loader, run.method
    assert run.model is not None, "start() first"
    loader.set_epoch(run.epoch)
    method.start_epoch(run.epoch)  # e.g. SGCL's k-means refit (skipped when resumed)
    seen = False
    for batch in rng_isolated(loader):
        seen = True
        slides = len(set(batch.meta["slide"]))  # this rank's batch
        log.slide_counts.append(slides)
        views = [v.to(run.info.device, non_blocking=True) for v in batch.views]
        try:
            loss, outputs, grad_norm = train_step(
                run.model, method, run.optimizer, views, run.step, run.record, run.info,
                lr=float(run.lr_schedule[run.step]), wd=float(run.wd_schedule[run.step]),
                meta=batch.meta,
            )  # fmt: skip
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(
                f"{exc} (epoch {run.epoch}); stopped. {checkpointer.last_good()} Try a lower "
                "--lr, a longer warmup, or --precision fp32."
            ) from None
        run.step += 1
        log.step_done(run.step, loss)
        if stop.requested():  # on every rank alike: checkpoint below, then leave
            run.stop_at = run.step
        epoch_done = batch.index + 1 >= len(loader)
        log.log(outputs, grad_norm, slides)
        if run.step % run.cfg.save_every == 0 or run.step == run.stop_at:
            checkpointer.save(
                run.step,
                run.epoch + 1 if epoch_done else run.epoch,
                None if epoch_done else loader.state_dict(),
            )
        if run.step >= run.stop_at:
            return
    if not seen:
        raise PathflowError(f"the loader yielded no batch in epoch {run.epoch}")
    run.epoch += 1


def summarise(run: Run, log: StepLogger, stop: StopSignal) -> TrainSummary:
    """The run's :class:`TrainSummary`; rank 0 exports the backbone (with the views'
    normalisation), writes ``summary.json`` and says the last line."""
    info, plan, step = run.info, run.plan, run.step
    seconds = time.perf_counter() - log.t_start
    done = step - run.start_step
    steady_steps = step - log.steady_from
    steady_s = time.perf_counter() - log.t_steady if log.t_steady is not None else 0.0
    ips = run.images_per_step
    counts = log.slide_counts
    summary = TrainSummary(
        method=plan.method,
        arch=plan.arch,
        steps=step,
        start_step=run.start_step,
        images=done * ips,
        seconds=round(seconds, 3),
        images_per_s=round(done * ips / max(seconds, 1e-9), 2),
        images_per_s_steady=round(
            steady_steps * ips / steady_s if steady_s > 0 and steady_steps > 0 else 0, 2
        ),
        peak_memory_gb=round(peak_memory_gb(info.device), 3),
        peak_rss_gb=round(peak_rss_gb(), 3),
        slides_per_batch_mean=round(float(np.mean(counts)), 3) if counts else None,
        slides_per_batch_min=min(counts) if counts else None,
        final_loss=None if math.isnan(log.last_loss) else log.last_loss,
        device=str(info.device),
        world_size=plan.world_size,
        precision=plan.precision,
        compile=plan.compile,
        batch_size=plan.batch_size,
        finished=step >= plan.total_steps,
        out=str(run.out),
        stopped_by=stop.reason if stop.stopped and step < plan.total_steps else None,
    )
    if info.is_main:
        write_outputs(run, summary)
        say(summary.line())
        if summary.stopped_by:
            say(stop.message(step, run.ckpt_path))
    if summary.stopped_by and info.distributed:
        dist.barrier()  # no rank exits (75) before rank 0's outputs: srun --kill-on-bad-exit
    return summary


def write_outputs(run: Run, summary: TrainSummary) -> None:
    """``backbone.safetensors`` (with the training normalisation, for ``--norm auto``) and
    ``summary.json``."""
    out = run.out
    with naming_os_errors(out / "backbone.safetensors"):
        export_backbone(
            run.method, out / "backbone.safetensors", arch=run.plan.arch,
            mean=run.data.mean, std=run.data.std,
        )  # fmt: skip
    with naming_os_errors(out / "summary.json"):
        atomic_write_text(out / "summary.json", json.dumps(asdict(summary), indent=2) + "\n")


def _train(
    cfg: TrainConfig, info: DistInfo, progress: bool | None, stop: StopSignal
) -> TrainSummary:
    use_cpu_cores(cfg, info.device)
    opened = open_run(cfg, info)
    if isinstance(opened, TrainSummary):  # --resume of a finished run
        return opened
    run = setup(cfg, info, opened)
    resume(run, opened.ckpt)
    del opened  # the checkpoint's tensors
    start(run)
    checkpointer = Checkpointer(
        run.ckpt_path,
        run.checkpoint_content,
        rank=info.rank,
        world_size=info.world_size if info.distributed else 1,
        last_saved=run.step if run.resuming else -1,
    )
    with StepLogger(run, progress) as log:
        stop.arm()  # from here a Ctrl-C finishes the step and checkpoints (a second: at once)
        while run.step < run.stop_at:
            run_epoch(run, log, checkpointer, stop)
    return summarise(run, log, stop)


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
    "Run",
    "StepLogger",
    "TrainData",
    "TrainSummary",
    "build_feature_loader",
    "build_loader",
    "build_method",
    "build_optimizer",
    "compile_backbones",
    "data_fingerprint",
    "open_data",
    "open_run",
    "recorded_config",
    "resolve_data",
    "resolve_runtime",
    "resume",
    "run_epoch",
    "runtime_settings",
    "seed_everything",
    "setup",
    "start",
    "summarise",
    "train",
    "train_step",
    "wrap_ddp",
]
