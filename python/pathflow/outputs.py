"""Files written per slide: CLAM-compatible coordinates (HDF5), mask PNG, overlay JPEG; and
the atomic-write helpers every pathflow output goes through (torch-free).

Every file is written to a temporary name in the destination folder, flushed and fsynced,
then ``os.replace``-d over the destination, so a crash never leaves a half-written file under
the final name (the previous file, if any, stays intact).

Example:
    >>> import tempfile, pathlib
    >>> from pathflow.outputs import atomic_write_text
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write_text(d / "a.txt", "hello")
    >>> (d / "a.txt").read_text()
    'hello'
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from pathflow.grid import PatchGrid
    from pathflow.tissue import TissueSegmentation


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc``); else
    set and restored at once (``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def published_mode() -> int:
    """Mode of a published file: ``0o666`` less the umask, as ``open()`` would create it
    (``mkstemp`` alone gives ``0o600``, which a colleague sharing the job folder cannot read)."""
    return 0o666 & ~current_umask()


def _temp_beside(dest: Path) -> tuple[int, Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        os.fchmod(fd, published_mode())
    except OSError:
        os.close(fd)
        Path(tmp).unlink(missing_ok=True)
        raise
    return fd, Path(tmp)


@contextlib.contextmanager
def atomic_open(dest: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``dest``; on success fsync it and rename it to ``dest``."""
    fd, tmp_path = _temp_beside(Path(dest))
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` for a writer that takes a file name; if the
    block succeeds, fsync the file and rename it to ``dest``. The mode is set again after the
    writer (some, e.g. safetensors, replace the file they are given by a 0600 one)."""
    fd, tmp_path = _temp_beside(Path(dest))
    os.close(fd)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fchmod(f.fileno(), published_mode())
            os.fsync(f.fileno())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``dest`` atomically."""
    with atomic_open(dest, "wb") as f:
        f.write(text.encode())


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content, read in ``chunk_size`` blocks (constant memory).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x"
        >>> _ = p.write_bytes(b"abc")
        >>> sha256_file(p)[:16]
        'ba7816bf8f01cfea'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def write_coords_h5(
    dest: str | os.PathLike[str],
    name: str,
    grid: PatchGrid,
    level_dim: tuple[int, int],
    downsample: tuple[float, float],
    extra_attrs: dict[str, Any],
    before_commit: Callable[[], None] | None = None,
) -> None:
    """Write ``coords`` the way CLAM's ``create_patches_fp.py`` does, plus pathflow extras.

    Dataset ``coords`` (N, 2) int64 with attrs ``patch_size`` (side at ``patch_level``),
    ``patch_level``, ``downsample``, ``downsampled_level_dim``, ``level_dim``, ``name``,
    ``save_path``; pathflow adds ``mpp``, ``target_mpp``, ``patch_size_level0``,
    ``target_patch_size``, ``step_level0`` and a ``tissue_fraction`` (N,) float32 dataset.
    The same attrs are mirrored on the file root for tools that look there.

    ``before_commit`` runs after the file is written and before it is renamed into place
    (e.g. waiting for other outputs written in the background, so the coordinate file still
    appears last); if it raises, nothing is renamed.
    """
    import h5py

    dest = Path(dest)
    attrs: dict[str, Any] = {
        "patch_size": int(grid.read_size),
        "patch_level": int(grid.read_level),
        "downsample": np.asarray(downsample, dtype=np.float64),
        "downsampled_level_dim": np.asarray(level_dim, dtype=np.int64),
        "level_dim": np.asarray(level_dim, dtype=np.int64),
        "name": name,
        "save_path": str(dest.parent),
        "patch_size_level0": int(grid.patch_size_level0),
        "step_level0": int(grid.step_level0),
        "target_patch_size": int(grid.patch),
        "target_mpp": float(grid.target_mpp),
    }
    attrs.update(extra_attrs)
    # locking=False: shared job folders on Lustre/NFS, where HDF5's flock fails
    with atomic_path(dest) as tmp, h5py.File(tmp, "w", locking=False) as f:
        ds = f.create_dataset("coords", data=grid.coords.astype(np.int64), maxshape=(None, 2))
        for k, v in attrs.items():
            ds.attrs[k] = v
            f.attrs[k] = v
        f.create_dataset("tissue_fraction", data=grid.tissue_fraction.astype(np.float32))
        f.close()
        if before_commit is not None:
            with open(tmp, "rb") as fh:  # flush to disk while the other writes finish
                os.fsync(fh.fileno())
            before_commit()


def read_coords_h5(path: str | os.PathLike[str]) -> tuple[npt.NDArray[np.int64], dict[str, Any]]:
    """Coordinates and ``coords`` attrs of a file written by :func:`write_coords_h5`."""
    coords, _, attrs = read_patch_table(path)
    return coords, attrs


def read_patch_table(
    path: str | os.PathLike[str],
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], dict[str, Any]]:
    """Coordinates, tissue fractions (ones for CLAM's own files) and ``coords`` attrs."""
    import h5py

    with h5py.File(path, "r", locking=False) as f:
        coords = np.asarray(f["coords"][:], dtype=np.int64)
        attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
        if "tissue_fraction" in f:
            fractions = np.asarray(f["tissue_fraction"][:], dtype=np.float32)
        else:
            fractions = np.ones(len(coords), np.float32)
    return coords, fractions, attrs


def _plain(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v


def write_mask_png(dest: str | os.PathLike[str], mask: npt.NDArray[np.uint8]) -> None:
    """Tissue mask (0/255) at segmentation resolution as an 8-bit grayscale PNG (encoded in
    Rust, unfiltered with a fast DEFLATE: a 2048 px binary mask takes a few ms)."""
    from pathflow import _core

    data = _core.encode_gray_png(np.ascontiguousarray(mask, dtype=np.uint8))
    with atomic_open(dest, "wb") as f:
        f.write(data)


def overlay_jpeg(
    thumbnail: npt.NDArray[np.uint8],
    level0_size: tuple[int, int],
    seg: TissueSegmentation,
    grid: PatchGrid,
    quality: int = 85,
) -> bytes:
    """JPEG of the thumbnail with the patch grid (yellow translucent cells with outlines),
    tissue contours (green) and holes (blue).

    Drawn in Rust in one pass: the patch cells become a label raster that is blended into
    the picture at once (no call per patch), each contour is drawn once.

    Example:
        >>> data = overlay_jpeg(np.asarray(slide.thumbnail(2048)), slide.dimensions, seg, grid)
        ... # doctest: +SKIP
    """
    from pathflow import _core

    rgb = np.asarray(thumbnail, dtype=np.uint8)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    rgb = np.ascontiguousarray(rgb[:, :, :3])
    th, tw = rgb.shape[:2]
    fx, fy = tw / level0_size[0], th / level0_size[1]
    return _core.render_overlay(
        rgb,
        np.ascontiguousarray(grid.coords, dtype=np.int64),
        float(grid.patch_size_level0),
        fx,
        fy,
        [np.ascontiguousarray(c, dtype=np.int64) for c in seg.tissue],
        [[np.ascontiguousarray(c, dtype=np.int64) for c in hl] for hl in seg.holes],
        line_width=max(1, round(max(tw, th) / 600)),
        quality=quality,
    )


def write_overlay(
    dest: str | os.PathLike[str],
    thumbnail: npt.NDArray[np.uint8],
    level0_size: tuple[int, int],
    seg: TissueSegmentation,
    grid: PatchGrid,
    quality: int = 85,
) -> None:
    """Write :func:`overlay_jpeg` to ``dest`` atomically."""
    data = overlay_jpeg(thumbnail, level0_size, seg, grid, quality)
    with atomic_open(dest, "wb") as f:
        f.write(data)
