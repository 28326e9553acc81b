"""``pathflow tile --shards``: WebDataset shards read back by tar, webdataset and DALI."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from pathflow.cli import main
from pathflow.slide import open_slide
from PIL import Image


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return {r["slide"]: r for r in csv.DictReader(f)}


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            data = tf.extractfile(m)
            assert data is not None
            samples.setdefault(key, {})[ext] = data.read()
    return samples


def all_samples(sdir: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for t in sorted(sdir.glob("*.tar")):
        out.update(tar_samples(t))
    return out


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def cmu_shards(tmp_path_factory: pytest.TempPathFactory, cmu_path: Path) -> Path:
    out = tmp_path_factory.mktemp("shards")
    args = ("tile", cmu_path, "--out", out, "--shards", "--shard-samples", "16", "-q")
    assert run_cli(*args) == 0
    return out


def test_layout_counts_and_summary(cmu_shards: Path) -> None:
    sdir = cmu_shards / "shards"
    tars = sorted(p.name for p in sdir.glob("*.tar"))
    # 43 patches (see test_tile), 16 per shard.
    assert tars == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert all((sdir / t.replace(".tar", ".idx")).is_file() for t in tars)
    assert not [p for p in sdir.iterdir() if p.name.startswith(".")]
    summary = json.loads((sdir / "shards.json").read_text())
    assert summary["samples"] == 43
    assert [s["samples"] for s in summary["shards"]] == [16, 16, 11]
    assert summary["slides"] == {"cmu_small_region": 43}
    with h5py.File(cmu_shards / "coords" / "cmu_small_region.h5") as f:
        coords = {tuple(c) for c in f["coords"][:].tolist()}
    samples = all_samples(sdir)
    assert len(samples) == len(coords) == 43
    got = set()
    for key, files in samples.items():
        assert "." not in key and set(files) == {"jpg", "json"}
        meta = json.loads(files["json"])
        assert (
            meta["slide"] == "cmu_small_region"
            and key == f"cmu_small_region_{meta['x']}_{meta['y']}"
        )
        assert meta["patch_size"] == 256 and meta["read_size"] == 257 and meta["level"] == 0
        assert meta["mpp"] == 0.5 and 0 < meta["tissue_fraction"] <= 1
        got.add((meta["x"], meta["y"]))
    assert got == coords
    assert manifest(cmu_shards)["cmu_small_region"]["shard_samples"] == "43"


def test_transcoded_pixels_match_read_region(cmu_shards: Path, cmu_path: Path) -> None:
    """Every transcoded patch is read_region -> area resize (cv2.INTER_AREA, exactly) ->
    JPEG q90 4:4:4, decoding to the same pixels as libjpeg-turbo's (PIL's) encoder gives."""
    import cv2

    samples = all_samples(cmu_shards / "shards")
    values, diffs = [], []
    with open_slide(cmu_path, backend="openslide") as s:
        for files in samples.values():
            meta = json.loads(files["json"])
            img = np.asarray(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))
            assert img.shape == (256, 256, 3)
            region = s.read_region((meta["x"], meta["y"]), 0, (257, 257))
            want = cv2.resize(region, (256, 256), interpolation=cv2.INTER_AREA)
            buf = io.BytesIO()
            Image.fromarray(want).save(buf, format="JPEG", quality=90, subsampling=0)
            ref = np.asarray(Image.open(buf))
            diffs.append(np.abs(img.astype(int) - ref.astype(int)).max())
            values.append(psnr(img, want))
    # Resampling agrees with cv2 to +-1 on non-integer factors (257 -> 256; a +-1 input can
    # move a decoded pixel by a few levels through the quantiser); the encoder is
    # libjpeg-turbo's: decoded pixels are (nearly always) identical to PIL's encode.
    assert max(diffs) <= 8 and np.median(diffs) == 0, diffs
    # Dense native-20x tissue: q90 costs 33-41 dB with any baseline JPEG encoder.
    assert min(values) > 32.0 and np.median(values) > 35.0


def test_transcode_40x_to_20x_psnr(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    """A 40x (0.25 um/px) pyramid tiled to 0.5 um/px: area 2x downsample + JPEG q90."""
    import cv2

    big = np.asarray(
        Image.fromarray(cmu_rgb).resize((2220 * 2, 2967 * 2), Image.Resampling.BICUBIC)
    )
    slide = tmp_path / "x40.svs"
    make_pyramid(slide, big, 0.25)
    out = tmp_path / "out"
    assert run_cli("tile", slide, "--out", out, "--shards", "--mpp", "0.5", "-q") == 0
    samples = all_samples(out / "shards")
    assert len(samples) > 30
    values = []
    with open_slide(slide, backend="openslide") as s:
        for files in samples.values():
            meta = json.loads(files["json"])
            assert meta["read_size"] == 512 and meta["patch_size"] == 256
            img = np.asarray(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))
            region = s.read_region((meta["x"], meta["y"]), 0, (512, 512))
            want = cv2.resize(region, (256, 256), interpolation=cv2.INTER_AREA)
            values.append(psnr(img, want))
    assert np.median(values) >= 38.0, np.percentile(values, [0, 50, 100])


def test_idx_offsets_and_webdataset_reader(cmu_shards: Path) -> None:
    import webdataset as wds

    sdir = cmu_shards / "shards"
    tar = sdir / "shard-000001.tar"
    lines = (sdir / "shard-000001.idx").read_text().splitlines()
    assert lines[0] == "v1.2 16"
    by_name = {}
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            by_name[m.name] = (m.offset_data, m.size)
    for line in lines[1:]:
        parts = line.split()
        for ext, off, size, name in zip(
            parts[::4], parts[1::4], parts[2::4], parts[3::4], strict=False
        ):
            assert by_name[name] == (int(off), int(size))
            assert name.endswith("." + ext)
    ds = wds.WebDataset([str(p) for p in sorted(sdir.glob("*.tar"))], shardshuffle=False)
    keys = [s["__key__"] for s in ds]
    assert len(keys) == len(set(keys)) == 43


def test_dali_reads_shards_with_our_index(cmu_shards: Path) -> None:
    dali = pytest.importorskip("nvidia.dali")
    from nvidia.dali import fn, pipeline_def

    sdir = cmu_shards / "shards"
    tars = [str(p) for p in sorted(sdir.glob("*.tar"))]
    idxs = [t.replace(".tar", ".idx") for t in tars]

    @pipeline_def(batch_size=43, num_threads=2, device_id=None)
    def pipe():  # type: ignore[no-untyped-def]
        jpg, meta = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg", "json"], missing_component_behavior="error"
        )
        return fn.decoders.image(jpg, device="cpu"), meta

    p = pipe()
    p.build()
    images, metas = p.run()
    assert len(images) == 43
    shapes = {tuple(images.at(i).shape) for i in range(43)}
    assert shapes == {(256, 256, 3)}
    first = json.loads(bytes(np.asarray(metas.at(0))).decode())
    assert first["slide"] == "cmu_small_region"
    assert dali.__version__


def test_passthrough_copies_native_tiles(tmp_path: Path, cmu_path: Path) -> None:
    """240 px at the slide's own 0.499 um/px: the grid is the Aperio tile grid."""
    out = tmp_path / "out"
    args = ("tile", cmu_path, "--out", out, "--shards", "--patch", "240", "--mpp", "0.499", "-q")
    assert run_cli(*args) == 0
    samples = all_samples(out / "shards")
    assert len(samples) > 20
    import tifffile

    with tifffile.TiffFile(cmu_path) as tf:
        page = tf.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    raw = cmu_path.read_bytes()
    cols = -(-2220 // 240)
    with open_slide(cmu_path, backend="openslide") as s:
        for files in samples.values():
            meta = json.loads(files["json"])
            assert meta["x"] % 240 == 0 and meta["y"] % 240 == 0
            img = np.asarray(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))
            want = s.read_region((meta["x"], meta["y"]), 0, (240, 240))
            diff = np.abs(img.astype(int) - want.astype(int))
            # Edge tiles are padded in the file: compare the part inside the slide.
            h = min(240, 2967 - meta["y"])
            w = min(240, 2220 - meta["x"])
            assert diff[:h, :w].max() <= 2
            # No re-encode: the JPEG ends with the stored tile's bytes (after its SOI).
            t = (meta["y"] // 240) * cols + meta["x"] // 240
            tile = raw[offsets[t] : offsets[t] + counts[t]]
            assert files["jpg"].endswith(tile[2:])
            assert len(files["jpg"]) < len(tile) + 400


def test_passthrough_ycbcr_tiles(tmp_path: Path, pyramid_path: Path) -> None:
    out = tmp_path / "out"
    args = ("tile", pyramid_path, "--slide-mpp", "1", "--mpp", "1", "--patch", "128",
            "--out", out, "--shards", "--transcode", "never", "-q")  # fmt: skip
    assert run_cli(*args) == 0
    samples = all_samples(out / "shards")
    assert samples
    with open_slide(pyramid_path, backend="openslide") as s:
        for files in list(samples.values())[:30]:
            meta = json.loads(files["json"])
            img = np.asarray(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))
            want = s.read_region((meta["x"], meta["y"]), 0, (128, 128))
            assert np.abs(img.astype(int) - want.astype(int)).max() <= 2


def test_transcode_never_fails_when_not_aligned(tmp_path: Path, cmu_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("tile", cmu_path, "--out", out, "--shards", "--transcode", "never", "-q") == 1
    row = manifest(out)["cmu_small_region"]
    assert row["status"] == "failed" and "native" in row["error"]


def test_shuffle_interleaves_slides_deterministically(
    tmp_path: Path, cmu_path: Path, ink_path: Path
) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_path, slides / "a.svs")
    shutil.copy(cmu_path, slides / "TCGA-XX.01.svs")  # dots in the id
    outs = []
    for seed in (1, 1, 2):
        out = tmp_path / f"out{len(outs)}"
        args = ("tile", slides, "--out", out, "--shards", "--shuffle", "--seed", str(seed),
                "--shard-samples", "20", "-q")  # fmt: skip
        assert run_cli(*args) == 0
        outs.append(out)
    read = lambda o: [(p.name, p.read_bytes()) for p in sorted((o / "shards").glob("*.tar"))]  # noqa: E731
    assert read(outs[0]) == read(outs[1])
    assert read(outs[0]) != read(outs[2])
    first = tar_samples(outs[0] / "shards" / "shard-000000.tar")
    ids = {json.loads(f["json"])["slide"] for f in first.values()}
    assert ids == {"a", "TCGA-XX.01"}
    samples = all_samples(outs[0] / "shards")
    assert len(samples) == 86 and all("." not in k for k in samples)


def test_regions_with_sub_patches(tmp_path: Path, cmu_path: Path) -> None:
    out = tmp_path / "out"
    args = ("tile", cmu_path, "--out", out, "--shards", "--region", "512", "--region-patches",
            "--region-patch", "256", "--mpp", "0.5", "-q")  # fmt: skip
    assert run_cli(*args) == 0
    samples = all_samples(out / "shards")
    assert samples
    for files in samples.values():
        assert set(files) == {"jpg", "json", "p000.jpg", "p001.jpg", "p002.jpg", "p003.jpg"}
        meta = json.loads(files["json"])
        region = np.asarray(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))
        assert region.shape == (512, 512, 3)
        assert len(meta["sub_coords"]) == 4 and meta["sub_patch_size"] == 256
        sub = np.asarray(Image.open(io.BytesIO(files["p003.jpg"])).convert("RGB"))
        assert psnr(sub, region[256:, 256:]) > 35


def make_pyramid(path: Path, rgb: np.ndarray, mpp: float) -> None:
    """A small Aperio-style pyramidal TIFF: level 0, thumbnail page, level 1 (4x), JPEG
    tiles of 256 (Aperio keeps the thumbnail as the second page)."""
    import tifffile

    h, w = rgb.shape[:2]
    desc = (
        f"Aperio Image Library v12.0.15\r\n{w}x{h} (256x256) JPEG/RGB Q=90|AppMag = 20|MPP = {mpp}"
    )
    small = np.asarray(Image.fromarray(rgb).resize((w // 4, h // 4), Image.Resampling.BOX))
    with tifffile.TiffWriter(path) as tw:
        tw.write(
            rgb,
            tile=(256, 256),
            compression="jpeg",
            photometric="rgb",
            description=desc,
            metadata=None,
        )
        thumb = np.asarray(Image.fromarray(rgb).resize((w // 16, h // 16)))
        tw.write(thumb, compression="jpeg", photometric="rgb", metadata=None)
        tw.write(small, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None)


def test_unreadable_tile_fails_that_slide_only(tmp_path: Path, cmu_rgb: np.ndarray) -> None:
    import tifffile

    slides = tmp_path / "slides"
    slides.mkdir()
    make_pyramid(slides / "good.svs", cmu_rgb, 0.499)
    bad = slides / "bad.svs"
    shutil.copy(slides / "good.svs", bad)
    with tifffile.TiffFile(bad) as tf:
        page = tf.pages[0]
        off, n = int(page.dataoffsets[49]), int(page.databytecounts[49])
    data = bytearray(bad.read_bytes())
    data[off : off + n] = b"\x00" * n  # level-0 tile (4, 5), mid-tissue: not a JPEG any more
    bad.write_bytes(bytes(data))
    out = tmp_path / "out"
    # The mask comes from level 1, so the damage only shows when level-0 pixels are read.
    args = ("tile", slides, "--out", out, "--shards", "--mpp", "0.5", "-q", "--no-overlay")
    assert run_cli(*args) == 1
    rows = manifest(out)
    assert rows["good"]["status"] == "ok" and rows["good"]["error"] == ""
    assert rows["bad"]["status"] == "failed"
    assert "bad.svs" in rows["bad"]["error"] and "tile" in rows["bad"]["error"]
    summary = json.loads((out / "shards" / "shards.json").read_text())
    assert summary["slides"]["good"] == int(rows["good"]["patches"]) > 20
    # Only the patches that touch the wiped tile are missing from the bad slide.
    assert 1 <= int(rows["bad"]["patches"]) - summary["slides"]["bad"] <= 4


def test_phase_one_failure_keeps_other_shards(tmp_path: Path, cmu_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(cmu_path, slides / "good.svs")
    (slides / "broken.svs").write_bytes(cmu_path.read_bytes()[:50_000])
    out = tmp_path / "out"
    assert run_cli("tile", slides, "--out", out, "--shards", "-q") == 1
    summary = json.loads((out / "shards" / "shards.json").read_text())
    assert summary["slides"] == {"good": 43} and summary["samples"] == 43


@pytest.mark.slow
def test_killed_run_resumes_to_identical_shards(tmp_path: Path, cmu_path: Path) -> None:
    slides = tmp_path / "slides"
    slides.mkdir()
    for name in ("s1", "s2", "s3", "s4"):
        shutil.copy(cmu_path, slides / f"{name}.svs")
    base = ["tile", str(slides), "--shards", "--shuffle", "--shard-samples", "4",
            "--transcode", "always", "-q", "--workers", "1"]  # fmt: skip
    ref = tmp_path / "ref"
    assert run_cli(*base, "--out", str(ref)) == 0
    out = tmp_path / "killed"
    code = (
        f"import sys; from pathflow.cli import main; sys.exit(main({[*base, '--out', str(out)]!r}))"
    )
    for delay in (0.8, 1.5):
        proc = subprocess.Popen([sys.executable, "-c", code], env=os.environ)
        deadline = time.time() + 60
        while time.time() < deadline and not list((out / "shards").glob("shard-00000[2-9].tar")):
            time.sleep(0.02)
        time.sleep(delay * 0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert run_cli(*base, "--out", str(out)) == 0
    a = sorted((ref / "shards").glob("*.tar"))
    b = sorted((out / "shards").glob("*.tar"))
    assert [p.name for p in a] == [p.name for p in b] and len(a) == 43
    for x, y in zip(a, b, strict=False):
        assert x.read_bytes() == y.read_bytes(), x.name
        assert x.with_suffix(".idx").read_text() == y.with_suffix(".idx").read_text()


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_lossless_formats(tmp_path: Path, cmu_path: Path, fmt: str) -> None:
    out = tmp_path / "out"
    assert run_cli("tile", cmu_path, "--out", out, "--shards", "--format", fmt, "-q") == 0
    samples = all_samples(out / "shards")
    assert len(samples) == 43
    import cv2

    files = next(iter(samples.values()))
    assert set(files) == {fmt, "json"}
    meta = json.loads(files["json"])
    with Image.open(io.BytesIO(files[fmt])) as im:
        assert im.format == fmt.upper()
        img = np.asarray(im.convert("RGB"))
    with open_slide(cmu_path, backend="openslide") as s:
        region = s.read_region((meta["x"], meta["y"]), 0, (257, 257))
    want = cv2.resize(region, (256, 256), interpolation=cv2.INTER_AREA)
    assert np.abs(img.astype(int) - want.astype(int)).max() <= 1  # lossless after resampling


def test_disk_full_is_a_clear_error_and_resumable(tmp_path: Path, cmu_path: Path) -> None:
    """A write that fails (file size limit standing in for a full disk) stops shard writing
    with one line on stderr; finished shards stay, no partial shard is published, and a
    re-run completes them."""
    out = tmp_path / "out"
    argv = ["tile", str(cmu_path), "--out", str(out), "--shards", "--shard-samples", "16", "-q",
            "--format", "png"]  # fmt: skip
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from pathflow.cli import main\n"
        "main(['tile', " + repr(str(cmu_path)) + ", '--out', " + repr(str(out)) + ", '-q'])\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1_500_000, 1_500_000))\n"
        f"sys.exit(main({argv!r}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0
    err = [line for line in res.stderr.splitlines() if "error" in line]
    assert len(err) == 1 and "writing shards failed" in err[0] and "re-run" in err[0], res.stderr
    sdir = out / "shards"
    assert not [p for p in sdir.iterdir() if p.name.startswith(".")]
    partial = sorted(p.name for p in sdir.glob("*.tar"))
    assert all((sdir / n.replace(".tar", ".idx")).is_file() for n in partial)
    assert run_cli(*argv) == 0
    assert json.loads((sdir / "shards.json").read_text())["samples"] == 43
