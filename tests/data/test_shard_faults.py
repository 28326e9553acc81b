"""Damaged shards of the real sample (``pathflow tile --shards`` of cmu-small, 43 patches):
a sample whose ``.json`` is garbage or lacks its position is skipped like a corrupt image,
and a truncated tar is refused when the ShardSet opens, naming the file."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from pathflow.data import make_loader
from pathflow.data.shardset import ShardSet
from pathflow.exceptions import CorruptShardError


def _copy(shards: Path, dest: Path) -> tuple[Path, Path]:
    """A private copy of the sample shards and its one tar."""
    shutil.copytree(shards, dest)
    tars = sorted(dest.glob("*.tar"))
    assert len(tars) == 1
    return dest, tars[0]


def _overwrite_json(tar: Path, sample: int, data: bytes) -> str:
    """Replace the ``.json`` of ``sample`` in place with ``data`` (padded with spaces to its
    size, so the index stays valid); returns the sample's key."""
    sh = ShardSet(tar).shards[0]
    off, size = int(sh.meta_off[sample]), int(sh.meta_size[sample])
    assert off > 0 and len(data) <= size
    with tar.open("r+b") as f:
        f.seek(off)
        f.write(data.ljust(size, b" "))
    return sh.keys[sample]


def _position(key: str) -> tuple[str, int, int]:
    """Slide, x, y from a pathflow key ``<slide>_<x>_<y>`` (how the tiler names samples)."""
    slide, x, y = key.rsplit("_", 2)
    return slide, int(x), int(y)


def test_corrupt_sample_json_is_logged_counted_and_replaced(
    sample_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shards, tar = _copy(sample_shards, tmp_path / "shards")
    garbage = _overwrite_json(tar, 5, b"\x89\xff garbage \x00\x01")
    no_position = _overwrite_json(tar, 17, b'{"label": 1}')  # valid JSON, no slide/x/y
    text_x = _overwrite_json(tar, 30, b'{"slide": "cmu_small_region", "x": "left", "y": 0}')

    ss = ShardSet(shards)
    _, metas = ss.read(np.arange(len(ss), dtype=np.int64))
    flagged = {m["key"] for m in metas if m["error"] is not None}
    assert flagged == {garbage, no_position, text_x}

    loader = make_loader(
        shards, views="simclr", batch_size=43, backend="torch", num_workers=0, device="cpu",
        shuffle=False, drop_last=False,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="pathflow.data"):
        batches = list(loader)
    assert loader.stats["skipped"] == 3
    assert sorted(loader.skipped_keys) == sorted([garbage, no_position, text_x])
    for key in (garbage, no_position, text_x):
        assert any(key in r.getMessage() and "corrupt metadata" in r.getMessage()
                   for r in caplog.records), key  # fmt: skip
    assert str(tar) in caplog.text

    keys = [k for b in batches for k in b.meta["key"]]
    assert len(keys) == 43 and not {garbage, no_position, text_x} & set(keys)
    for b in batches:
        assert (b.meta["x"] >= 0).all() and (b.meta["y"] >= 0).all()
        for key, slide, x, y in zip(b.meta["key"], b.meta["slide"], b.meta["x"].tolist(),
                                    b.meta["y"].tolist(), strict=True):  # fmt: skip
            assert (slide, x, y) == _position(key)  # the key the tiler wrote: the truth


def test_foreign_webdataset_json_without_position_is_kept(
    sample_shards: Path, tmp_path: Path
) -> None:
    """A tar of another WebDataset (no shards.json) may carry .json without positions: only
    JSON that does not parse is corrupt there."""
    _, tar = _copy(sample_shards, tmp_path / "shards")
    garbage = _overwrite_json(tar, 2, b"not json {")
    labelled = _overwrite_json(tar, 3, b'{"label": 4}')
    ss = ShardSet(tar)  # the tar alone: no manifest
    _, metas = ss.read(np.asarray([2, 3, 4], dtype=np.int64))
    assert metas[0]["key"] == garbage and "not valid JSON" in str(metas[0]["error"])
    assert metas[1]["key"] == labelled and metas[1]["error"] is None
    assert (metas[1]["label"], metas[1]["x"], metas[1]["y"]) == (4, -1, -1)
    assert metas[2]["error"] is None and metas[2]["x"] == _position(metas[2]["key"])[1]


def test_truncated_shard_is_refused_when_the_shardset_opens(
    sample_shards: Path, tmp_path: Path
) -> None:
    shards, tar = _copy(sample_shards, tmp_path / "shards")
    full = tar.stat().st_size
    ShardSet(shards)  # intact: opens
    with tar.open("r+b") as f:
        f.truncate(full // 2)  # an interrupted copy
    for source in (shards, tar):  # with shards.json, and the tar with its .idx alone
        with pytest.raises(CorruptShardError, match="truncated") as err:
            ShardSet(source)
        msg = str(err.value)
        assert msg.startswith(f"{tar}: ") and "\n" not in msg
    tar.with_suffix(".idx").unlink()  # no .idx: the tar headers are scanned
    with pytest.raises(CorruptShardError, match=f"^{tar}: "):
        ShardSet(tar)


def test_shard_shorter_than_shards_json_records_is_refused(
    sample_shards: Path, tmp_path: Path
) -> None:
    """Only the tar's end-of-archive blocks lost: every sample still reads, but the file is not
    the one ``pathflow tile`` wrote (shards.json has its size)."""
    shards, tar = _copy(sample_shards, tmp_path / "shards")
    full = tar.stat().st_size
    with tar.open("r+b") as f:
        f.truncate(full - 1024)
    recorded = f"{full - 1024} bytes, shards.json recorded {full}"
    with pytest.raises(CorruptShardError, match=recorded):
        ShardSet(shards)
    assert len(ShardSet(tar)) == 43  # the tar alone: its index still fits


def test_corrupt_json_of_a_slides_first_sample_keeps_neighbour_positives(
    sample_shards: Path, tmp_path: Path
) -> None:
    """Neighbour positives check the key-parsed positions against one ``.json`` per slide:
    when the slide's first sample has a corrupt one, the next sample's is used, and the
    corrupt sample is skipped as an anchor like any other."""
    shards, tar = _copy(sample_shards, tmp_path / "shards")
    first = int(np.argmin(ShardSet(tar).shards[0].meta_off))  # the slide's first sample
    bad = _overwrite_json(tar, first, b"{truncated")
    loader = make_loader(
        shards, views="simclr", batch_size=43, backend="torch", num_workers=0, device="cpu",
        shuffle=False, drop_last=False, positives="neighbour",
    )  # fmt: skip
    assert loader.neighbours is not None
    (batch,) = list(loader)
    assert loader.stats["skipped"] == 1 and bad not in batch.meta["key"]
    anchors = batch.meta["index"].tolist()
    partners = batch.meta["partner_index"].tolist()
    ss = ShardSet(shards)
    step = 257  # the tiler's level-0 step on cmu-small (keys ..._771_0, ..._1028_0)
    for a, p in zip(anchors, partners, strict=True):  # a partner of the same slide, nearby
        (_, ax, ay), (_, px, py) = _position(ss.key_of(a)), _position(ss.key_of(p))
        assert a != p and max(abs(ax - px), abs(ay - py)) <= 2 * step, (a, p)
