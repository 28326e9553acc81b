"""Training logs: ``metrics.jsonl`` and ``metrics.csv`` (one row per logged step) and
TensorBoard scalars (``tb/``), written by rank 0 only.

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
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        writer = csv.writer(self._csv)
        if self._columns is None:
            self._columns = list(record)
            writer.writerow(self._columns)
        writer.writerow([record.get(c, "") for c in self._columns])
        self._csv.flush()
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


__all__ = ["MetricsLogger"]
