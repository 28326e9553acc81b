"""``make_loader(positives=...)``: neighbour and multi-scale positive pairs on real patches.

The pixels of each view are checked against PIL's decode of the image it must come from (the
anchor or its partner), partners against a brute-force neighbour search, and resuming against
an uninterrupted epoch. The multi-scale shards are built here by hand in the documented layout
(``<key>.jpg`` + ``<key>.mpp1.jpg`` + ``<key>.mpp2.jpg``, JSON ``mpps``/``scale_exts``) from
real regions of the sample slide read at 2x and 4x the patch's level-0 extent.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pathflow.data import ShardSet, ViewSpec, ViewsSpec, create_views, make_loader  # noqa: E402
from pathflow.data.neighbours import NeighbourIndex  # noqa: E402

# Whole image, no flip or colour change, uint8 out: a view is the decoded image itself.
FULL = ViewsSpec((ViewSpec(size=256, count=2, crop="full", hflip=0.0),), name="full")
SMALL = create_views("simclr", global_size=32)  # SimCLR's augmentations, cheap to compute


def decode(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_same_image(view: torch.Tensor, ref: np.ndarray) -> None:
    got = view.permute(1, 2, 0).numpy().astype(int)
    diff = np.abs(got - ref.astype(int))
    assert diff.mean() < 0.6 and diff.max() <= 3  # decoder rounding only


@pytest.fixture(scope="module")
def multiscale_shards(
    tmp_path_factory: pytest.TempPathFactory, sample_shards: Path, cmu_path: Path
) -> Path:
    """The first 13 samples of ``sample_shards`` with ``mpp1.jpg``/``mpp2.jpg`` entries
    (level-0 regions of 2x / 4x the patch side, same centre, resized to 256 px); the last
    sample has none."""
    from pathflow.slide import open_slide
    from PIL import Image

    out = tmp_path_factory.mktemp("multiscale") / "shards"
    out.mkdir()
    ss = ShardSet(sample_shards)
    images, metas = ss.read(np.arange(13))
    with (
        open_slide(cmu_path, backend="openslide") as slide,
        tarfile.open(out / "ms-000000.tar", "w") as tf,
    ):
        for i, (img, m) in enumerate(zip(images, metas, strict=True)):
            meta = ss.read_json(i)
            side = int(meta["patch_size_level0"])
            entries = {"jpg": img}
            if i < 12:
                meta["mpps"] = [0.5, 1.0, 2.0]
                meta["scale_exts"] = ["jpg", "mpp1.jpg", "mpp2.jpg"]
                cx, cy = m["x"] + side // 2, m["y"] + side // 2
                for f, ext in ((2, "mpp1.jpg"), (4, "mpp2.jpg")):
                    region = slide.read_region((cx - f * side // 2, cy - f * side // 2), 0,
                                               (f * side, f * side))  # fmt: skip
                    buf = io.BytesIO()
                    Image.fromarray(region).resize((256, 256), Image.BILINEAR).save(
                        buf, "JPEG", quality=90
                    )
                    entries[ext] = buf.getvalue()
            entries["json"] = json.dumps(meta).encode()
            for ext, data in entries.items():
                info = tarfile.TarInfo(f"{m['key']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out


def test_meta_index_is_the_global_sample_index(sample_shards: Path) -> None:
    ss = ShardSet(sample_shards)
    backends = ["torch", "dali"] if _has_dali() else ["torch"]
    for backend in backends:
        loader = make_loader(ss, views=SMALL, batch_size=8, backend=backend, device="cpu",
                             num_workers=2 if backend == "torch" else 1, seed=5)  # fmt: skip
        seen = []
        for b in loader:
            assert b.meta["index"].dtype == torch.int64
            assert [ss.key_of(int(i)) for i in b.meta["index"]] == b.meta["key"]
            seen += b.meta["index"].tolist()
        assert len(set(seen)) == len(seen) == 40


def _has_dali() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def test_neighbour_pairs_are_neighbours_with_their_pixels(sample_shards: Path) -> None:
    ss = ShardSet(sample_shards)
    radius = 1.0
    loader = make_loader(ss, views=FULL, batch_size=8, backend="torch", device="cpu",
                         num_workers=0, output="uint8", positives="neighbour",
                         neighbour_radius=radius, seed=2)  # fmt: skip
    # brute force from the samples' own JSON: step = patch_size_level0 (no overlap)
    _, metas = ss.read(np.arange(len(ss)))
    x = np.asarray([m["x"] for m in metas])
    y = np.asarray([m["y"] for m in metas])
    step = ss.read_json(0)["patch_size_level0"]
    cheb = np.maximum(np.abs(x[:, None] - x[None, :]), np.abs(y[:, None] - y[None, :])) / step
    has = ((cheb > 0) & (cheb <= radius)).any(axis=1)
    alone_seen = 0
    for b in loader:
        assert [tuple(v.shape) for v in b.views] == [(8, 3, 256, 256)] * 2
        a_idx, p_idx = b.meta["index"].numpy(), b.meta["partner_index"].numpy()
        p_images, p_metas = ss.read(p_idx)
        a_images, _ = ss.read(a_idx)
        for i, (a, p) in enumerate(zip(a_idx, p_idx, strict=True)):
            if has[a]:
                assert p_metas[i]["slide"] == metas[a]["slide"] and 0 < cheb[a, p] <= radius
            else:
                assert p == a
                alone_seen += 1
            assert_same_image(b.views[0][i], decode(a_images[i]))  # view 0: the anchor
            assert_same_image(b.views[1][i], decode(p_images[i]))  # view 1: the partner
    assert loader.stats["no_partner"] == alone_seen > 0  # cmu-small has an isolated patch
    assert (~has).sum() >= 1


def test_resume_and_workers_give_identical_pairs(sample_shards: Path) -> None:
    kw = dict(views=SMALL, batch_size=8, backend="torch", device="cpu", num_workers=0,
              seed=9, positives="neighbour")  # fmt: skip
    full = make_loader(sample_shards, **kw)  # type: ignore[arg-type]
    full.set_epoch(1)
    ref = list(full)
    part = make_loader(sample_shards, **{**kw, "num_workers": 1})  # type: ignore[arg-type]
    part.set_epoch(1)
    it = iter(part)
    for _ in range(2):
        next(it)
    state = part.state_dict()
    assert state["positives"] == "neighbour" and state["batch"] == 2
    resumed = make_loader(sample_shards, **kw)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [b.index for b in rest] == list(range(2, len(ref)))
    for a, b in zip(ref[2:], rest, strict=True):
        assert torch.equal(a.meta["partner_index"], b.meta["partner_index"])
        assert all(torch.equal(u, v) for u, v in zip(a.views, b.views, strict=True))
    # another epoch draws other partners; resuming with other positives is refused
    other = make_loader(sample_shards, **kw)  # type: ignore[arg-type]
    other.set_epoch(2)
    pairs1 = torch.cat([b.meta["partner_index"] for b in ref])
    pairs2 = torch.cat([b.meta["partner_index"] for b in other])
    assert not torch.equal(pairs1, pairs2)
    with pytest.raises(ValueError, match="positives"):
        make_loader(sample_shards, **{**kw, "positives": "augment"}).load_state_dict(state)  # type: ignore[arg-type]


def test_dali_cpu_pairs_agree_with_torch(sample_shards: Path) -> None:
    pytest.importorskip("nvidia.dali")
    runs = {}
    for backend in ("torch", "dali"):
        views = create_views("dino", global_size=64, local_size=32, num_local=2)
        loader = make_loader(sample_shards, views=views, batch_size=8, backend=backend,
                             device="cpu", num_workers=1, seed=4,
                             positives="neighbour")  # fmt: skip
        runs[backend] = next(iter(loader))
    a, b = runs["torch"], runs["dali"]
    assert torch.equal(a.meta["partner_index"], b.meta["partner_index"])
    assert not torch.equal(a.meta["partner_index"], a.meta["index"])
    for va, vb in zip(a.views, b.views, strict=True):
        assert va.shape == vb.shape and (va - vb).abs().mean() < 0.03


def test_scale_pairs_read_the_other_magnification(multiscale_shards: Path) -> None:
    ss = ShardSet(multiscale_shards)
    assert ss.scale_exts == ["mpp1.jpg", "mpp2.jpg"]
    loader = make_loader(ss, views=FULL, batch_size=4, backend="torch", device="cpu",
                         num_workers=0, output="uint8", positives="scale", seed=1,
                         drop_last=False)  # fmt: skip
    last = len(ss) - 1
    chosen = []
    for b in loader:
        idx = b.meta["index"].numpy()
        mpp = b.meta["partner_mpp"].numpy()
        assert torch.equal(b.meta["partner_index"], b.meta["index"])
        exts = [None if np.isnan(m) else f"mpp{m:g}.jpg" for m in mpp]
        anchors = ss.read_images(idx)
        partners = ss.read_images(idx, exts)
        for i, j in enumerate(idx.tolist()):
            assert np.isnan(mpp[i]) == (j == last)  # the last sample has one scale only
            assert_same_image(b.views[0][i], decode(anchors[i]))
            assert_same_image(b.views[1][i], decode(partners[i]))
        chosen += [m for m in mpp.tolist() if not np.isnan(m)]
    assert loader.stats["no_partner"] == 1 and loader.stats["samples"] == len(ss)
    assert set(chosen) == {1.0, 2.0} and len(chosen) == 12
    # uniform between the two other scales: 400 epochs of one sample (binomial, 5 sigma)
    from pathflow.data.loader import draw_scales

    picks = [draw_scales(ss, np.array([3]), 1, e)[1][0] for e in range(400)]
    assert set(picks) == {1.0, 2.0} and abs(picks.count(1.0) - 200) <= 50


def test_pair_options_are_checked(sample_shards: Path) -> None:
    with pytest.raises(ValueError, match=r"mpp<v>\.jpg") as e:
        make_loader(sample_shards, views="simclr", batch_size=4, positives="scale")
    assert "\n" not in str(e.value) and str(sample_shards) in str(e.value)
    with pytest.raises(ValueError, match="two views"):
        make_loader(sample_shards, views="eval", batch_size=4, positives="neighbour")
    with pytest.raises(ValueError, match="positives"):
        make_loader(sample_shards, views="simclr", batch_size=4, positives="near")
    with pytest.raises(ValueError, match="radius"):
        make_loader(sample_shards, batch_size=4, positives="neighbour", neighbour_radius=0)


def test_index_from_loader_matches_partners(sample_shards: Path) -> None:
    """The loader's partners are the index's draws for (seed, epoch, anchor)."""
    views = create_views("byol", global_size=32)
    loader = make_loader(sample_shards, views=views, batch_size=8, backend="torch",
                         device="cpu", num_workers=0, positives="neighbour", seed=6)  # fmt: skip
    nb = NeighbourIndex.from_shards(sample_shards, radius=2)
    b = next(iter(loader))
    want, _ = nb.draw(b.meta["index"].numpy(), 6, 0)
    assert b.meta["partner_index"].tolist() == want.tolist()


@pytest.mark.parametrize(
    ("method", "positives"),
    [("simclr", "neighbour"), ("dino", "neighbour"),
     pytest.param("mocov2", "neighbour", marks=pytest.mark.slow),
     pytest.param("byol", "scale", marks=pytest.mark.slow)],
)  # fmt: skip
def test_train_with_pair_positives(
    request: pytest.FixtureRequest, tmp_path: Path, method: str, positives: str
) -> None:
    from pathflow.cli import main

    shards = request.getfixturevalue(
        "multiscale_shards" if positives == "scale" else "sample_shards"
    )

    opts = {
        "simclr": ["--simclr.proj-hidden-dim", "16", "--simclr.proj-dim", "8"],
        "mocov2": ["--mocov2.proj-hidden-dim", "16", "--mocov2.proj-dim", "8",
                   "--mocov2.queue-size", "8"],
        "byol": ["--byol.proj-hidden-dim", "16", "--byol.proj-dim", "8",
                 "--byol.pred-hidden-dim", "16"],
        "dino": ["--dino.out-dim", "32"],
    }  # fmt: skip
    out = tmp_path / "run"
    args = [
        "train", "--method", method, "--data", str(shards), "--out", str(out),
        "--arch", "test_vit", "--img-size", "32", "--global-size", "32", "--local-size", "16",
        "--num-local", "2", "--batch-size", "4", "--steps", "2", "--warmup-steps", "1",
        "--device", "cpu", "--precision", "fp32", "--loader-backend", "torch",
        "--num-workers", "0", "--log-every", "1", "--no-tensorboard", "-q",
        "--positives", positives, "--neighbour-radius", "1.5", *opts[method],
    ]  # fmt: skip
    torch.set_num_threads(1)
    assert main(args) == 0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(r["loss"]) for r in rows)
    text = (out / "config.yaml").read_text()
    assert f"positives: {positives}" in text and "neighbour_radius: 1.5" in text


@pytest.mark.slow
def test_scale_pairs_on_tiled_multiscale_shards(tmp_path: Path, cmu_path: Path) -> None:
    """``pathflow tile --shards --shard-mpps 0.5,1,2`` output read as scale pairs: view 1 is
    the decoded ``mpp1.jpg``/``mpp2.jpg`` entry that ``meta["partner_mpp"]`` names."""
    from pathflow.cli import main

    out = tmp_path / "out"
    args = ["tile", str(cmu_path), "--out", str(out), "--shards", "--shard-mpps", "0.5,1,2"]
    assert main([*args, "-q", "--no-overlay"]) == 0
    ss = ShardSet(out / "shards")
    assert ss.scale_exts == ["mpp1.jpg", "mpp2.jpg"] and ss.scale_mask(np.arange(len(ss))).all()
    loader = make_loader(ss, views=FULL, batch_size=8, backend="torch", device="cpu",
                         num_workers=0, output="uint8", positives="scale", seed=3)  # fmt: skip
    b = next(iter(loader))
    idx = b.meta["index"].numpy()
    exts = [f"mpp{m:g}.jpg" for m in b.meta["partner_mpp"].tolist()]
    assert set(exts) <= {"mpp1.jpg", "mpp2.jpg"}
    for i, data in enumerate(ss.read_images(idx, exts)):
        assert_same_image(b.views[1][i], decode(data))
    assert loader.stats["no_partner"] == 0


def test_corrupt_partner_is_replaced_by_its_anchor(
    tmp_path: Path, multiscale_shards: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    src = next(multiscale_shards.glob("*.tar"))
    bad_key = ShardSet(multiscale_shards).key_of(2)
    with tarfile.open(src) as tin, tarfile.open(tmp_path / "c-000000.tar", "w") as tout:
        for m in tin:
            data = tin.extractfile(m).read()  # type: ignore[union-attr]
            if m.name.startswith(f"{bad_key}.mpp"):
                data = b"\x00garbage" * 50
            m.size = len(data)
            tout.addfile(m, io.BytesIO(data))
    ss = ShardSet(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pathflow.data"):
        loader = make_loader(ss, views=FULL, batch_size=13, backend="torch", device="cpu",
                             num_workers=0, output="uint8", positives="scale",
                             shuffle=False, drop_last=False)  # fmt: skip
        (b,) = list(loader)
    mpp = b.meta["partner_mpp"].numpy()
    assert np.isnan(mpp[2]) and not np.isnan(mpp[1])
    assert_same_image(b.views[1][2], decode(ss.read_images(np.array([2]))[0]))  # the anchor
    assert loader.stats["skipped"] == 1 and loader.skipped_keys[0].startswith(f"{bad_key}.mpp")
    assert loader.stats["no_partner"] == 2  # the corrupt one and the sample without scales
    assert "corrupt partner" in caplog.text
