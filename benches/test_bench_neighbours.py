"""Cost of neighbour positive pairs: loader images/s with ``positives="neighbour"`` against
plain two-view (``positives="augment"``), same run, same shards, same views.

Both read the 256 px JPEG patches that ``pathflow tile --shards`` writes from the generated
40x slide (``synthetic_slide.py``, real tissue; the shards of ``test_bench_loader.py``), with
SimCLR's two 224 px views, batch 64, the torch backend (Rust decode/crop/augment in 2
workers). With neighbour pairs every anchor's partner is a second patch read (``pread``) and
decoded; the view work is unchanged (view 1 is cut from the partner instead of the anchor).
The two configurations alternate over rounds (the machine may be shared) and the median per
configuration is reported, with the neighbour index build time.

Run: ``python -m pytest benches/test_bench_neighbours.py --benchmark-only -s``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

BATCH = 64
WARMUP = 3
TIMED = 12
ROUNDS = 2


def rate(shards: Path, positives: str) -> float:
    """Images/s (anchors) over TIMED batches after WARMUP, looping over epochs."""
    from pathflow.data import make_loader

    loader = make_loader(shards, views="simclr", batch_size=BATCH, backend="torch",
                         device="cpu", num_workers=2, positives=positives)  # fmt: skip

    def forever() -> Any:
        while True:
            yield from loader

    it = forever()
    for _ in range(WARMUP):
        next(it)
    t0 = time.perf_counter()
    n = sum(len(next(it)) for _ in range(TIMED))
    dt = time.perf_counter() - t0
    del it
    return n / dt


def test_neighbour_pairs_throughput(benchmark: Any, shards: Path) -> None:
    from pathflow.data import NeighbourIndex, ShardSet

    t0 = time.perf_counter()
    nb = NeighbourIndex.from_shards(ShardSet(shards), radius=2)
    build = time.perf_counter() - t0
    counts = nb.counts()

    def run() -> dict[str, list[float]]:
        rates: dict[str, list[float]] = {"augment": [], "neighbour": []}
        for _ in range(ROUNDS):
            for positives in rates:
                rates[positives].append(rate(shards, positives))
        return rates

    rates = benchmark.pedantic(run, rounds=1, iterations=1)
    plain = statistics.median(rates["augment"])
    pairs = statistics.median(rates["neighbour"])
    print(
        f"\n{len(nb)} patches, neighbour index (radius 2) built in {build:.2f} s, "
        f"{counts.mean():.1f} neighbours per patch on average, {(counts == 0).sum()} alone"
        f"\n[two-view] plain: {plain:.0f} images/s, neighbour pairs: {pairs:.0f} images/s "
        f"({pairs / plain:.2f}x; rounds {rates})"
    )
    benchmark.extra_info.update(
        plain_images_per_s=plain, neighbour_images_per_s=pairs, index_build_s=build
    )
