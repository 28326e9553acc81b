"""Where ``pathflow train --data`` points: the shard folder or region-feature folder it names
(:func:`resolve_data`), and a fingerprint of its index (:func:`data_fingerprint`) that a
``--resume`` compares. Torch-free.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from pathflow.data.sources import resolve_data
    >>> run = Path(tempfile.mkdtemp())
    >>> (run / "shards").mkdir(); (run / "shards" / "shard-000000.tar").touch()
    >>> resolve_data(str(run)) == run / "shards"  # the output folder of pathflow tile --shards
    True
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pathflow.exceptions import ConfigError


def resolve_data(data: str, kind: str = "images") -> Path:
    """The source of ``--data``. Images: a shard folder, ``shards.json``, a ``.tar``, or the
    output folder of ``pathflow tile --shards`` (its ``shards/``). Region features: a folder
    of ``pathflow extract --model regions`` files, or the extract output folder holding
    ``features/``."""
    if kind == "region_features":
        from pathflow.data.features import is_region_feature_folder

        p = Path(data) if data else Path()
        if not data or not p.exists():
            raise ConfigError(
                f"{data or '--data'}: region features not found (--data DIR, output of "
                "pathflow extract --model regions)"
            )
        if not (p.is_file() and p.suffix == ".h5") and not is_region_feature_folder(p):
            raise ConfigError(
                f"{p}: no region-feature .h5 files (region_features [M, G*G, D]); make them "
                "with pathflow extract SHARDS --model regions"
            )
        return p
    if not data:
        raise ConfigError("no training data: --data DIR (output of pathflow tile --shards)")
    p = Path(data)
    sub = p / "shards"
    if (
        p.is_dir()
        and not (p / "shards.json").is_file()
        and sub.is_dir()
        and ((sub / "shards.json").is_file() or any(sub.glob("*.tar")))
    ):
        return sub
    if not p.exists():
        raise ConfigError(f"{p}: training data not found")
    return p


def data_fingerprint(data: Path) -> str:
    """sha256 of the data's index: ``shards.json`` when there is one, else the names and
    sizes of the ``.tar`` files. A re-tiled folder gets another fingerprint."""
    h = hashlib.sha256()
    manifest = data if data.name == "shards.json" else data / "shards.json"
    if data.is_dir() and not manifest.is_file() and not any(data.glob("*.tar")):
        # region-feature files: names, sizes and modification times
        for f in sorted(data.rglob("*.h5")):
            st = f.stat()
            h.update(f"{f.relative_to(data)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    elif manifest.is_file():
        h.update(manifest.read_bytes())
    else:
        tars = [data] if data.is_file() else sorted(data.glob("*.tar"))
        for tar in tars:
            h.update(f"{tar.name}\t{tar.stat().st_size}\n".encode())
    return h.hexdigest()


__all__ = ["data_fingerprint", "resolve_data"]
