"""Training logs: ``metrics.jsonl`` and ``metrics.csv`` (one row per logged step) and
TensorBoard scalars (``tb/``), written by rank 0 only; and the progress line on stderr, with
the job's steps per second and the time left (:class:`StepRate`, :func:`progress_line`).

On resume, rows past the resumed step (logged after the checkpoint by the interrupted run)
are dropped, so the files hold one row per step.

Example:
    >>> import tempfile, pathlib
    >>> from pathflow.train.metrics import MetricsLogger
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with MetricsLogger(d, tensorboard=False) as log:
    ...     log.log({"step": 1, "loss": 2.5})
    >>> (d / "metrics.csv").read_text().splitlines()
    ['step,loss', '1,2.5']
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path
from types import TracebackType
from typing import Any

from pathflow.outputs import atomic_write_text

log = logging.getLogger("pathflow.train")


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (``m:ss`` under an hour), rounded to the second.

    Example:
        >>> format_duration(3725.4), format_duration(65), format_duration(0.4)
        ('1:02:05', '1:05', '0:00')
    """
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class StepRate:
    """Steps per second of this job and the time left until its last step.

    Measured from the end of the job's first step, which carries the start-up (loader workers,
    compilation, the first batch); until a second step is done, from the job's start.

    Example:
        >>> r = StepRate(start_step=0, t_start=0.0)
        >>> r.done(1, 10.0)  # the first step took 10 s (start-up)
        >>> r.done(5, 12.0)  # then 4 steps in 2 s
        >>> r.steps_per_s(), r.eta_s(stop_at=25)
        (2.0, 10.0)
    """

    def __init__(self, start_step: int, t_start: float) -> None:
        self._origin = (start_step, t_start)
        self._first: tuple[int, float] | None = None
        self._last = (start_step, t_start)

    def done(self, step: int, now: float) -> None:
        """``step`` steps are done at time ``now`` (``time.perf_counter()``)."""
        if self._first is None:
            self._first = (step, now)
        self._last = (step, now)

    def steps_per_s(self) -> float:
        s0, t0 = self._first if self._first is not None else self._origin
        s1, t1 = self._last
        if s1 <= s0:
            s0, t0 = self._origin
        return (s1 - s0) / (t1 - t0) if s1 > s0 and t1 > t0 else 0.0

    def eta_s(self, stop_at: int) -> float | None:
        """Seconds until step ``stop_at`` at the current rate (None before any rate)."""
        rate = self.steps_per_s()
        return (stop_at - self._last[0]) / rate if rate > 0 else None


def progress_line(
    step: int,
    total: int,
    epoch: int,
    loss: float,
    lr: float,
    images_per_s: float,
    rate: StepRate,
    stop_at: int,
) -> str:
    """The line ``pathflow train`` prints per logged step when stderr is not a terminal.

    Example:
        >>> r = StepRate(0, 0.0); r.done(1, 1.0); r.done(3, 2.0)
        >>> progress_line(3, 10, 0, 2.5, 1e-3, 64.0, r, stop_at=10)
        'step 3/10 epoch 0 loss 2.5000 lr 1.00e-03 64.0 img/s 2.00 steps/s ETA 0:04'
    """
    eta = rate.eta_s(stop_at)
    left = "ETA ?" if eta is None else f"ETA {format_duration(eta)}"
    if stop_at < total:
        left += f" to step {stop_at}"  # --stop-after, or a stop asked for by a signal
    return (
        f"step {step}/{total} epoch {epoch} loss {loss:.4f} lr {lr:.2e} {images_per_s:.1f} "
        f"img/s {rate.steps_per_s():.2f} steps/s {left}"
    )


def _truncate_after(path: Path, step: int, csv_file: bool) -> None:
    """Drop rows whose ``step`` is greater than ``step``."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    if csv_file:
        if not lines:
            return
        rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
        kept = [lines[0]] + [
            line for line, row in zip(lines[1:], rows, strict=False) if int(row["step"]) <= step
        ]
    else:
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "\n".join(kept) + ("\n" if kept else ""))


class MetricsLogger:
    """Append-only JSONL + CSV + TensorBoard writer. Disabled (a no-op) when
    ``enabled=False`` (ranks other than 0)."""

    def __init__(
        self,
        out: str | Path,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.enabled = enabled
        self.out = Path(out)
        self._columns: list[str] | None = None
        self._tb: Any = None
        if not enabled:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.out / "metrics.jsonl"
        self.csv_path = self.out / "metrics.csv"
        if resume_step is None:
            for p in (self.jsonl_path, self.csv_path):
                p.unlink(missing_ok=True)
        else:
            _truncate_after(self.jsonl_path, resume_step, csv_file=False)
            _truncate_after(self.csv_path, resume_step, csv_file=True)
        if self.csv_path.exists() and self.csv_path.stat().st_size:
            with self.csv_path.open() as f:
                self._columns = next(csv.reader(f))
        self._jsonl = self.jsonl_path.open("a")
        self._csv = self.csv_path.open("a", newline="")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # the tensorboard package is optional
                log.warning("tensorboard is not installed: no TensorBoard scalars")
            else:
                self._tb = SummaryWriter(str(self.out / "tb"), purge_step=resume_step)

    def log(self, record: dict[str, Any]) -> None:
        """Write one row (must contain ``step``); scalars go to TensorBoard as ``train/<k>``."""
        if not self.enabled:
            return
        try:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        except OSError as exc:  # e.g. a full disk: say which file
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.jsonl_path)) from None
        try:
            writer = csv.writer(self._csv)
            if self._columns is None:
                self._columns = list(record)
                writer.writerow(self._columns)
            writer.writerow([record.get(c, "") for c in self._columns])
            self._csv.flush()
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.csv_path)) from None
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        self._csv.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = ["MetricsLogger", "StepRate", "format_duration", "progress_line"]
