"""``pathflow extract`` from coordinates + slides against ``pathflow extract`` from shards of
the same patches, on the CPU (issue target: within 1.5x).

Data: the generated 32768 px 0.25 um/px Aperio-style slide of real tissue
(``synthetic_slide.py``), tiled by ``pathflow tile --mpp 0.5`` (512 px read at level 0 ->
256 px), the first ``PATHFLOW_BENCH_EXTRACT_PATCHES`` (default 512) patches kept; their
shards are written once by ``write_shards`` (not timed). Both paths then run the stage
(``run_extract``, model loading included) with the same model and batch size, one after the
other in one process after an untimed warm-up run (imports, first model build), order
alternating between the 2 rounds, medians of wall and CPU
seconds (CPU: every thread of the process, a fairer figure on a shared machine):

* shards: JPEG bytes read from the tars, decoded and resized in Rust threads, model;
* coordinates + slides: the tiles read by the Rust tile reader, resampled to 256 px and
  JPEG-encoded (the tiler's encoder, so the features are identical: checked), in a background
  thread, then the same decode, resize and model.

Models: ``test_vit`` (timm's 0.3M-parameter ViT at 160 px: reading dominates, the worst case
for the coordinates path) and ``resnet18`` at 224 px (a small real backbone).

Run: ``python -m pytest benches/test_bench_extract_coords.py --benchmark-only -s``.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import keep_first_patches
from pathflow.cli import main
from pathflow.extract.config import ExtractConfig
from pathflow.extract.runner import run_extract
from pathflow.tiling.shards import ShardParams, write_shards

N_PATCHES = int(os.environ.get("PATHFLOW_BENCH_EXTRACT_PATCHES", "512"))


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Coordinates (first N_PATCHES) + their shards of the generated slide."""
    from synthetic_slide import cached_large_slide

    slide = cached_large_slide()
    out = tmp_path_factory.mktemp("extract_coords") / "run"
    assert main(["tile", str(slide), "--out", str(out), "--mpp", "0.5", "-q",
                 "--no-overlay"]) == 0  # fmt: skip
    rows = keep_first_patches(out, N_PATCHES)
    write_shards(out, rows, ShardParams(), progress=False)
    return out


def _run(inp: Path, out: Path, arch: str, size: int) -> tuple[float, float]:
    """Wall and CPU seconds (all threads of this process: Python, torch, Rust) of one run."""
    shutil.rmtree(out, ignore_errors=True)
    cfg = ExtractConfig.build({}, {"inputs": [str(inp)], "out": str(out), "arch": arch,
                                   "image_size": size, "batch_size": 64, "device": "cpu",
                                   "precision": "fp32"})  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    report = run_extract(cfg, progress=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert report.ok and report.images == N_PATCHES, report.summary()
    return seconds, cpu


def _features(out: Path) -> np.ndarray:
    with h5py.File(next((out / "features").glob("*.h5"))) as f:
        return np.asarray(f["features"][:])


@pytest.mark.parametrize(("arch", "size"), [("test_vit", 160), ("resnet18", 224)])
def test_extract_coords_vs_shards(
    benchmark: Any, tiled: Path, tmp_path: Path, arch: str, size: int
) -> None:
    runs: dict[str, list[tuple[float, float]]] = {"shards": [], "coords": []}
    order = ["shards", "coords"]

    def both() -> None:  # one round: both paths, each timed on its own; order alternates
        for name in order:
            src = tiled / name
            runs[name].append(_run(src, tmp_path / name, arch, size))
        order.reverse()

    _run(tiled / "shards", tmp_path / "warmup", arch, size)  # imports, first model build
    benchmark.pedantic(both, rounds=2, warmup_rounds=0)
    wall = {k: statistics.median(t for t, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in runs.items()}
    np.testing.assert_array_equal(_features(tmp_path / "shards"), _features(tmp_path / "coords"))
    ratio, cpu_ratio = wall["coords"] / wall["shards"], cpu["coords"] / cpu["shards"]
    benchmark.extra_info.update({"patches": N_PATCHES, "arch": arch, "shards_s": wall["shards"],
                                 "coords_s": wall["coords"], "ratio": ratio,
                                 "shards_cpu_s": cpu["shards"], "coords_cpu_s": cpu["coords"],
                                 "cpu_ratio": cpu_ratio})  # fmt: skip
    print(
        f"\n[{arch} @ {size}px] {N_PATCHES} patches | shards {wall['shards']:.2f} s wall "
        f"({N_PATCHES / wall['shards']:.0f}/s), {cpu['shards']:.2f} s CPU | coords + slide "
        f"{wall['coords']:.2f} s wall ({N_PATCHES / wall['coords']:.0f}/s), "
        f"{cpu['coords']:.2f} s CPU | coords/shards {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU"
    )
