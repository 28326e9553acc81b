"""Batch driver of ``pathflow extract``: every slide's patches -> ``features/<slide>.h5``.

Slides are processed in name order as one stream of batches (a batch may span slides);
a slide's file is written (atomically) as soon as its last patch is embedded, so a killed
run loses at most the slides in flight. On re-run, slides whose file exists and is complete
(same model, all patches accounted for) are skipped; ``overwrite`` redoes them. "Same model"
means the same arch, weights path *and content* (the weights file's sha256, computed once per
run) and the same input size and mean/std, so weights retrained into the same file are not
mistaken for the old ones. A re-run with other options that change the features
(:meth:`ExtractConfig.features_key`, against the folder's own ``extract.yaml``) is refused
unless ``overwrite``, which also removes the old setup's files that the run does not rewrite.
Undecodable patches are left out of the file (counted in ``num_skipped`` and a warning).

Many jobs: ``part`` (``I/N`` or ``auto``) keeps the slides whose id hashes to that part
(:mod:`pathflow.jobs.partition`) and writes ``extract_manifest.part-000I-of-000N.csv``;
``executor="dask"`` sends ``chunk_slides`` slides per task to a Dask cluster
(:mod:`pathflow.jobs.dask_executor`), where each worker process loads the model once
(:func:`worker_models`), checks and writes its slides' files itself and returns their rows.

Example:
    >>> from pathflow.extract.config import ExtractConfig
    >>> from pathflow.extract.runner import run_extract
    >>> cfg = ExtractConfig.build({}, {"inputs": ["pathflow_out"], "arch": "test_vit"})
    >>> report = run_extract(cfg)  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pathflow.exceptions import ConfigError
from pathflow.extract.config import ExtractConfig
from pathflow.extract.engine import Decoder, Embedder
from pathflow.extract.hierarchy import (
    HIPT_FORMAT,
    REGION_FORMAT,
    ROWS_DATASET,
    hipt_descriptors,
    region_rows,
    write_region_file,
)
from pathflow.extract.model import load_extractor
from pathflow.extract.sources import (
    COORDS_KIND,
    PatchGroup,
    PatchRef,
    RegionGroup,
    discover,
    discover_regions,
)
from pathflow.extract.writer import is_complete, model_id, write_features
from pathflow.jobs.partition import format_part, parse_part, part_of
from pathflow.outputs import atomic_path, sha256_file

log = logging.getLogger("pathflow.extract")

MANIFEST = "extract_manifest.csv"
#: The config saved beside the features (in the features folder, and a copy in ``out``).
CONFIG = "extract.yaml"
MANIFEST_FIELDS = ["slide", "status", "patches", "skipped", "seconds", "file", "model", "error"]


@dataclass
class ExtractReport:
    """Outcome: one row per slide (status ``ok``, ``resumed`` or ``failed``)."""

    out: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0
    embed_seconds: float = 0.0
    regions: int = 0

    @property
    def ok(self) -> bool:
        return all(r["status"] != "failed" for r in self.rows)

    @property
    def images_per_second(self) -> float:
        return self.images / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def summary(self) -> str:
        by: dict[str, int] = {}
        for r in self.rows:
            by[r["status"]] = by.get(r["status"], 0) + 1
        skipped = sum(int(r.get("skipped") or 0) for r in self.rows)
        parts = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
        text = (
            f"extracted {len(self.rows)} slide(s) in {self.seconds:.1f} s: {parts}; "
            f"{self.images} images embedded ({self.images_per_second:.1f} images/s) -> {self.out}"
        )
        if self.regions:
            rps = self.regions / self.embed_seconds if self.embed_seconds > 0 else 0.0
            text += f"; {self.regions} regions ({rps:.2f} regions/s)"
        if skipped:
            text += f"; {skipped} undecodable patch(es) skipped"
        return text


@dataclass
class ExtractJob:
    """What every worker needs besides its slides (picklable, sent with each Dask task):
    the config, the resolved input size, the weights' sha256 and the models recorded in
    previous manifests."""

    cfg: ExtractConfig
    image_size: int | None
    digest: str | None
    recorded: dict[str, str]


@dataclass
class Models:
    """A loaded backbone (+ ViT-4K for ``--model hipt``) and the attrs it writes."""

    backbone: Any
    attrs: dict[str, Any]
    vit4k: Any
    mid: str


@dataclass
class GroupsResult:
    """Rows and counters of one batch of slides (a local run or one Dask task)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    embed_seconds: float = 0.0
    regions: int = 0


def run_extract(
    cfg: ExtractConfig, progress: bool | None = None, decoder: Decoder | None = None
) -> ExtractReport:
    """Extract features for every slide of ``cfg.inputs`` (see the module docstring)."""
    t0 = time.perf_counter()
    regions = cfg.model != "patches"
    part = parse_part(cfg.part) if cfg.part else None
    groups, from_slides = _collect(cfg, regions, part)
    out = Path(cfg.out)
    fdir = out / cfg.features_dir
    report = ExtractReport(out=fdir)
    changed = _check_previous(out, cfg, from_slides)
    image_size = cfg.image_size
    if regions and image_size is None and groups:
        # HIPT runs its ViT-256 on the 256 px sub-patches as they are (no resize)
        image_size = int(groups[0].attrs.get("region_patch_size") or 0) or None
    job = ExtractJob(cfg, image_size, _digest(cfg.weights), _recorded_models(out))
    manifest = out / (f"extract_manifest.{format_part(part)}.csv" if part else MANIFEST)
    models = load_models(job) if cfg.executor == "local" else None
    if changed:
        _remove_stale(fdir, cfg.format, {g.name for g in groups}, changed)
    fdir.mkdir(parents=True, exist_ok=True)
    cfg.save(fdir / CONFIG)
    cfg.save(out / CONFIG)
    result = GroupsResult()
    try:
        if models is None:
            _run_dask(job, groups, result, progress)
        else:
            extract_groups(job, groups, models, result, progress, decoder)
    finally:
        report.rows, report.images, report.regions = result.rows, result.images, result.regions
        report.embed_seconds = result.embed_seconds
        report.rows.sort(key=lambda r: r["slide"])
        _write_manifest(manifest, report.rows)
        report.seconds = time.perf_counter() - t0
    return report


def load_models(job: ExtractJob, device: str | None = None) -> Models:
    """The backbone of ``job`` (and HIPT's ViT-4K) on ``device`` (default: the config's)."""
    cfg = job.cfg
    regions = cfg.model != "patches"
    backbone = load_extractor(str(cfg.arch), cfg.weights, cfg.pretrained, job.image_size,
                              cfg.norm, device or cfg.device, weights_sha256=job.digest,
                              norm_fallback="hipt" if regions else "imagenet",
                              precision=cfg.precision, compile=cfg.compile)  # fmt: skip
    attrs = backbone.attrs()
    vit4k = None
    if cfg.model == "hipt":
        vit4k, attrs_4k = _load_vit4k(cfg, backbone)
        attrs.update(attrs_4k)
    return Models(backbone, attrs, vit4k, model_id(attrs))


def extract_groups(
    job: ExtractJob,
    groups: list[PatchGroup],
    models: Models,
    result: GroupsResult,
    progress: bool | None = None,
    decoder: Decoder | None = None,
) -> None:
    """Embed ``groups`` with ``models`` and write their files; rows and counters go into
    ``result`` as slides finish (also when a later slide raises). Complete files are
    ``resumed``."""
    from tqdm.auto import tqdm

    cfg = job.cfg
    fdir = Path(cfg.out) / cfg.features_dir
    rows_ds = ROWS_DATASET.get(cfg.model, "features")
    todo: list[PatchGroup] = []
    redo: dict[str, int] = {}
    for g in groups:
        dest = fdir / f"{g.name}.{cfg.format}"
        expected = g.num_regions if isinstance(g, RegionGroup) else len(g)
        done, why = (
            is_complete(dest, expected, models.attrs, job.recorded.get(g.name), rows_ds)
            if not cfg.overwrite
            else (False, "")
        )
        if done:
            result.rows.append(_row(g.name, "resumed", dest, patches=expected, model=models.mid))
            continue
        if dest.exists() and not cfg.overwrite:
            if not redo:
                log.warning("%s: redoing (%s)", dest, why)
            redo[why] = redo.get(why, 0) + 1
        todo.append(g)
    if sum(redo.values()) > 1:
        log.warning("redoing %d existing file(s): %s", sum(redo.values()),
                    "; ".join(f"{n} {why}" for why, n in redo.items()))  # fmt: skip
    fdir.mkdir(parents=True, exist_ok=True)
    total = sum(len(g) for g in todo)
    unit = "patches of regions" if cfg.model != "patches" else "patches"
    log.info("%d slide(s) to extract (%d %s), %d resumed", len(todo), total, unit,
             len(groups) - len(todo))  # fmt: skip
    embedder = Embedder(models.backbone, cfg.batch_size, cfg.workers, decoder=decoder)
    bar = tqdm(total=total, unit="img", desc="extract", disable=progress is False or not total,
               dynamic_ncols=True)  # fmt: skip
    t_embed = time.perf_counter()
    try:
        for g, feats, ok, reasons, secs in _per_group(embedder, todo, bar):
            dest = fdir / f"{g.name}.{cfg.format}"
            result.images += len(g)
            if isinstance(g, RegionGroup):
                row = _write_regions(cfg, g, feats, ok, reasons, secs, dest, models.attrs,
                                     models.mid, models.vit4k)  # fmt: skip
                result.rows.append(row)
                result.regions += g.num_regions
                continue
            result.rows.append(_write_patches(cfg, g, feats, ok, reasons, secs, dest, models))
    finally:
        bar.close()
        result.embed_seconds += time.perf_counter() - t_embed


def _write_patches(
    cfg: ExtractConfig,
    g: PatchGroup,
    feats: np.ndarray,
    ok: np.ndarray,
    reasons: list[str | None],
    secs: float,
    dest: Path,
    models: Models,
) -> dict[str, Any]:
    """One slide's features file (``--model patches``); its manifest row."""
    bad = int((~ok).sum())
    first = next((r for r in reasons if r), "?")
    if bad:
        log.warning("%s: %d of %d patches undecodable, skipped (e.g. %s)",
                    g.name, bad, len(g), first)  # fmt: skip
    if not ok.any():
        return _row(g.name, "failed", dest, 0, bad, secs, error=f"no decodable patch ({first})")
    attrs = {
        **g.attrs,
        **models.attrs,
        "slide": g.name,
        "num_patches": int(ok.sum()),
        "num_skipped": bad,
        "format": "pathflow-features-v1",
    }
    names = [n for n, k in zip(g.names, ok, strict=True) if k] if g.names else None
    write_features(dest, feats[ok], g.coords[ok], attrs, names)
    return _row(g.name, "ok", dest, int(ok.sum()), bad, secs, model=models.mid)


# ------------------------------------------------------------------------------------ Dask
#: The models of this worker process, loaded by its first task (one entry: a new setup
#: replaces it).
_WORKER_MODELS: dict[str, Models] = {}
_WORKER_LOCK = threading.Lock()


def _worker_device(device: str) -> str:
    """``auto`` on a multi-GPU node: the GPU of this worker's index (local cluster workers
    are named 0, 1...), so N workers share N GPUs; else ``device``."""
    if device != "auto":
        return device
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n <= 1:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return device
    return f"cuda:{name % n}" if isinstance(name, int) else device


def worker_models(job: ExtractJob) -> Models:
    """The models of ``job``, loaded once per worker process (cached by their setup)."""
    cfg = job.cfg
    device = _worker_device(cfg.device)
    setup = [cfg.model_key(), cfg.norm, cfg.precision, cfg.compile, device, job.image_size,
             job.digest, cfg.arch_4k]  # fmt: skip
    key = json.dumps(setup, sort_keys=True, default=str)
    with _WORKER_LOCK:  # a worker with several threads loads its model once
        if key not in _WORKER_MODELS:
            _WORKER_MODELS.clear()
            _WORKER_MODELS[key] = load_models(job, device)
        return _WORKER_MODELS[key]


def extract_task(job: ExtractJob, groups: list[PatchGroup]) -> GroupsResult:
    """One Dask task: a chunk of slides with this worker's cached models; a slide that raises
    fails with the rest of the chunk after it (one line each), the finished ones are kept."""
    result = GroupsResult()
    try:
        extract_groups(job, groups, worker_models(job), result, progress=False)
    except Exception as exc:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        done = {r["slide"] for r in result.rows}
        result.rows += [_failed_row(job.cfg, g, why) for g in groups if g.name not in done]
    return result


def _failed_row(cfg: ExtractConfig, g: PatchGroup, why: str) -> dict[str, Any]:
    return _row(g.name, "failed", Path(cfg.out) / cfg.features_dir / f"{g.name}.{cfg.format}",
                error=why)  # fmt: skip


def _run_dask(
    job: ExtractJob, groups: list[PatchGroup], result: GroupsResult, progress: bool | None
) -> None:
    """``chunk_slides`` slides per task on a Dask cluster; rows collected here as tasks end."""
    from tqdm.auto import tqdm

    from pathflow.jobs.dask_executor import dask_client, run_tasks

    cfg = job.cfg
    groups = [g for g in groups if len(g)]
    n = cfg.chunk_slides
    chunks = [groups[i : i + n] for i in range(0, len(groups), n)]
    if not chunks:
        return
    workers = cfg.dask_workers or _local_workers()
    threads = max(1, (os.cpu_count() or 1) // workers)
    env = {"OMP_NUM_THREADS": str(threads)}  # torch's CPU threads (Dask's default is 1)
    bar = tqdm(total=len(groups), unit="slide", desc="extract (dask)",
               disable=progress is False, dynamic_ncols=True)  # fmt: skip

    def finish(i: int, res: GroupsResult) -> None:
        result.rows.extend(res.rows)
        result.images += res.images
        result.regions += res.regions
        bar.update(len(chunks[i]))

    def failed(i: int, why: str) -> GroupsResult:
        return GroupsResult(rows=[_failed_row(cfg, g, why) for g in chunks[i]])

    t_run = time.perf_counter()
    try:
        with dask_client(cfg.scheduler, cfg.scheduler_file, workers, threads, env) as client:
            log.info("dask: %d slide(s) in %d task(s) on %s", len(groups), len(chunks),
                     client.scheduler.address)  # fmt: skip
            payloads = [(_chunk_job(job, c), c) for c in chunks]
            run_tasks(extract_task, payloads, finish, failed, client=client,
                      names=[c[0].name for c in chunks])  # fmt: skip
    finally:
        bar.close()
        result.embed_seconds = time.perf_counter() - t_run


def _chunk_job(job: ExtractJob, chunk: list[PatchGroup]) -> ExtractJob:
    """``job`` with only the recorded models of ``chunk``'s slides (small task payloads)."""
    rec = {g.name: job.recorded[g.name] for g in chunk if g.name in job.recorded}
    return replace(job, recorded=rec)


def _local_workers() -> int:
    """Local cluster size: one worker per GPU, else one (torch uses every core)."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def _digest(weights: str | None) -> str | None:
    """sha256 of a weights file, once per run: the weights' content, not their path."""
    if weights is None:
        return None
    t_hash = time.perf_counter()
    digest = sha256_file(weights)
    log.debug("sha256 of %s in %.1f s", weights, time.perf_counter() - t_hash)
    return digest


def _load_vit4k(cfg: ExtractConfig, backbone: Any) -> tuple[Any, dict[str, Any]]:
    """HIPT's ViT-4K on the ViT-256's device (random init seeded, or ``--weights-4k``)."""
    import torch

    from pathflow.exceptions import PathflowError
    from pathflow.extract.model import WeightsError, read_state_dict
    from pathflow.models import list_models
    from pathflow.models.weights import load_backbone

    state = read_state_dict(cfg.weights_4k) if cfg.weights_4k else None
    kwargs: dict[str, Any] = {}
    if cfg.arch_4k in list_models():  # ours read the ViT-256's width (384 for ViT-S/16)
        kwargs["in_dim"] = backbone.embed_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            vit4k = load_backbone(cfg.arch_4k, state, **kwargs)
        except PathflowError as exc:
            raise WeightsError(f"{cfg.weights_4k}: {exc}") from exc
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"--arch-4k {cfg.arch_4k}: {exc}") from exc
    in_dim = int(getattr(vit4k, "in_dim", backbone.embed_dim))
    if in_dim != backbone.embed_dim:
        raise ConfigError(
            f"--arch-4k {cfg.arch_4k} reads {in_dim}-d tokens, --arch {cfg.arch} gives "
            f"{backbone.embed_dim}-d features"
        )
    vit4k = vit4k.to(backbone.device).eval()
    for p in vit4k.parameters():
        p.requires_grad_(False)
    attrs = {
        "arch_4k": cfg.arch_4k,
        "weights_4k": str(Path(cfg.weights_4k).resolve()) if cfg.weights_4k else "random-init",
        "weights_4k_sha256": _digest(cfg.weights_4k),
        "embed_dim_4k": int(getattr(vit4k, "num_features", 0)),
    }
    return vit4k, attrs


def _write_regions(
    cfg: ExtractConfig,
    g: RegionGroup,
    feats: np.ndarray,
    ok: np.ndarray,
    reasons: list[str | None],
    secs: float,
    dest: Path,
    model_attrs: dict[str, Any],
    mid: str,
    vit4k: Any,
) -> dict[str, Any]:
    """One slide's region file (``--model regions``/``hipt``); its manifest row."""
    grids, rok = region_rows(feats, ok, g.grid)
    bad = int((~rok).sum())
    first = next((r for r in reasons if r), "?")
    if bad:
        log.warning("%s: %d of %d regions have undecodable patches, skipped (e.g. %s)",
                    g.name, bad, g.num_regions, first)  # fmt: skip
    if not rok.any():
        return _row(g.name, "failed", dest, 0, bad, secs, error=f"no decodable region ({first})")
    kept = grids[rok]
    attrs = {
        **g.attrs,
        **model_attrs,
        "slide": g.name,
        "num_regions": int(rok.sum()),
        "num_skipped": bad,
        "region_dtype": cfg.region_dtype,
        "format": HIPT_FORMAT if vit4k is not None else REGION_FORMAT,
    }
    descriptors = hipt_descriptors(vit4k, kept) if vit4k is not None else None
    keep = vit4k is None or cfg.keep_region_features
    write_region_file(dest, g.coords[rok], attrs, kept if keep else None, descriptors,
                      cfg.region_dtype)  # fmt: skip
    return _row(g.name, "ok", dest, int(rok.sum()), bad, secs, model=mid)


def _collect(
    cfg: ExtractConfig, regions: bool = False, part: tuple[int, int] | None = None
) -> tuple[list[PatchGroup], bool]:
    """Every input's groups, sorted by name; with ``part`` only those of that part (by slide
    id: the coordinate file's stem, else the group name). Also whether some input is read
    from slides (coordinate files)."""
    from pathflow.extract.slide_regions import SlideReadOptions

    read = SlideReadOptions(slides=cfg.slides, format=cfg.patch_format, quality=cfg.quality,
                            transcode=cfg.transcode, threads=max(2, cfg.workers))  # fmt: skip

    def keep(sid: str) -> bool:
        return part is None or part_of(sid, part[1]) == part[0]

    groups: dict[str, PatchGroup] = {}
    from_slides = False
    for inp in cfg.inputs:
        if regions:
            kind, rfound = discover_regions(inp, cfg.slides, cfg.region_patch, read, keep)
            found = list[PatchGroup](rfound)
        else:
            kind, found = discover(inp, read, keep)
        if part is not None and kind != COORDS_KIND:
            found = [g for g in found if keep(g.name)]
        from_slides = from_slides or kind == COORDS_KIND
        log.info("%s: %s, %d group(s)", inp, kind, len(found))
        for g in found:
            if g.name in groups:
                raise ConfigError(f"{inp}: slide {g.name!r} appears in more than one input")
            groups[g.name] = g
    return [groups[k] for k in sorted(groups)], from_slides


def _recorded_models(out: Path) -> dict[str, str]:
    """Slide -> ``model`` id of the finished slides in previous runs' manifests (the whole
    run's and every part's)."""
    found: dict[str, str] = {}
    for path in sorted(out.glob("extract_manifest*.csv")):
        try:
            with open(path, newline="") as f:
                found.update({
                    r["slide"]: r["model"]
                    for r in csv.DictReader(f)
                    if r.get("status") in ("ok", "resumed") and r.get("model")
                })  # fmt: skip
        except (OSError, csv.Error, KeyError, UnicodeDecodeError):
            continue
    return found


def _check_previous(out: Path, cfg: ExtractConfig, from_slides: bool) -> dict[str, Any]:
    """Refuse to mix features of two setups in one features folder: a re-run whose
    :meth:`ExtractConfig.features_key` differs from the folder's saved config
    (``<features_dir>/extract.yaml``; for folders of older versions ``<out>/extract.yaml``
    when it names the same features folder) is a one-line error naming the changed options,
    unless ``overwrite``. Returns the changed options ({flag: (before, now)}), empty if none."""
    fdir = out / cfg.features_dir
    if not fdir.is_dir() or not any(p.suffix in (".h5", ".pt") for p in fdir.iterdir()):
        return {}  # no features yet: nothing to mix
    path = fdir / CONFIG
    if not path.is_file():
        path = out / CONFIG
        if not path.is_file():
            return {}
    try:
        prev = ExtractConfig(**ExtractConfig.from_yaml(path))  # as saved (not re-validated)
    except (ConfigError, TypeError) as exc:
        if cfg.overwrite:
            return {"config": (str(path), "unreadable")}
        raise ConfigError(f"{path}: unreadable saved config of {fdir}/ ({exc}); "
                          "use --overwrite to redo the folder") from exc  # fmt: skip
    if path.parent == out and prev.features_dir != cfg.features_dir:
        return {}
    before, now = prev.features_key(from_slides), cfg.features_key(from_slides)
    changed = {_flag(k): (before.get(k), v) for k, v in now.items() if before.get(k) != v}
    if changed and not cfg.overwrite:
        what = ", ".join(f"{f} {_show(b)} (now {_show(n)})" for f, (b, n) in changed.items())
        raise ConfigError(
            f"{fdir}/ holds features of another setup: {what}; use another --out / "
            "--features-dir, or --overwrite to redo them"
        )
    return changed


def _flag(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _show(v: Any) -> str:
    return "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def _remove_stale(
    fdir: Path, fmt: str, names: set[str], changed: dict[str, tuple[Any, Any]]
) -> None:
    """``--overwrite`` with a changed setup: the features files this run does not rewrite
    (other slides, the other format) were made by the old setup; remove them so that the
    folder holds what its saved config says."""
    stale = [p for p in sorted(fdir.iterdir()) if p.is_file() and p.suffix in (".h5", ".pt")
             and (p.suffix != f".{fmt}" or p.stem not in names)]  # fmt: skip
    for p in stale:
        p.unlink()
    if stale:
        log.warning("%s: removed %d features file(s) of the previous setup (%s) that this run "
                    "does not rewrite (e.g. %s)", fdir, len(stale), ", ".join(changed),
                    stale[0].name)  # fmt: skip


def _per_group(
    embedder: Embedder, groups: list[PatchGroup], bar: Any
) -> Iterator[tuple[PatchGroup, np.ndarray, np.ndarray, list[str | None], float]]:
    """Route the batch stream back to groups; yield each group once all its rows are in."""
    groups = [g for g in groups if len(g)]
    if not groups:
        return

    def refs() -> Iterator[PatchRef]:
        for g in groups:
            yield from g.refs

    gi, filled, start = 0, 0, time.perf_counter()
    d = embedder.backbone.embed_dim
    feats = np.empty((len(groups[0]), d), np.float32)
    ok = np.zeros(len(groups[0]), bool)
    reasons: list[str | None] = [None] * len(groups[0])
    for batch in embedder.embed(refs()):
        pos = 0
        n = len(batch.refs)
        while pos < n:
            g = groups[gi]
            take = min(n - pos, len(g) - filled)
            feats[filled : filled + take] = batch.features[pos : pos + take]
            ok[filled : filled + take] = batch.ok[pos : pos + take]
            reasons[filled : filled + take] = batch.reasons[pos : pos + take]
            filled += take
            pos += take
            if filled == len(g):
                yield g, feats, ok, reasons, time.perf_counter() - start
                gi, filled, start = gi + 1, 0, time.perf_counter()
                if gi < len(groups):
                    m = len(groups[gi])
                    feats = np.empty((m, d), np.float32)
                    ok = np.zeros(m, bool)
                    reasons = [None] * m
        bar.update(n)


def _row(
    slide: str,
    status: str,
    dest: Path,
    patches: int = 0,
    skipped: int = 0,
    seconds: float = 0.0,
    error: str = "",
    model: str = "",
) -> dict[str, Any]:
    if status == "failed":
        log.error("FAILED %s: %s", slide, error)
    return {
        "slide": slide,
        "status": status,
        "patches": patches,
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "file": str(dest),
        "model": model,
        "error": error,
    }


def _write_manifest(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_FIELDS)
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
