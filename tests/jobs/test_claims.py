"""Claims on a shared folder: O_EXCL lock files, heartbeat, stale takeover by exactly one."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import time
from pathlib import Path
from typing import Any

from pathflow.jobs.claims import read_claim, try_claim

RACERS = 8


def _race(folder: str, job: str, stale_after: float, go: Any, done: Any, results: Any) -> None:
    go.wait()  # all racers start together
    claim = try_claim(folder, "slide", job=job, stale_after=stale_after, heartbeat=0)
    results.put((job, claim is not None))
    done.wait()  # the winner keeps its lock until everyone has tried
    if claim is not None:
        claim.release()


def _run_racers(folder: Path, stale_after: float) -> list[str]:
    ctx = mp.get_context("fork")
    go, done = ctx.Barrier(RACERS), ctx.Barrier(RACERS)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_race, args=(str(folder), f"job{k}", stale_after, go, done, results))
        for k in range(RACERS)
    ]
    for p in procs:
        p.start()
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return [job for job, won in got if won]


def _fake_lock(path: Path, host: str, pid: int, age: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "job": "old", "time": 0.0}) + "\n")
    t = time.time() - age
    os.utime(path, (t, t))


def test_eight_processes_racing_one_claim_give_one_winner(tmp_path: Path) -> None:
    winners = _run_racers(tmp_path, stale_after=300)
    assert len(winners) == 1
    assert not (tmp_path / "slide.lock").exists()  # released by the winner


def test_stale_lock_is_taken_over_by_exactly_one(tmp_path: Path) -> None:
    lock = tmp_path / "slide.lock"
    _fake_lock(lock, "node-that-died", 4242, age=1000)  # heartbeat 1000 s ago
    winners = _run_racers(tmp_path, stale_after=60)
    assert len(winners) == 1
    # Nothing left behind: no renamed stale lock, no takeover guard, and the winner released.
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_stale_takeover_records_the_old_holder(tmp_path: Path) -> None:
    lock = tmp_path / "slide.lock"
    _fake_lock(lock, "node-that-died", 4242, age=1000)
    claim = try_claim(tmp_path, "slide", job="new", stale_after=60, heartbeat=0)
    assert claim is not None and claim.took_over is not None
    assert (claim.took_over.host, claim.took_over.pid) == ("node-that-died", 4242)
    info = read_claim(lock)
    assert info is not None
    assert (info.host, info.pid, info.job) == (socket.gethostname(), os.getpid(), "new")
    claim.release()


def test_a_fresh_lock_of_another_host_is_respected(tmp_path: Path) -> None:
    _fake_lock(tmp_path / "slide.lock", "other-node", 4242, age=5)
    assert try_claim(tmp_path, "slide", job="me", stale_after=60, heartbeat=0) is None
    assert read_claim(tmp_path / "slide.lock").host == "other-node"  # type: ignore[union-attr]


def test_a_lock_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    p = ctx.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()  # the pid is gone (reaped)
    _fake_lock(tmp_path / "slide.lock", socket.gethostname(), p.pid, age=1)
    claim = try_claim(tmp_path, "slide", job="me", stale_after=3600, heartbeat=0)
    assert claim is not None and claim.took_over is not None
    claim.release()


def test_heartbeat_keeps_the_lock_fresh(tmp_path: Path) -> None:
    claim = try_claim(tmp_path, "slide", job="me", heartbeat=0.05)
    assert claim is not None
    lock = tmp_path / "slide.lock"
    old = time.time() - 500
    os.utime(lock, (old, old))
    deadline = time.time() + 5
    while lock.stat().st_mtime < time.time() - 100 and time.time() < deadline:
        time.sleep(0.02)
    assert lock.stat().st_mtime > time.time() - 5
    claim.release()
    assert not lock.exists()
    claim.release()  # idempotent


def test_lock_holds_host_pid_job_time(tmp_path: Path) -> None:
    t0 = time.time()
    claim = try_claim(tmp_path / "claims", "s1", job="slurm:77_3", heartbeat=0)
    assert claim is not None
    doc = json.loads((tmp_path / "claims" / "s1.lock").read_text())
    assert doc["host"] == socket.gethostname() and doc["pid"] == os.getpid()
    assert doc["job"] == "slurm:77_3" and t0 - 1 <= doc["time"] <= time.time() + 1
    claim.release()
