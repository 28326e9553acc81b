"""torch.distributed helpers: initialisation from ``torchrun`` variables (or, for processes
started by ``srun`` alone, from SLURM's), rank queries that work without a process group, and
a gradient-preserving ``all_gather``.

Example:
    >>> from pathflow.train.distributed import get_rank, get_world_size, expand_hostlist
    >>> get_rank(), get_world_size()  # no process group: a single process
    (0, 1)
    >>> expand_hostlist("gpu[01-02,07],login")
    ['gpu01', 'gpu02', 'gpu07', 'login']
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_dist() -> bool:
    """True when a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def available_cpus() -> int:
    """CPUs this process may run on: its affinity (what ``srun --cpus-per-task``, cgroups or
    ``taskset`` left it), else every CPU of the machine.

    Example:
        >>> import os
        >>> 1 <= available_cpus() <= (os.cpu_count() or 1)
        True
    """
    getaffinity = getattr(os, "sched_getaffinity", None)
    if getaffinity is not None:
        try:
            return max(1, len(getaffinity(0)))
        except OSError:
            pass
    return os.cpu_count() or 1


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> ``cuda`` when available, else ``cpu``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_cuda_device(
    requested: torch.device, world_size: int, local_rank: int, current: int
) -> torch.device:
    """The CUDA device of this process: ``LOCAL_RANK``'s under torchrun; in one process the
    one asked for (``cuda:1`` stays ``cuda:1``), or the current device for a bare ``cuda``.

    Example:
        >>> import torch
        >>> pick_cuda_device(torch.device("cuda:1"), 1, 0, current=0)
        device(type='cuda', index=1)
        >>> pick_cuda_device(torch.device("cuda"), 4, 2, current=0)
        device(type='cuda', index=2)
    """
    if world_size > 1:
        return torch.device("cuda", local_rank)
    return torch.device("cuda", requested.index if requested.index is not None else current)


def local_cuda_index(local_rank: int, visible: int) -> int:
    """The CUDA device of local rank ``local_rank`` when ``visible`` devices are visible:
    ``local_rank`` itself, or 0 when ``srun --gpus-per-task 1`` left each task a single one.

    Example:
        >>> local_cuda_index(3, 8), local_cuda_index(3, 1)
        (3, 0)
    """
    return 0 if visible == 1 else local_rank


# ------------------------------------------------------------------------ srun without torchrun
#: First port of the rendezvous of an ``srun``-only job when ``MASTER_PORT`` is unset: the port
#: is ``SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN`` (below Linux's ephemeral range), so
#: every task of a job derives the same one and two jobs sharing a node rarely collide.
SLURM_PORT_BASE = 12000
SLURM_PORT_SPAN = 20000

#: ``SLURM_STEP_ID`` of a batch script (SLURM's ``SLURM_BATCH_SCRIPT`` step).
_BATCH_STEP = "4294967294"

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_hostlist(text: str) -> list[str]:
    """Host names of a SLURM host list in its compressed form (``SLURM_JOB_NODELIST``):
    comma-separated names, each with any number of bracketed ranges (zero padding kept).

    Example:
        >>> expand_hostlist("node[01-03,07]")
        ['node01', 'node02', 'node03', 'node07']
        >>> expand_hostlist("r[1-2]n[9-10],head")
        ['r1n9', 'r1n10', 'r2n9', 'r2n10', 'head']
    """
    hosts: list[str] = []
    for name in _split_outside_brackets(text.strip()):
        hosts += _expand_name(name, text)
    if not hosts:
        raise ValueError(f"empty SLURM host list {text!r}")
    return hosts


def _split_outside_brackets(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _expand_name(name: str, whole: str) -> list[str]:
    """``r[1-2]n[9-10]`` -> the product of its ranges, first range slowest."""
    open_at = name.find("[")
    if open_at < 0:
        if "]" in name:
            raise ValueError(f"unbalanced brackets in SLURM host list {whole!r}")
        return [name]
    close_at = name.find("]", open_at)
    if close_at < 0:
        raise ValueError(f"unbalanced brackets in SLURM host list {whole!r}")
    head, body, tail = name[:open_at], name[open_at + 1 : close_at], name[close_at + 1 :]
    values: list[str] = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if m is None:
            raise ValueError(f"bad range {item!r} in SLURM host list {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        width = len(lo) if lo.startswith("0") else 0
        values += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    return [head + v + rest for v in values for rest in _expand_name(tail, whole)]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM host list: ``scontrol show hostnames`` when ``scontrol`` is
    on the PATH (it knows every form SLURM writes), else :func:`expand_hostlist`."""
    scontrol = shutil.which("scontrol")
    if scontrol is not None:
        try:
            done = subprocess.run(
                [scontrol, "show", "hostnames", nodelist],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            names = done.stdout.split()
            if names:
                return names[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_hostlist(nodelist)[0]


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """Tasks on node ``node`` from SLURM's ``SLURM_STEP_TASKS_PER_NODE`` form.

    Example:
        >>> [tasks_on_node("2(x3),1", n) for n in range(4)]
        [2, 2, 2, 1]
    """
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if m is None:
            raise ValueError(f"bad SLURM tasks-per-node value {tasks_per_node!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    if not 0 <= node < len(counts):
        raise ValueError(f"node {node} not in SLURM tasks-per-node value {tasks_per_node!r}")
    return counts[node]


def slurm_port(job_id: str | None) -> int:
    """The rendezvous port of an ``srun``-only job: derived from ``SLURM_JOB_ID``.

    Example:
        >>> slurm_port("4242"), slurm_port("123456")
        (16242, 15456)
    """
    return SLURM_PORT_BASE + int(job_id or 0) % SLURM_PORT_SPAN


def slurm_environment(env: Mapping[str, str]) -> dict[str, str] | None:
    """torch.distributed's variables for a task started by ``srun`` without ``torchrun``.

    None when ``torchrun`` (or anything else) set ``RANK`` / ``WORLD_SIZE``, when the SLURM
    task variables (``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``) are absent or
    describe one task, or when the process is not in a job step (no ``SLURM_STEP_ID``: the
    batch script itself, whose ``SLURM_NTASKS`` counts tasks it did not start; joining them
    would wait forever). Otherwise ``RANK`` = ``SLURM_PROCID``, ``WORLD_SIZE`` = the step's
    task count (``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``), ``LOCAL_RANK`` =
    ``SLURM_LOCALID``, ``LOCAL_WORLD_SIZE`` from the tasks per node, ``MASTER_ADDR`` = the first
    host of the step's node list (task 0 runs there) and ``MASTER_PORT`` derived from
    ``SLURM_JOB_ID`` (:func:`slurm_port`); ``MASTER_ADDR`` / ``MASTER_PORT`` already set win.

    Example:
        >>> env = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4",
        ...        "SLURM_LOCALID": "1",
        ...        "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "2(x2)",
        ...        "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
        >>> e = slurm_environment(env)
        >>> e["RANK"], e["WORLD_SIZE"], e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"]
        ('3', '4', '1', '2')
        >>> e["MASTER_ADDR"], e["MASTER_PORT"]
        ('gpu07', '16242')
    """
    if "RANK" in env or "WORLD_SIZE" in env:
        return None
    step = env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID")
    if step is None or step == _BATCH_STEP:
        return None
    rank, local = env.get("SLURM_PROCID"), env.get("SLURM_LOCALID")
    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if rank is None or local is None or world is None or int(world) <= 1:
        return None
    out = {"RANK": str(int(rank)), "WORLD_SIZE": str(int(world)), "LOCAL_RANK": str(int(local))}
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node:
        node = int(env.get("SLURM_NODEID", "0"))
        out["LOCAL_WORLD_SIZE"] = str(tasks_on_node(per_node, node))
    if env.get("MASTER_ADDR"):
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    else:
        nodelist = next(
            (env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
             if env.get(k)),
            None,
        )  # fmt: skip
        if nodelist is None:
            raise ValueError(
                "started by srun without torchrun but SLURM_STEP_NODELIST / SLURM_JOB_NODELIST "
                "is unset: set MASTER_ADDR, or launch with torchrun"
            )
        out["MASTER_ADDR"] = first_host(nodelist)
    out["MASTER_PORT"] = env.get("MASTER_PORT") or str(slurm_port(env.get("SLURM_JOB_ID")))
    return out


def elastic_attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """Under a single-node ``torchrun``, its agent's store with keys private to this restart
    attempt; None otherwise (``env://`` then, as usual).

    torchrun hosts one store for the whole job and, after ``--max-restarts`` restarts the
    workers, hands the new ones the same store: the process group's keys (gloo's addresses,
    NCCL's unique id) of the killed attempt are still there, and a new rank can read a dead
    peer's address before its replacement writes its own. With one agent every worker has
    the same ``TORCHELASTIC_RESTART_COUNT``, which then prefixes the keys. Across nodes the
    agents count restarts differently (a node that restarts because another rejoined does not
    count it), so there the fix is torchrun's own: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``
    gives every rendezvous round a fresh store (``examples/slurm/train_multinode.sbatch``).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("GROUP_WORLD_SIZE", "1") != "1":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"pathflow/attempt_{attempt}/", store)


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group described by ``torchrun``'s environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), if any; for tasks
    started by ``srun`` alone, by SLURM's (:func:`slurm_environment`, which fills those
    variables in ``os.environ``).

    NCCL on CUDA, gloo on CPU. Without those variables (or with ``WORLD_SIZE=1``) nothing
    is initialised and a single-process :class:`DistInfo` is returned. A process group that
    is already initialised (e.g. by a test) is used as it is.
    """
    dev = resolve_device(device)
    from_slurm = None
    if not (dist.is_available() and dist.is_initialized()):
        from_slurm = slurm_environment(os.environ)
    if from_slurm is not None:
        os.environ.update(from_slurm)
        if from_slurm["RANK"] == "0":
            print(
                f"pathflow train: {from_slurm['WORLD_SIZE']} processes from SLURM variables "
                f"(srun without torchrun), rendezvous at {from_slurm['MASTER_ADDR']}:"
                f"{from_slurm['MASTER_PORT']}",
                file=sys.stderr,
                flush=True,
            )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # the GPU of this rank: its local rank, or the only one srun --gpus-per-task 1 left it
    gpu = local_cuda_index(local_rank, torch.cuda.device_count()) if dev.type == "cuda" else 0
    if dist.is_available() and dist.is_initialized():
        world_size = dist.get_world_size()
    elif world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(gpu)
        timeout = datetime.timedelta(minutes=30)
        store = elastic_attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
        else:
            rank = int(os.environ["RANK"])
            dist.init_process_group(
                backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout
            )
    if dev.type == "cuda":
        current = torch.cuda.current_device() if dev.index is None and world_size == 1 else 0
        dev = pick_cuda_device(dev, world_size, gpu, current)
        if world_size == 1:
            torch.cuda.set_device(dev)
    return DistInfo(rank=get_rank(), world_size=world_size, local_rank=local_rank, device=dev)


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sends each rank the sum over ranks of the gradients
    with respect to its own slice (the losses of every rank depend on it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping gradients flowing back to each
    rank's slice. Identity without a process group.

    With DDP (which averages gradients) a loss that is the mean over local anchors then gets
    exactly the gradient of the single-process loss on the concatenated batch.
    """
    if not is_dist():
        return x
    return torch.cat(_GatherWithGrad.apply(x), dim=0)


@torch.no_grad()
def all_reduce_sum(x: Tensor) -> Tensor:
    """In-place sum over ranks (no-op in one process); returns ``x``."""
    if is_dist():
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if this module's caller created one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DistInfo",
    "all_reduce_sum",
    "available_cpus",
    "barrier",
    "cleanup",
    "elastic_attempt_store",
    "expand_hostlist",
    "first_host",
    "gather_with_grad",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_dist",
    "local_cuda_index",
    "pick_cuda_device",
    "resolve_device",
    "slurm_environment",
    "slurm_port",
    "tasks_on_node",
]
