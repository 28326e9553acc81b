"""Claims: which job works on a slide right now, on a shared (possibly network) filesystem.

A claim is a lock file ``claims/<name>.lock`` created with ``O_CREAT | O_EXCL`` (atomic on
local filesystems, NFSv3+ and Lustre; ``flock`` is not used because it fails or is a no-op on
Lustre and some NFS mounts). It holds one JSON line naming the holder (host, pid, job id,
time). While the work runs, a heartbeat thread touches the file (its mtime is the liveness
signal). A lock whose mtime is older than ``stale_after`` seconds belongs to a dead job: a
taker renames it to a name unique to itself (``<lock>.stale.<host>.<pid>.<n>``); rename is
atomic, so exactly one of several takers succeeds and then creates a fresh lock with
``O_EXCL``. Finished work releases (deletes) its lock.

Correctness never depends on claims: every output is written atomically and a re-run of a
finished slide is a no-op, so two jobs working on one slide only waste time. Claims just keep
cooperating jobs from doing the same work.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> c = try_claim(d, "slide-1", job="demo")
    >>> c is not None, try_claim(d, "slide-1", job="other") is None
    (True, True)
    >>> c.release()
    >>> (d / "slide-1.lock").exists()
    False
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_STALE",
    "Claim",
    "ClaimInfo",
    "job_id",
    "read_claim",
    "try_claim",
]

#: Seconds between heartbeats (mtime touches) of a held claim.
DEFAULT_HEARTBEAT = 30.0
#: A claim whose lock was not touched for this many seconds is stale (its job died).
DEFAULT_STALE = 300.0

_COUNTER = itertools.count()


def job_id() -> str:
    """The scheduler's job id (SLURM, PBS, LSF, Kubernetes pod) or ``local``.

    >>> job_id() if not any(k in os.environ for k in ("SLURM_JOB_ID", "PBS_JOBID",
    ...     "LSB_JOBID", "JOB_COMPLETION_INDEX")) else "local"
    'local'
    """
    env = os.environ
    if env.get("SLURM_JOB_ID"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"slurm:{env['SLURM_JOB_ID']}" + (f"_{task}" if task else "")
    if env.get("PBS_JOBID"):
        return f"pbs:{env['PBS_JOBID']}"
    if env.get("LSB_JOBID"):
        index = env.get("LSB_JOBINDEX", "0")
        return f"lsf:{env['LSB_JOBID']}" + (f"[{index}]" if index != "0" else "")
    if env.get("JOB_COMPLETION_INDEX") is not None:
        return f"k8s:{socket.gethostname()}"
    return "local"


@dataclass
class ClaimInfo:
    """What a lock file says about its holder, and how old its last heartbeat is."""

    path: Path
    host: str
    pid: int
    job: str
    time: float
    age: float

    def stale(self, stale_after: float) -> bool:
        """Older than ``stale_after`` s, or held by a process of this host that is gone."""
        return self.age > stale_after or self.dead()

    def dead(self) -> bool:
        """The holder ran on this host and its process no longer exists."""
        if self.host != socket.gethostname() or self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, owned by another user
            return False
        return False


def read_claim(path: str | os.PathLike[str]) -> ClaimInfo | None:
    """The holder of a lock file, or None when there is no lock (a half-written or foreign
    lock reads as an unknown holder; its age still counts)."""
    p = Path(path)
    try:
        st = p.stat()
        text = p.read_text()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        doc: dict[str, Any] = json.loads(text)
    except ValueError:
        doc = {}
    return ClaimInfo(
        path=p,
        host=str(doc.get("host", "?")),
        pid=int(doc.get("pid", -1)),
        job=str(doc.get("job", "?")),
        time=float(doc.get("time", st.st_mtime)),
        age=max(0.0, time.time() - st.st_mtime),
    )


class _Heartbeat:
    """One daemon thread touching every held lock of this process (not a thread per claim:
    a Dask driver may hold thousands)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: dict[Path, float] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, path: Path, every: float) -> None:
        with self._lock:
            self._paths[path] = every
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="claims", daemon=True)
                self._thread.start()
            self._wake.set()

    def discard(self, path: Path) -> None:
        with self._lock:
            self._paths.pop(path, None)
            self._wake.set()  # the thread ends at once when no lock is left

    def _run(self) -> None:
        due: dict[Path, float] = {}
        while True:
            with self._lock:
                if not self._paths:
                    self._thread = None
                    return
                now = time.monotonic()
                for p, every in self._paths.items():
                    if p not in due:
                        due[p] = now + every
                    elif due[p] <= now:
                        with contextlib.suppress(OSError):
                            os.utime(p)
                        due[p] = now + every
                for p in [p for p in due if p not in self._paths]:
                    del due[p]
                wait = max(0.01, min(due.values()) - now)
                self._wake.clear()
            self._wake.wait(wait)


_BEAT = _Heartbeat()


@dataclass
class Claim:
    """A held claim; the heartbeat keeps its lock fresh until :meth:`release`."""

    path: Path
    heartbeat: float = DEFAULT_HEARTBEAT
    took_over: ClaimInfo | None = None
    _held: bool = field(default=False, repr=False)

    def start(self) -> Claim:
        if not self._held:
            self._held = True
            if self.heartbeat > 0:
                _BEAT.add(self.path, self.heartbeat)
        return self

    def release(self) -> None:
        """Stop the heartbeat and delete the lock (idempotent)."""
        if self._held:
            self._held = False
            _BEAT.discard(self.path)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _create(lock: Path, job: str) -> bool:
    """O_CREAT|O_EXCL the lock and write the holder; False when it exists."""
    try:
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return False
    doc = {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "time": time.time()}
    try:
        os.write(fd, (json.dumps(doc) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def try_claim(
    folder: str | os.PathLike[str],
    name: str,
    *,
    job: str | None = None,
    stale_after: float = DEFAULT_STALE,
    heartbeat: float = DEFAULT_HEARTBEAT,
) -> Claim | None:
    """Claim ``folder/<name>.lock``: a started :class:`Claim`, or None when another live
    job holds it. A stale lock (mtime older than ``stale_after`` s) is taken over by exactly
    one of the jobs racing for it."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    lock = d / f"{name}.lock"
    job = job or job_id()
    if _create(lock, job):
        return Claim(lock, heartbeat).start()
    info = read_claim(lock)
    if info is None:  # released between our create and our read: try once more
        return Claim(lock, heartbeat).start() if _create(lock, job) else None
    if not info.stale(stale_after):
        return None
    return _take_over(lock, job, stale_after, heartbeat)


def _grave(lock: Path) -> Path:
    host = socket.gethostname()
    return lock.with_name(f"{lock.name}.stale.{host}.{os.getpid()}.{next(_COUNTER)}")


def _take_over(lock: Path, job: str, stale_after: float, heartbeat: float) -> Claim | None:
    """Replace a stale lock. Takers are serialised by a short-lived ``<lock>.takeover``
    O_EXCL lock, so one never renames a fresh lock that another taker just created; the
    stale lock is renamed to a unique name (one rename wins) and recreated with O_EXCL."""
    guard = lock.with_name(lock.name + ".takeover")
    if not _create(guard, job):
        g = read_claim(guard)
        if g is not None and g.stale(stale_after):  # a taker died mid-takeover
            grave = _grave(guard)
            with contextlib.suppress(OSError):
                os.rename(guard, grave)
                grave.unlink()
        return None
    try:
        info = read_claim(lock)
        if info is not None:
            if not info.stale(stale_after):
                return None  # another taker won before us
            grave = _grave(lock)
            try:
                os.rename(lock, grave)
            except FileNotFoundError:
                info = None
            else:
                with contextlib.suppress(OSError):
                    grave.unlink()
        if not _create(lock, job):
            return None  # a fresh claimer created it while it was absent: it wins
        return Claim(lock, heartbeat, took_over=info).start()
    finally:
        with contextlib.suppress(OSError):
            guard.unlink()
