"""Split a cohort into N disjoint, stable parts for job arrays (``--part I/N`` / ``auto``).

A slide belongs to part ``blake2b(slide id) mod N``: the assignment depends only on the slide
id and N, so it is the same on every machine, Python version and run, and adding slides never
moves an existing slide to another part.

``--part auto`` reads the index of the running array task from the scheduler's environment:

- SLURM: ``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_COUNT`` (or ``SLURM_ARRAY_TASK_MIN`` /
  ``SLURM_ARRAY_TASK_MAX``; ``--array=0-7`` and ``--array=1-8`` both give parts 0..7);
- PBS Pro / OpenPBS: ``PBS_ARRAY_INDEX`` (or TORQUE's ``PBS_ARRAYID``) with the count in
  ``PATHFLOW_PART_COUNT``;
- LSF: ``LSB_JOBINDEX`` (1-based) with ``LSB_JOBINDEX_END`` (or ``PATHFLOW_PART_COUNT``);
- Kubernetes indexed jobs: ``JOB_COMPLETION_INDEX`` with ``PATHFLOW_PART_COUNT``.

``PATHFLOW_PART_COUNT`` (and ``PATHFLOW_PART_MIN``, the first array index, default 0 or the
scheduler's minimum) override what the scheduler says.

Example:
    >>> parse_part("2/8")
    (2, 8)
    >>> part_of("TCGA-A1-0001", 4)
    3
    >>> select(["a.svs", "b.svs", "c.svs"], ["a", "b", "c"], (0, 1))
    ['a.svs', 'b.svs', 'c.svs']
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from pathflow.exceptions import ConfigError

__all__ = ["format_part", "parse_part", "part_of", "select"]

T = TypeVar("T")

_PART_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def part_of(key: str, n: int) -> int:
    """Part (0..n-1) that ``key`` belongs to: blake2b-64 of its UTF-8 bytes, mod ``n``.

    >>> [part_of(k, 3) for k in ("a", "b", "c")] == [part_of(k, 3) for k in ("a", "b", "c")]
    True
    """
    if n < 1:
        raise ConfigError(f"part count must be >= 1, got {n}")
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def select(items: Sequence[T], keys: Sequence[str], part: tuple[int, int]) -> list[T]:
    """The items whose key falls in ``part`` = (index, count), order kept.

    >>> select([10, 20, 30], ["x", "y", "z"], (1, 1))
    Traceback (most recent call last):
    ...
    pathflow.exceptions.ConfigError: part 1/1: index must be in 0..0
    """
    index, count = _check(index=part[0], count=part[1], text=f"{part[0]}/{part[1]}")
    if len(items) != len(keys):
        raise ConfigError(f"select: {len(items)} items but {len(keys)} keys")
    return [it for it, k in zip(items, keys, strict=True) if part_of(k, count) == index]


def format_part(part: tuple[int, int]) -> str:
    """Folder/file tag of a part: ``part-0002-of-0008``.

    >>> format_part((2, 8))
    'part-0002-of-0008'
    """
    return f"part-{part[0]:04d}-of-{part[1]:04d}"


def _check(index: int, count: int, text: str) -> tuple[int, int]:
    if count < 1:
        raise ConfigError(f"part {text}: count must be >= 1")
    if not 0 <= index < count:
        raise ConfigError(f"part {text}: index must be in 0..{count - 1}")
    return index, count


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise ConfigError(f"--part auto: {name}={raw!r} is not an integer") from None


def parse_part(text: str, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``"I/N"`` (0-based, 0 <= I < N) or ``"auto"`` (array-job environment) -> (I, N).

    >>> parse_part("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"})
    (3, 4)
    >>> parse_part("auto", {"LSB_JOBINDEX": "1", "LSB_JOBINDEX_END": "5"})
    (0, 5)
    """
    text = str(text).strip()
    if text.lower() != "auto":
        m = _PART_RE.match(text)
        if not m:
            raise ConfigError(f"--part {text!r}: expected I/N (e.g. 0/8) or auto")
        return _check(int(m.group(1)), int(m.group(2)), text)
    return _auto(os.environ if env is None else env)


def _auto(env: Mapping[str, str]) -> tuple[int, int]:
    override_n = _int(env, "PATHFLOW_PART_COUNT")
    override_min = _int(env, "PATHFLOW_PART_MIN")

    def done(
        raw: int, first: int, count: int | None, source: str, count_hint: str
    ) -> tuple[int, int]:
        first = override_min if override_min is not None else first
        n = override_n if override_n is not None else count
        if n is None:
            raise ConfigError(
                f"--part auto: {source} is set but the number of parts is not: "
                f"set {count_hint}PATHFLOW_PART_COUNT"
            )
        return _check(raw - first, n, f"auto ({source}={raw}, first {first}, count {n})")

    slurm = _int(env, "SLURM_ARRAY_TASK_ID")
    if slurm is not None:
        lo = _int(env, "SLURM_ARRAY_TASK_MIN")
        hi = _int(env, "SLURM_ARRAY_TASK_MAX")
        count = _int(env, "SLURM_ARRAY_TASK_COUNT")
        first = lo if lo is not None else 0
        if count is None and lo is not None and hi is not None:
            count = hi - lo + 1
        return done(slurm, first, count, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT or ")
    for name in ("PBS_ARRAY_INDEX", "PBS_ARRAYID"):
        pbs = _int(env, name)
        if pbs is not None:
            return done(pbs, 0, None, name, "")
    lsf = _int(env, "LSB_JOBINDEX")
    if lsf is not None and lsf > 0:  # LSF sets LSB_JOBINDEX=0 outside arrays
        end = _int(env, "LSB_JOBINDEX_END")
        return done(lsf, 1, end, "LSB_JOBINDEX", "LSB_JOBINDEX_END or ")
    k8s = _int(env, "JOB_COMPLETION_INDEX")
    if k8s is not None:
        return done(k8s, 0, None, "JOB_COMPLETION_INDEX", "")
    raise ConfigError(
        "--part auto: no array-job index found (SLURM_ARRAY_TASK_ID, PBS_ARRAY_INDEX, "
        "LSB_JOBINDEX or JOB_COMPLETION_INDEX); use --part I/N"
    )
