"""Checkpoint and stop on a signal: SLURM's pre-timeout warning (``--signal=USR1@120``) or a
preemption's ``SIGTERM``, so that a requeued job continues exactly with ``--resume``; and on
Ctrl-C (``SIGINT``) alike, with exit status :data:`EXIT_INTERRUPTED`.

The handler only notes the signal. At every step boundary each rank calls
:meth:`StopSignal.requested`; under DDP the ranks sum their flags (an all-reduce, so they all
stop after the same step and none waits in a collective the others left). The reduction of
one boundary is read at the next: it runs in the background behind the following step and
adds no host-device synchronisation, at the price of stopping one step later. The trainer
then writes its (atomic) checkpoint, says so on stderr, and ``pathflow train`` exits with
:data:`EXIT_STOPPED`.

Ctrl-C is handled the same way once the training loop runs (:meth:`StopSignal.arm`): the step
in progress finishes, the checkpoint is written, one line says so and ``pathflow train``
exits with 130 (``128 + SIGINT``, as a shell reports a Ctrl-C). A second Ctrl-C (more than
:data:`SAME_CTRL_C_S` later: ``torchrun`` forwards the first to its workers), or one before
the first step (nothing to save yet), raises ``KeyboardInterrupt`` at once: the run leaves
without saving (the last checkpoint stays intact; no temporary file is left).

Example:
    >>> from pathflow.train.preemption import parse_signal
    >>> parse_signal("USR1").name, parse_signal("sigterm").name, parse_signal("none")
    ('SIGUSR1', 'SIGTERM', None)
"""

from __future__ import annotations

import signal
import threading
import time
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

#: Exit status of a run stopped by Ctrl-C (``128 + SIGINT``), after its checkpoint.
EXIT_INTERRUPTED = 128 + signal.SIGINT

#: A second SIGINT this soon after the first is the same Ctrl-C: ``torchrun`` forwards the
#: terminal's SIGINT to its workers, which got it from the terminal already.
SAME_CTRL_C_S = 0.5

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
    """While entered, a handler of ``name``'s signal that asks the training loop to stop, and
    (``interrupt``, unless ``name`` is ``INT`` itself) one of Ctrl-C that does the same once
    :meth:`arm` ed (before: ``KeyboardInterrupt`` at once; a second Ctrl-C: likewise).

    Installed only from the main thread (Python's rule; elsewhere no handler is installed and
    :meth:`requested` stays False); the previous handlers come back on exit.

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

    def __init__(self, name: str | None, info: DistInfo, interrupt: bool = True) -> None:
        self.signum = parse_signal(name)
        self.info = info
        self.received = False  # this process got the signal
        self.interrupted = False  # this process got a Ctrl-C (SIGINT) while armed
        self.stopped = False  # the ranks agreed to stop
        self.by_interrupt = False  # ... and a Ctrl-C (on any rank) was among the reasons
        self.armed = False
        self._interrupted_at = 0.0
        self.interrupt = interrupt and self.signum != signal.SIGINT
        self._previous: Any = None
        self._previous_int: Any = None
        self._installed = False
        self._int_installed = False
        self._active = False  # requested() takes part (a collective under DDP): same on all ranks
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._host: torch.Tensor | None = None

    @property
    def name(self) -> str:
        return self.signum.name if self.signum is not None else "none"

    @property
    def reason(self) -> str:
        """The signal that stopped the run: ``SIGINT`` for a Ctrl-C, else :attr:`name`."""
        return "SIGINT" if self.by_interrupt else self.name

    @property
    def exit_status(self) -> int:
        """The exit status of a stopped run: 130 after Ctrl-C, else 75."""
        return EXIT_INTERRUPTED if self.by_interrupt else EXIT_STOPPED

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._active = self.signum is not None or self.interrupt
            if self.signum is not None:
                self._previous = signal.signal(self.signum, self._handle)
                self._installed = True
            # an ignored SIGINT (a job started with nohup or in the background) stays ignored
            if self.interrupt and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
                self._previous_int = signal.signal(signal.SIGINT, self._handle_interrupt)
                self._int_installed = True
        return self

    def arm(self) -> None:
        """From now on (the training loop runs) a first Ctrl-C asks for a checkpoint and a
        stop instead of raising ``KeyboardInterrupt``."""
        self.armed = True

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
        if self._int_installed:
            previous = self._previous_int  # None: installed from C, not Python
            if previous is None:
                previous = signal.default_int_handler
            signal.signal(signal.SIGINT, previous)
            self._int_installed = False
        self._active = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = True

    def _handle_interrupt(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.interrupted and now - self._interrupted_at < SAME_CTRL_C_S:
            return  # the same Ctrl-C, forwarded by torchrun
        if not self.armed or self.interrupted:
            raise KeyboardInterrupt  # nothing to save yet, or the second Ctrl-C: leave now
        self.interrupted = True
        self._interrupted_at = now

    def requested(self) -> bool:
        """True, on every rank alike, once any rank got the signal. Call it on every rank at
        every step boundary (it is a collective under DDP)."""
        if not self._active:
            return False
        if not self.info.distributed:
            self.stopped = self.received or self.interrupted
            self.by_interrupt = self.interrupted
            return self.stopped
        if self._pending is not None:
            flags = self._collect()
            if flags[0] or flags[1]:
                self.stopped = True
                self.by_interrupt = flags[1] > 0
                return True
        self._launch()
        return False

    def _launch(self) -> None:
        device = self.info.device
        flag = torch.tensor(
            [int(self.received), int(self.interrupted)], dtype=torch.int32, device=device
        )
        work = dist.all_reduce(flag, async_op=True)
        if device.type == "cuda":
            # the current stream waits for the collective, the host does not; the sum comes
            # back to pinned memory, read after the next step's own synchronisation
            assert work is not None
            work.wait()
            if self._host is None:
                self._host = torch.zeros(2, dtype=torch.int32, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending = (done, self._host)
        else:
            self._pending = (work, flag)

    def _collect(self) -> tuple[int, int]:
        """The ranks' summed flags: (checkpoint signals, Ctrl-Cs)."""
        assert self._pending is not None
        waiter, value = self._pending
        self._pending = None
        if isinstance(waiter, torch.cuda.Event):
            waiter.synchronize()
        else:
            waiter.wait()
        got = [int(v) for v in value.tolist()]
        return got[0], got[1]

    def message(self, step: int, checkpoint: Path) -> str:
        """The line said when the run stops."""
        if self.by_interrupt:
            return (
                f"pathflow train: interrupted (SIGINT): stopped after step {step}, checkpoint "
                f"{checkpoint} written; exit status {EXIT_INTERRUPTED}: run the same command "
                "with --resume to continue exactly"
            )
        return (
            f"pathflow train: {self.name} received: stopped after step {step}, checkpoint "
            f"{checkpoint} written; exit status {EXIT_STOPPED}: run the same command with "
            "--resume (e.g. in the requeued job) to continue exactly"
        )


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_STOPPED",
    "SAME_CTRL_C_S",
    "SIGNAL_NAMES",
    "StopSignal",
    "parse_signal",
]
