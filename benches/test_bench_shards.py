"""Shard writing speed: ``pathflow tile --shards`` against the Python export loop users
write today (OpenSlide ``read_region`` -> PIL resize/encode -> ``webdataset.ShardWriter``,
one process), on the large generated 40x slide, in the same run.

* ``transcode``: 256 px patches at 0.5 um/px from the 0.25 um/px slide (read 512, area
  downsample, JPEG q90);
* ``passthrough``: 256 px patches at the native 0.25 um/px, aligned with the 256 px JPEG
  tiles: pathflow copies the tiles' bytes, the baseline decodes and re-encodes.

Run: ``python -m pytest benches/test_bench_shards.py --benchmark-only -s``.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import keep_first_patches
from pathflow.cli import main
from pathflow.tiling.shards import ShardParams, write_shards

N_PATCHES = 2000


@pytest.fixture(scope="module")
def big_slide() -> Path:
    from synthetic_slide import cached_large_slide

    return cached_large_slide()


def prepare(tmp: Path, slide: Path, mpp: float) -> tuple[Path, list[dict[str, Any]]]:
    out = tmp / f"mpp{mpp}"
    assert main(["tile", str(slide), "--out", str(out), "--mpp", str(mpp), "-q",
                 "--no-overlay"]) == 0  # fmt: skip
    rows = keep_first_patches(out, N_PATCHES)
    return out, rows


def baseline(
    slide: Path, out_dir: Path, coords: np.ndarray, level: int, read: int, size: int
) -> int:
    import openslide
    import webdataset as wds
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    with (
        openslide.OpenSlide(str(slide)) as wsi,
        wds.ShardWriter(str(out_dir / "base-%06d.tar"), maxcount=10_000, verbose=0) as sink,
    ):
        for x, y in coords.tolist():
            img = wsi.read_region((x, y), level, (read, read)).convert("RGB")
            if read != size:
                img = img.resize((size, size), Image.Resampling.BOX)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            data = buf.getvalue()
            total += len(data)
            sink.write({"__key__": f"s_{x}_{y}", "jpg": data, "json": {"x": x, "y": y}})
    return total


@pytest.mark.parametrize("mode", ["transcode", "passthrough"])
def test_shards_vs_python_loop(benchmark: Any, tmp_path: Path, big_slide: Path, mode: str) -> None:
    mpp = 0.5 if mode == "transcode" else 0.25
    out, rows = prepare(tmp_path, big_slide, mpp)
    h5 = next((out / "coords").glob("*.h5"))
    with h5py.File(h5) as f:
        coords = f["coords"][:]
        level = int(f["coords"].attrs["patch_level"])
        read = int(f["coords"].attrs["patch_size"])
        size = int(f["coords"].attrs["target_patch_size"])
    params = ShardParams(transcode="auto", quality=90)

    def ours() -> Any:
        shutil.rmtree(out / "shards", ignore_errors=True)
        return write_shards(out, rows, params, progress=False)

    t0 = time.perf_counter()
    base_bytes = baseline(big_slide, tmp_path / "base", coords, level, read, size)
    t_base = time.perf_counter() - t0
    rep = benchmark.pedantic(ours, rounds=3, warmup_rounds=1)
    assert rep.samples == len(coords)
    assert (rep.passthrough_slides == 1) == (mode == "passthrough")
    t_ours = benchmark.stats.stats.median
    n = len(coords)
    ratio = t_base / t_ours
    benchmark.extra_info.update({"patches": n, "baseline_s": t_base, "pathflow_s": t_ours,
                                 "speedup": ratio})  # fmt: skip
    print(
        f"\n[{mode}] {n} patches of {size}px (read {read}px at level {level}) | "
        f"python loop {n / t_base:7.0f} patches/s {base_bytes / 1e6 / t_base:6.1f} MB/s | "
        f"pathflow {n / t_ours:7.0f} patches/s {rep.bytes / 1e6 / t_ours:6.1f} MB/s | "
        f"speedup {ratio:5.1f}x"
    )
