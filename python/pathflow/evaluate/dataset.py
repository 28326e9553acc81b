"""Labelled patch datasets in ImageFolder layout and their (cached) features.

``root/<class>/<image>.{jpg,png,tif,...}``: classes are the sub-folders with images, sorted
by name (torchvision's convention). Features are cached in an HDF5 file (``features``,
``labels``, ``names`` + the class list and a fingerprint of the model and the file list), so
``pathflow eval knn`` then ``pathflow eval linear`` embed the images once.

Example:
    >>> from pathflow.evaluate.dataset import scan_labelled
    >>> ds = scan_labelled("NCT-CRC-HE-100K")  # doctest: +SKIP
    >>> ds.classes[:3], len(ds)  # doctest: +SKIP
    (['ADI', 'BACK', 'DEB'], 100000)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.extract.sources import PatchRef, SourceError, list_images
from pathflow.outputs import _plain, atomic_path

log = logging.getLogger("pathflow.eval")


@dataclass
class LabelledImages:
    """Image files with integer labels indexing ``classes``."""

    root: Path
    classes: list[str]
    paths: list[Path]
    labels: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.paths)

    def names(self) -> list[str]:
        return [str(p.relative_to(self.root)) for p in self.paths]

    def fingerprint(self) -> str:
        """Hash of the relative paths, sizes and labels (changes when the data do)."""
        h = hashlib.sha1()
        for p, y in zip(self.paths, self.labels.tolist(), strict=True):
            h.update(f"{p.relative_to(self.root)}\t{p.stat().st_size}\t{y}\n".encode())
        h.update(json.dumps(self.classes).encode())
        return h.hexdigest()


@dataclass
class LabelledFeatures:
    """Embedded images: features (N, D) float32, labels (N,), relative names."""

    features: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    names: list[str]
    classes: list[str]
    skipped: int = 0

    def subset(self, idx: npt.NDArray[np.int64]) -> LabelledFeatures:
        return LabelledFeatures(
            self.features[idx], self.labels[idx], [self.names[i] for i in idx], self.classes
        )


def scan_labelled(
    root: str | os.PathLike[str],
    classes: list[str] | None = None,
    max_per_class: int | None = None,
    seed: int = 0,
) -> LabelledImages:
    """Images of ``root/<class>/``; with ``classes`` given (the training set's), every class
    folder must be one of them. ``max_per_class`` keeps a seeded random subset per class."""
    r = Path(root)
    if not r.is_dir():
        raise SourceError(f"{r}: not a folder (expected ROOT/<class>/<image>)")
    found: dict[str, list[Path]] = {}
    for d in sorted(r.iterdir()):
        if d.is_dir() and not d.name.startswith("."):
            if imgs := list_images(d):
                found[d.name] = imgs
            else:
                log.warning("%s: empty class folder (no images), left out", d)
    if not found:
        raise SourceError(f"{r}: no class folders with images (expected ROOT/<class>/<image>)")
    if classes is None:
        classes = sorted(found)
    else:
        extra = sorted(set(found) - set(classes))
        if extra:
            raise SourceError(f"{r}: classes {extra} are not in the training set {classes}")
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    labels: list[int] = []
    for name, imgs in found.items():
        if max_per_class is not None and len(imgs) > max_per_class:
            keep = np.sort(rng.choice(len(imgs), max_per_class, replace=False))
            imgs = [imgs[i] for i in keep]
        paths += imgs
        labels += [classes.index(name)] * len(imgs)
    return LabelledImages(r, list(classes), paths, np.asarray(labels, np.int64))


def embed_labelled(
    data: LabelledImages, embedder: Any, progress: bool | None = None, desc: str = "embed"
) -> LabelledFeatures:
    """Embed every image (undecodable ones are left out with a counted warning)."""
    from tqdm.auto import tqdm

    d = embedder.backbone.embed_dim
    feats = np.empty((len(data), d), np.float32)
    ok = np.zeros(len(data), bool)
    reasons: list[str | None] = []
    pos = 0
    refs = (PatchRef(str(p)) for p in data.paths)
    with tqdm(total=len(data), unit="img", desc=desc, disable=progress is False,
              dynamic_ncols=True) as bar:  # fmt: skip
        for batch in embedder.embed(refs):
            n = len(batch.refs)
            feats[pos : pos + n] = batch.features
            ok[pos : pos + n] = batch.ok
            reasons += batch.reasons
            pos += n
            bar.update(n)
    bad = np.flatnonzero(~ok)
    if bad.size:
        log.warning(
            "%s: %d of %d images undecodable, skipped (e.g. %s: %s)",
            data.root, bad.size, len(data), data.paths[bad[0]], reasons[bad[0]],
        )  # fmt: skip
    names = data.names()
    keep = np.flatnonzero(ok)
    return LabelledFeatures(
        feats[keep], data.labels[keep], [names[i] for i in keep], data.classes, int(bad.size)
    )


def save_cache(
    path: Path, feats: LabelledFeatures, fingerprint: str, attrs: dict[str, Any]
) -> None:
    """Write cached features (atomically)."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("features", data=feats.features)
        f.create_dataset("labels", data=feats.labels)
        f.create_dataset("names", data=np.array(feats.names, dtype=object),
                         dtype=h5py.string_dtype())  # fmt: skip
        f.attrs["classes"] = json.dumps(feats.classes)
        f.attrs["fingerprint"] = fingerprint
        f.attrs["num_skipped"] = feats.skipped
        for k, v in attrs.items():
            if v is not None:
                f.attrs[k] = v


def load_cache(path: Path, fingerprint: str) -> LabelledFeatures | None:
    """Cached features when ``path`` exists with the same fingerprint, else ``None``."""
    if not path.is_file():
        return None
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if _plain(f.attrs.get("fingerprint")) != fingerprint:
                return None
            return LabelledFeatures(
                features=np.asarray(f["features"][:], np.float32),
                labels=np.asarray(f["labels"][:], np.int64),
                names=[_plain(n) for n in f["names"][:]],
                classes=list(json.loads(_plain(f.attrs["classes"]))),
                skipped=int(f.attrs.get("num_skipped", 0)),
            )
    except Exception as exc:
        log.warning("%s: unreadable feature cache, re-embedding (%s)", path, exc)
        return None
