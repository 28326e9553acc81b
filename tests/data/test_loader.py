"""make_loader end to end on the real sample shards (torch backend; DALI parity at the end)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pathflow.data import ShardSet, ViewsSpec, create_views, make_loader  # noqa: E402
from pathflow.data.views import apply_d4  # noqa: E402

PLAIN = replace(create_views("simclr").groups[0], count=2, jitter=0.0, grayscale=0.0, blur=0.0)


def keys_of(loader: object) -> list[str]:
    return [k for b in loader for k in b.meta["key"]]  # type: ignore[attr-defined]


def test_dino_batches_shapes_and_meta(sample_shards: Path) -> None:
    loader = make_loader(
        sample_shards, views="dino", batch_size=8, backend="torch", device="cpu", num_workers=0
    )
    assert len(loader) == 43 // 8
    batches = list(loader)
    assert len(batches) == 5 and [b.index for b in batches] == list(range(5))
    b = batches[0]
    assert [tuple(v.shape) for v in b.views] == [(8, 3, 224, 224)] * 2 + [(8, 3, 96, 96)] * 8
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in b.views)
    # normalised: roughly zero-centred, unit-ish spread, not the raw [0, 1] range
    assert b.views[0].min() < -0.5 and b.views[0].max() > 1.0
    assert b.meta["slide"] == ["cmu_small_region"] * 8
    assert b.meta["label"].tolist() == [-1] * 8 and b.meta["x"].dtype == torch.int64
    assert loader.stats["samples"] == 40 and loader.stats["skipped"] == 0
    assert loader.epoch == 1  # the epoch advanced at the end


def test_uint8_crops_match_pil_reference(sample_shards: Path) -> None:
    import io

    from PIL import Image

    spec = ViewsSpec((replace(PLAIN, vflip=0.5, rot90=0.75),), name="plain")
    loader = make_loader(
        sample_shards,
        views=spec,
        batch_size=6,
        backend="torch",
        device="cpu",
        num_workers=0,
        output="uint8",
        shuffle=False,
    )
    from pathflow.data.loader import Plan, build_raw_batch

    plan = Plan(loader.shardset, loader.cfg, 0)
    raw = build_raw_batch(
        loader.shardset, plan.indices(0), spec, seed=0, epoch=0, rank=0, index=0, stain_stats=None
    )
    assert raw is not None
    batch = next(iter(loader))
    images, _ = ShardSet(sample_shards).read(plan.indices(0))
    for v, p in enumerate(raw.params):
        got = batch.views[v].permute(0, 2, 3, 1).numpy()
        for i, data in enumerate(images):
            x0, y0, w, h = p.box[i]
            ref = (
                Image.open(io.BytesIO(data))
                .convert("RGB")
                .resize((224, 224), Image.BILINEAR, box=(x0, y0, x0 + w, y0 + h))
            )
            ref_a = apply_d4(np.asarray(ref), int(p.d4[i]))
            diff = np.abs(got[i].astype(int) - ref_a.astype(int))
            assert diff.mean() < 0.6 and diff.max() <= 3


def test_batches_do_not_depend_on_worker_count(sample_shards: Path) -> None:
    runs = []
    for workers in (0, 2):
        loader = make_loader(
            sample_shards,
            views="pathology-dino",
            batch_size=8,
            backend="torch",
            device="cpu",
            num_workers=workers,
            seed=3,
        )
        runs.append(list(loader))
    assert len(runs[0]) == len(runs[1]) == 5
    for a, b in zip(*runs, strict=False):
        assert a.meta["key"] == b.meta["key"]
        for va, vb in zip(a.views, b.views, strict=False):
            assert torch.equal(va, vb)


def test_resume_mid_epoch_gives_the_same_batches(sample_shards: Path) -> None:
    kw = dict(views="simclr", batch_size=4, backend="torch", device="cpu", num_workers=2, seed=9)
    full = make_loader(sample_shards, **kw)  # type: ignore[arg-type]
    full.set_epoch(1)
    ref = list(full)
    part = make_loader(sample_shards, **kw)  # type: ignore[arg-type]
    part.set_epoch(1)
    it = iter(part)
    for _ in range(3):
        next(it)
    state = part.state_dict()
    assert state == {**state, "epoch": 1, "batch": 3}
    resumed = make_loader(sample_shards, **kw)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    resumed.set_epoch(1)  # a trainer calling set_epoch for the same epoch keeps the position
    rest = list(resumed)
    assert [b.index for b in rest] == list(range(3, len(ref)))
    for a, b in zip(ref[3:], rest, strict=False):
        assert a.meta["key"] == b.meta["key"]
        assert all(torch.equal(x, y) for x, y in zip(a.views, b.views, strict=False))
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(sample_shards, **{**kw, "batch_size": 5}).load_state_dict(state)  # type: ignore[arg-type]


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_and_workers_visit_every_sample_once(sample_shards: Path, world: int) -> None:
    seen: list[str] = []
    for rank in range(world):
        loader = make_loader(
            sample_shards,
            views="eval",
            batch_size=5,
            backend="torch",
            device="cpu",
            num_workers=2,
            rank=rank,
            world_size=world,
            drop_last=False,
            output="uint8",
        )
        seen += keys_of(loader)
    assert sorted(seen) == sorted(ShardSet(sample_shards).shards[0].keys)
    lens = []
    for rank in range(world):
        loader = make_loader(
            sample_shards,
            views="eval",
            batch_size=4,
            backend="torch",
            device="cpu",
            num_workers=0,
            rank=rank,
            world_size=world,
            output="uint8",
        )
        lens.append(len(list(loader)))
    assert len(set(lens)) == 1  # drop_last keeps ranks in lock-step


def corrupt_shards(tmp: Path, sample_shards: Path) -> Path:
    import webdataset as wds

    good, metas = ShardSet(sample_shards).read(np.arange(10))
    with wds.TarWriter(str(tmp / "000000.tar")) as w:
        for i, (img, _meta) in enumerate(zip(good, metas, strict=False)):
            if i == 3:
                img = img[: len(img) // 2]  # truncated
            if i == 7:
                img = b"\x00garbage" * 100
            w.write({"__key__": f"s{i:02d}", "jpg": img, "cls": i % 2})
    return tmp


def test_corrupt_jpegs_are_skipped_and_counted(
    tmp_path: Path, sample_shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = corrupt_shards(tmp_path, sample_shards)
    with caplog.at_level(logging.WARNING, logger="pathflow.data"):
        loader = make_loader(
            src,
            views="simclr",
            batch_size=5,
            backend="torch",
            device="cpu",
            num_workers=0,
            drop_last=False,
            shuffle=False,
        )
        batches = list(loader)
    assert [len(b) for b in batches] == [5, 5]
    assert loader.stats["skipped"] == 2 and sorted(loader.skipped_keys) == ["s03", "s07"]
    assert "s03" in caplog.text and "truncated" in caplog.text.lower()
    labels = torch.cat([b.meta["label"] for b in batches]).tolist()
    assert set(labels) <= {0, 1} and "s03" not in batches[0].meta["key"]


def test_pathology_views_fit_stain_stats(sample_shards: Path) -> None:
    loader = make_loader(
        sample_shards,
        views="pathology",
        batch_size=8,
        backend="torch",
        device="cpu",
        num_workers=0,
        output="bfloat16",
    )
    st = loader.stain_stats
    assert st is not None and 40 < st.mean_mean[0] < 95 and st.mean_mean[1] > 0  # pink H&E
    b = next(iter(loader))
    assert b.views[0].dtype == torch.bfloat16 and b.views[0].shape == (8, 3, 224, 224)


def test_bad_arguments(sample_shards: Path) -> None:
    with pytest.raises(ValueError, match="output"):
        make_loader(sample_shards, output="half")
    with pytest.raises(ValueError, match="no batch"):
        make_loader(sample_shards, views="simclr", batch_size=64, backend="torch")
    with pytest.raises(ValueError, match="rank"):
        make_loader(sample_shards, views="simclr", batch_size=4, rank=2, world_size=2)


@pytest.mark.parametrize("views", ["simclr", "pathology-dino"])
def test_dali_cpu_and_torch_backends_agree(sample_shards: Path, views: str) -> None:
    pytest.importorskip("nvidia.dali")
    runs = {}
    for backend in ("torch", "dali"):
        loader = make_loader(sample_shards, views=views, batch_size=8, backend=backend,
                             device="cpu", num_workers=2, seed=11)  # fmt: skip
        runs[backend] = [next(iter(loader))]
    a, b = runs["torch"][0], runs["dali"][0]
    assert a.meta["key"] == b.meta["key"] and a.index == b.index == 0
    for va, vb in zip(a.views, b.views, strict=True):
        assert va.shape == vb.shape and va.dtype == vb.dtype == torch.float32
        # same crops, flips and colour parameters: per-pixel agreement up to resampling at
        # image borders and float rounding (normalised units: 1/255 is about 0.017)
        assert (va - vb).abs().mean() < 0.03
        np.testing.assert_allclose(va.mean((0, 2, 3)), vb.mean((0, 2, 3)), atol=0.02)


def test_state_saved_after_the_last_batch_resumes_with_the_next_epoch(sample_shards: Path) -> None:
    kw = dict(views="eval", batch_size=8, backend="torch", device="cpu", num_workers=0)
    a = make_loader(sample_shards, **kw)  # type: ignore[arg-type]
    it = iter(a)
    for _ in range(len(a)):
        next(it)
    state = a.state_dict()  # saved inside the loop, after the epoch's last batch
    assert state["epoch"] == 0 and state["batch"] == len(a)
    b = make_loader(sample_shards, **kw)  # type: ignore[arg-type]
    b.load_state_dict(state)
    first = next(iter(b))
    assert first.epoch == 1 and first.index == 0
    c = make_loader(sample_shards, **kw)  # type: ignore[arg-type]
    c.set_epoch(1)
    assert next(iter(c)).meta["key"] == first.meta["key"]
