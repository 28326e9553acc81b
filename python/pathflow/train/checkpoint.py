"""Training checkpoints: everything needed to resume a run exactly, written atomically.

One file, ``OUT/checkpoint.pt`` (``torch.save``), replaced atomically every ``save_every``
steps and at the end::

    format, version, method_name, arch, export_prefix
    method        the method's state dict (student, teacher, DINO centre, BN statistics)
    optimizer     AdamW state (moments, step counts, parameter groups)
    step          optimisation steps done; the next step to run
    epoch         the epoch the next batch belongs to
    config        the resolved TrainConfig
    world_size    processes of the run
    rank_states   per rank, pickled bytes: the loader's ``state_dict`` and the torch / CUDA /
                  numpy / python RNG states

A checkpoint that cannot be written (disk full, quota, I/O error) raises
:class:`CheckpointWriteError` naming the file and the reason (``No space left on device``,
which ``torch.save`` itself reports only as ``unexpected pos``); the previous checkpoint is
replaced only once the new one is complete, so it stays intact.

Everything but ``rank_states`` is tensors and plain values, so the file loads with
``torch.load(weights_only=True)`` (and :func:`pathflow.train.export.load_backbone_state`
reads the weights from it); the per-rank blobs are unpickled only when resuming one's own run.

Example:
    >>> from pathflow.train.checkpoint import capture_rng, restore_rng
    >>> import torch
    >>> state = capture_rng()
    >>> a = torch.rand(1); restore_rng(state); bool(torch.rand(1) == a)
    True
"""

from __future__ import annotations

import errno
import os
import pickle
import random
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from pathflow.exceptions import PathflowError
from pathflow.outputs import atomic_open

FORMAT = "pathflow-ssl-checkpoint"
VERSION = 1


def capture_rng() -> dict[str, Any]:
    """RNG states of torch (CPU and the current CUDA device), numpy and python."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_state(loader_state: dict[str, Any] | None) -> bytes:
    """This rank's private part of a checkpoint: loader position (None at an epoch's end)
    and RNG states."""
    return pickle.dumps({"loader": loader_state, "rng": capture_rng()})


class CheckpointWriteError(PathflowError):
    """A checkpoint could not be written (``errno``: the OS error's, e.g. ``ENOSPC``); the
    previous checkpoint, if any, is intact."""

    def __init__(self, message: str, errno_: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.errno = errno_
        self.reason = reason or message  # the OS's words: "No space left on device (ENOSPC)"


class _Sink:
    """A file that remembers the exception its ``write`` raised: ``torch.save`` turns it
    into ``RuntimeError: ... unexpected pos``, losing ``No space left on device``."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self.error: BaseException | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except BaseException as exc:  # OSError, or a KeyboardInterrupt from a second Ctrl-C
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def describe_os_error(exc: OSError) -> str:
    """``No space left on device (ENOSPC)``: the OS's words and the error's name.

    Example:
        >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device"))
        'No space left on device (ENOSPC)'
    """
    code = errno.errorcode.get(exc.errno or -1)
    text = exc.strerror or str(exc)
    return f"{text} ({code})" if code else text


def save_checkpoint(path: str | os.PathLike[str], checkpoint: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename over ``path``.

    Raises :class:`CheckpointWriteError` (the file and the OS's reason) when it cannot be
    written; then ``path`` keeps its previous content and no temporary file is left."""
    checkpoint = {"format": FORMAT, "version": VERSION, **checkpoint}
    try:
        with atomic_open(path) as f:
            sink = _Sink(f)
            try:
                torch.save(checkpoint, sink)  # type: ignore[arg-type]  # write + flush
            except RuntimeError:
                if sink.error is not None:
                    raise sink.error from None
                raise
    except OSError as exc:
        reason = describe_os_error(exc)
        raise CheckpointWriteError(
            f"{path}: cannot write the checkpoint: {reason}", exc.errno, reason
        ) from None


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (weights-only unpickling)."""
    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a pathflow training checkpoint")
    return ckpt


def unpack_rank_state(ckpt: dict[str, Any], rank: int) -> dict[str, Any]:
    """The loader state and RNG states saved by ``rank`` (a trusted, own checkpoint)."""
    states = ckpt["rank_states"]
    if rank >= len(states):
        raise ValueError(
            f"checkpoint was written by {len(states)} process(es); cannot resume rank {rank}"
        )
    out: dict[str, Any] = pickle.loads(states[rank])
    return out


def gather_rank_states(blob: bytes, world_size: int) -> list[bytes]:
    """Every rank's :func:`rank_state` blob, on every rank (one ``all_gather_object``)."""
    if world_size == 1:
        return [blob]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, blob)
    return [bytes(b) for b in out]


class Checkpointer:
    """Writes ``OUT/checkpoint.pt`` of a run: gathers every rank's private state, rank 0
    writes (:func:`save_checkpoint`), then all ranks meet. ``content()`` gives the shared
    part (method and optimiser states, step, config, ...). ``last_saved``: the step of the
    last checkpoint written or resumed from (-1: none)."""

    def __init__(
        self,
        path: Path,
        content: Any,
        *,
        rank: int,
        world_size: int,
        last_saved: int = -1,
    ) -> None:
        self.path = path
        self.content = content
        self.rank = rank
        self.world_size = world_size
        self.last_saved = last_saved

    def save(self, step: int, epoch_next: int, loader_state: dict[str, Any] | None) -> None:
        """Checkpoint step ``step``; the next batch is of epoch ``epoch_next`` at the
        loader position ``loader_state`` (None: the epoch's start)."""
        blobs = gather_rank_states(rank_state(loader_state), self.world_size)
        if self.rank == 0:
            try:
                save_checkpoint(
                    self.path, {**self.content(), "step": step, "epoch": epoch_next,
                                "world_size": self.world_size, "rank_states": blobs}
                )  # fmt: skip
            except CheckpointWriteError as exc:
                raise CheckpointWriteError(
                    f"{self.path}: cannot write the checkpoint of step {step}: {exc.reason}; "
                    f"stopped, {self.previous()}: free space, then run the same command "
                    "with --resume",
                    exc.errno,
                    exc.reason,
                ) from None
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
        self.last_saved = step

    def previous(self) -> str:
        """What a failed write leaves: the previous checkpoint, or none."""
        if self.last_saved >= 0:
            return f"{self.path} still holds step {self.last_saved}, intact"
        return "no earlier checkpoint was written"

    def last_good(self) -> str:
        """The sentence of a stopped run about its last good checkpoint."""
        if self.last_saved >= 0:
            return f"Last good checkpoint: {self.path} (step {self.last_saved})."
        return "No checkpoint was written."


__all__ = [
    "CheckpointWriteError",
    "Checkpointer",
    "capture_rng",
    "describe_os_error",
    "gather_rank_states",
    "load_checkpoint",
    "rank_state",
    "restore_rng",
    "save_checkpoint",
    "unpack_rank_state",
]
