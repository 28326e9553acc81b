"""The torch backend: Rust decode + crop + D4 in DataLoader workers, colour stages in torch.

Each worker builds whole batches (batch ``start + worker + k * num_workers``), so the
DataLoader's round-robin returns them in epoch order whatever the number of workers.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pathflow.data.augment_torch import apply_color_stages, finish
from pathflow.data.batch import Batch, RawBatch
from pathflow.data.views import ViewsSpec

if TYPE_CHECKING:
    from pathflow.data.raw_batches import BatchSource, LoaderConfig

log = logging.getLogger("pathflow.data")


def view_groups(raw: RawBatch | list[Any]) -> list[tuple[int, int]]:
    """Runs of consecutive views (of a batch, or a list of view parameters) with the same
    output size: (first view, count)."""
    params = raw.params if isinstance(raw, RawBatch) else raw
    groups: list[tuple[int, int]] = []
    for v, p in enumerate(params):
        if groups and params[groups[-1][0]].size == p.size:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((v, 1))
    return groups


def decode_crops(raw: RawBatch) -> list[np.ndarray]:
    """uint8 crops ``(N, S, S, 3)`` per view (after D4), each image decoded once.

    Images that pass the header check but fail to decode are replaced by the next decodable
    image of the batch and recorded in ``raw.skipped``. With positive pairs
    (``raw.partner``), each view is cut from the anchor or the partner (``raw.sources``).
    """
    if raw.partner is None or raw.sources is None:
        return _decode_views(raw, raw.data, raw.params)
    out: list[np.ndarray | None] = [None] * len(raw.params)
    for src, data in ((0, raw.data), (1, raw.partner)):
        views = [v for v, s in enumerate(raw.sources) if s == src]
        if not views:
            continue
        crops = _decode_views(raw, data, [raw.params[v] for v in views])
        for v, c in zip(views, crops, strict=True):
            out[v] = c
    return [c for c in out if c is not None]


def _decode_views(raw: RawBatch, images: list[np.ndarray], params: list[Any]) -> list[np.ndarray]:
    from pathflow import _core

    groups = view_groups(params)
    boxes = [np.stack([params[v + j].box for j in range(c)], axis=1) for v, c in groups]
    d4 = [np.stack([params[v + j].d4 for j in range(c)], axis=1) for v, c in groups]
    sizes = [params[v].size for v, _ in groups]
    data = [a.tobytes() for a in images]
    outs, ok, reasons = _core.decode_views(data, boxes, sizes, d4)
    if not ok.all():
        good = np.flatnonzero(ok)
        if good.size == 0:
            raise ValueError(f"no image of batch {raw.index} could be decoded: {reasons[0]}")
        for i in np.flatnonzero(~ok).tolist():
            j = int(next((g for g in good if g > i), good[0]))
            log.warning("skipping undecodable image %s: %s", raw.meta["key"][i], reasons[i])
            raw.skipped.append(str(raw.meta["key"][i]))
            for o in outs:
                o[i] = o[j]
    return [np.ascontiguousarray(o[:, j]) for o in outs for j in range(o.shape[1])]


def augment_cpu(
    crops: list[np.ndarray], raw: RawBatch, spec: ViewsSpec, output: str
) -> list[torch.Tensor]:
    """All float stages in one fused Rust pass per view (same math as :mod:`augment_torch`)."""
    from pathflow import _core

    out = []
    for crop, p in zip(crops, raw.params, strict=True):
        a = _core.augment_views(
            crop, p.stain, p.stain_mean, p.stain_std, p.hed, p.hed_matrix, p.hed_offset,
            p.color, p.color_matrix, p.color_k, p.blur_sigma, p.solarize,
            spec.mean, spec.std, output,
        )  # fmt: skip
        t = torch.from_numpy(a)
        out.append(t.view(torch.bfloat16) if output == "bfloat16" else t)
    return out


def augment_torch(
    crops: list[Any], raw: RawBatch, spec: ViewsSpec, output: str, device: str
) -> list[torch.Tensor]:
    """Float stages in torch on ``device`` (the GPU path without DALI, and the reference)."""
    mean = torch.tensor(spec.mean, device=device)
    std = torch.tensor(spec.std, device=device)
    out = []
    for crop, p in zip(crops, raw.params, strict=True):
        t = torch.as_tensor(crop).to(device, non_blocking=True).permute(0, 3, 1, 2)
        x = t.float().div_(255).contiguous()
        x = apply_color_stages(x, p)
        out.append(finish(x, mean, std, output))
    return out


class ViewsDataset(IterableDataset[Any]):
    """Yields finished :class:`Batch` es (``augment=True``) or ``(crops, raw)`` pairs; worker
    ``w`` of ``n`` builds batches ``start + w, start + w + n, ...``."""

    def __init__(
        self, source: BatchSource, start: int, output: str = "float", augment: bool = True
    ) -> None:
        self.source = source
        self.start = start
        self.output = output
        self.augment = augment

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        for raw in self.source.raw_batches(self.start + w, n):
            crops = decode_crops(raw)
            if self.augment:
                yield Batch.from_raw(augment_cpu(crops, raw, self.source.spec, self.output), raw)
            else:
                yield [torch.from_numpy(c) for c in crops], raw  # shared memory


def finish_on_device(item: Any, spec: ViewsSpec, output: str, device: str) -> Batch:
    """Main-process half of the GPU path: move uint8 crops and run the float stages there."""
    crops, raw = item
    return Batch.from_raw(augment_torch(crops, raw, spec, output, device), raw)


class TorchBackend:
    """The ``torch`` loader backend: :class:`ViewsDataset` in ``cfg.num_workers`` DataLoader
    workers (in the main process with 0); on CUDA the float stages run there in torch."""

    def __init__(self, cfg: LoaderConfig, spec: ViewsSpec) -> None:
        self.cfg = cfg
        self.spec = spec

    def iterate(self, source: BatchSource, start: int) -> Iterator[Batch]:
        on_gpu = self.cfg.device.startswith("cuda")
        ds = ViewsDataset(source, start, self.cfg.output, augment=not on_gpu)
        workers = self.cfg.num_workers
        if workers > 0:
            dl = torch.utils.data.DataLoader(
                ds,
                batch_size=None,
                num_workers=workers,
                pin_memory=on_gpu,
                worker_init_fn=_worker_init,
                prefetch_factor=2,
                multiprocessing_context=_worker_context(),
            )
            items: Any = dl
        else:
            items = ds
        for item in items:
            if on_gpu:
                item = finish_on_device(item, self.spec, self.cfg.output, self.cfg.device)
            yield item

    def close(self) -> None:
        pass


def _worker_context() -> str | None:
    """``fork`` (fast) unless a DALI pipeline ran in this process: DALI's threads and CUDA
    state do not survive a fork (workers can crash), so then a fresh forkserver is used."""
    if os.name != "posix":
        return None
    return "forkserver" if "pathflow.data.dali_backend" in sys.modules else "fork"


def _worker_init(_: int) -> None:
    import signal

    from pathflow import _core

    torch.set_num_threads(1)
    _core.set_num_threads(1)
    # Ctrl-C reaches the whole process group: the main process checkpoints and stops the
    # workers itself, a worker that died of it would end the run with a traceback instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)
