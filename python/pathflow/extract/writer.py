"""Features files, one per slide, as CLAM / TRIDENT read them.

``.h5``: datasets ``features`` float32 (N, D) and ``coords`` int64 (N, 2) (level-0 top-left
corners), ``names`` (image folders only); attrs on the file root (arch, weights, embed_dim,
image_size, mean, std, patch geometry, ``num_patches``, ``num_skipped``), patch geometry
mirrored on ``coords`` (CLAM's ``patch_size``, ``patch_level``) and the model on ``features``.
``.pt``: the features tensor alone, as CLAM's ``pt_files`` (``torch.load(path)`` -> (N, D)).
Files are written to a temporary name and renamed, so an existing file is a finished slide;
whether it was made by the same model is told by its attrs (``.h5``) or by the ``model`` id
that the run's manifest records for it (``.pt``; :func:`model_id`).

Example:
    >>> from pathflow.extract.writer import read_features
    >>> feats, coords, attrs = read_features("pathflow_out/features/slide.h5")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.outputs import _plain, atomic_path

_MODEL_ATTRS = ("arch", "weights", "weights_sha256", "embed_dim", "image_size", "mean", "std",
                "norm", "precision")  # fmt: skip
#: Model attrs the features depend on: a file made with other values is redone (the ViT-4K's
#: for HIPT's descriptors; None for patch features).
FEATURE_ATTRS = ("arch", "weights", "weights_sha256", "image_size", "mean", "std", "arch_4k",
                 "weights_4k", "weights_4k_sha256")  # fmt: skip
_GEOMETRY_ATTRS = (
    "patch_size", "patch_level", "patch_size_level0", "read_size", "target_mpp", "mpp",
)  # fmt: skip


def write_features(
    dest: str | os.PathLike[str],
    features: npt.NDArray[np.float32],
    coords: npt.NDArray[np.int64],
    attrs: dict[str, Any],
    names: list[str] | None = None,
) -> None:
    """Write one slide's features atomically; the format follows ``dest``'s suffix."""
    dest = Path(dest)
    feats = np.ascontiguousarray(features, np.float32)
    xy = np.ascontiguousarray(coords, np.int64).reshape(-1, 2)
    if feats.ndim != 2 or len(feats) != len(xy):
        raise ValueError(f"features {feats.shape} and coords {xy.shape} do not match")
    if dest.suffix == ".pt":
        import torch

        with atomic_path(dest) as tmp:
            torch.save(torch.from_numpy(feats), tmp)
        return
    import h5py

    with atomic_path(dest) as tmp, h5py.File(tmp, "w") as f:
        fd = f.create_dataset("features", data=feats)
        cd = f.create_dataset("coords", data=xy)
        if names is not None:
            f.create_dataset("names", data=np.array(names, dtype=object), dtype=h5py.string_dtype())
        for k, v in attrs.items():
            if v is None:
                continue
            f.attrs[k] = v
            if k in _MODEL_ATTRS:
                fd.attrs[k] = v
            if k in _GEOMETRY_ATTRS:
                cd.attrs[k] = v


def read_features(
    path: str | os.PathLike[str],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64] | None, dict[str, Any]]:
    """``(features, coords, attrs)`` of a ``.h5`` or ``.pt`` file (``.pt``: no coords/attrs)."""
    p = Path(path)
    if p.suffix == ".pt":
        import torch

        t = torch.load(p, map_location="cpu", weights_only=True)
        return t.numpy().astype(np.float32, copy=False), None, {}
    import h5py

    with h5py.File(p, "r") as f:
        feats = np.asarray(f["features"][:], np.float32)
        coords = np.asarray(f["coords"][:], np.int64) if "coords" in f else None
        attrs = {k: _plain(v) for k, v in f.attrs.items()}
    return feats, coords, attrs


def model_id(model_attrs: dict[str, Any]) -> str:
    """Short id (16 hex) of the :data:`FEATURE_ATTRS` of a model (recorded in the manifest)."""
    key = {k: model_attrs.get(k) for k in FEATURE_ATTRS}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _same(have: Any, want: Any) -> bool:
    if isinstance(want, (list, tuple)) and isinstance(have, (list, tuple)):
        return len(have) == len(want) and bool(np.allclose(have, want, rtol=0, atol=1e-9))
    return bool(have == want)


def is_complete(
    path: Path,
    expected: int,
    model_attrs: dict[str, Any],
    recorded_model: str | None = None,
    dataset: str = "features",
) -> tuple[bool, str]:
    """Whether ``path`` holds a finished slide of ``expected`` patches by this model.

    ``.h5``: readable, ``num_patches + num_skipped == expected`` and the same
    :data:`FEATURE_ATTRS` (arch, weights path and sha256, input size, mean/std), rows counted
    in ``dataset`` (``region_features`` / ``cls4k`` for region files); ``.pt``:
    readable with at most ``expected`` rows, and ``recorded_model`` (the manifest's ``model``
    for the slide) is this model's :func:`model_id`. Returns ``(ok, why not)``.
    """
    if not path.is_file():
        return False, "missing"
    try:
        if path.suffix == ".pt":
            if recorded_model != model_id(model_attrs):
                return False, "made by another model (or not recorded in the manifest)"
            feats, _, _ = read_features(path)
            if feats.ndim != 2 or len(feats) > expected:
                return False, f"{len(feats)} rows for {expected} patches"
            return True, ""
        import h5py

        with h5py.File(path, "r") as f:
            n = int(f[dataset].shape[0])
            skipped = int(f.attrs.get("num_skipped", 0))
            for k in FEATURE_ATTRS:
                have = _plain(f.attrs.get(k))
                if not _same(have, model_attrs.get(k)):
                    return False, f"made with {k}={have!r}"
    except Exception as exc:  # unreadable or truncated: redo
        return False, f"unreadable ({str(exc).splitlines()[0] if str(exc) else exc})"
    if n + skipped != expected:
        return False, f"{n} + {skipped} skipped rows for {expected} patches"
    return True, ""
