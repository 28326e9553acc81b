"""``pathflow status JOB``: done / failed / running / stale per stage of a job folder.

Stages: ``tile coords`` (slides: the last manifest row of each slide, live and stale claims
in ``claims/``, and slides not started yet when the inputs of ``config.yaml`` are readable),
``shards`` (per part: a finished ``shards/part-IIII/shards.json``, a live or stale writer
claim) and ``extract features`` (files in ``features/`` and ``extract_manifest.csv``, when
present). Nothing is modified.

Example:
    >>> from pathflow.jobs.status import job_status
    >>> print(job_status("job").text())  # doctest: +SKIP
    job: 3 parts, 2 finished (part 1 not finished)
    tile coords: 5 done, 0 failed, 1 running, 0 stale, 0 pending (6 slides)
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pathflow.jobs.claims import DEFAULT_STALE, read_claim
from pathflow.jobs.manifest import latest_rows, manifest_path, read_done, read_manifest

__all__ = ["JobStatus", "StageStatus", "job_status"]


@dataclass
class StageStatus:
    """Counts of one stage (slides, or parts for shards)."""

    name: str
    unit: str = "slides"
    done: int = 0
    failed: int = 0
    running: int = 0
    stale: int = 0
    pending: int | None = None
    note: str = ""

    def line(self) -> str:
        text = (
            f"{self.name}: {self.done} done, {self.failed} failed, {self.running} running, "
            f"{self.stale} stale"
        )
        if self.pending is not None:
            text += f", {self.pending} pending"
        text += f" ({self.unit})"
        return text + (f"; {self.note}" if self.note else "")


@dataclass
class JobStatus:
    """Status of a job folder; :meth:`text` is what ``pathflow status`` prints."""

    job: Path
    parts: int = 0
    finished: list[int] = field(default_factory=list)
    stages: list[StageStatus] = field(default_factory=list)
    holders: list[str] = field(default_factory=list)

    def stage(self, name: str) -> StageStatus:
        return next(s for s in self.stages if s.name == name)

    def text(self) -> str:
        missing = [i for i in range(self.parts) if i not in self.finished]
        head = f"{self.job}: {self.parts} part(s), {len(self.finished)} finished"
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            head += f" (not finished: {shown})"
        lines = [head, *(s.line() for s in self.stages)]
        lines += [f"  {h}" for h in self.holders[:20]]
        return "\n".join(lines)


def _stale_after() -> float:
    try:
        return float(os.environ.get("PATHFLOW_CLAIM_STALE", "") or DEFAULT_STALE)
    except ValueError:
        return DEFAULT_STALE


def _claims(job: Path) -> dict[str, tuple[bool, str]]:
    """Claim name -> (stale, description)."""
    out: dict[str, tuple[bool, str]] = {}
    d = job / "claims"
    if not d.is_dir():
        return out
    stale_after = _stale_after()
    for f in sorted(d.glob("*.lock")):
        info = read_claim(f)
        if info is None:
            continue
        stale = info.stale(stale_after)
        what = "stale" if stale else "running"
        out[f.name[: -len(".lock")]] = (
            stale,
            f"{what}: {f.name[:-5]} by {info.job} on {info.host} pid {info.pid} "
            f"(heartbeat {info.age:.0f} s ago)",
        )
    return out


def _expected_slides(job: Path) -> set[str] | None:
    """Slide ids of the job's inputs (None when config.yaml or the inputs are unreadable)."""
    try:
        import yaml

        from pathflow.inputs import discover, slide_id

        cfg: Any = yaml.safe_load((job / "config.yaml").read_text()) or {}
        inputs = cfg.get("inputs") or []
        if not inputs or cfg.get("sample"):
            return None
        return {slide_id(p) for p in discover(inputs, bool(cfg.get("recursive")))}
    except Exception:
        return None


def job_status(job: str | os.PathLike[str]) -> JobStatus:
    """Read-only status of a ``pathflow tile`` job folder (with or without ``--part``)."""
    from pathflow.exceptions import ConfigError
    from pathflow.jobs.merge import job_part_count

    jd = Path(job)
    if not jd.is_dir():
        raise ConfigError(f"{jd}: no such job folder")
    n, _ = job_part_count(jd)
    st = JobStatus(job=jd, parts=n)
    claims = _claims(jd)
    rows: dict[str, dict[str, Any]] = {}
    done_docs: dict[int, dict[str, Any]] = {}
    for i in range(n):
        rows.update(latest_rows(read_manifest(manifest_path(jd, (i, n)))[0]))
        doc = read_done(jd, (i, n))
        if doc is not None:
            st.finished.append(i)
            done_docs[i] = doc

    coords = StageStatus("tile coords")
    for sid, r in rows.items():
        if r.get("status") == "failed":
            coords.failed += 1
        elif (jd / "coords" / f"{sid}.h5").is_file():
            coords.done += 1
    slide_claims = {k: v for k, v in claims.items() if not k.startswith("shards-part-")}
    for sid, (stale, _) in list(slide_claims.items()):
        if sid in rows and rows[sid].get("status") != "failed":
            del claims[sid]  # finished; the lock of a killed job is a harmless leftover
            continue
        if stale:
            coords.stale += 1
        else:
            coords.running += 1
    expected = _expected_slides(jd)
    if expected is not None:
        coords.pending = len(expected - set(rows) - set(slide_claims))
        coords.note = f"{len(expected)} slides in the inputs"
    st.stages.append(coords)

    with_shards = any(d.get("shards") for d in done_docs.values())
    cfg_shards = _config_flag(jd, "shards")
    if with_shards or cfg_shards:
        sh = StageStatus("shards", unit="parts")
        for i in range(n):
            folder = (
                jd / "shards"
                if n == 1 and not (jd / "shards" / "part-0000").is_dir()
                else (jd / "shards" / f"part-{i:04d}")
            )
            claim = claims.get(f"shards-part-{i:04d}-of-{n:04d}")
            if claim is not None:
                if claim[0]:
                    sh.stale += 1
                else:
                    sh.running += 1
            elif i in done_docs and (folder / "shards.json").is_file():
                sh.done += 1
            elif i in done_docs:
                sh.failed += 1
        merged = (jd / "shards" / "shards.json").is_file()
        sh.pending = n - sh.done - sh.failed - sh.running - sh.stale
        sh.note = "merged shards.json: " + ("yes" if merged else "no (run pathflow merge)")
        st.stages.append(sh)

    feats = jd / "features"
    if feats.is_dir():
        fx = StageStatus("extract features")
        files = {p.stem for p in feats.iterdir() if p.suffix in (".h5", ".pt")}
        fx.done = len(files)
        manifest = jd / "extract_manifest.csv"
        if manifest.is_file():
            with open(manifest, newline="") as f:
                for r in csv.DictReader(f):
                    if r.get("status") == "failed":
                        fx.failed += 1
        if expected is not None:
            fx.pending = max(0, coords.done - fx.done - fx.failed)
        st.stages.append(fx)
    st.holders = [desc for _, desc in claims.values()]
    return st


def _config_flag(job: Path, name: str) -> bool:
    try:
        import yaml

        doc = yaml.safe_load((job / "config.yaml").read_text()) or {}
        return bool(doc.get(name))
    except Exception:
        return False
