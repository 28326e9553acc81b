"""Training across nodes on 127.0.0.1 (gloo, CPU): ``torchrun --nnodes 2`` with the c10d
rendezvous, tasks started by ``srun`` alone (SLURM variables, no torchrun), the pre-timeout
checkpoint signal and a worker killed under ``torchrun --max-restarts``. Every distributed run
is compared with one ``torchrun --nproc-per-node 2`` run of the same 2 ranks: same per-step
losses, bitwise equal weights."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from pathflow.train.checkpoint import load_checkpoint
from pathflow.train.distributed import (
    SLURM_PORT_BASE,
    expand_hostlist,
    first_host,
    slurm_environment,
    slurm_port,
    tasks_on_node,
)
from pathflow.train.preemption import EXIT_STOPPED, parse_signal

STEPS = 6
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
#: launcher variables of a parent torchrun (or of the test runner) that must not leak in
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "GROUP_RANK", "TORCHELASTIC_RUN_ID")  # fmt: skip


# --------------------------------------------------------------------- SLURM variables
def test_hostlist_expansion_follows_slurm_syntax() -> None:
    assert expand_hostlist("node[01-03,07]") == ["node01", "node02", "node03", "node07"]
    assert expand_hostlist("n[8-11]") == ["n8", "n9", "n10", "n11"]  # no padding
    assert expand_hostlist("a[098-101]") == ["a098", "a099", "a100", "a101"]  # padding kept
    assert expand_hostlist("gpu-a[1-2]-ib,login2") == ["gpu-a1-ib", "gpu-a2-ib", "login2"]
    assert expand_hostlist("r[1-2]n[1,3]") == ["r1n1", "r1n3", "r2n1", "r2n3"]
    assert expand_hostlist("127.0.0.1") == ["127.0.0.1"]
    for bad in ("node[01-03", "node]1[", "node[a-b]", ""):
        with pytest.raises(ValueError):
            expand_hostlist(bad)
    assert [tasks_on_node("4(x2),2", n) for n in range(3)] == [4, 4, 2]


def _slurm(**kw: str) -> dict[str, str]:
    env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "987654"}  # fmt: skip
    env.update(kw)
    return env


def test_slurm_variables_fill_torch_distributed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol: the host list is parsed here
    e = slurm_environment(_slurm())
    assert e == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                 "MASTER_ADDR": "gpu12", "MASTER_PORT": str(12000 + 987654 % 20000)}  # fmt: skip
    assert slurm_port("987654") == SLURM_PORT_BASE + 7654
    # the step's own values win over the job's; MASTER_ADDR / MASTER_PORT set by hand win too
    e = slurm_environment(_slurm(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="gpu[13-14]"))
    assert e is not None and (e["WORLD_SIZE"], e["MASTER_ADDR"]) == ("2", "gpu13")
    e = slurm_environment(_slurm(MASTER_ADDR="10.0.0.9", MASTER_PORT="29400"))
    assert e is not None and (e["MASTER_ADDR"], e["MASTER_PORT"]) == ("10.0.0.9", "29400")
    # torchrun's variables come first; one task, or no task variables, is no group at all
    assert slurm_environment(_slurm(RANK="0", WORLD_SIZE="8")) is None
    assert slurm_environment(_slurm(SLURM_NTASKS="1")) is None
    assert slurm_environment({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) is None
    # the batch script itself (no job step, or the batch step) is one process, not rank 0
    # of SLURM_NTASKS that it never started
    batch = _slurm()
    del batch["SLURM_STEP_ID"]
    assert slurm_environment(batch) is None
    assert slurm_environment(_slurm(SLURM_STEP_ID="4294967294")) is None
    # scontrol, when installed, expands the list (it knows every form SLURM writes)
    scontrol = tmp_path / "scontrol"
    scontrol.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu[12-13]" ] && '
                        'printf "gpu12.cluster\\ngpu13.cluster\\n"\n')  # fmt: skip
    scontrol.chmod(0o755)
    assert first_host("gpu[12-13]") == "gpu12.cluster"
    e = slurm_environment(_slurm())
    assert e is not None and e["MASTER_ADDR"] == "gpu12.cluster"


def test_signal_names() -> None:
    from pathflow.exceptions import ConfigError

    assert parse_signal("USR1") == signal.SIGUSR1 and parse_signal("SIGTERM") == signal.SIGTERM
    assert parse_signal("none") is None
    with pytest.raises(ConfigError, match="signal_checkpoint must be one of"):
        parse_signal("KILL")


def test_stop_signal_in_one_process_notes_the_signal_and_restores_the_handler() -> None:
    from pathflow.train.distributed import DistInfo
    from pathflow.train.preemption import StopSignal

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    before = signal.getsignal(signal.SIGUSR2)
    with StopSignal("USR2", info) as stop:
        assert signal.getsignal(signal.SIGUSR2) != before
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested() and stop.stopped and stop.name == "SIGUSR2"
    assert signal.getsignal(signal.SIGUSR2) == before
    with StopSignal("none", info) as stop:
        assert not stop.requested() and stop.name == "none"


# -------------------------------------------------------------------- real processes
def _free_port(lo: int = 0, hi: int = 0) -> int:
    """A free TCP port on 127.0.0.1 (in [lo, hi) when given)."""
    candidates = range(lo + os.getpid() % (hi - lo), hi) if hi else [0]
    for port in candidates:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RuntimeError("no free port")


def _args(shards: Path, out: Path, *extra: str) -> list[str]:
    """``pathflow train`` arguments: SimCLR on ResNet-18 at 32 px, 4 images a rank."""
    return [
        "train", "--method", "simclr", "--arch", "resnet18", "--global-size", "32",
        "--simclr.proj-hidden-dim", "64", "--simclr.proj-dim", "16", "--batch-size", "4",
        "--steps", str(STEPS), "--data", str(shards), "--out", str(out), "--device", "cpu",
        "--loader-backend", "torch", "--num-workers", "0", "--no-tensorboard", "--log-every",
        "1", "--resume", "-q", *extra,
    ]  # fmt: skip


def _env(**kw: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **kw)
    return env


@dataclass
class Proc:
    """A child process whose stderr is read as it comes (so a test can wait for a line)."""

    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, cmd: list[str], env: dict[str, str], cpus: set[int]) -> Proc:
        """Run ``cmd`` on ``cpus`` (the trainer runs ``len(cpus) // LOCAL_WORLD_SIZE`` torch
        threads: one a rank in every layout here, which keeps the float sums identical)."""
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cpus)  # this thread only; the child inherits it
        try:
            popen = subprocess.Popen(
                cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
        finally:
            os.sched_setaffinity(0, before)
        proc = cls(popen)
        assert popen.stderr is not None
        threading.Thread(target=proc._read, args=(popen.stderr,), daemon=True).start()
        return proc

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while needle not in self.text:
            assert self.popen.poll() is None, f"exited before {needle!r}:\n{self.text}"
            assert time.monotonic() < end, f"no {needle!r} in:\n{self.text}"
            time.sleep(0.02)

    def finish(self, timeout: float = 180) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.text}") from None


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Children of a test, killed (by their own ids) if the test leaves any running."""
    started: list[Proc] = []
    yield started
    for p in started:
        if p.popen.poll() is None:
            p.popen.kill()
            p.popen.wait()


def _cpus(n: int) -> list[int]:
    """``n`` CPUs of this process (repeating the last when it has fewer)."""
    mine = sorted(os.sched_getaffinity(0))
    return [mine[min(i, len(mine) - 1)] for i in range(n)]


def _pathflow(procs: list[Proc], env: dict[str, str], args: list[str], cpus: set[int]) -> Proc:
    proc = Proc.start([sys.executable, "-m", "pathflow", *args], env, cpus)
    procs.append(proc)
    return proc


def _torchrun(
    procs: list[Proc], launcher: list[str], args: list[str], cpus: set[int], **env: str
) -> Proc:
    proc = Proc.start([*TORCHRUN, *launcher, "-m", "pathflow", *args], _env(**env), cpus)
    procs.append(proc)
    return proc


def _srun_tasks(procs: list[Proc], args: list[str], port: int) -> list[Proc]:
    """Two tasks as ``srun --ntasks 2`` starts them on one node of a job whose id gives
    ``port`` (no ``scontrol`` on the PATH: the node list is parsed by pathflow)."""
    job = str(port - SLURM_PORT_BASE)
    common = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_NODELIST": "localhost",
              "SLURM_JOB_ID": job,
              "SLURM_NODEID": "0", "SLURM_TASKS_PER_NODE": "2",
              "PATH": os.path.dirname(sys.executable)}  # fmt: skip
    env = [_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), **common) for r in range(2)]
    return [_pathflow(procs, env[r], args, set(_cpus(2))) for r in range(2)]


def _run_state(out: Path) -> dict[str, Any]:
    """What a finished run leaves: weights, step, per-step losses."""
    ckpt = load_checkpoint(out / "checkpoint.pt")
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        losses[rec["step"]] = rec["loss"]  # a resumed step logged twice keeps its last value
    return {"method": ckpt["method"], "step": ckpt["step"], "world": ckpt["world_size"],
            "losses": losses}  # fmt: skip


def _assert_same_run(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert (got["step"], got["world"]) == (want["step"], want["world"]) == (STEPS, 2)
    assert got["losses"] == want["losses"] and sorted(want["losses"]) == list(range(1, STEPS + 1))
    assert got["method"].keys() == want["method"].keys()
    for name, value in want["method"].items():
        assert torch.equal(got["method"][name], value), name


@pytest.fixture(scope="module")
def reference(sample_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One ``torchrun --standalone --nproc-per-node 2`` run: the state every other equals."""
    out = tmp_path_factory.mktemp("multinode") / "reference"
    proc = Proc.start(
        [*TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "pathflow",
         *_args(sample_shards, out)],
        _env(),
        set(_cpus(2)),
    )  # fmt: skip
    assert proc.finish() == 0, proc.text
    return _run_state(out)


@pytest.mark.slow
def test_srun_tasks_stopped_by_usr1_resume_to_the_torchrun_result(
    sample_shards: Path, tmp_path: Path, reference: dict[str, Any], procs: list[Proc]
) -> None:
    """Two tasks started as by ``srun`` alone (SLURM variables, no torchrun) get SLURM's
    pre-timeout USR1 on rank 1 only: both ranks stop after the same step (no rank left waiting
    in a collective), write the checkpoint and exit with status 75; the requeued job (same
    command, ``--resume``) ends exactly where the uninterrupted torchrun run does."""
    out = tmp_path / "signal"
    args = _args(sample_shards, out)
    port = _free_port(SLURM_PORT_BASE, SLURM_PORT_BASE + 20000)
    tasks = _srun_tasks(procs, args, port)
    rendezvous = "2 processes from SLURM variables (srun without torchrun), rendezvous at "
    tasks[0].wait_for(f"{rendezvous}localhost:{port}")
    tasks[0].wait_for("pathflow train: simclr/resnet18")  # the loop is about to start
    tasks[1].popen.send_signal(signal.SIGUSR1)
    assert [t.finish() for t in tasks] == [EXIT_STOPPED] * 2, tasks[0].text + tasks[1].text
    stopped = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 1 <= stopped < STEPS
    assert f"SIGUSR1 received: stopped after step {stopped}, checkpoint" in tasks[0].text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGUSR1" and not summary["finished"]

    again = _srun_tasks(procs, args, port)
    assert [t.finish() for t in again] == [0, 0], again[0].text + again[1].text
    assert f"resuming at step {stopped}" in again[0].text
    _assert_same_run(_run_state(out), reference)


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from ``/proc/*/stat``)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return sorted(kids)


@pytest.mark.slow
def test_two_torchrun_nodes_equal_one_node_and_restart_a_killed_worker(
    sample_shards: Path, tmp_path: Path, reference: dict[str, Any], procs: list[Proc]
) -> None:
    """Two ``torchrun --nnodes 2 --nproc-per-node 1`` meeting through the c10d rendezvous on
    127.0.0.1 train like one ``torchrun --nproc-per-node 2``. The worker of one node is killed
    (SIGKILL, a crashed process) after the first checkpoint: both torchruns
    (``--max-restarts 1``, a fresh store per round as in the SLURM script) start their workers
    again with the same ``--resume`` command line; they continue from the checkpoint and end
    on the weights and per-step losses of the uninterrupted run."""
    out = tmp_path / "two_nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = []
    for rank in range(2):
        launcher = [
            "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "job1",
            "--max-restarts", "1",
        ]  # fmt: skip
        args = _args(sample_shards, out, "--save-every", "1")
        cpus = {_cpus(2)[rank]}
        nodes.append(_torchrun(procs, launcher, args, cpus, TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1"))
    end = time.monotonic() + 180
    while not (out / "checkpoint.pt").exists():
        assert all(n.popen.poll() is None for n in nodes), nodes[0].text + nodes[1].text
        assert time.monotonic() < end, nodes[0].text + nodes[1].text
        time.sleep(0.02)
    (worker,) = _children(nodes[1].popen.pid)
    os.kill(worker, signal.SIGKILL)
    assert [n.finish() for n in nodes] == [0, 0], nodes[0].text + nodes[1].text
    text = nodes[0].text + nodes[1].text
    resumed = [line for line in text.splitlines() if "resuming at step" in line]
    assert len(resumed) == 1 and not resumed[0].endswith(f"resuming at step {STEPS}"), text
    _assert_same_run(_run_state(out), reference)


@pytest.mark.slow
def test_worker_killed_under_torchrun_restarts_from_the_checkpoint(
    sample_shards: Path, tmp_path: Path, reference: dict[str, Any], procs: list[Proc]
) -> None:
    """One node, torchrun's shared store: SIGKILL of one worker after the first checkpoint;
    ``torchrun --max-restarts 1`` starts both workers again with the same ``--resume``
    command line; their process group keys are apart from the dead attempt's (no stale
    address of the killed rank), they continue from the checkpoint and end on the weights
    and per-step losses of an uninterrupted run."""
    out = tmp_path / "killed"
    run = _torchrun(
        procs,
        ["--standalone", "--nproc-per-node", "2", "--max-restarts", "1"],
        _args(sample_shards, out, "--save-every", "1"),
        set(_cpus(2)),
    )
    end = time.monotonic() + 180
    while not (out / "checkpoint.pt").exists():
        assert run.popen.poll() is None and time.monotonic() < end, run.text
        time.sleep(0.02)
    workers = _children(run.popen.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    assert run.finish() == 0, run.text
    resumed = [line for line in run.lines if "resuming at step" in line]
    assert len(resumed) == 1 and not resumed[0].endswith(f"resuming at step {STEPS}"), run.text
    _assert_same_run(_run_state(out), reference)
