"""Augmentation retrieval (``pathflow eval retrieval``): metric, ties, views, CLI."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from pathflow.evaluate.retrieval import read_ranks, retrieval_metrics, retrieval_ranks, sign_test


def test_hand_computed_example() -> None:
    # cosine similarities of z1 rows against z2 rows (all unit vectors):
    # row 0: own 1.0 vs 0.0, 0.6 -> rank 1; row 1: own 0.8 vs 0.0, 1.0 -> rank 2;
    # row 2: own 0.8 vs 0.0, 1.0 -> rank 2.
    z1 = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    z2 = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    m = retrieval_metrics(z1, z2, ks=(1, 2))
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top2"] == pytest.approx(1.0)
    assert m["mean_rank"] == pytest.approx(5 / 3)
    assert m["chance_top1"] == pytest.approx(1 / 3) and m["n"] == 3
    # cosine, not dot product: scaling rows changes nothing
    m2 = retrieval_metrics(z1 * np.array([[3.0], [0.5], [7.0]]), z2 * 2.0, ks=(1, 2))
    assert m2["top1"] == pytest.approx(1 / 3) and m2["mean_rank"] == pytest.approx(5 / 3)


def test_ties_are_credited_fractionally() -> None:
    # constant embedding: all N candidates tie, the true match is at a uniform rank 1..N
    n = 8
    m = retrieval_metrics(np.ones((n, 4)), np.ones((n, 4)), ks=(1, 5, 20))
    assert m["top1"] == pytest.approx(1 / n)
    assert m["top5"] == pytest.approx(5 / n)
    assert m["top20"] == pytest.approx(1.0)
    assert m["mean_rank"] == pytest.approx((n + 1) / 2)
    # one candidate strictly better and one tied with the true match: rank 2 or 3
    z1 = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    z2 = np.array([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    m = retrieval_metrics(z1, z2, ks=(1, 2, 3))
    # row 0: own 0.707, greater 1 (row 1's 1.0), tied 1 -> top1 0, top2 1/2, top3 1
    # row 1: own 1.0 best -> all 1; row 2 like row 0
    assert m["top1"] == pytest.approx(1 / 3)
    assert m["top2"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert m["top3"] == pytest.approx(1.0)


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError):
        retrieval_metrics(np.ones((3, 2)), np.ones((4, 2)))


def _jpegs(n: int, size: int = 64) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        out.append(buf.getvalue())
    return out


def test_identical_views_identity_embedding_is_perfect() -> None:
    pytest.importorskip("torch")
    from pathflow.data.views import ViewSpec, ViewsSpec
    from pathflow.evaluate.retrieval import embed_views, pair_spec, view_pairs

    images = _jpegs(6)
    fixed = ViewSpec(size=32, crop="full", hflip=0.0)  # no randomness: both views identical
    v1, v2 = view_pairs(images, ViewsSpec((fixed, fixed)), seed=0)
    assert v1.shape == (6, 3, 32, 32) and bool((v1 == v2).all())
    z1, z2 = embed_views(v1, v2, lambda x: x.flatten(1), batch_size=4)
    m = retrieval_metrics(z1, z2)
    assert m["top1"] == 1.0 and m["top5"] == 1.0 and m["mean_rank"] == 1.0

    # the simclr preset: views differ from each other, are reproducible for a seed
    spec = pair_spec("simclr", 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert spec.num_views == 2 and spec.groups[0].size == 32
    a1, a2 = view_pairs(images, spec, seed=3)
    b1, b2 = view_pairs(images, spec, seed=3)
    assert bool((a1 == b1).all()) and bool((a2 == b2).all()) and not bool((a1 == a2).all())
    # pathology uses RandStainNA in some presets: switched off, never needs statistics
    assert all(g.randstain == 0 for g in pair_spec("pathology", 32, (0,) * 3, (1,) * 3).groups)


def test_cli_writes_metrics(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from pathflow.cli import main

    data = tmp_path / "imgs"
    (data / "a").mkdir(parents=True)
    for i, b in enumerate(_jpegs(5)):
        (data / "a" / f"{i}.jpg").write_bytes(b)
    out = tmp_path / "ret"
    rc = main(["eval", "retrieval", str(data), "--arch", "test_vit", "--image-size", "32",
               "--device", "cpu", "--views", "simclr", "--seed", "0", "-o", str(out)])  # fmt: skip
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_images"] == 5 and report["weights"] is None
    m = report["metrics"]
    assert 0.0 <= m["top1"] <= m["top5"] <= 1.0 and m["chance_top1"] == pytest.approx(0.2)
    ranks = read_ranks(out / "ranks.csv")
    assert len(ranks) == 5 and all(1.0 <= r <= 5.0 for r in ranks.values())
    assert sum(ranks.values()) / 5 == pytest.approx(m["mean_rank"])


def test_per_image_ranks_and_the_sign_test_by_hand() -> None:
    # image 0 finds its own view first; image 1's own view is beaten by image 0's and ties
    # with image 2's (identical rows): rank 1 + 1 + 1/2; image 2's ties with image 1's: 1.5
    z1 = np.array([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]])
    z2 = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert retrieval_ranks(z1, z2).tolist() == [1.0, 2.5, 1.5]
    m = retrieval_metrics(z1, z2)
    assert m["median_rank"] == 1.5 and m["mean_rank"] == pytest.approx(5.0 / 3)
    # 8 better, 2 worse, 1 tie: p = 2 (C(10,0) + C(10,1) + C(10,2)) / 2^10 = 112 / 1024
    before = [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5]
    after = [1, 2, 3, 4, 1, 2, 3, 4, 9, 9, 5]
    t = sign_test(before, after)
    assert (t["better"], t["worse"], t["tied"]) == (8, 2, 1)
    assert t["p"] == pytest.approx(112 / 1024)
    assert sign_test([1, 2], [1, 2])["p"] == 1.0
