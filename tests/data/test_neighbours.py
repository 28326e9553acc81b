"""NeighbourIndex: spatial neighbours of shard samples, against hand counts and a brute-force
search over the real sample slides' grids, and the uniformity of its draws."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pathflow.data import ShardSet
from pathflow.data.neighbours import NeighbourIndex, grid_steps, hash_uniform, sample_coords


def json_coords(shards: Path) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, int]]:
    """slide, x, y of every sample (tar order) and patch_size_level0 per slide, straight from
    the tars' .json members (independent of ShardSet and the key parsing)."""
    slides, xs, ys, size = [], [], [], {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())  # type: ignore[union-attr]
                    slides.append(meta["slide"])
                    xs.append(meta["x"])
                    ys.append(meta["y"])
                    size[meta["slide"]] = meta["patch_size_level0"]
    return slides, np.asarray(xs), np.asarray(ys), size


def test_hand_counts_on_a_3x3_grid() -> None:
    # 3 x 3 grid of step 100 plus a lone patch 5 steps away and a duplicate of the centre
    x = np.array([0, 100, 200, 0, 100, 200, 0, 100, 200, 700, 100])
    y = np.array([0, 0, 0, 100, 100, 100, 200, 200, 200, 0, 100])
    s = np.zeros(len(x), np.int64)
    step = np.full(len(x), 100.0)
    cheb = NeighbourIndex(s, x, y, step, radius=1)
    # corners 3 + the duplicate centre, edges 5 + 1, centre 8 (its duplicate at distance 0 is
    # not a neighbour), lone 0
    assert cheb.counts().tolist() == [4, 6, 4, 6, 8, 6, 4, 6, 4, 0, 8]
    _, nb = cheb.query(np.array([4]))
    assert nb.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    euc = NeighbourIndex(s, x, y, step, radius=1, metric="euclidean")
    # Euclidean radius 1: the centre (and its duplicate) is sqrt(2) from the corners
    assert euc.counts().tolist() == [2, 4, 2, 4, 4, 4, 2, 4, 2, 0, 4]
    assert NeighbourIndex(s, x, y, step, radius=1.5, metric="euclidean").counts()[4] == 8
    # the same grid on another slide is not a neighbour
    two = NeighbourIndex(np.r_[s, 1], np.r_[x, 100], np.r_[y, 100], np.r_[step, 100.0], radius=1)
    assert two.counts()[4] == 8 and two.counts()[-1] == 0
    p, alone = cheb.draw(np.array([9, 4]), seed=0, epoch=0)
    assert p[0] == 9 and alone.tolist() == [True, False] and p[1] in nb


def test_grid_step_is_inferred_from_row_spacing() -> None:
    # 128-pixel step (overlap 50 %), two slides, one with no row pair
    x = np.array([0, 128, 256, 512, 0, 40])
    y = np.array([0, 0, 0, 0, 128, 900])
    s = np.array([0, 0, 0, 0, 0, 1])
    out = grid_steps(s, x, y, 2)
    assert out[0] == 128.0 and np.isnan(out[1])


@pytest.mark.parametrize("radius", [1.0, 2.0, 2.5])
@pytest.mark.parametrize("metric", ["chebyshev", "euclidean"])
def test_real_grid_neighbours_equal_brute_force(
    two_slide_shards: Path, radius: float, metric: str
) -> None:
    """Every returned neighbour is on the anchor's slide and within the radius, and none is
    missed (brute force over all pairs from the tars' JSON)."""
    ss = ShardSet(two_slide_shards)
    slides, x, y, size = json_coords(two_slide_shards)
    assert len(slides) == len(ss) == 118 and len(set(slides)) == 2
    coords = sample_coords(ss)
    assert coords.slides == sorted(set(slides))
    step = np.asarray([float(size[s]) for s in slides])  # no overlap: step = patch size
    assert np.array_equal(coords.step, step)
    nb = NeighbourIndex.from_shards(ss, radius=radius, metric=metric)
    indptr, got = nb.query(np.arange(len(ss)))
    same = np.asarray(slides)[:, None] == np.asarray(slides)[None, :]
    dx = np.abs(x[:, None] - x[None, :]) / step[:, None]
    dy = np.abs(y[:, None] - y[None, :]) / step[:, None]
    d = np.maximum(dx, dy) if metric == "chebyshev" else np.sqrt(dx**2 + dy**2)
    want = same & (d > 0) & (d <= radius + 1e-9)
    for i in range(len(ss)):
        mine = got[indptr[i] : indptr[i + 1]]
        assert all(slides[j] == slides[i] and 0 < d[i, j] <= radius + 1e-9 for j in mine)
        assert mine.tolist() == np.flatnonzero(want[i]).tolist()
    assert want.sum(1).max() > 0  # the grid has neighbours at all


def test_json_and_key_paths_agree(two_slide_shards: Path) -> None:
    from pathflow.data import neighbours

    ss = ShardSet(two_slide_shards)
    from_keys = neighbours._from_keys(ss)
    assert from_keys is not None
    from_json = neighbours._from_json(ss)
    for a, b in zip(from_keys[:4], from_json[:4], strict=True):
        assert (a == b) if isinstance(a, list) else np.array_equal(a, b)
    assert from_keys[4] == from_json[4]


def test_draw_is_uniform_over_neighbours(sample_shards: Path) -> None:
    """One anchor with 8 neighbours, 4000 epochs: chi-square against uniform."""
    nb = NeighbourIndex.from_shards(ShardSet(sample_shards), radius=1)
    counts = nb.counts()
    anchor = int(np.flatnonzero(counts == 8)[0])
    _, nbrs = nb.query(np.array([anchor]))
    epochs = 2000
    picks = np.concatenate([nb.draw(np.array([anchor]), 7, e)[0] for e in range(epochs)])
    assert set(picks.tolist()) == set(nbrs.tolist())
    observed = np.array([(picks == j).sum() for j in nbrs])
    expected = epochs / len(nbrs)
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    try:
        from scipy.stats import chi2 as dist

        assert dist.sf(chi2, len(nbrs) - 1) > 1e-3
    except ImportError:
        assert chi2 < 24.3  # the 0.999 quantile of chi-square with 7 degrees of freedom
    # over all anchors at one epoch: every pick is a neighbour, and re-drawing is identical
    a = np.arange(len(nb))
    p1, alone = nb.draw(a, 7, 3)
    p2, _ = nb.draw(a, 7, 3)
    assert np.array_equal(p1, p2) and np.array_equal(alone, counts == 0)
    d = nb.distance(a, p1)
    assert np.all((d > 0) & (d <= 1) | alone)


def test_hash_uniform_is_a_pure_function() -> None:
    u = hash_uniform(3, 1, np.arange(100_000))
    assert np.array_equal(u, hash_uniform(3, 1, np.arange(100_000)))
    assert not np.array_equal(u, hash_uniform(3, 2, np.arange(100_000)))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    hist = np.bincount((u * 10).astype(int), minlength=10)
    assert hist.min() > 9_500 and hist.max() < 10_500


def test_large_index_is_fast_enough() -> None:
    """200k samples on 100 slides: build and a batch query stay interactive."""
    import time

    rng = np.random.default_rng(0)
    g = np.stack(np.meshgrid(np.arange(50), np.arange(40)), -1).reshape(-1, 2)
    x = np.tile(g[:, 0], 100) * 256
    y = np.tile(g[:, 1], 100) * 256
    s = np.repeat(np.arange(100), len(g))
    perm = rng.permutation(len(x))
    t0 = time.perf_counter()
    nb = NeighbourIndex(s[perm], x[perm], y[perm], np.full(len(x), 256.0), radius=2)
    p, alone = nb.draw(np.arange(256), 0, 0)
    assert time.perf_counter() - t0 < 10 and not alone.any()
    assert np.all(s[perm][p] == s[perm][:256])


def test_bad_arguments() -> None:
    z = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="metric"):
        NeighbourIndex(z, z, z, np.ones(2), metric="manhattan")
    with pytest.raises(ValueError, match="radius"):
        NeighbourIndex(z, z, z, np.ones(2), radius=0)
