"""Cost of multi-magnification shards: ``pathflow tile --shards --shard-mpps 0.5,1,2`` against
the single-resolution ``--mpp 0.5``, the same patches of the generated 0.25 um/px slide
(16384 px, levels 1/4/16), in the same run.

Per sample the single resolution reads 512 px at level 0 (area 2x, JPEG q90); three
resolutions add 256 px at level 1 (1 um/px, no resize) and 512 px at level 1 (2 um/px,
area 2x), so about 1.5x the decoded pixels and 3x the encodes.

Run: ``python -m pytest benches/test_bench_multiscale.py -s``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from pathflow.tiling.shards import ShardParams, write_shards
from test_bench_shards import prepare


@pytest.fixture(scope="module")
def slide() -> Path:
    from synthetic_slide import cached_large_slide

    return cached_large_slide(size=16384)


def test_three_magnifications_vs_one(tmp_path: Path, slide: Path) -> None:
    out, rows = prepare(tmp_path, slide, 0.5)
    runs = {"1 mpp (0.5)": ShardParams(), "3 mpps (0.5,1,2)": ShardParams(mpps=[0.5, 1.0, 2.0])}
    seconds: dict[str, float] = {}
    for label, params in [*runs.items(), *runs.items()]:  # first pass warms the page cache
        shutil.rmtree(out / "shards", ignore_errors=True)
        t0 = time.perf_counter()
        rep = write_shards(out, rows, params, progress=False)
        seconds[label] = time.perf_counter() - t0
        assert rep.samples == int(rows[0]["patches"])
    n = int(rows[0]["patches"])
    one, three = seconds.values()
    print(
        f"\n{n} samples of 256 px | "
        + " | ".join(f"{k}: {v:.2f} s ({n / v:.0f} samples/s)" for k, v in seconds.items())
        + f" | 3 mpps cost {three / one:.2f}x"
    )
