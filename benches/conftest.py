"""Benchmarks import the OpenCV CLAM reference that the tests use; shared fixtures and helpers."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))
sys.path.insert(0, str(ROOT))


import csv  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def shards() -> Path:
    """Shards of the generated 40x slide at 0.5 um/px (2387 patches, 500 per shard), cached
    beside the samples: the loader benches' input."""
    from pathflow.cli import main
    from pathflow.data import sample_cache_dir

    out = sample_cache_dir().parent / "bench" / "loader_shards"
    if not (out / "shards" / "shards.json").is_file():
        from synthetic_slide import cached_large_slide

        slide = cached_large_slide()
        assert main(["tile", str(slide), "--out", str(out), "--mpp", "0.5", "--shards", "-q",
                     "--no-overlay", "--shard-samples", "500"]) == 0  # fmt: skip
    return out / "shards"


def keep_first_patches(out: Path, n: int) -> list[dict[str, Any]]:
    """Cut the single slide of tile output ``out`` to its first ``n`` (row-major) patches:
    its coords file and its manifest row; returns the manifest rows."""
    import h5py

    h5 = next((out / "coords").glob("*.h5"))
    with h5py.File(h5, "r+") as f:
        coords, frac = f["coords"][:n], f["tissue_fraction"][:n]
        attrs = dict(f["coords"].attrs)
        del f["coords"], f["tissue_fraction"]
        ds = f.create_dataset("coords", data=coords)
        for k, v in attrs.items():
            ds.attrs[k] = v
        f.create_dataset("tissue_fraction", data=frac)
    with open(out / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["patches"] = str(len(coords))
    return rows
