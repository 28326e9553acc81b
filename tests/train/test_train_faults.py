"""Faults during ``pathflow train`` on the real sample shards (cmu-small, 43 patches): a
truncated shard, a full disk at checkpoint time, Ctrl-C; and the progress line's ETA. Each
fault ends with one line on stderr, no traceback, a non-zero exit and the last checkpoint
intact."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from pathflow.cli import main
from pathflow.train import TrainConfig, train
from pathflow.train.checkpoint import load_checkpoint
from pathflow.train.distributed import DistInfo
from pathflow.train.metrics import format_duration
from pathflow.train.preemption import EXIT_INTERRUPTED, SAME_CTRL_C_S, StopSignal

#: ResNet-18 SimCLR on 48 px crops with a small projector: the fastest real setup.
TINY = [
    "--method", "simclr", "--arch", "resnet18", "--global-size", "48",
    "--simclr.proj-hidden-dim", "64", "--simclr.proj-dim", "16", "--batch-size", "8",
    "--device", "cpu", "--loader-backend", "torch", "--no-tensorboard", "--log-every", "1",
]  # fmt: skip


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["train", *TINY, "--data", str(shards), "--out", str(out), *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error" in line or "interrupted" in line]


# ------------------------------------------------------------------ a truncated shard
def test_truncated_shard_stops_train_with_one_line(
    sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(sample_shards, shards)
    tar = next(shards.glob("*.tar"))
    with tar.open("r+b") as f:
        f.truncate(tar.stat().st_size // 3)
    capsys.readouterr()
    code = main(_args(shards, tmp_path / "run", "--steps", "2", "--num-workers", "1"))
    err = capsys.readouterr().err
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"pathflow train: error: {tar}: truncated"), err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# -------------------------------------------------------------- a full disk at checkpoint
class _FullDisk:
    """A real file that fails like a full disk once ``budget`` bytes were written."""

    def __init__(self, f: IO[Any], budget: int) -> None:
        self._f, self._budget = f, budget

    def write(self, data: Any) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._budget -= n
        return int(self._f.write(data))

    def __enter__(self) -> _FullDisk:
        self._f.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.__exit__(*exc)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


#: the temporaries of the atomic writers are told apart by their names in /proc/self/fd
needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="no /proc/self/fd")


def _fill_disk(monkeypatch: pytest.MonkeyPatch, name: str, nth: int, budget: int) -> list[str]:
    """The ``nth`` file opened by pathflow's atomic writers for output ``name`` (its temporary
    ``.NAME.*``) runs out of space after ``budget`` bytes. Returns the temporaries opened."""
    real_fdopen = os.fdopen
    opened: list[str] = []

    def fdopen(fd: int, *a: Any, **kw: Any) -> Any:
        f = real_fdopen(fd, *a, **kw)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if Path(path).name.startswith(f".{name}."):
            opened.append(path)
            if len(opened) == nth:
                return _FullDisk(f, budget)
        return f

    monkeypatch.setattr(os, "fdopen", fdopen)
    return opened


@needs_proc
def test_disk_full_at_checkpoint_keeps_the_previous_one(
    sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The disk fills up while the step-4 checkpoint is written (1 MB into it): the run
    stops with one line naming the file and ENOSPC; the step-2 checkpoint is intact."""
    out = tmp_path / "run"
    opened = _fill_disk(monkeypatch, "checkpoint.pt", nth=2, budget=1 << 20)
    capsys.readouterr()
    code = main(_args(sample_shards, out, "--steps", "6", "--save-every", "2",
                      "--num-workers", "0", "-q"))  # fmt: skip
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    lines = _error_lines(err)
    ckpt = out / "checkpoint.pt"
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pathflow train: error: {ckpt}: cannot write the checkpoint "
                               "of step 4: No space left on device (ENOSPC)"), err  # fmt: skip
    assert f"{ckpt} still holds step 2" in lines[0] and "--resume" in lines[0]
    assert len(opened) == 2
    saved = load_checkpoint(ckpt)
    assert saved["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["method"].values() if v.is_floating_point())
    assert not list(out.glob(".checkpoint.pt.*"))  # the partial file is gone
    assert not (out / "summary.json").exists()  # the run did not pretend to finish


@needs_proc
def test_disk_full_at_the_summary_names_the_file(
    sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    out = tmp_path / "run"
    _fill_disk(monkeypatch, "summary.json", nth=1, budget=0)
    capsys.readouterr()
    code = main(_args(sample_shards, out, "--steps", "1", "--num-workers", "0", "-q"))
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    want = f"pathflow train: error: [Errno 28] No space left on device: '{out / 'summary.json'}'"
    assert _error_lines(err) == [want], err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1  # written before
    assert not list(out.glob(".summary.json.*"))


# ------------------------------------------------------------------------------ Ctrl-C
def _start(args: list[str], cpu: int) -> subprocess.Popen[str]:
    """``pathflow`` in its own session (so a Ctrl-C can go to its whole process group, loader
    workers included, as a terminal sends it), on one CPU: one torch thread in every run,
    which keeps the float sums bitwise equal between runs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})  # this thread only; the child inherits it
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "pathflow", *args], env=env, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
    finally:
        os.sched_setaffinity(0, before)


def _run(args: list[str], cpu: int, ctrl_c_after: str | None = None) -> tuple[int, str]:
    """Run to the end; with ``ctrl_c_after``, send SIGINT to the process group once a stderr
    line starts with it. Returns the exit status and stderr."""
    proc = _start(args, cpu)
    assert proc.stderr is not None
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if ctrl_c_after is not None and line.startswith(ctrl_c_after):
                os.killpg(proc.pid, signal.SIGINT)
                ctrl_c_after = None
        return proc.wait(timeout=120), "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _state(out: Path) -> tuple[dict[str, torch.Tensor], dict[int, float]]:
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]
    return load_checkpoint(out / "checkpoint.pt")["method"], losses


@pytest.mark.slow
def test_ctrl_c_checkpoints_exits_130_and_resumes_exactly(
    sample_shards: Path, tmp_path: Path
) -> None:
    """Ctrl-C after step 2 (to the process group: the loader worker gets it too): the step in
    progress finishes, the checkpoint is written, one line says so, exit 130; ``--resume``
    then ends where the uninterrupted run does, weights bitwise equal."""
    cpu = min(os.sched_getaffinity(0))
    steps = ["--steps", "6", "--num-workers", "1", "--resume"]  # --resume: the same command
    code, err = _run(_args(sample_shards, tmp_path / "full", *steps), cpu)
    assert code == 0, err

    part = tmp_path / "part"
    code, err = _run(_args(sample_shards, part, *steps), cpu, ctrl_c_after="step 2/6 ")
    assert code == EXIT_INTERRUPTED == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    said = _error_lines(err)
    assert len(said) == 1, err
    m = re.fullmatch(
        rf"pathflow train: interrupted \(SIGINT\): stopped after step (\d+), checkpoint "
        rf"{re.escape(str(part / 'checkpoint.pt'))} written; exit status 130: run the same "
        r"command with --resume to continue exactly",
        said[0],
    )
    assert m is not None, said[0]
    stopped = int(m.group(1))
    assert 2 <= stopped < 6 and load_checkpoint(part / "checkpoint.pt")["step"] == stopped
    assert json.loads((part / "summary.json").read_text())["stopped_by"] == "SIGINT"

    code, err = _run(_args(sample_shards, part, *steps), cpu)
    assert code == 0 and f"resuming at step {stopped}" in err, err
    (want, want_losses), (got, got_losses) = _state(tmp_path / "full"), _state(part)
    assert sorted(got_losses) == list(range(1, 7)) and got_losses == want_losses
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert torch.equal(got[name], value), name


def test_ctrl_c_semantics_of_the_stop_signal() -> None:
    """Before :meth:`arm` (nothing to save) and the second time, Ctrl-C raises
    ``KeyboardInterrupt`` at once; the first armed one only asks for a stop."""
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    before = signal.getsignal(signal.SIGINT)
    with StopSignal("USR1", info) as stop:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs in this thread before sleep returns
        stop.arm()
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # at once: torchrun forwarding the same Ctrl-C
        assert stop.requested() and stop.reason == "SIGINT" and stop.exit_status == 130
        time.sleep(SAME_CTRL_C_S)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
    # --signal-checkpoint INT: Ctrl-C is the requeue signal (exit 75), no second handler
    with StopSignal("INT", info) as stop:
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # a second one changes nothing
        assert stop.requested() and stop.reason == "SIGINT" and stop.exit_status == 75
    assert signal.getsignal(signal.SIGINT) is before


# ------------------------------------------------------------------------ progress ETA
def test_progress_line_shows_steps_per_second_and_time_left(
    sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = TrainConfig(
        method="simclr", arch="resnet18", data=str(sample_shards), out=str(tmp_path / "run"),
        device="cpu", loader_backend="torch", num_workers=0, batch_size=8, steps=4,
        log_every=1, tensorboard=False, global_size=48,
        options={"proj_hidden_dim": 64, "proj_dim": 16},
    )  # fmt: skip
    capsys.readouterr()
    t0 = time.perf_counter()
    train(cfg, progress=None)  # stderr is no terminal here: one line per logged step
    wall = time.perf_counter() - t0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("step ")]
    assert len(lines) == 4
    # seconds since the loop started, logged with every step
    times = {
        r["step"]: r["time"]
        for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    }
    pattern = re.compile(r"step (\d)/4 epoch 0 loss \S+ lr \S+ \S+ img/s (\S+) steps/s "
                         r"ETA (\d+):(\d\d)$")  # fmt: skip
    for line in lines:
        m = pattern.match(line)
        assert m is not None, line
        step, rate = int(m.group(1)), float(m.group(2))
        eta = 60 * int(m.group(3)) + int(m.group(4))
        assert rate > 0 and rate >= max(step - 1, 1) / wall, (line, wall)
        if step >= 2:  # the steps after the first (which carries the start-up) over their time
            assert rate == pytest.approx((step - 1) / (times[step] - times[1]), rel=0.05), line
        # the time left is the steps left at that rate, to the second (the rate printed is
        # rounded to 0.01 steps/s, so the ETA lies between those of the rate's two bounds)
        left = 4 - step
        lo, hi = left / (rate + 0.005), left / max(rate - 0.005, 1e-9)
        assert lo - 0.51 <= eta <= hi + 0.51, line
    assert lines[-1].endswith("ETA 0:00")
    hand = ["0:00", "1:00", "1:01", "1:00:00", "24:01:02"]
    assert [format_duration(s) for s in (0.4, 59.6, 61, 3599.5, 86400 + 62)] == hand
