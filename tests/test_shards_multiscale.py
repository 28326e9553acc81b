"""``pathflow tile --shards --shard-mpps 0.5,1,2``: one sample per grid position holding the
same spot at several resolutions, each read as the single-resolution path reads it."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from pathflow.cli import main
from pathflow.slide import open_slide
from pathflow.tiling.config import TileConfig
from PIL import Image
from test_shards import all_samples, make_pyramid, tar_samples

EXTS = {"jpg", "json", "mpp1.jpg", "mpp2.jpg"}


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def jpeg_q90(rgb: np.ndarray) -> np.ndarray:
    """What the single-resolution path's encoder gives (libjpeg-turbo q90, 4:4:4)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90, subsampling=0)
    return np.asarray(Image.open(buf))


@pytest.fixture(scope="module")
def x40(tmp_path_factory: pytest.TempPathFactory, cmu_rgb: np.ndarray) -> tuple[Path, Path]:
    """A 0.25 um/px pyramid (levels: 1, 4) from a real tissue crop, tiled at 0.5, 1 and 2."""
    tmp = tmp_path_factory.mktemp("x40")
    crop = cmu_rgb[:1280, :1280]
    big = np.asarray(Image.fromarray(crop).resize((2560, 2560), Image.Resampling.BICUBIC))
    slide = tmp / "x40.svs"
    make_pyramid(slide, big, 0.25)
    out = tmp / "out"
    args = ("tile", slide, "--out", out, "--shards", "--shard-mpps", "0.5,1,2",
            "--shard-samples", "4", "-q", "--no-overlay")  # fmt: skip
    assert run_cli(*args) == 0
    return slide, out


def test_each_scale_is_read_region_resized(x40: tuple[Path, Path]) -> None:
    """Every entry equals OpenSlide's region at the level the single-resolution path picks
    (hand-computed here), area-resized to 256 and JPEG-encoded at q90, and is centred on
    the centre of the finest patch."""
    slide, out = x40
    samples = all_samples(out / "shards")
    assert len(samples) > 10
    # 0.25 um/px slide, 256 px: level-0 footprints 512 (0.5), 1024 (1.0), 2048 (2.0); levels
    # have downsamples 1 and 4, so 0.5 -> level 0 (read 512), 1 -> level 1 (read 256),
    # 2 -> level 1 (read 512). Centred: top-left shifts 0, -256, -768.
    plan = {"jpg": (0, 512, 0, 512), "mpp1.jpg": (1, 256, -256, 1024),
            "mpp2.jpg": (1, 512, -768, 2048)}  # fmt: skip
    diffs: dict[str, list[int]] = {e: [] for e in plan}
    with open_slide(slide, backend="openslide") as s:
        assert s.level_downsamples == (1.0, 4.0)
        for key, files in samples.items():
            assert "." not in key and set(files) == EXTS
            meta = json.loads(files["json"])
            x, y = meta["x"], meta["y"]
            assert key == f"x40_{x}_{y}" and x % 512 == 0 and y % 512 == 0
            assert meta["mpps"] == [0.5, 1.0, 2.0]
            assert meta["scale_exts"] == ["jpg", "mpp1.jpg", "mpp2.jpg"]
            assert meta["scale_levels"] == [0, 1, 1]
            boxes = [[x + plan[e][2], y + plan[e][2], plan[e][3]] for e in plan]
            assert meta["scale_boxes"] == boxes
            centres = {(bx + side / 2, by + side / 2) for bx, by, side in boxes}
            assert centres == {(x + 256, y + 256)}
            for ext, (level, read, shift, _) in plan.items():
                img = decode(files[ext])
                assert img.shape == (256, 256, 3)
                region = s.read_region((x + shift, y + shift), level, (read, read))
                if read != 256:
                    region = cv2.resize(region, (256, 256), interpolation=cv2.INTER_AREA)
                diffs[ext].append(int(np.abs(img.astype(int) - jpeg_q90(region)).max()))
    # Same tolerance as the single-resolution shard tests (test_shards.py).
    for ext, d in diffs.items():
        assert max(d) <= 8 and np.median(d) == 0, (ext, d)


def best_offset(coarse: np.ndarray, fine: np.ndarray, factor: int) -> tuple[int, int]:
    """Shift (dx, dy) in coarse pixels at which the finest patch, area-downsampled by
    ``factor``, best matches the coarse patch around its centre."""
    small = cv2.resize(fine, (256 // factor,) * 2, interpolation=cv2.INTER_AREA).astype(float)
    n = small.shape[0]
    c0 = 128 - n // 2
    errs = {}
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            crop = coarse[c0 + dy : c0 + dy + n, c0 + dx : c0 + dx + n].astype(float)
            errs[(dx, dy)] = float(np.mean((crop - small) ** 2))
    return min(errs, key=errs.__getitem__)


def test_centres_coincide_in_pixels(tmp_path: Path, cmu_path: Path) -> None:
    """On the 0.499 um/px single-level sample (non-integer footprints 257 / 513 / 1026), the
    finest patch shrunk by 2 and 4 lands on the middle of the coarser patches (pixel
    content, not metadata), within half a coarse pixel of rounding."""
    out = tmp_path / "out"
    assert run_cli("tile", cmu_path, "--out", out, "--shards", "--shard-mpps", "0.5,1,2",
                   "-q", "--no-overlay") == 0  # fmt: skip
    samples = all_samples(out / "shards")
    assert len(samples) == 43  # as the single-resolution run (test_shards)
    with open_slide(cmu_path, backend="openslide") as s:
        for files in list(samples.values())[::4]:
            meta = json.loads(files["json"])
            fine = decode(files["jpg"])
            assert best_offset(decode(files["mpp1.jpg"]), fine, 2) == (0, 0)
            assert best_offset(decode(files["mpp2.jpg"]), fine, 4) == (0, 0)
            # Level-0 footprints round(256 * m / 0.499), centred within half a pixel.
            sides = [b[2] for b in meta["scale_boxes"]]
            assert sides == [257, 513, 1026] and meta["scale_levels"] == [0, 0, 0]
            cx = [b[0] + b[2] / 2 for b in meta["scale_boxes"]]
            assert max(cx) - min(cx) <= 0.5
            # The coarsest entry, partly outside the slide near the edges, is white there.
            bx, by, side = meta["scale_boxes"][2]
            region = s.read_region((bx, by), 0, (side, side))
            want = jpeg_q90(cv2.resize(region, (256, 256), interpolation=cv2.INTER_AREA))
            got = decode(files["mpp2.jpg"])
            assert np.abs(got.astype(int) - want).max() <= 8


def test_reader_source_slide_lossless(tmp_path: Path, ink_path: Path) -> None:
    """A flat JPEG (read through the slide readers, not the native TIFF path), stored as PNG:
    every entry is the reader's region (white past the edges) block-averaged by hand
    (factors 1, 2, 4) to +-1 (rounding), and the entry names follow the format."""
    out = tmp_path / "out"
    args = ("tile", ink_path, "--slide-mpp", "0.5", "--out", out, "--shards", "--shard-mpps",
            "0.5,1,2", "--format", "png", "-q", "--no-overlay")  # fmt: skip
    assert run_cli(*args) == 0
    samples = all_samples(out / "shards")
    assert len(samples) > 10
    with open_slide(ink_path) as s:
        for files in list(samples.values())[::3]:
            meta = json.loads(files["json"])
            x, y = meta["x"], meta["y"]
            assert set(files) == {"png", "json", "mpp1.png", "mpp2.png"}
            assert meta["scale_exts"] == ["png", "mpp1.png", "mpp2.png"]
            # 0.5 um/px, one level: footprints 256, 512, 1024 centred on (x + 128, y + 128).
            boxes = [[x, y, 256], [x - 128, y - 128, 512], [x - 384, y - 384, 1024]]
            assert meta["scale_boxes"] == boxes
            for ext, (bx, by, side) in zip(meta["scale_exts"], boxes, strict=True):
                f = side // 256
                region = s.read_region((bx, by), 0, (side, side)).astype(float)
                want = region.reshape(256, f, 256, f, 3).mean(axis=(1, 3))
                assert np.abs(decode(files[ext]) - want).max() <= 1, (ext, bx, by)


def test_single_resolution_and_passthrough_unchanged(tmp_path: Path, cmu_path: Path) -> None:
    """The finest entry is byte for byte the single-resolution run's (here native tiles
    passed through: 240 px at the slide's 0.499 um/px), and a run without --shard-mpps
    writes no multi-scale keys."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    base = ("tile", cmu_path, "--shards", "--patch", "240", "-q", "--no-overlay")
    assert run_cli(*base, "--mpp", "0.499", "--out", single) == 0
    assert run_cli(*base, "--shard-mpps", "0.499,1", "--out", multi) == 0
    a, b = all_samples(single / "shards"), all_samples(multi / "shards")
    assert a.keys() == b.keys() and len(a) > 20
    raw = cmu_path.read_bytes()
    for key in a:
        assert b[key]["jpg"] == a[key]["jpg"] and raw.find(a[key]["jpg"][-2000:]) > 0
        assert set(a[key]) == {"jpg", "json"} and set(b[key]) == {"jpg", "json", "mpp1.jpg"}
        ma, mb = json.loads(a[key]["json"]), json.loads(b[key]["json"])
        assert "mpps" not in ma and {k: mb[k] for k in ma} == ma
        assert mb["scale_boxes"][1][2] == round(240 / 0.499)
    summary = json.loads((single / "shards" / "shards.json").read_text())
    assert "mpps" not in summary
    summary = json.loads((multi / "shards" / "shards.json").read_text())
    assert summary["mpps"] == [0.499, 1.0] and summary["scale_exts"] == ["jpg", "mpp1.jpg"]


def test_webdataset_reader_and_dali_index(x40: tuple[Path, Path]) -> None:
    import webdataset as wds

    sdir = x40[1] / "shards"
    tars = sorted(sdir.glob("*.tar"))
    ds = wds.WebDataset([str(p) for p in tars], shardshuffle=False).decode("rgb8")
    n = 0
    for sample in ds:
        assert set(sample) >= EXTS
        assert all(sample[e].shape == (256, 256, 3) for e in EXTS - {"json"})
        assert sample["json"]["x"] == int(sample["__key__"].rsplit("_", 2)[1])
        n += 1
    assert n == json.loads((sdir / "shards.json").read_text())["samples"]
    # The DALI index lists every entry at its offset in the tar.
    lines = tars[0].with_suffix(".idx").read_text().splitlines()
    assert lines[0] == f"v1.2 {len(lines) - 1}"
    with tarfile.open(tars[0]) as tf:
        where = {m.name: (m.offset_data, m.size) for m in tf.getmembers()}
    for line in lines[1:]:
        parts = line.split()
        assert [p for p in parts[::4]] == ["jpg", "json", "mpp1.jpg", "mpp2.jpg"]
        for off, size, name in zip(parts[1::4], parts[2::4], parts[3::4], strict=True):
            assert where[name] == (int(off), int(size))


def test_dali_reads_every_scale_with_our_index(x40: tuple[Path, Path]) -> None:
    pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    sdir = x40[1] / "shards"
    tars = [str(p) for p in sorted(sdir.glob("*.tar"))]
    n = json.loads((sdir / "shards.json").read_text())["samples"]
    exts = ["jpg", "mpp1.jpg", "mpp2.jpg"]

    @pipeline_def(batch_size=n, num_threads=2, device_id=None)
    def pipe():  # type: ignore[no-untyped-def]
        *images, meta = fn.readers.webdataset(
            paths=tars, index_paths=[t.replace(".tar", ".idx") for t in tars],
            ext=[*exts, "json"], missing_component_behavior="error",
        )  # fmt: skip
        return (*(fn.decoders.image(i, device="cpu") for i in images), meta)

    p = pipe()
    p.build()
    *images, metas = p.run()
    samples = all_samples(sdir)
    for i in range(n):
        meta = json.loads(bytes(np.asarray(metas.at(i))).decode())
        files = samples[f"x40_{meta['x']}_{meta['y']}"]
        for ext, batch in zip(exts, images, strict=True):
            got = np.asarray(batch.at(i)).astype(int)
            assert got.shape == (256, 256, 3)
            assert np.abs(got - decode(files[ext])).max() <= 2  # libjpeg-turbo either way


def test_unreadable_coarse_tile_drops_only_its_samples(
    x40: tuple[Path, Path], tmp_path: Path
) -> None:
    """A wiped level-1 tile: exactly the samples whose coarser regions touch it are left out
    (a sample has all its resolutions or none), the slide is reported failed."""
    import csv

    import h5py
    import tifffile

    slide = tmp_path / "x40.svs"
    slide.write_bytes(x40[0].read_bytes())
    out = tmp_path / "out"
    args = ("tile", slide, "--out", out, "-q", "--no-overlay")
    assert run_cli(*args) == 0  # coordinates first: the mask is read from level 1
    with tifffile.TiffFile(slide) as tf:
        page = tf.pages[2]  # level 1 (after level 0 and the thumbnail): 640 px, 3 x 3 tiles
        assert page.imagewidth == 640
        off, n = int(page.dataoffsets[8]), int(page.databytecounts[8])
    data = bytearray(slide.read_bytes())
    data[off : off + n] = b"\x00" * n  # tile (2, 2): level-1 pixels [512, 640)^2
    slide.write_bytes(bytes(data))
    args = (*args, "--shards", "--shard-mpps", "0.5,1,2")
    assert run_cli(*args) == 1
    with open(out / "manifest.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert row["status"] == "failed" and "tile" in row["error"]
    with h5py.File(out / "coords" / "x40.h5") as f:
        coords = f["coords"][:].tolist()

    # Level-1 regions: mpp 1 -> 256 px at (x - 256) / 4, mpp 2 -> 512 px at (x - 768) / 4.
    def touches(x: int, y: int) -> bool:
        return any(
            (x + shift) // 4 + read > 512 and (y + shift) // 4 + read > 512
            for shift, read in ((-256, 256), (-768, 512))
        )

    want = {f"x40_{x}_{y}" for x, y in coords if not touches(x, y)}
    got = all_samples(out / "shards")
    assert set(got) == want and 0 < len(want) < len(coords)
    assert all(set(f) == EXTS for f in got.values())


def test_resume_and_idempotence(x40: tuple[Path, Path], tmp_path: Path) -> None:
    """Shards removed after a crash are rewritten identically; a re-run changes nothing;
    other mpps are refused without --overwrite."""
    slide, ref = x40
    out = tmp_path / "out"
    args = ["tile", str(slide), "--out", str(out), "--shards", "--shard-mpps", "0.5,1,2",
            "--shard-samples", "4", "-q", "--no-overlay"]  # fmt: skip
    assert run_cli(*args) == 0
    sdir = out / "shards"
    tars = sorted(sdir.glob("*.tar"))
    assert len(tars) >= 3
    want = {p.name: p.read_bytes() for p in sorted((ref / "shards").glob("*.[ti][ad]*"))}
    # A crash: the last two shards lost, a temporary left behind.
    for p in tars[-2:]:
        p.unlink()
    tars[-1].with_suffix(".idx").unlink()
    (sdir / f".{tars[-1].name}.tmp").write_bytes(b"partial")
    assert run_cli(*args) == 0
    got = {p.name: p.read_bytes() for p in sorted(sdir.glob("*.[ti][ad]*"))}
    assert got == want
    assert not [p for p in sdir.iterdir() if p.name.startswith(".")]
    mtimes = [p.stat().st_mtime_ns for p in sorted(sdir.glob("*.tar"))]
    assert run_cli(*args) == 0
    assert [p.stat().st_mtime_ns for p in sorted(sdir.glob("*.tar"))] == mtimes
    other = [a if a != "0.5,1,2" else "0.5,1" for a in args]
    assert run_cli(*other) == 1
    first = tar_samples(sorted(sdir.glob("*.tar"))[0])
    assert all(set(f) == EXTS for f in first.values())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"mpp": 0.25}, "differs from the finest"),
        ({"shard_mpps": [1.0, 0.5]}, "strictly increasing"),
        ({"shard_mpps": [0.5, 0.5]}, "strictly increasing"),
        ({"region": 1024}, "--region"),
    ],
)
def test_config_errors(extra: dict[str, object], message: str) -> None:
    from pathflow.exceptions import ConfigError

    values = {"inputs": ["x"], "shards": True, "shard_mpps": [0.5, 1.0, 2.0], **extra}
    with pytest.raises(ConfigError, match=message):
        TileConfig.build({}, values)


def test_config_sets_grid_mpp() -> None:
    cfg = TileConfig.build({}, {"inputs": ["x"], "shard_mpps": [0.25, 1.0]})
    assert cfg.mpp == 0.25 and cfg.grid_params().mpp == 0.25
    assert cfg.shard_params().mpps == [0.25, 1.0]
    assert TileConfig.build({}, {"inputs": ["x"]}).shard_params().mpps == []
