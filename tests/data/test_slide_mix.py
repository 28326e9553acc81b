"""Batches mix slides: shards written one slide after another (``pathflow tile --shards``
without ``--shuffle``), read in the default permutation order or through a shuffle buffer."""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pathflow.data import ShardSet, make_loader  # noqa: E402

KW: dict[str, Any] = dict(
    views="eval", backend="torch", device="cpu", output="uint8", num_workers=0
)


@pytest.fixture(scope="module")
def two_slides(two_slide_shards: Path) -> Path:
    return two_slide_shards


def slide_sizes(shards: Path) -> dict[str, int]:
    ss = ShardSet(shards)
    return dict(Counter(m["slide"] for m in ss.read(np.arange(len(ss)))[1]))


def p_one_slide(sizes: list[int], batch: int) -> float:
    """Hypergeometric: probability that a uniform random batch holds a single slide."""
    total = sum(sizes)
    return sum(math.comb(n, batch) for n in sizes) / math.comb(total, batch)


def distinct(batches: list[Any]) -> list[int]:
    return [len(set(b.meta["slide"])) for b in batches]


def test_fixture_is_one_slide_per_shard(two_slides: Path) -> None:
    ss = ShardSet(two_slides)
    assert ss.shuffled is False and ss.counts.tolist() == [43, 43, 32]
    for k in range(3):
        _, metas = ss.read(np.arange(ss.starts[k], ss.starts[k + 1]))
        assert len({m["slide"] for m in metas}) == 1
    assert sorted(slide_sizes(two_slides).values()) == [43, 75]


def test_default_order_mixes_slides_in_every_batch(
    two_slides: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sizes = list(slide_sizes(two_slides).values())
    single = p_one_slide(sizes, 16)
    assert single < 1e-3  # so nearly every batch of 16 holds both slides
    # a buffer smaller than a shard, as the old default 8192 is to shards of 10,000 patches:
    # the default order does not stream through it
    with caplog.at_level(logging.WARNING, logger="pathflow.data"):
        loader = make_loader(two_slides, batch_size=16, shuffle_buffer=4, **KW)
    assert "few slides" not in caplog.text
    batches = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches += list(loader)
    counts = distinct(batches)
    assert len(counts) == 3 * (118 // 16)
    # expected single-slide batches: 21 * single < 0.03; allow one
    assert sum(c == 1 for c in counts) <= 1
    st = loader.stats
    assert st["batches"] == len(counts) and st["samples"] == 16 * len(counts)
    assert st["slides_per_batch_mean"] == pytest.approx(np.mean(counts))
    assert st["slides_per_batch_min"] == min(counts)
    assert loader.cfg.shuffle_mode == "permutation"


def test_default_order_with_workers_and_ranks(two_slides: Path) -> None:
    """Every rank sees both slides in most batches; stats are counted with workers too."""
    sizes = slide_sizes(two_slides)
    seen: list[str] = []
    for rank in range(2):
        kw = {**KW, "num_workers": 2}
        loader = make_loader(two_slides, batch_size=8, rank=rank, world_size=2, **kw)
        loader.set_epoch(1)
        batches = list(loader)
        counts = distinct(batches)
        assert loader.stats["slides_per_batch_mean"] == pytest.approx(np.mean(counts))
        assert loader.stats["slides_per_batch_min"] == min(counts)
        # P(one slide) ~ 0.03 per batch of 8 from a uniform random share
        assert sum(c == 2 for c in counts) >= len(counts) - 2
        slides = [s for b in batches for s in b.meta["slide"]]
        assert set(slides) == set(sizes)
        seen += [k for b in batches for k in b.meta["key"]]
    assert len(seen) == len(set(seen)) == 2 * (118 // 2 // 8) * 8  # disjoint shares


def test_buffer_mode_smaller_than_a_shard_gives_single_slide_batches(
    two_slides: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The old order: a buffer smaller than a shard of one slide; with a warning."""
    with caplog.at_level(logging.WARNING, logger="pathflow.data"):
        loader = make_loader(
            two_slides, batch_size=8, shuffle_mode="buffer", shuffle_buffer=4, **KW
        )
    assert "few slides" in caplog.text and "shuffled" in caplog.text
    batches = list(loader)
    counts = distinct(batches)
    # a uniform random batch of 8 is single-slide with probability ~0.03; here only batches
    # near the one or two slide changes of the shard sequence can mix
    assert p_one_slide(list(slide_sizes(two_slides).values()), 8) < 0.05
    assert sum(c == 1 for c in counts) >= len(counts) // 2
    assert loader.stats["slides_per_batch_min"] == 1
    assert loader.stats["slides_per_batch_mean"] == pytest.approx(np.mean(counts))
    # every sample once per epoch over ranks, as in the permutation order
    keys = []
    for rank in range(3):
        ld = make_loader(two_slides, batch_size=8, rank=rank, world_size=3, drop_last=False,
                         shuffle_mode="buffer", shuffle_buffer=4, **KW)  # fmt: skip
        keys += [k for b in ld for k in b.meta["key"]]
    assert len(keys) == len(set(keys)) == 118


def test_no_warning_when_the_buffer_holds_a_shard(
    two_slides: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="pathflow.data"):
        make_loader(two_slides, batch_size=8, shuffle_mode="buffer", shuffle_buffer=43, **KW)
        make_loader(two_slides, batch_size=8, shuffle_mode="buffer", shuffle=False, **KW)
    assert "few slides" not in caplog.text


def test_resume_mid_epoch_keeps_order_and_slide_stats(two_slides: Path) -> None:
    kw = {**KW, "batch_size": 8, "rank": 1, "world_size": 2, "seed": 5}
    full = make_loader(two_slides, **kw)
    full.set_epoch(2)
    ref = list(full)
    part = make_loader(two_slides, **kw)
    part.set_epoch(2)
    it = iter(part)
    for _ in range(3):
        next(it)
    state = part.state_dict()
    assert state["shuffle_mode"] == "permutation" and state["batch"] == 3
    resumed = make_loader(two_slides, **kw)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b.meta["key"] for b in rest] == [b.meta["key"] for b in ref[3:]]
    assert resumed.stats == full.stats  # slide counts carried over in the state
    other = make_loader(two_slides, shuffle_mode="buffer", **kw)
    with pytest.raises(ValueError, match="shuffle_mode"):
        other.load_state_dict(state)


def test_state_without_slide_counts_restarts_them(two_slides: Path) -> None:
    loader = make_loader(two_slides, batch_size=8, **KW)
    old = {"epoch": 0, "batch": 0, "seed": 0, "batch_size": 8, "world_size": 1, "rank": 0,
           "stats": {"samples": 80, "batches": 10, "skipped": 0}}  # fmt: skip
    loader.load_state_dict(old)
    first = next(iter(loader))
    assert loader.stats["batches"] == 11 and loader.stats["samples"] == 88
    n = len(set(first.meta["slide"]))
    assert loader.stats["slides_per_batch_mean"] == n and loader.stats["slides_per_batch_min"] == n


def test_bad_shuffle_mode(two_slides: Path) -> None:
    with pytest.raises(ValueError, match="shuffle_mode"):
        make_loader(two_slides, batch_size=8, shuffle_mode="global", **KW)


def test_dali_backend_counts_slides(two_slides: Path) -> None:
    pytest.importorskip("nvidia.dali")
    kw = {**KW, "backend": "dali", "num_workers": 2}
    loader = make_loader(two_slides, batch_size=16, **kw)
    counts = distinct(list(loader))
    assert loader.stats["slides_per_batch_mean"] == pytest.approx(np.mean(counts))
    assert loader.stats["slides_per_batch_min"] == min(counts) == 2
