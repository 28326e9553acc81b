"""Run per-slide work on a Dask cluster (``--executor dask``): an existing engine, not ours.

Without an address a ``LocalCluster`` of worker *processes* is started on 127.0.0.1; with
``scheduler="tcp://HOST:PORT"`` or ``scheduler_file=PATH`` (``dask scheduler
--scheduler-file``, dask-jobqueue's SLURM/PBS/LSF clusters) the run joins that cluster. Every
task's result is handed to ``finish`` in the driver as soon as it completes (any order). The
driver keeps at most one task per worker thread in flight, so a worker that dies (segfault,
``os._exit``, OOM kill) takes only its own task with it: that task comes back as
distributed's ``KilledWorker``, is tried once more, and then becomes a failed result; the run
goes on. The local cluster's scheduler gives up on a task at its first worker death
(``allowed-failures`` 0); an external scheduler applies its own setting (Dask's default
retries on 3 more workers first; ``DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0`` in its
environment does the same as the local cluster).

Example:
    >>> from pathflow.jobs.dask_executor import run_slide_tasks
    >>> from pathflow.tiling.slide_task import process_slide
    >>> rows = {}
    >>> run_slide_tasks(process_slide, [(0, path, "s0")], (cfg,),  # doctest: +SKIP
    ...                 lambda i, row: rows.__setitem__(i, row),
    ...                 lambda p, sid, err: {"slide": sid, "status": "failed", "error": err})
"""

from __future__ import annotations

import logging
import os
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pathflow.exceptions import ConfigError

log = logging.getLogger("pathflow.jobs")

__all__ = ["dask_client", "run_slide_tasks", "run_tasks"]

#: Scheduler settings of the local cluster (see the module docstring).
LOCAL_SCHEDULER_CONFIG = {
    "distributed.scheduler.allowed-failures": 0,
    "distributed.scheduler.worker-saturation": 1.0,
}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ConfigError(
            "--executor dask needs Dask distributed: pip install 'pathflow[dask]'"
        ) from exc
    return distributed


@contextmanager
def dask_client(
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Any]:
    """A ``distributed.Client``: to ``scheduler`` / ``scheduler_file`` when given, else to a
    new ``LocalCluster`` of ``workers`` processes (default: one per core) with one task
    thread each on 127.0.0.1 (``threads``: ``PATHFLOW_NUM_THREADS`` of its workers, the Rust
    pool size; ``extra_env``: more environment variables of the local workers). Closed
    (cluster included) on exit."""
    distributed = _import_distributed()
    args = (scheduler, scheduler_file, workers, threads, extra_env)
    with _quiet_distributed(), _client(distributed, *args) as c:
        yield c


@contextmanager
def _quiet_distributed() -> Iterator[None]:
    """Dask's INFO/ERROR chatter (start-up, a dead worker) off unless pathflow logs debug:
    failures come back as rows."""
    dlog = logging.getLogger("distributed")
    old = dlog.level
    if not log.isEnabledFor(logging.DEBUG):
        dlog.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        dlog.setLevel(old)


@contextmanager
def _client(
    distributed: Any,
    scheduler: str | None,
    scheduler_file: str | None,
    workers: int | None,
    threads: int | None,
    extra_env: dict[str, str] | None,
) -> Iterator[Any]:
    import dask

    if scheduler and scheduler_file:
        raise ConfigError("give --scheduler or --scheduler-file, not both")
    if scheduler_file and not Path(scheduler_file).is_file():
        raise ConfigError(f"{scheduler_file}: scheduler file not found")
    if scheduler or scheduler_file:
        try:
            client = distributed.Client(address=scheduler, scheduler_file=scheduler_file,
                                        timeout="30s")  # fmt: skip
        except (OSError, TimeoutError) as exc:
            where = scheduler or scheduler_file
            why = _one_line(exc)
            raise ConfigError(f"{where}: cannot reach the Dask scheduler ({why})") from exc
        try:
            yield client
        finally:
            client.close()
        return
    n = workers if workers and workers > 0 else (os.cpu_count() or 1)
    env = {"PATHFLOW_NUM_THREADS": str(threads)} if threads and threads > 0 else {}
    with dask.config.set(LOCAL_SCHEDULER_CONFIG):
        cluster = distributed.LocalCluster(
            host="127.0.0.1",
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",  # its HTTP server on 127.0.0.1, a free port
            silence_logs=logging.CRITICAL,
            env={**env, **(extra_env or {})},
        )
    try:
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def run_tasks(
    fn: Callable[..., Any],
    payloads: Sequence[tuple[Any, ...]],
    finish: Callable[[int, Any], None],
    failed: Callable[[int, str], Any],
    *,
    client: Any,
    names: Sequence[str] | None = None,
    attempts: int = 2,
) -> None:
    """``fn(*payloads[i])`` for every ``i`` on ``client``'s cluster; ``finish(i, result)`` in
    this process as each completes, ``finish(i, failed(i, error))`` for a task that raised, or
    whose worker died ``attempts`` times.

    At most one task per worker thread is in flight (topped up as tasks end, following the
    cluster's size), so a worker that dies takes only the task it was running with it: the
    others are never charged with its death."""
    distributed = _import_distributed()
    run = uuid.uuid4().hex[:8]
    pending = deque(range(len(payloads)))
    tries = [0] * len(payloads)
    running: dict[Any, int] = {}
    done = distributed.as_completed()

    def top_up() -> None:
        slots = max(1, sum(client.nthreads().values()))
        while pending and len(running) < slots:
            i = pending.popleft()
            tries[i] += 1
            tag = names[i] if names is not None else ""
            key = f"pathflow-{run}-{i}-{tries[i]}-{tag}"[:120]
            fut = client.submit(fn, *payloads[i], key=key, pure=False, retries=0)
            running[fut] = i
            done.add(fut)

    try:
        top_up()
        for fut in done:
            i = running.pop(fut)
            if fut.status == "finished":
                result = fut.result()
            else:
                try:
                    exc = fut.exception()
                except BaseException as exc2:  # cancelled: the scheduler lost the task
                    exc = exc2
                why = _one_line(exc)
                killed = isinstance(exc, distributed.KilledWorker)
                if killed:
                    why = f"worker died while running the task ({why.split('. ')[0]})"
                log.debug("task %d (try %d) failed: %s", i, tries[i], why)
                if killed and tries[i] < attempts:
                    pending.appendleft(i)
                    fut.release()
                    top_up()
                    continue
                result = failed(i, why)
            fut.release()
            finish(i, result)
            top_up()
    finally:
        for fut in running:
            fut.cancel()


def run_slide_tasks(
    fn: Callable[..., dict[str, Any]],
    jobs: list[tuple[int, Path, str]],
    args: tuple[Any, ...],
    finish: Callable[[int, dict[str, Any]], None],
    failed_row: Callable[[Path, str, str], dict[str, Any]],
    *,
    scheduler: str | None = None,
    scheduler_file: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
) -> None:
    """One task ``fn(path, sid, *args)`` per slide of ``jobs`` = [(index, path, sid)...];
    ``finish(index, row)`` in the driver as rows arrive; a task that raised or whose worker
    died gives ``finish(index, failed_row(path, sid, error))``."""
    if not jobs:
        return
    payloads = [(path, sid, *args) for _, path, sid in jobs]

    def failed(k: int, why: str) -> dict[str, Any]:
        _, path, sid = jobs[k]
        return failed_row(path, sid, why)

    def done(k: int, row: dict[str, Any]) -> None:
        finish(jobs[k][0], row)

    with dask_client(scheduler, scheduler_file, workers, threads) as client:
        run_tasks(fn, payloads, done, failed, client=client, names=[sid for _, _, sid in jobs])
