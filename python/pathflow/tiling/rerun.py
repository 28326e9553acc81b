"""Re-running ``pathflow tile`` into a folder that holds finished slides.

A finished slide (``coords/<id>.h5``) is skipped on re-run, so a re-run with options that
change what a slide's outputs hold would keep the old outputs while ``config.yaml`` said
otherwise. :func:`check_rerun` refuses such a run with one line naming the options and the
folder, unless ``--overwrite`` (then the run's slides are redone under the new options).

What may change between runs into one folder:

* how a run runs (:data:`JOB_FIELDS`: workers, threads, ...) and which
  slides it tiles (inputs, ``--sample``, ``--recursive``): adding slides resumes;
* the shard options while the folder holds no shards (``--shards`` can be added later);
* ``--slide-mpp`` / ``--slide-mpp-csv`` / ``--force-slide-mpp`` as long as every finished
  slide keeps the mpp it was tiled at (checked per slide from its coords file: e.g. adding
  ``--slide-mpp`` for slides that failed without an mpp leaves the others as they are).

Example:
    >>> from pathflow.tiling.rerun import option_groups
    >>> sorted(option_groups({"patch": 256, "workers": 2, "seed": 0})[0])
    ['patch']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pathflow.exceptions import ConfigError, PathflowError
from pathflow.tiling.config import TileConfig

#: Config fields that may differ between the jobs sharing a job folder (how a job runs, not
#: what it writes).
JOB_FIELDS = frozenset(
    {"part", "executor", "scheduler", "scheduler_file", "workers", "threads", "overwrite", "out"}
)
#: Options that choose which slides a run tiles, not what a slide's outputs hold.
SELECTION_FIELDS = frozenset({"inputs", "sample", "recursive"})
#: Options that shape the shards only.
SHARD_FIELDS = frozenset({
    "shards", "shard_prefix", "shard_samples", "shard_mb", "format", "quality", "transcode",
    "shuffle", "seed", "region_patch", "region_patches", "shard_mpps",
})  # fmt: skip
#: Options that give a slide its mpp: compared per finished slide, not as text.
MPP_FIELDS = frozenset({"slide_mpp", "slide_mpp_csv", "force_slide_mpp"})

#: Values of options that a config.yaml written before the option existed meant.
_LEGACY = {"mask_mode": "replace", "force_slide_mpp": None}


def option_groups(d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options that change coords/masks/overlays, options that change shards) of a config
    dict; run, selection and mpp options are left out."""
    import yaml

    plain = yaml.safe_load(yaml.safe_dump(d)) or {}
    for k, v in _LEGACY.items():
        plain.setdefault(k, v)
    if plain.get("mask") is None:  # without --mask the mode changes nothing
        plain.pop("mask_mode", None)
    skip = JOB_FIELDS | SELECTION_FIELDS | MPP_FIELDS
    tiles = {k: v for k, v in plain.items() if k not in skip and k not in SHARD_FIELDS}
    shards = {k: v for k, v in plain.items() if k in SHARD_FIELDS}
    return tiles, shards


def _diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _has_shards(out: Path) -> bool:
    d = out / "shards"
    return (d / "plan.json").is_file() or any(d.glob("part-*/plan.json"))


def expected_mpp(
    attrs: dict[str, Any], cfg: TileConfig, table: dict[str, float] | None
) -> tuple[float | None, str]:
    """The mpp (and its source) that ``cfg`` gives a finished slide, from its coords attrs
    (``file_mpp``, ``slide_path``): the rule of :func:`pathflow.tiling.slide_task.choose_mpp`
    without opening the slide. ``None``: these options give it no mpp."""
    from pathflow.slide import MPP_MAX, MPP_MIN, lookup_mpp

    if cfg.force_slide_mpp is not None:
        return float(cfg.force_slide_mpp), "override"
    if table is not None:
        found = lookup_mpp(table, str(attrs.get("slide_path", "")))
        if found is not None:
            return found, "csv"
    own = float(attrs.get("file_mpp", math.nan))
    if math.isfinite(own) and MPP_MIN <= own <= MPP_MAX:
        return own, "file"
    if cfg.slide_mpp is not None:
        return float(cfg.slide_mpp), "fallback"
    return None, ""


def mpp_conflicts(
    finished: dict[str, Path], cfg: TileConfig
) -> list[tuple[str, float, str, float | None, str]]:
    """Finished slides whose recorded mpp differs from the one ``cfg`` gives them:
    (slide, mpp there, its source, mpp here, its source). Unreadable files are skipped (a
    re-run tiles them again)."""
    from pathflow.outputs import read_coords_h5
    from pathflow.slide import load_mpp_csv

    table = load_mpp_csv(cfg.slide_mpp_csv) if cfg.slide_mpp_csv else None
    out = []
    for sid, path in sorted(finished.items()):
        try:
            _, attrs = read_coords_h5(path)
        except Exception:
            continue
        if "mpp" not in attrs:
            continue
        had = float(attrs["mpp"])
        want, source = expected_mpp(attrs, cfg, table)
        if want is None or not math.isclose(had, want, rel_tol=1e-9, abs_tol=1e-12):
            out.append((sid, had, str(attrs.get("mpp_source", "") or "?"), want, source))
    return out


def finished_slides(out: Path) -> dict[str, Path]:
    """Slide id -> ``coords/<id>.h5`` of every finished slide in ``out``."""
    d = out / "coords"
    if not d.is_dir():
        return {}
    return {p.name[: -len(".h5")]: p for p in d.iterdir()
            if p.name.endswith(".h5") and not p.name.startswith(".")}  # fmt: skip


def check_rerun(out: Path, cfg: TileConfig, run_ids: set[str]) -> None:
    """Refuse (a one-line PathflowError: exit status 1) a run without ``--part`` into
    ``out`` whose options change what its finished slides hold, unless ``cfg.overwrite`` and
    every such slide is one of ``run_ids`` (redone by this run). Does nothing for a new
    folder."""
    import yaml

    path = out / "config.yaml"
    if not path.is_file():
        return
    try:
        theirs = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: unreadable ({str(exc).splitlines()[0]})") from exc
    if not isinstance(theirs, dict):
        raise ConfigError(f"{path}: not a pathflow tile config")
    finished = finished_slides(out)
    mine = cfg.to_dict()
    (ta, sa), (tb, sb) = option_groups(theirs), option_groups(mine)
    changed = _diff(ta, tb) if finished else []
    shards_on_disk = _has_shards(out)
    shard_changed = _diff(sa, sb) if shards_on_disk else []
    uses_mpp = any(theirs.get(k) is not None or mine.get(k) is not None for k in MPP_FIELDS)
    conflicts = mpp_conflicts(finished, cfg) if finished and uses_mpp else []
    if not (changed or shard_changed or conflicts):
        return
    shown = [f"{k}: {ta.get(k)!r} there, {tb.get(k)!r} here" for k in changed]
    shown += [f"{k}: {sa.get(k)!r} there, {sb.get(k)!r} here" for k in shard_changed]
    if conflicts:
        sid, had, src, want, wsrc = conflicts[0]
        opts = [k for k in sorted(MPP_FIELDS) if theirs.get(k) != mine.get(k)]
        here = f"{want:g} ({wsrc})" if want is not None else "none"
        shown.append(
            f"mpp of {len(conflicts)} slide(s), e.g. {sid}: {had:g} ({src}) there, {here} here"
            + (f" ({', '.join(opts)} changed)" if opts else "")
        )
    text = "; ".join(shown[:4]) + (f" and {len(shown) - 4} more" if len(shown) > 4 else "")
    if not cfg.overwrite:
        raise PathflowError(
            f"{out}: finished slides were tiled with other options ({text}); use the same "
            "options, --overwrite to redo them, or another --out"
        )
    stale = sorted(set(finished) - run_ids) if changed else []
    stale += sorted({c[0] for c in conflicts} - run_ids - set(stale))
    if stale:
        raise PathflowError(
            f"{out}: --overwrite redoes the slides of this run only, but {len(stale)} finished "
            f"slide(s) are not in it (e.g. {stale[0]}) and would keep the old options ({text}); "
            "add them to the run or use another --out"
        )
    if shards_on_disk and not cfg.shards:
        raise PathflowError(
            f"{out}: --overwrite with other options would leave the shards of the old ones in "
            f"{out / 'shards'} ({text}); add --shards to rewrite them or use another --out"
        )


__all__ = [
    "MPP_FIELDS",
    "SELECTION_FIELDS",
    "SHARD_FIELDS",
    "check_rerun",
    "expected_mpp",
    "finished_slides",
    "mpp_conflicts",
    "option_groups",
]
