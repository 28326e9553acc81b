"""Checkpoint and stop on a signal: SLURM's pre-timeout warning (``--signal=USR1@120``) or a
preemption's ``SIGTERM``, so that a requeued job continues exactly with ``--resume``.

The handler only notes the signal. At every step boundary each rank calls
:meth:`StopSignal.requested`; under DDP the ranks sum their flags (an all-reduce, so they all
stop after the same step and none waits in a collective the others left). The reduction of
one boundary is read at the next: it runs in the background behind the following step and
adds no host-device synchronisation, at the price of stopping one step later. The trainer
then writes its (atomic) checkpoint, says so on stderr, and ``pathflow train`` exits with
:data:`EXIT_STOPPED`.

Example:
    >>> from pathflow.train.preemption import parse_signal
    >>> parse_signal("USR1").name, parse_signal("sigterm").name, parse_signal("none")
    ('SIGUSR1', 'SIGTERM', None)
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import torch
import torch.distributed as dist

from pathflow.exceptions import ConfigError
from pathflow.train.distributed import DistInfo

#: Exit status of a run stopped by the checkpoint signal (``EX_TEMPFAIL``: try again later);
#: a job script requeues on it.
EXIT_STOPPED = 75

#: Accepted values of ``--signal-checkpoint``.
SIGNAL_NAMES = ("USR1", "USR2", "TERM", "INT", "HUP", "none")


def parse_signal(name: str | None) -> signal.Signals | None:
    """``USR1`` / ``SIGUSR1`` (any case) -> ``signal.SIGUSR1``; ``none`` (or empty) -> None."""
    text = (name or "none").strip().upper()
    if text == "NONE":
        return None
    short = text.removeprefix("SIG")
    if short not in SIGNAL_NAMES:
        raise ConfigError(
            f"signal_checkpoint must be one of {', '.join(SIGNAL_NAMES)}, got {name!r}"
        )
    return signal.Signals[f"SIG{short}"]


class StopSignal:
    """While entered, a handler of ``name``'s signal that asks the training loop to stop.

    Installed only from the main thread (Python's rule; elsewhere no handler is installed and
    :meth:`requested` stays False); the previous handler comes back on exit.

    Example:
        >>> import os, signal, torch
        >>> from pathflow.train.distributed import DistInfo
        >>> info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
        >>> with StopSignal("USR1", info) as stop:
        ...     before = stop.requested()
        ...     os.kill(os.getpid(), signal.SIGUSR1)
        ...     after = stop.requested()
        >>> before, after, stop.name
        (False, True, 'SIGUSR1')
    """

    def __init__(self, name: str | None, info: DistInfo) -> None:
        self.signum = parse_signal(name)
        self.info = info
        self.received = False  # this process got the signal
        self.stopped = False  # the ranks agreed to stop
        self._previous: Any = None
        self._installed = False
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._host: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.signum.name if self.signum is not None else "none"

    def __enter__(self) -> StopSignal:
        if self.signum is not None and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handle)
            self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pending is not None and exc_type is None:
            self._collect()  # every rank launched it: it completes
        self._pending = None
        if self._installed and self.signum is not None:
            signal.signal(self.signum, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def requested(self) -> bool:
        """True, on every rank alike, once any rank got the signal. Call it on every rank at
        every step boundary (it is a collective under DDP)."""
        if not self._installed:
            return False
        if not self.info.distributed:
            self.stopped = self.received
            return self.stopped
        if self._pending is not None and self._collect():
            self.stopped = True
            return True
        self._launch()
        return False

    def _launch(self) -> None:
        device = self.info.device
        flag = torch.full((1,), int(self.received), dtype=torch.int32, device=device)
        work = dist.all_reduce(flag, async_op=True)
        if device.type == "cuda":
            # the current stream waits for the collective, the host does not; the sum comes
            # back to pinned memory, read after the next step's own synchronisation
            assert work is not None
            work.wait()
            if self._host is None:
                self._host = torch.zeros(1, dtype=torch.int32, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (done, self._host)
        else:
            self._pending = (work, flag)

    def _collect(self) -> bool:
        assert self._pending is not None
        waiter, value = self._pending
        self._pending = None
        if isinstance(waiter, torch.cuda.Event):
            waiter.synchronize()
        else:
            waiter.wait()
        return int(value.item()) > 0

    def message(self, step: int, checkpoint: Path) -> str:
        """The line said when the run stops."""
        return (
            f"pathflow train: {self.name} received: stopped after step {step}, checkpoint "
            f"{checkpoint} written; exit status {EXIT_STOPPED}: run the same command with "
            "--resume (e.g. in the requeued job) to continue exactly"
        )


__all__ = ["EXIT_STOPPED", "SIGNAL_NAMES", "StopSignal", "parse_signal"]
