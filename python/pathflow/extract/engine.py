"""Batched embedding of encoded patches: read bytes + decode in background threads while the
backbone runs (``torch.inference_mode``, bf16 autocast on CUDA).

Example:
    >>> from pathflow.extract.engine import Embedder
    >>> from pathflow.extract.model import load_extractor
    >>> emb = Embedder(load_extractor("test_vit", device="cpu"), batch_size=32)  # doctest: +SKIP
    >>> for out in emb.embed(refs):  # doctest: +SKIP
    ...     out.features.shape, out.ok.sum()
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.extract.decode import DecodedBatch, decode_resize
from pathflow.extract.model import Backbone
from pathflow.extract.sources import ByteReader, PatchRef

log = logging.getLogger("pathflow.extract")

Decoder = Callable[[list[bytes], int], DecodedBatch]


@dataclass
class EmbeddedBatch:
    """Features (n, D) float32 of one batch (rows of failed images are NaN), ``ok`` mask,
    failure ``reasons`` and the refs, in input order."""

    features: npt.NDArray[np.float32]
    ok: npt.NDArray[np.bool_]
    reasons: list[str | None]
    refs: list[PatchRef]


class Embedder:
    """Embeds a stream of :class:`PatchRef` in order, ``batch_size`` at a time.

    ``workers`` threads read and decode up to ``prefetch`` batches ahead of the model.
    ``decoder`` replaces :func:`~pathflow.extract.decode.decode_resize` (tests).
    """

    def __init__(
        self,
        backbone: Backbone,
        batch_size: int = 64,
        workers: int = 2,
        prefetch: int = 3,
        decoder: Decoder | None = None,
    ) -> None:
        if batch_size < 1 or workers < 1 or prefetch < 1:
            raise ValueError("batch_size, workers and prefetch must be >= 1")
        self.backbone = backbone
        self.batch_size = batch_size
        self.workers = workers
        self.prefetch = prefetch
        self.decoder: Decoder = decoder or decode_resize
        self._norm: tuple[Any, Any] | None = None

    def embed(self, refs: Iterable[PatchRef]) -> Iterator[EmbeddedBatch]:
        """Yield one :class:`EmbeddedBatch` per ``batch_size`` refs, in order."""
        it = iter(refs)
        with ByteReader() as reader, ThreadPoolExecutor(self.workers) as pool:
            pending: deque[tuple[list[PatchRef], Future[DecodedBatch]]] = deque()

            def submit() -> bool:
                chunk = list(islice(it, self.batch_size))
                if chunk:
                    pending.append((chunk, pool.submit(self._load, reader, chunk)))
                return bool(chunk)

            while len(pending) < self.prefetch + self.workers and submit():
                pass
            while pending:
                chunk, fut = pending.popleft()
                submit()
                batch = fut.result()
                yield EmbeddedBatch(
                    features=self._forward(batch), ok=batch.ok, reasons=batch.reasons, refs=chunk
                )

    def _load(self, reader: ByteReader, refs: list[PatchRef]) -> DecodedBatch:
        data: list[bytes] = []
        read_errors: dict[int, str] = {}
        for i, r in enumerate(refs):
            try:
                data.append(reader.read(r))
            except OSError as exc:
                data.append(b"")
                read_errors[i] = f"{r.path}: {exc.strerror or exc}"
        batch = self.decoder(data, self.backbone.image_size)
        for i, why in read_errors.items():
            batch.ok[i] = False
            batch.reasons[i] = why
        return batch

    def _forward(self, batch: DecodedBatch) -> npt.NDArray[np.float32]:
        import torch

        bb = self.backbone
        n = len(batch.ok)
        out = np.full((n, bb.embed_dim), np.nan, np.float32)
        idx = np.flatnonzero(batch.ok)
        if idx.size == 0:
            return out
        if self._norm is None:
            mean = torch.tensor(bb.mean, device=bb.device).view(1, 3, 1, 1) * 255.0
            std = torch.tensor(bb.std, device=bb.device).view(1, 3, 1, 1) * 255.0
            self._norm = (mean, std)
        mean, std = self._norm
        x = torch.from_numpy(np.ascontiguousarray(batch.images[idx]))
        if bb.device.type == "cuda":
            x = x.pin_memory().to(bb.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().sub_(mean).div_(std)
        if bb.compiled and len(x) < self.batch_size:
            # one static shape: a short (last) batch is padded instead of compiled again
            x = torch.cat([x, x.new_zeros((self.batch_size - len(x), *x.shape[1:]))])
        y = bb.forward(x)[: idx.size]
        if y.shape != (idx.size, bb.embed_dim):
            raise RuntimeError(
                f"{bb.arch} returned features of shape {tuple(y.shape)}, "
                f"expected ({idx.size}, {bb.embed_dim})"
            )
        out[idx] = y.cpu().numpy()
        return out
