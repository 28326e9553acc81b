"""``pathflow merge JOB``: one ``manifest.csv`` and one ``shards/shards.json`` for a job
folder tiled by N cooperating parts (``pathflow tile --part I/N``), without copying data.

The combined ``shards.json`` lists every part's shards by their path relative to
``JOB/shards`` (``part-0002/shard-000000.tar``, its DALI index beside it), in part order, so
``pathflow train --data JOB``, ``pathflow extract JOB`` and :class:`pathflow.data.ShardSet`
read the whole cohort. Missing or unfinished parts are refused (named) unless
``allow_partial``. Merging twice gives byte-identical files.

Example:
    >>> from pathflow.jobs.merge import merge_job
    >>> report = merge_job("job")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    merged 3/3 parts: 6 slides (ok 6), 9 shards, 1234 samples -> job/manifest.csv, ...
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathflow.exceptions import ConfigError, PathflowError
from pathflow.jobs.manifest import (
    MANIFEST_FIELDS,
    latest_rows,
    list_parts,
    manifest_path,
    read_done,
    read_manifest,
    write_manifest_csv,
)
from pathflow.jobs.partition import format_part

__all__ = ["MergeReport", "job_part_count", "merge_job"]


@dataclass
class MergeReport:
    """What :func:`merge_job` wrote."""

    job: Path
    parts: int
    finished: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    shards_json: Path | None = None
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        by: dict[str, int] = {}
        for r in self.rows:
            by[str(r.get("status"))] = by.get(str(r.get("status")), 0) + 1
        status = ", ".join(f"{k} {v}" for k, v in sorted(by.items())) or "none"
        text = (
            f"merged {len(self.finished)}/{self.parts} parts: {len(self.rows)} slides "
            f"({status}) -> {self.job / 'manifest.csv'}"
        )
        if self.shards_json is not None:
            text += f"; {self.shards} shards, {self.samples} samples -> {self.shards_json}"
        if self.missing:
            text += f"; partial: parts {', '.join(map(str, self.missing))} missing"
        return text


def job_part_count(job: Path) -> tuple[int, list[str]]:
    """The part count N of a job folder (from its manifests) and warnings: when manifests
    of several counts exist (the folder was re-split), the newest count wins."""
    found = list_parts(job)
    if not found:
        raise ConfigError(
            f"{job}: no manifests/part-*.jsonl (not a pathflow tile job folder, or no part "
            "has started)"
        )
    if len(found) == 1:
        return next(iter(found)), []

    def newest(n: int) -> float:
        times = []
        for i in found[n]:
            for p in (manifest_path(job, (i, n)), manifest_path(job, (i, n)).with_suffix(".done")):
                if p.exists():
                    times.append(p.stat().st_mtime)
        return max(times, default=0.0)

    n = max(found, key=newest)
    others = ", ".join(str(k) for k in sorted(found) if k != n)
    return n, [f"{job}/manifests: also holds manifests of {others} parts; using {n} parts"]


def merge_job(
    job: str | os.PathLike[str],
    allow_partial: bool = False,
    ranks: int = 8,
    workers: int = 8,
    fields: Sequence[str] = MANIFEST_FIELDS,
) -> MergeReport:
    """Write ``JOB/manifest.csv`` and (when the job wrote shards) ``JOB/shards/shards.json``
    from the parts' manifests and shard folders. Raises a one-line error naming the missing
    parts unless ``allow_partial``. Warns (in the report) when the job has fewer shards than
    ``ranks * workers`` loader streams. ``fields``: the columns of ``manifest.csv`` (the
    caller's schema; default: the rows ``pathflow tile`` writes)."""
    jd = Path(job)
    if not (jd / "config.yaml").is_file():
        raise ConfigError(f"{jd}: no config.yaml (not a pathflow tile job folder)")
    n, warnings = job_part_count(jd)
    report = MergeReport(job=jd, parts=n, warnings=warnings)
    slides: list[dict[str, Any]] = []
    with_shards = False
    for i in range(n):
        done = read_done(jd, (i, n))
        if done is None:
            report.missing.append(i)
            if not allow_partial:
                continue
            rows, _ = read_manifest(manifest_path(jd, (i, n)))
            slides.extend(latest_rows(rows).values())
            continue
        report.finished.append(i)
        with_shards = with_shards or bool(done.get("shards"))
        latest = latest_rows(read_manifest(manifest_path(jd, (i, n)))[0])
        for sid in done.get("slides", []):
            if sid in latest:
                slides.append(latest[sid])
    if report.missing and not allow_partial:
        names = ", ".join(f"{format_part((i, n))}" for i in report.missing)
        raise PathflowError(
            f"{jd}: {len(report.missing)} of {n} parts not finished ({names}); re-run them "
            "(pathflow tile --part I/N with the same options) or merge with --allow-partial"
        )
    report.rows = sorted(slides, key=lambda r: str(r["slide"]))
    write_manifest_csv(jd / "manifest.csv", report.rows, fields)
    if with_shards:
        _merge_shards(jd, n, report)
        streams = ranks * workers
        if report.shards < streams:
            report.warnings.append(
                f"{report.shards} shards for {ranks} ranks x {workers} loader workers = "
                f"{streams} streams: some workers get no shard of their own (write smaller "
                "shards: --shard-samples)"
            )
    return report


def _merge_shards(jd: Path, n: int, report: MergeReport) -> None:
    from pathflow.outputs import atomic_write_text

    root = jd / "shards"
    docs: list[tuple[str, dict[str, Any]]] = []
    if n == 1 and not (root / "part-0000").is_dir():
        parts = [("", root / "shards.json")]  # a run without --part: shards/ itself
    else:
        parts = [
            (f"part-{i:04d}/", root / f"part-{i:04d}" / "shards.json") for i in report.finished
        ]
    for prefix, path in parts:
        if not path.is_file():
            raise PathflowError(f"{path}: missing (the part wrote no shards summary)")
        try:
            docs.append((prefix, json.loads(path.read_text())))
        except ValueError as exc:
            raise PathflowError(f"{path}: unreadable ({exc})") from exc
    merged: dict[str, Any] = {}
    for _, d in docs:  # format, prefix, image_ext... (the same in every part)
        for k, v in d.items():
            if k not in ("shards", "samples", "bytes", "slides"):
                merged.setdefault(k, v)
    shards: list[dict[str, Any]] = []
    slides: dict[str, int] = {}
    first = 0
    for prefix, d in docs:
        for s in d.get("shards", []):
            entry = dict(s)
            entry["name"] = prefix + str(s["name"])
            entry["index_file"] = prefix + str(s.get("index_file", str(s["name"])[:-4] + ".idx"))
            entry["first_sample"] = first
            first += int(s.get("samples", 0))
            shards.append(entry)
        slides.update({str(k): int(v) for k, v in d.get("slides", {}).items()})
    merged["samples"] = first
    merged["bytes"] = sum(int(s.get("bytes", 0)) for s in shards)
    merged["parts"] = n
    merged["partial"] = bool(report.missing)
    merged["shards"] = shards
    merged["slides"] = dict(sorted(slides.items()))
    report.shards = len(shards)
    report.samples = first
    report.shards_json = root / "shards.json"
    if len(parts) == 1 and parts[0][0] == "":
        return  # a run without --part: its own shards.json already lists the whole job
    atomic_write_text(report.shards_json, json.dumps(merged, indent=1) + "\n")
