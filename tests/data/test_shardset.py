"""Shard index, reading, and the per-rank epoch order."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from pathflow.data.shardset import ShardSet, epoch_order, read_dali_index, scan_tar, shuffle_buffer


def test_dali_index_equals_tar_scan(sample_shards: Path) -> None:
    tar = sample_shards / "shard-000000.tar"
    a = read_dali_index(tar, tar.with_suffix(".idx"))
    b = scan_tar(tar)
    assert a.keys == b.keys and len(a) == 43
    for f in ("img_off", "img_size", "meta_off", "meta_size"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


def test_read_bytes_and_meta_match_tar(sample_shards: Path) -> None:
    ss = ShardSet(sample_shards)
    assert len(ss) == 43
    images, metas = ss.read(np.array([0, 17, 42]))
    with tarfile.open(sample_shards / "shard-000000.tar") as tf:
        for img, meta in zip(images, metas, strict=False):
            member = tf.extractfile(meta["key"] + ".jpg")
            assert member is not None and member.read() == img
            js = json.loads(tf.extractfile(meta["key"] + ".json").read())  # type: ignore[union-attr]
            assert (meta["slide"], meta["x"], meta["y"]) == (js["slide"], js["x"], js["y"])
            assert meta["label"] == -1


def _write_generic_wds(path: Path, n: int, jpg: bytes) -> None:
    """A WebDataset written the way webdataset.TarWriter does: .jpg + .cls, no .idx."""
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            w.write({"__key__": f"dir/sample{i:04d}", "jpg": jpg, "cls": i % 3})


def test_generic_webdataset_without_index(tmp_path: Path, sample_shards: Path) -> None:
    jpg = ShardSet(sample_shards).read(np.array([0]))[0][0]
    _write_generic_wds(tmp_path / "a.tar", 5, jpg)
    _write_generic_wds(tmp_path / "b.tar", 3, jpg)
    ss = ShardSet(tmp_path)
    assert len(ss) == 8 and list(ss.counts) == [5, 3]
    images, metas = ss.read(np.arange(8))
    assert all(im == jpg for im in images)
    assert [m["label"] for m in metas] == [0, 1, 2, 0, 1, 0, 1, 2]
    assert metas[0]["key"] == "dir/sample0000" and metas[0]["slide"] == "sample0000"


def test_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no shards\.json"):
        ShardSet(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing\.tar"):
        ShardSet([tmp_path / "missing.tar"])


@pytest.mark.parametrize("mode", ["permutation", "buffer"])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_cover_every_sample_once(world: int, mode: str) -> None:
    counts = np.array([100, 37, 1, 64, 250])
    total = int(counts.sum())
    for epoch in range(3):
        parts = [
            epoch_order(counts, epoch=epoch, seed=7, rank=r, world=world, mode=mode, buffer=50)
            for r in range(world)
        ]
        allidx = np.concatenate(parts)
        assert sorted(allidx.tolist()) == list(range(total))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        equal = [
            epoch_order(counts, epoch=epoch, seed=7, rank=r, world=world, mode=mode, equal=True)
            for r in range(world)
        ]
        assert {len(p) for p in equal} == {total // world}
        assert len(np.unique(np.concatenate(equal))) == world * (total // world)


def test_order_is_seeded_and_changes_per_epoch() -> None:
    counts = np.array([40, 40, 40])
    a = epoch_order(counts, epoch=0, seed=1)
    assert np.array_equal(a, epoch_order(counts, epoch=0, seed=1))
    assert not np.array_equal(a, epoch_order(counts, epoch=1, seed=1))
    assert not np.array_equal(a, epoch_order(counts, epoch=0, seed=2))
    plain = epoch_order(counts, epoch=0, seed=1, shuffle=False)
    assert np.array_equal(plain, np.arange(120))


def _expected_distinct(sizes: np.ndarray, batch: int) -> float:
    """E[#slides in a uniform random batch] = sum_s 1 - C(N - n_s, B) / C(N, B)."""
    total = int(sizes.sum())
    j = np.arange(batch)
    return float(sum(1 - np.prod((total - n - j) / (total - j)) for n in sizes.tolist()))


def _slides_per_batch(order: np.ndarray, slide_of: np.ndarray, batch: int) -> np.ndarray:
    nb = len(order) // batch
    ids = slide_of[order[: nb * batch]].reshape(nb, batch)
    return np.asarray([len(np.unique(r)) for r in ids])


def test_default_order_mixes_slides_of_sequential_shards() -> None:
    """``pathflow tile --shards`` without --shuffle at its defaults (10,000 samples a shard,
    slides one after another) and the loader's defaults (batch 64): a batch must draw from all
    slides like a uniform random sample, on every rank. The shuffle buffer (8192 samples,
    smaller than a shard) gives batches of about half of the slides."""
    sizes = np.array([12000, 9000, 15000, 6000, 11000, 8000, 14000, 5000])  # 80,000 patches
    slide_of = np.repeat(np.arange(len(sizes)), sizes)
    counts = np.full(8, 10_000)  # shard k = patches 10,000 k .. 10,000 (k + 1) - 1
    expected = _expected_distinct(sizes, 64)
    assert 7.9 < expected < 8
    for rank in range(2):
        order = epoch_order(counts, epoch=0, seed=0, rank=rank, world=2, equal=True)
        per_batch = _slides_per_batch(order, slide_of, 64)
        assert abs(per_batch.mean() - expected) < 0.1 and per_batch.min() >= expected - 3
        # the rank's share is a uniform random half: slide proportions within 5 sd
        share = np.bincount(slide_of[order], minlength=len(sizes))
        p = sizes / sizes.sum()
        sd = np.sqrt(len(order) * p * (1 - p) * 0.5)  # hypergeometric, half of the population
        assert (np.abs(share - len(order) * p) < 5 * sd).all()
    old = epoch_order(counts, epoch=0, seed=0, rank=0, world=2, equal=True, mode="buffer")
    assert _slides_per_batch(old, slide_of, 64).mean() < 0.65 * expected  # what it replaces


def test_unknown_shuffle_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="permutation"):
        epoch_order(np.array([3]), epoch=0, seed=0, mode="random")


def test_shuffled_flag_from_shards_json(tmp_path: Path, sample_shards: Path) -> None:
    assert ShardSet(sample_shards).shuffled is False
    assert ShardSet(sample_shards / "shards.json").shuffled is False
    assert ShardSet([sample_shards / "shard-000000.tar"]).shuffled is None
    for f in ("shard-000000.tar", "shard-000000.idx"):
        (tmp_path / f).write_bytes((sample_shards / f).read_bytes())
    assert ShardSet(tmp_path).shuffled is None  # a plain WebDataset directory
    info = json.loads((sample_shards / "shards.json").read_text())
    (tmp_path / "shards.json").write_text(json.dumps({**info, "shuffled": True}))
    assert ShardSet(tmp_path).shuffled is True


def test_shuffle_buffer_is_a_local_permutation() -> None:
    seq = np.arange(10_000)
    out = shuffle_buffer(seq, 100, np.random.default_rng(0))
    assert sorted(out.tolist()) == seq.tolist()
    # an item leaves the buffer no earlier than it entered: out[i] <= i + 99
    assert (out <= np.arange(10_000) + 99).all()
    assert np.abs(out - np.arange(10_000)).mean() > 20  # actually shuffled


def test_truncated_shard_read_is_a_clear_error(tmp_path: Path, sample_shards: Path) -> None:
    """Truncated after the ShardSet opened (opening checks the size: test_shard_faults.py)."""
    data = (sample_shards / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000000.tar").write_bytes(data)
    (tmp_path / "shard-000000.idx").write_bytes((sample_shards / "shard-000000.idx").read_bytes())
    ss = ShardSet([tmp_path / "shard-000000.tar"])
    (tmp_path / "shard-000000.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        ss.read(np.array([42]))
