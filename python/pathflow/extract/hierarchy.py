"""HIPT's region stages of ``pathflow extract``: ``--model regions`` and ``--model hipt``.

The runner embeds every sub-patch of every region with the ViT-256 (many regions per
forward: the patch stream is cut into ``--batch-size`` patches whatever the region
boundaries) and hands each slide's rows here, region after region, in row-major patch order:

* ``--model regions`` writes ``region_features`` ``[M, G*G, D]`` (float16 by default; the
  ``[256, 384]`` tensors of ViT-4K pretraining, ``pathflow train --method hipt4k``) and
  ``coords`` ``[M, 2]`` (level-0 top-left corner of each region);
* ``--model hipt`` runs the ViT-4K on each region's grid and writes HIPT's descriptors
  ``cls4k`` ``[M, 192]``, ``mean256`` ``[M, 384]``, ``concat`` ``[M, 576]``, the slide's
  embeddings ``slide_cls4k``, ``slide_mean256``, ``slide_concat`` (means over regions) and
  ``coords``; ``region_features`` too with ``--keep-region-features``.

The datasets are contiguous and uncompressed so the feature loader memory-maps them. A region
with an undecodable sub-patch is left out (counted in ``num_skipped``). Attributes: the
ViT-256's (``arch``, ``weights``, ``weights_sha256``, ``mean``, ``std``, ``image_size``...),
the ViT-4K's (``arch_4k``, ``weights_4k``, ``weights_4k_sha256``), the geometry (``grid``,
``region_size``, ``region_patch_size``, ``mpp``...) and ``format``
(``pathflow-region-features-v1`` / ``pathflow-hipt-v1``).

Example:
    >>> from pathflow.extract.hierarchy import read_hipt
    >>> d = read_hipt("out/features/slide.h5")  # doctest: +SKIP
    >>> d["cls4k"].shape, d["slide_concat"].shape  # doctest: +SKIP
    ((12, 192), (576,))
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.outputs import _plain, atomic_path

REGION_FORMAT = "pathflow-region-features-v1"
HIPT_FORMAT = "pathflow-hipt-v1"
#: The dataset whose rows count the regions of a finished file, per ``--model``.
ROWS_DATASET = {"regions": "region_features", "hipt": "cls4k"}


def region_rows(
    feats: npt.NDArray[np.float32], ok: npt.NDArray[np.bool_], grid: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """Per-patch rows ``[M*G*G, D]`` -> ``[M, G*G, D]`` and the regions whose every patch
    was decoded."""
    n = grid * grid
    if len(feats) % n:
        raise ValueError(f"{len(feats)} patch rows are not whole regions of {n}")
    m = len(feats) // n
    keep: npt.NDArray[np.bool_] = np.asarray(ok.reshape(m, n).all(axis=1), bool)
    return feats.reshape(m, n, feats.shape[-1]), keep


def hipt_descriptors(vit4k: Any, region_features: npt.NDArray[Any]) -> dict[str, np.ndarray]:
    """HIPT's region descriptors and slide embeddings (float32) from ``[M, G*G, D]``."""
    import torch

    from pathflow.models.hipt import region_descriptors

    dev = next(vit4k.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(region_features, np.float32)).to(dev)
    out = {k: v.cpu().numpy().astype(np.float32) for k, v in region_descriptors(vit4k, x).items()}
    for k in list(out):
        out[f"slide_{k}"] = out[k].mean(axis=0)
    return out


def write_region_file(
    dest: str | os.PathLike[str],
    coords: npt.NDArray[np.int64],
    attrs: dict[str, Any],
    region_features: npt.NDArray[Any] | None = None,
    descriptors: dict[str, np.ndarray] | None = None,
    dtype: str = "float16",
) -> None:
    """Write one slide's region features and/or HIPT descriptors atomically (``.h5``)."""
    import h5py

    xy = np.ascontiguousarray(coords, np.int64).reshape(-1, 2)
    with atomic_path(Path(dest)) as tmp, h5py.File(tmp, "w") as f:
        if region_features is not None:
            rf = np.ascontiguousarray(region_features, np.dtype(dtype))
            if rf.ndim != 3 or len(rf) != len(xy):
                raise ValueError(f"region features {rf.shape} and coords {xy.shape} differ")
            f.create_dataset("region_features", data=rf)  # contiguous: memory-mappable
        for k, v in (descriptors or {}).items():
            f.create_dataset(k, data=np.ascontiguousarray(v, np.float32))
        cd = f.create_dataset("coords", data=xy)
        for k, v in attrs.items():
            if v is None:
                continue
            f.attrs[k] = v
            if k in ("region_size", "region_patch_size", "patch_level", "grid"):
                cd.attrs[k] = v


def read_hipt(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Every dataset of a region/HIPT file as numpy arrays, plus ``attrs``."""
    import h5py

    with h5py.File(path, "r") as f:
        out: dict[str, Any] = {k: f[k][()] for k in f}
        out["attrs"] = {k: _plain(v) for k, v in f.attrs.items()}
    return out


__all__ = [
    "HIPT_FORMAT",
    "REGION_FORMAT",
    "ROWS_DATASET",
    "hipt_descriptors",
    "read_hipt",
    "region_rows",
    "write_region_file",
]
