"""Where a loader is in its epoch, what it has yielded, and how that resumes: shared by the
image loader (:class:`~pathflow.data.loader.Loader`) and the region-feature loader
(:class:`~pathflow.data.features.RegionFeatureLoader`).

``stats`` (cumulative over the batches yielded, kept across :meth:`load_state_dict`):
``samples``, ``batches``, ``skipped`` (corrupt images replaced), and ``slides_per_batch_mean``
/ ``slides_per_batch_min``, the mean and minimum number of distinct ``meta["slide"]`` values
per batch (0 before the first batch).
"""

from __future__ import annotations

import logging
from typing import Any

from pathflow.data.batch import Batch

log = logging.getLogger("pathflow.data")


class EpochPosition:
    """Mixin: ``epoch``, the next batch ``_next``, ``stats`` and their state dict. The class
    has ``cfg`` with ``seed``, ``batch_size``, ``world_size`` and ``rank``, and names its sample
    order in :meth:`order_mode`."""

    cfg: Any

    def _init_position(self) -> None:
        self.epoch = 0
        self._next = 0  # next batch index of self.epoch
        self.stats: dict[str, int | float] = {
            "samples": 0,
            "batches": 0,
            "skipped": 0,
            "slides_per_batch_mean": 0.0,
            "slides_per_batch_min": 0,
        }
        self._slides = [0, 0]  # distinct slides summed over batches, batches counted
        self.skipped_keys: list[str] = []

    def order_mode(self) -> str:
        """The sample order recorded in the state (``permutation``, ``buffer``, ``none``)."""
        return "permutation"

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; the position is kept if it is the current epoch."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._next = 0

    def state_dict(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "epoch": self.epoch,
            "batch": self._next,
            "seed": c.seed,
            "batch_size": c.batch_size,
            "world_size": c.world_size,
            "rank": c.rank,
            "shuffle_mode": self.order_mode(),
            "stats": dict(self.stats),
            "slides": list(self._slides),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = self.cfg
        for k in ("seed", "batch_size", "world_size"):
            if state.get(k) != getattr(c, k):
                raise ValueError(
                    f"cannot resume loader: {k} was {state.get(k)}, now {getattr(c, k)}"
                )
        mode = self.order_mode()
        if "shuffle_mode" in state and state["shuffle_mode"] != mode:
            raise ValueError(
                f"cannot resume loader: shuffle_mode was {state['shuffle_mode']}, now {mode}"
            )
        if "shuffle_mode" not in state and int(state["batch"]) > 0 and mode == "permutation":
            log.warning(
                "resuming epoch %s at batch %s from a loader state saved with the older "
                "shuffle-buffer order: the rest of this epoch follows the permutation order "
                "(some samples may repeat or be missed until the next epoch)",
                state["epoch"],
                state["batch"],
            )
        self.epoch = int(state["epoch"])
        self._next = int(state["batch"])
        self.stats.update(state.get("stats", {}))
        slides = state.get("slides")
        self._slides = [int(slides[0]), int(slides[1])] if slides else [0, 0]
        if not slides:  # a state without slide counts: they restart from here
            self.stats["slides_per_batch_mean"] = 0.0
            self.stats["slides_per_batch_min"] = 0

    def _count(self, batch: Batch) -> None:
        """Add a yielded batch to ``stats``."""
        st = self.stats
        st["batches"] += 1
        st["samples"] += len(batch)
        if batch.skipped:
            st["skipped"] += len(batch.skipped)
            self.skipped_keys.extend(batch.skipped)
        n = len(set(batch.meta["slide"]))
        first = self._slides[1] == 0
        self._slides[0] += n
        self._slides[1] += 1
        st["slides_per_batch_mean"] = self._slides[0] / self._slides[1]
        st["slides_per_batch_min"] = n if first else min(int(st["slides_per_batch_min"]), n)


__all__ = ["EpochPosition"]
