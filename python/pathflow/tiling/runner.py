"""Batch driver of ``pathflow tile``: many slides, parallel processes, resumable, and many
cooperating jobs on one shared job folder.

Per slide (in a worker process): open -> resolve mpp -> tissue mask (or the user's mask)
-> patch grid -> ``masks/<id>.png``, ``overlays/<id>.jpg`` and finally
``coords/<id>.h5``. The coordinate file is written last and atomically, so its presence
marks a finished slide: a re-run skips it. A failing slide becomes a ``failed`` row in the
manifest (and a line on stderr) and the batch goes on.

Each finished slide appends one JSON line to ``manifests/part-IIII-of-NNNN.jsonl``
(``part-0000-of-0001`` for a run without ``--part``); a run without ``--part`` writes
``manifest.csv`` once at the end. Every run claims each slide with a lock file in
``claims/`` (so a duplicate job or a re-run of a killed one does not redo work in flight)
and its shard folder (one writer at a time). With ``--part I/N`` (or ``auto``: the job array
index) the run tiles only the slides whose id hashes to part I,
writes its shards to ``shards/part-IIII/`` and marks the part finished with
``manifests/part-IIII-of-NNNN.done``; ``pathflow merge`` then writes ``manifest.csv`` and
``shards/shards.json`` of the whole job.

Example:
    >>> from pathflow.tiling.config import TileConfig
    >>> from pathflow.tiling.runner import tile_slides
    >>> cfg = TileConfig(inputs=["slides/"], out="job", part="0/4").resolve()  # doctest: +SKIP
    >>> tile_slides(cfg).summary()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathflow.exceptions import ConfigError
from pathflow.inputs import (
    SLIDE_EXTENSIONS,
    discover,
    discover_inputs,
    no_slides_message,
    slide_id,
)
from pathflow.jobs.claims import DEFAULT_HEARTBEAT, DEFAULT_STALE, Claim, try_claim
from pathflow.jobs.manifest import ManifestLog, manifest_path, write_done, write_manifest_csv
from pathflow.jobs.partition import format_part, parse_part, part_of
from pathflow.tiling.config import TileConfig
from pathflow.tiling.rerun import JOB_FIELDS, check_rerun
from pathflow.tiling.slide_task import MANIFEST_FIELDS, process_slide

log = logging.getLogger("pathflow.tile")

__all__ = [
    "JOB_FIELDS",
    "MANIFEST_FIELDS",
    "SLIDE_EXTENSIONS",
    "TileReport",
    "check_job_config",
    "discover",
    "discover_inputs",
    "no_slides_message",
    "process_slide",
    "slide_id",
    "tile_slides",
]


@dataclass
class TileReport:
    """Outcome of a batch: one manifest row per slide."""

    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    shards: Any = None

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        n = len(self.rows)
        by: dict[str, int] = {}
        for r in self.rows:
            by[r["status"]] = by.get(r["status"], 0) + 1
        resumed = sum(1 for r in self.rows if r.get("resumed"))
        patches = sum(int(r.get("patches") or 0) for r in self.rows)
        parts = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
        text = (
            f"tiled {n} slide(s) in {self.seconds:.1f} s: {parts}"
            f"{f', resumed {resumed}' if resumed else ''}; {patches} patches -> {self.out}"
        )
        if self.shards is not None:
            text += "\n" + self.shards.summary()
        return text


def _failed_row(path: Path, sid: str, error: str) -> dict[str, Any]:
    row: dict[str, Any] = {k: "" for k in MANIFEST_FIELDS}
    row.update(slide=sid, path=str(path), status="failed", patches=0, resumed=False)
    row["error"] = error if str(path) in error else f"{path}: {error}"
    return row


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    import yaml

    plain = yaml.safe_load(yaml.safe_dump(d))
    if isinstance(plain.get("inputs"), list):  # "slides/" and "slides" are one folder
        plain["inputs"] = [os.path.normpath(str(p)) for p in plain["inputs"]]
    plain.setdefault("mask_mode", "replace")  # what a config.yaml from before it meant
    plain.setdefault("force_slide_mpp", None)
    if plain.get("mask") is None:  # without --mask the mode changes nothing
        plain.pop("mask_mode", None)
    return {k: v for k, v in plain.items() if k not in JOB_FIELDS}


def check_job_config(out: Path, cfg: TileConfig) -> None:
    """A job array part joins ``out`` only if its ``config.yaml`` equals ``cfg`` in every
    field but :data:`JOB_FIELDS`; writes it when absent. Raises a one-line ConfigError."""
    import yaml

    path = out / "config.yaml"
    mine = cfg.to_dict()
    if not path.is_file():
        cfg.save(path)
        return
    try:
        theirs = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from exc
    if not isinstance(theirs, dict):
        raise ConfigError(f"{path}: not a pathflow tile config")
    a, b = _comparable(theirs), _comparable(mine)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in diff[:4])
        more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
        raise ConfigError(
            f"{path}: this job folder was made with other options ({shown}{more}); "
            "use the same options or another --out"
        )


def _init_worker(threads: int) -> None:
    from pathflow import _core

    if threads > 0:
        _core.set_num_threads(threads)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None


class _Feeder:
    """Hands out the slides of a run one at a time. With claims (every run), a slide
    held by another live job is deferred and offered again later (by then usually finished:
    its coords file exists and the slide comes back as a quick ``resumed`` row), so a part
    ends only when every one of its slides has a row."""

    def __init__(self, jobs: list[tuple[int, Path, str]], out: Path, cfg: TileConfig,
                 claims: bool) -> None:  # fmt: skip
        self.pending = list(jobs)
        self.deferred: list[tuple[int, Path, str]] = []
        self.out = out
        self.cfg = cfg
        self.claims = claims
        self.held: dict[int, Claim] = {}
        self.stale = _env_float("PATHFLOW_CLAIM_STALE", DEFAULT_STALE)
        self.beat = _env_float("PATHFLOW_CLAIM_HEARTBEAT", DEFAULT_HEARTBEAT)
        self.delay = 0.5
        self.next_round = 0.0

    @property
    def exhausted(self) -> bool:
        return not self.pending and not self.deferred

    def pause(self) -> float:
        return max(0.05, self.next_round - time.monotonic()) if self.deferred else 0.0

    def take(self) -> tuple[int, Path, str] | None:
        """The next slide to process now, or None (none left, or all deferred for now)."""
        while True:
            if not self.pending:
                if not self.deferred or time.monotonic() < self.next_round:
                    return None
                self.pending, self.deferred = self.deferred, []
            job = self.pending.pop(0)
            if not self.claims:
                return job
            i, _, sid = job
            if not self.cfg.overwrite and (self.out / "coords" / f"{sid}.h5").exists():
                return job  # finished (by anyone): a resumed row, no claim needed
            claim = try_claim(self.out / "claims", sid, stale_after=self.stale, heartbeat=self.beat)
            if claim is None:
                self.deferred.append(job)
                if not self.pending:
                    self.next_round = time.monotonic() + self.delay
                    self.delay = min(self.delay * 2, 30.0)
                continue
            if claim.took_over is not None:
                t = claim.took_over
                log.warning("%s: took over the stale claim of %s (pid %s, %s)", sid, t.host,
                            t.pid, t.job)  # fmt: skip
            self.held[i] = claim
            return job

    def release(self, i: int) -> None:
        c = self.held.pop(i, None)
        if c is not None:
            c.release()

    def release_all(self) -> None:
        for i in list(self.held):
            self.release(i)


def tile_slides(cfg: TileConfig, progress: bool | None = None) -> TileReport:
    """Run ``pathflow tile`` for a resolved config; returns the report (never raises for
    a bad slide; configuration errors do raise)."""
    from pathflow.data import sample_slide

    t0 = time.perf_counter()
    out = Path(cfg.out)
    part = parse_part(cfg.part) if cfg.part else None
    paths, dups = discover_inputs(cfg.inputs, cfg.recursive)
    paths += [sample_slide(name) for name in cfg.sample]
    if not paths:  # before any output: an empty run must not look like a finished one
        raise ConfigError(no_slides_message(cfg.inputs, cfg.recursive))
    out.mkdir(parents=True, exist_ok=True)
    if part is not None:
        check_job_config(out, cfg)  # before any output: one line and no work when refused
    else:
        check_rerun(out, cfg, {slide_id(p) for p in paths})
        cfg.save(out / "config.yaml")
    for kept, dropped in dups:
        print(
            f"pathflow tile: warning: {dropped} and {kept} are the same file; tiled once "
            f"as {slide_id(kept)!r}",
            file=sys.stderr,
        )
    report = TileReport(out=out)

    # Slide ids must be unique: a second slide with the same id fails instead of overwriting.
    jobs: list[tuple[int, Path, str]] = []
    rows: dict[int, dict[str, Any]] = {}
    owner: dict[str, Path] = {}
    for i, p in enumerate(paths):
        sid = slide_id(p)
        if part is not None and part_of(sid, part[1]) != part[0]:
            continue
        if sid in owner:
            rows[i] = _failed_row(p, sid, f"{p}: duplicate slide id {sid!r} (also {owner[sid]})")
            continue
        owner[sid] = p
        jobs.append((i, p, sid))

    mlog = ManifestLog(manifest_path(out, part or (0, 1)))
    try:
        for i in sorted(rows):
            mlog.append({**rows[i], "stage": "tile"})
        _run_slides(cfg, out, jobs, rows, mlog, part, progress, len(rows))
        report.rows = [rows[k] for k in sorted(rows)]
        if cfg.shards:
            _shards_phase(cfg, report, progress, part)
            for r in report.rows:
                mlog.append({**r, "stage": "shards"})
    finally:
        mlog.close()
    if part is None:
        write_manifest_csv(out / "manifest.csv", report.rows, MANIFEST_FIELDS)
    from pathflow.jobs.claims import job_id

    whole = part or (0, 1)
    write_done(out, whole, {
        "part": list(whole),
        "slides": [r["slide"] for r in report.rows],
        "status": _counts(report.rows),
        "shards": bool(cfg.shards),
        "job": job_id(),
        "finished": time.time(),
    })  # fmt: skip
    report.seconds = time.perf_counter() - t0
    return report


def _counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    by: dict[str, int] = {}
    for r in rows:
        by[r["status"]] = by.get(r["status"], 0) + 1
    return by


def _run_slides(
    cfg: TileConfig,
    out: Path,
    jobs: list[tuple[int, Path, str]],
    rows: dict[int, dict[str, Any]],
    mlog: ManifestLog,
    part: tuple[int, int] | None,
    progress: bool | None,
    done_before: int,
) -> None:
    """Process ``jobs`` (locally or on Dask), filling ``rows`` and the JSONL manifest."""
    from tqdm.auto import tqdm

    cpus = _cpu_count()
    workers = cfg.workers or default_workers(len(jobs), cpus)
    threads = cfg.threads or max(1, cpus // max(1, workers))
    bar = tqdm(
        total=len(jobs) + done_before,
        desc="pathflow tile" + (f" {format_part(part)}" if part else ""),
        unit="slide",
        disable=(not progress) if progress is not None else None,
        file=sys.stderr,
    )
    bar.update(done_before)
    feeder = _Feeder(jobs, out, cfg, claims=True)  # a duplicate run waits or helps

    def finish(i: int, row: dict[str, Any]) -> None:
        warning = row.pop("warning", None)
        if warning:
            bar.write(f"pathflow tile: warning: {warning}", file=sys.stderr)
        rows[i] = row
        mlog.append({**row, "stage": "tile"})
        feeder.release(i)
        if row["status"] == "failed":
            bar.write(f"pathflow tile: FAILED {row['error']}", file=sys.stderr)
        elif row["status"] == "no_tissue" and not row.get("resumed"):
            bar.write(f"pathflow tile: warning: {row['path']}: no tissue found", file=sys.stderr)
        bar.update(1)
        bar.set_postfix_str(row["slide"][:30])

    try:
        if cfg.executor == "dask":
            _run_dask(cfg, feeder, finish)
        if workers <= 1 or cfg.executor == "dask":
            _init_worker(threads)
            _run_serial(cfg, feeder, finish)
        else:
            _run_pool(cfg, feeder, workers, threads, finish)
    finally:
        feeder.release_all()
        bar.close()


def _run_serial(
    cfg: TileConfig, feeder: _Feeder, finish: Callable[[int, dict[str, Any]], None]
) -> None:
    while not feeder.exhausted:
        job = feeder.take()
        if job is None:
            time.sleep(feeder.pause())
            continue
        i, p, sid = job
        finish(i, process_slide(p, sid, cfg))


def _run_dask(
    cfg: TileConfig, feeder: _Feeder, finish: Callable[[int, dict[str, Any]], None]
) -> None:
    """One Dask task per slide for every slide claimable now; slides held by other jobs are
    left in ``feeder`` (the caller waits for them locally: they are mostly resumed rows)."""
    from pathflow.jobs.dask_executor import run_slide_tasks

    batch = []
    while (job := feeder.take()) is not None:
        batch.append(job)
    run_slide_tasks(
        process_slide, batch, (cfg,), finish, _failed_row,
        scheduler=cfg.scheduler, scheduler_file=cfg.scheduler_file,
        workers=cfg.workers or None, threads=cfg.threads or None,
    )  # fmt: skip


def _shards_phase(
    cfg: TileConfig, report: TileReport, progress: bool | None, part: tuple[int, int] | None
) -> None:
    from pathflow.tiling.shards import write_shards

    out = Path(cfg.out)
    sdir = None if part is None else out / "shards" / f"part-{part[0]:04d}"
    # One writer per shard folder: a duplicate job (or a second plain run) waits for it,
    # then finds its shards finished.
    stale = _env_float("PATHFLOW_CLAIM_STALE", DEFAULT_STALE)
    beat = _env_float("PATHFLOW_CLAIM_HEARTBEAT", DEFAULT_HEARTBEAT)
    delay = 0.5
    name = "shards" if part is None else f"shards-{format_part(part)}"
    while (claim := try_claim(out / "claims", name, stale_after=stale, heartbeat=beat)) is None:
        time.sleep(delay)
        delay = min(delay * 2, 30.0)
    try:
        res = write_shards(out, report.rows, cfg.shard_params(), cfg.overwrite, progress,
                           shards_dir=sdir)  # fmt: skip
    finally:
        claim.release()
    report.shards = res
    for r in report.rows:
        if r["status"] == "ok":
            r["shard_samples"] = res.per_slide.get(r["slide"], 0)
            errs = res.errors.get(r["slide"])
            if errs:
                r["status"] = "failed"
                r["error"] = f"shards: {errs[0]}"
                print(f"pathflow tile: FAILED {r['error']}", file=sys.stderr)


def _crash_row(p: Path, sid: str) -> dict[str, Any]:
    return _failed_row(p, sid, f"{p}: the slide reader crashed the worker process")


#: Below this many slides ``pathflow tile`` runs in one process by default: a worker process
#: costs more to start (imports, ~0.6 s CPU) than a slide costs to tile (~0.1 s for a 32k x 32k
#: slide with the clam preset), measured on 2 cores (benches/test_bench_tile.py).
POOL_MIN_SLIDES = 16

#: Imported once by the forkserver, so that worker processes start without re-importing them.
_PRELOAD = [
    "numpy", "h5py", "PIL.Image", "tiffslide", "openslide", "pathflow._core", "pathflow.slide",
    "pathflow.tissue", "pathflow.grid", "pathflow.outputs", "pathflow.tiling.slide_task",
]  # fmt: skip


def default_workers(num_slides: int, cpus: int) -> int:
    """``--workers`` when not given: one process for small batches, else one per core (<= 8)."""
    if num_slides < POOL_MIN_SLIDES:
        return 1
    return max(1, min(num_slides, cpus, 8))


def _pool_context() -> Any:
    """Worker processes from a forkserver that has the heavy modules imported (Linux), else
    ``spawn``: never a plain fork of a parent holding threads and native readers."""
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return mp.get_context("spawn")


def _run_pool(
    cfg: TileConfig,
    feeder: _Feeder,
    workers: int,
    threads: int,
    finish: Callable[[int, dict[str, Any]], None],
) -> None:
    """Process pool that survives a worker crash (a native reader segfaulting on one slide):
    slides caught in a broken pool are re-run one per process, so only the culprit fails.
    At most ``2 * workers`` slides are in flight (and claimed) at a time."""
    ctx = _pool_context()
    while not feeder.exhausted:
        crashed: list[tuple[int, Path, str]] = []
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
        ) as ex:
            futs: dict[Future[dict[str, Any]], tuple[int, Path, str]] = {}
            broken = False
            while True:
                while not broken and len(futs) < 2 * workers:
                    job = feeder.take()
                    if job is None:
                        break
                    futs[ex.submit(process_slide, job[1], job[2], cfg)] = job
                if not futs:
                    if feeder.exhausted or broken:
                        break
                    time.sleep(feeder.pause())
                    continue
                timeout = feeder.pause() if feeder.deferred else None
                done, _ = wait(futs, timeout=timeout, return_when=FIRST_COMPLETED)
                for fut in done:
                    job = futs.pop(fut)
                    try:
                        row = fut.result()
                    except BrokenProcessPool:
                        crashed.append(job)
                        broken = True
                        continue
                    finish(job[0], row)
        for i, p, sid in sorted(crashed):
            with ProcessPoolExecutor(
                1, mp_context=ctx, initializer=_init_worker, initargs=(threads * workers,)
            ) as ex:
                try:
                    row = ex.submit(process_slide, p, sid, cfg).result()
                except BrokenProcessPool:
                    row = _crash_row(p, sid)
            finish(i, row)
