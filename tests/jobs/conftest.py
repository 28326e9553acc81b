"""A small cohort of real sample slides under several names (copies, so each is its own
file) for the job-array tests; the part of each id under ``--part i/3`` is noted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from jobs_cohort import COHORT_PARTS


@pytest.fixture(scope="session")
def cohort(
    tmp_path_factory: pytest.TempPathFactory, cmu_path: Path, pyramid_path: Path, ink_path: Path
) -> Path:
    """Folder of 6 slides + ``again.svs``, a symlink to ``cmu_b.svs`` (a duplicate input)."""
    d = tmp_path_factory.mktemp("cohort")
    src = {"cmu": cmu_path, "slide": pyramid_path, "ink": ink_path}
    for sid in COHORT_PARTS:
        kind = sid.split("_")[0]
        shutil.copyfile(src[kind], d / f"{sid}{src[kind].suffix}")
    (d / "again.svs").symlink_to(d / "cmu_b.svs")
    return d
