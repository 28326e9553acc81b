"""A loader of HIPT ViT-4K views over region-feature files (``pathflow extract``).

HIPT (Chen et al., CVPR 2022) pretrains its ViT-4K with DINO on grids of ViT-256 features:
a 4096 px region is a ``[G*G, D]`` tensor (``G = 16``, ``D = 384``; row ``G*r + c`` is the
patch at grid row ``r``, column ``c``) seen as a ``[D, G, G]`` image. Its views follow
``DataAugmentationDINO4K`` of HIPT's ``1-Hierarchical-Pretraining/main_dino4k.py``:

- 2 global views: ``RandomCrop(14)`` then ``RandomHorizontalFlip(p=0.5)``;
- 8 local views: ``RandomCrop(6)`` then ``RandomHorizontalFlip(p=0.5)``;
- nothing else: no resize, no vertical flip, no colour or noise augmentation.

``RandomCrop`` draws the top and left offsets independently and uniformly over
``0 .. G - size`` (no padding); the horizontal flip reverses the column axis (the last one of
``[D, rows, cols]``). Every view of every sample draws its own offsets and flip
(:class:`FeatureCropSpec`; ``vflip`` adds vertical flips, off as in HIPT).

Input: a folder of per-slide HDF5 files (recursively ``*.h5``, or those of its ``features/``
sub-folder) with a dataset ``region_features`` ``[M, G*G, D]`` (float16, contiguous and
uncompressed: it is memory-mapped; chunked or compressed files are read through h5py),
``coords`` int64 ``[M, 2]`` (x, y) and the root attributes ``slide`` (default: the file
stem) and ``grid`` (``G``). Files without regions are skipped; any ``G`` and ``D`` work, but
all files must agree.

Order and randomness: each epoch is one seeded permutation of all regions cut into one share
per rank (:func:`~pathflow.data.epoch_order`, as the image loader). The crops and flips of a
sample depend only on ``(seed, epoch, position of the sample in the epoch's permutation)``
(a counter-based hash, vectorised), never on the rank or the batch: a resumed run yields the
same batches as an uninterrupted one, and a sample gets the same views whatever the number of
processes. The next batches are read and cropped in a background thread (on the GPU when
``device="cuda"``: the float16 regions are copied there and cropped there).

Example:
    >>> from pathflow.data import make_feature_loader
    >>> loader = make_feature_loader("out/extract", batch_size=256)  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     globals_, locals_ = batch.views[:2], batch.views[2:]
    >>> globals_[0].shape, locals_[0].shape  # doctest: +SKIP
    (torch.Size([256, 384, 14, 14]), torch.Size([256, 384, 6, 6]))
    >>> FeatureCropSpec().sizes()
    [14, 14, 6, 6, 6, 6, 6, 6, 6, 6]
    >>> FeatureCropSpec.for_grid(4).sizes()[:3]
    [3, 3, 2]
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.data.batch import Batch
from pathflow.data.position import EpochPosition
from pathflow.data.shardset import epoch_order
from pathflow.exceptions import ConfigError
from pathflow.threads import background

log = logging.getLogger("pathflow.data")

FEATURE_OUTPUTS = ("float", "bfloat16")
DATASET = "region_features"
I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]
_MASK = (1 << 64) - 1
_PREFETCH = 2
_PROBE_FILES = 32  # files is_region_feature_folder opens at most


# ---------------------------------------------------------------------------- crop spec
@dataclass(frozen=True)
class FeatureCropSpec:
    """The views of a feature grid: ``num_global`` crops of ``global_size`` then
    ``num_local`` crops of ``local_size`` (in grid cells), each flipped horizontally with
    probability ``hflip`` and vertically with ``vflip``. The defaults are HIPT's ViT-4K
    views (``DataAugmentationDINO4K``) for a 16 x 16 grid."""

    global_size: int = 14
    local_size: int = 6
    num_global: int = 2
    num_local: int = 8
    hflip: float = 0.5
    vflip: float = 0.0
    name: str = "hipt4k"

    def __post_init__(self) -> None:
        if self.global_size < 1 or self.local_size < 1:
            raise ConfigError(
                f"crop sizes must be >= 1, got {self.global_size} and {self.local_size}"
            )
        if self.num_global < 1 or self.num_local < 0:
            raise ConfigError(
                f"need num_global >= 1 and num_local >= 0, got {self.num_global}, {self.num_local}"
            )
        for p in (self.hflip, self.vflip):
            if not 0.0 <= p <= 1.0:
                raise ConfigError(f"flip probabilities must be in [0, 1], got {p}")

    @classmethod
    def for_grid(cls, grid: int, **kwargs: Any) -> FeatureCropSpec:
        """HIPT's proportions for a ``grid`` x ``grid`` grid: global crops drop
        ``max(1, round(grid / 8))`` cells (14 of 16), local crops keep ``round(3 * grid / 8)``
        (6 of 16); other fields from ``kwargs``."""
        fields: dict[str, Any] = {
            "global_size": max(1, grid - max(1, round(grid / 8))),
            "local_size": max(1, round(3 * grid / 8)),
        }
        fields.update(kwargs)
        return cls(**fields)

    @property
    def num_views(self) -> int:
        return self.num_global + self.num_local

    def sizes(self) -> list[int]:
        """The crop size of every view, globals first."""
        return [self.global_size] * self.num_global + [self.local_size] * self.num_local

    def check_grid(self, grid: int) -> None:
        if max(self.global_size, self.local_size) > grid:
            raise ConfigError(
                f"crop sizes {self.global_size}/{self.local_size} do not fit the "
                f"{grid} x {grid} feature grid; use FeatureCropSpec.for_grid({grid})"
            )


# ------------------------------------------------------------------- counter-based hash
def _u64(x: int) -> U64:
    return np.asarray([x & _MASK], dtype=np.uint64)


def _mix(x: U64) -> U64:
    """SplitMix64: a bijective 64-bit hash with full avalanche (arrays only: no warnings
    on the wrap-around)."""
    z = x + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def crop_params(
    spec: FeatureCropSpec, grid: int, *, seed: int, epoch: int, positions: npt.ArrayLike
) -> tuple[I64, I64, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Top and left offsets and horizontal / vertical flips, each ``[B, num_views]``, of the
    samples at ``positions`` of the epoch's global order: a pure function of
    ``(seed, epoch, position, view)``.

    Example:
        >>> top, left, hf, vf = crop_params(FeatureCropSpec(), 16, seed=0, epoch=0,
        ...                                 positions=[0, 1])
        >>> top.shape, bool((top[:, :2] <= 2).all()), bool((left <= 10).all()), bool(vf.any())
        ((2, 10), True, True, False)
    """
    pos = np.asarray(positions, dtype=np.int64).astype(np.uint64)
    key = _mix(_mix(_mix(_u64(seed) ^ np.uint64(0xFEA7)) ^ _u64(epoch)) ^ pos)  # [B]
    nv = spec.num_views
    stream = np.asarray(
        [(0xD1B54A32D192ED03 * (4 * v + f + 1)) & _MASK for v in range(nv) for f in range(4)],
        dtype=np.uint64,
    )
    u = _mix(key[:, None] ^ stream[None, :]).reshape(len(pos), nv, 4)
    span = np.asarray([grid - s + 1 for s in spec.sizes()], dtype=np.uint64)
    top = (u[..., 0] % span).astype(np.int64)
    left = (u[..., 1] % span).astype(np.int64)
    unit = (u[..., 2:] >> np.uint64(11)).astype(np.float64) * 2.0**-53  # uniform [0, 1)
    return top, left, unit[..., 0] < spec.hflip, unit[..., 1] < spec.vflip


def crop_tokens(
    size: int, grid: int, top: I64, left: I64, hflip: npt.NDArray[np.bool_], vflip: Any
) -> I64:
    """Token indices ``[..., size * size]`` (row-major over the crop) into the ``grid*grid``
    rows of a region, for crops at ``top``/``left``, flipped where ``hflip``/``vflip``."""
    ar = np.arange(size, dtype=np.int64)
    rows = np.where(np.asarray(vflip)[..., None], size - 1 - ar, ar) + top[..., None]
    cols = np.where(hflip[..., None], size - 1 - ar, ar) + left[..., None]
    tok = rows[..., :, None] * grid + cols[..., None, :]
    return tok.reshape(*top.shape, size * size)


# ------------------------------------------------------------------------- the files
def _feature_files(source: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such folder or .h5 file")
        sub = p / "features"
        if sub.is_dir() and any(sub.rglob("*.h5")):
            p = sub
        files = sorted(f for f in p.rglob("*.h5") if f.is_file())
        if not files:
            raise ConfigError(f"{p}: no .h5 region-feature files")
        return files
    return [Path(s) for s in source]


def is_region_feature_folder(path: str | Path) -> bool:
    """True when ``path`` is a folder whose ``.h5`` files (or those of its ``features/``
    sub-folder) hold ``region_features`` (the first few files are looked at)."""
    import h5py

    p = Path(path)
    if not p.is_dir():
        return False
    try:
        files = _feature_files(p)
    except (ConfigError, OSError):
        return False
    for f in files[:_PROBE_FILES]:
        try:
            with h5py.File(f, "r") as h5:
                if isinstance(h5.get(DATASET), h5py.Dataset):
                    return True
        except OSError:
            continue
    return False


def _raise_nofile_limit(needed: int) -> None:
    """Each memory map holds a file descriptor: lift the soft limit for many slides."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 256
    if soft == resource.RLIM_INFINITY or soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        log.warning("cannot raise the open-file limit to %d for %d feature files", new, needed)


def _attr_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.size == 1:
        return _attr_str(value.item())
    return str(value)


class RegionFeatureSet:
    """All regions of a set of region-feature files, addressable by a global index.

    ``files``, ``slides`` and ``counts`` list the files kept (those with regions), in sorted
    path order; ``grid`` and ``dim`` are ``G`` and ``D``; ``memmapped[i]`` says whether file
    ``i`` is memory-mapped (else it is read through h5py, for chunked/compressed datasets).

    Example:
        >>> fs = RegionFeatureSet("out/extract")  # doctest: +SKIP
        >>> len(fs), fs.grid, fs.dim, fs.read([0, 5]).shape  # doctest: +SKIP
        (1200, 16, 384, (2, 256, 384))
    """

    def __init__(self, source: str | Path | Sequence[str | Path]) -> None:
        import h5py

        paths = _feature_files(source)
        _raise_nofile_limit(len(paths))
        self.files: list[Path] = []
        self.slides: list[str] = []
        self.memmapped: list[bool] = []
        self._arrays: list[Any] = []  # np.memmap, or the h5py dataset of an open file
        self._handles: list[Any] = []  # open h5py files (fallback only)
        self._coords: list[I64] = []
        counts: list[int] = []
        grid = dim = 0
        first: Path | None = None
        dtypes: list[np.dtype[Any]] = []
        for path in paths:
            try:
                h5 = h5py.File(path, "r")
            except OSError as exc:
                self.close()
                raise ConfigError(f"{path}: not a readable HDF5 file ({exc})") from None
            keep_open = False
            try:
                ds = h5.get(DATASET)
                if not isinstance(ds, h5py.Dataset):
                    log.warning("%s: no '%s' dataset; skipped", path, DATASET)
                    continue
                if ds.ndim != 3:
                    raise ConfigError(
                        f"{path}: {DATASET} has shape {ds.shape}; expected 3-D "
                        "[regions, grid*grid, dim]"
                    )
                m, tokens, d = (int(n) for n in ds.shape)
                if m == 0:
                    log.info("%s: no regions; skipped", path)
                    continue
                g = math.isqrt(tokens)
                if g * g != tokens or g == 0:
                    raise ConfigError(
                        f"{path}: {DATASET} has {tokens} tokens per region, not a square grid"
                    )
                if "grid" in h5.attrs and int(np.asarray(h5.attrs["grid"]).item()) != g:
                    raise ConfigError(
                        f"{path}: attribute grid={_attr_str(h5.attrs['grid'])} but "
                        f"{DATASET} holds {tokens} = {g} x {g} tokens per region"
                    )
                if ds.dtype.kind != "f":
                    raise ConfigError(f"{path}: {DATASET} is {ds.dtype}, not floating point")
                if first is None:
                    grid, dim, first = g, d, path
                elif (g, d) != (grid, dim):
                    raise ConfigError(
                        f"{path}: {DATASET} is a {g} x {g} grid of {d}-dim features, but "
                        f"{first} has {grid} x {grid} x {dim}"
                    )
                coords = np.full((m, 2), -1, dtype=np.int64)
                if "coords" in h5:
                    c = np.asarray(h5["coords"][()])
                    if c.shape != (m, 2):
                        raise ConfigError(f"{path}: coords has shape {c.shape}, expected ({m}, 2)")
                    coords = c.astype(np.int64)
                slide = _attr_str(h5.attrs["slide"]) if "slide" in h5.attrs else path.stem
                offset = ds.id.get_offset()
                nbytes = m * tokens * d * ds.dtype.itemsize
                contiguous = (
                    offset is not None
                    and ds.chunks is None
                    and ds.compression is None
                    and path.stat().st_size >= offset + nbytes
                )
                if contiguous:
                    arr: Any = np.memmap(
                        path, dtype=ds.dtype, mode="r", offset=offset, shape=(m, tokens, d)
                    )
                else:
                    arr = ds
                    keep_open = True
                    self._handles.append(h5)
            except BaseException:
                self.close()
                raise
            finally:
                if not keep_open:
                    h5.close()
            self.files.append(path)
            self.slides.append(slide)
            self.memmapped.append(contiguous)
            self._arrays.append(arr)
            self._coords.append(coords)
            dtypes.append(np.dtype(arr.dtype))
            counts.append(m)
        if not counts:
            raise ConfigError(f"{source}: no regions in {len(paths)} region-feature file(s)")
        self.grid = grid
        self.dim = dim
        self.dtype: np.dtype[Any] = np.result_type(*dtypes)
        self.counts = np.asarray(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._lock = threading.Lock()  # h5py reads of the fallback path

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return (
            f"RegionFeatureSet({len(self)} regions in {len(self.files)} files, grid "
            f"{self.grid} x {self.grid}, dim {self.dim}, {sum(self.memmapped)} memory-mapped)"
        )

    def close(self) -> None:
        for h5 in self._handles:
            h5.close()
        self._handles = []
        self._arrays = []

    def locate(self, idx: npt.ArrayLike) -> tuple[I64, I64]:
        """File and in-file region index of global indices."""
        i = np.asarray(idx, dtype=np.int64)
        if i.size and (i.min() < 0 or i.max() >= len(self)):
            raise IndexError(f"region index out of range 0..{len(self) - 1}")
        f = np.searchsorted(self.starts, i, side="right") - 1
        return f.astype(np.int64), (i - self.starts[f]).astype(np.int64)

    def read(self, idx: npt.ArrayLike) -> npt.NDArray[Any]:
        """Features ``[B, G*G, D]`` (float16 for float16 files) of global indices."""
        files, local = self.locate(idx)
        out = np.empty((len(files), self.grid * self.grid, self.dim), dtype=self.dtype)
        if not len(files):
            return out
        order = np.lexsort((local, files))  # by file, then ascending in-file index
        fs = files[order]
        cuts = np.flatnonzero(np.diff(fs)) + 1
        for grp in np.split(order, cuts):
            f = int(files[grp[0]])
            loc = local[grp]
            arr = self._arrays[f]
            if self.memmapped[f]:
                out[grp] = arr[loc]
            else:  # h5py wants unique increasing indices
                uniq, inv = np.unique(loc, return_inverse=True)
                with self._lock:
                    out[grp] = arr[uniq][inv.reshape(-1)]
        return out

    def meta(self, idx: npt.ArrayLike) -> dict[str, Any]:
        """``key`` (``"<slide>/<region>"``), ``slide``, ``x``, ``y`` and ``label`` (-1)."""
        files, local = self.locate(idx)
        fl, ll = files.tolist(), local.tolist()
        xy = np.asarray(
            [self._coords[f][i] for f, i in zip(fl, ll, strict=True)], dtype=np.int64
        ).reshape(-1, 2)
        return {
            "key": [f"{self.slides[f]}/{i}" for f, i in zip(fl, ll, strict=True)],
            "slide": [self.slides[f] for f in fl],
            "x": xy[:, 0].copy(),
            "y": xy[:, 1].copy(),
            "label": np.full(len(fl), -1, dtype=np.int64),
        }


# ------------------------------------------------------------------------- the loader
@dataclass
class FeatureLoaderConfig:
    """Everything that defines the sample stream of a :class:`RegionFeatureLoader`."""

    batch_size: int = 64
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    drop_last: bool = True
    output: str = "float"
    device: str = "cpu"


@dataclass
class _Raw:
    """One batch read, with its crop parameters, before the crops."""

    data: Any  # [B, G*G, D]: numpy, or a pinned torch tensor
    tokens: list[I64]  # per view group: [B, views, size*size]
    meta: dict[str, Any]
    index: int
    epoch: int


class RegionFeatureLoader(EpochPosition):
    """Iterable over :class:`~pathflow.data.batch.Batch` es of HIPT views; see
    :func:`make_feature_loader`. Same interface as :class:`~pathflow.data.loader.Loader`:
    ``len`` (batches per epoch on this rank), :meth:`set_epoch`, :meth:`state_dict` /
    :meth:`load_state_dict` (resume at any batch), ``stats`` and ``spec``."""

    def __init__(
        self, features: RegionFeatureSet, spec: FeatureCropSpec, cfg: FeatureLoaderConfig
    ) -> None:
        spec.check_grid(features.grid)
        self.features = features
        self.spec = spec
        self.cfg = cfg
        self._init_position()

    # ---------------------------------------------------------------- order
    def _split(self) -> tuple[int, int]:
        """Start (in the epoch's global order) and length of this rank's share."""
        n, w, r = len(self.features), self.cfg.world_size, self.cfg.rank
        if self.cfg.drop_last:
            return r * (n // w), n // w
        return r * (n // w) + min(r, n % w), n // w + (1 if r < n % w else 0)

    def __len__(self) -> int:
        _, share = self._split()
        bs = self.cfg.batch_size
        return share // bs if self.cfg.drop_last else math.ceil(share / bs)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"RegionFeatureLoader({len(self.features)} regions, {len(self)} batches of "
            f"{c.batch_size}, views={self.spec.name} x{self.spec.num_views}, grid "
            f"{self.features.grid}, dim {self.features.dim}, device={c.device}, "
            f"rank {c.rank}/{c.world_size})"
        )

    def order(self, epoch: int) -> I64:
        """Global region indices this rank visits in ``epoch``."""
        c = self.cfg
        return epoch_order(
            self.features.counts,
            epoch=epoch,
            seed=c.seed,
            rank=c.rank,
            world=c.world_size,
            mode="permutation",
            equal=c.drop_last,
        )

    # ---------------------------------------------------------------- state
    # ------------------------------------------------------------ iteration
    def _read(self, order: I64, epoch: int, b: int) -> _Raw:
        """Read batch ``b`` and draw its crops (background thread)."""
        bs = self.cfg.batch_size
        idx = order[b * bs : (b + 1) * bs]
        start, _ = self._split()
        positions = start + b * bs + np.arange(len(idx), dtype=np.int64)
        spec, grid = self.spec, self.features.grid
        top, left, hf, vf = crop_params(
            spec, grid, seed=self.cfg.seed, epoch=epoch, positions=positions
        )
        ng = spec.num_global
        tokens = [
            crop_tokens(spec.global_size, grid, top[:, :ng], left[:, :ng], hf[:, :ng], vf[:, :ng])
        ]
        if spec.num_local:
            tokens.append(
                crop_tokens(
                    spec.local_size, grid, top[:, ng:], left[:, ng:], hf[:, ng:], vf[:, ng:]
                )
            )
        data: Any = self.features.read(idx)
        if self.cfg.device.startswith("cuda"):
            import torch

            data = torch.from_numpy(data)
            if torch.cuda.is_available():
                data = data.pin_memory()
        return _Raw(data, tokens, self.features.meta(idx), b, epoch)

    def _finish(self, raw: _Raw) -> Batch:
        """Crop the views on the loader's device."""
        import torch

        dev = torch.device(self.cfg.device)
        dtype = torch.bfloat16 if self.cfg.output == "bfloat16" else torch.float32
        x = raw.data if isinstance(raw.data, torch.Tensor) else torch.from_numpy(raw.data)
        x = x.to(dev, non_blocking=True)
        bsz, t, d = x.shape
        flat = x.reshape(bsz * t, d)
        base = torch.arange(bsz, device=dev, dtype=torch.int64).view(bsz, 1, 1) * t
        views: list[Any] = []
        for tok in raw.tokens:
            nv, ss = tok.shape[1], tok.shape[2]
            size = math.isqrt(ss)
            ti = torch.from_numpy(tok).to(dev, non_blocking=True) + base
            got = flat.index_select(0, ti.reshape(-1)).view(bsz, nv, size, size, d)
            out = torch.empty((nv, bsz, d, size, size), dtype=dtype, device=dev)
            out.copy_(got.permute(1, 0, 4, 2, 3))
            views.extend(out.unbind(0))
        meta = dict(raw.meta)
        for k in ("x", "y", "label"):
            meta[k] = torch.from_numpy(np.asarray(raw.meta[k], dtype=np.int64))
        return Batch(views=views, meta=meta, index=raw.index, epoch=raw.epoch)

    def _produce(self, order: I64, epoch: int, start: int, stop: int) -> Iterator[Any]:
        on_gpu = self.cfg.device.startswith("cuda")
        for b in range(start, stop):
            raw = self._read(order, epoch, b)
            yield raw if on_gpu else self._finish(raw)

    def __iter__(self) -> Iterator[Batch]:
        n = len(self)
        if self._next >= n:  # resumed from a state saved after the last batch
            self.epoch += 1
            self._next = 0
        epoch = self.epoch
        order = self.order(epoch)
        on_gpu = self.cfg.device.startswith("cuda")
        for item in background(self._produce(order, epoch, self._next, n), _PREFETCH):
            batch = self._finish(item) if on_gpu else item
            self._next = batch.index + 1
            self._count(batch)
            yield batch
        self.epoch += 1
        self._next = 0


def make_feature_loader(
    data: str | Path | Sequence[str | Path] | RegionFeatureSet,
    batch_size: int,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    device: str = "cpu",
    output: str = "float",
    spec: FeatureCropSpec | None = None,
    drop_last: bool = True,
) -> RegionFeatureLoader:
    """A loader of HIPT ViT-4K views over region-feature files.

    Args:
        data: a folder of region-feature ``.h5`` files (recursively, or its ``features/``
            sub-folder), one ``.h5``, a list of them, or a :class:`RegionFeatureSet`.
        batch_size: regions per batch and rank.
        seed: seeds the epoch order and every crop and flip.
        rank, world_size: DDP split (default: from ``torch.distributed`` or RANK/WORLD_SIZE).
        device: where the views are cropped and returned: ``"cpu"``, ``"cuda[:N]"`` or
            ``"auto"`` (CUDA when available).
        output: ``"float"`` (float32) or ``"bfloat16"``.
        spec: the views (default: HIPT's, :meth:`FeatureCropSpec.for_grid` of the files'
            grid, which is :class:`FeatureCropSpec` ``()`` for 16 x 16 grids).
        drop_last: equal batch counts on every rank and no partial batch; with False every
            region is visited exactly once per epoch.

    Each batch's ``views`` are ``num_global`` tensors ``[B, D, g, g]`` then ``num_local``
    tensors ``[B, D, l, l]``; ``meta`` holds ``key`` (``"<slide>/<region>"``), ``slide``,
    ``x``, ``y`` (the region's coords) and ``label`` (-1).
    """
    from pathflow.data.loader import _dist_rank_world

    if output not in FEATURE_OUTPUTS:
        raise ValueError(f"output must be one of {FEATURE_OUTPUTS}, got {output!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    fs = data if isinstance(data, RegionFeatureSet) else RegionFeatureSet(data)
    if spec is None:
        spec = FeatureCropSpec.for_grid(fs.grid)
    if device == "auto":
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    r, w = _dist_rank_world()
    rank = r if rank is None else rank
    world_size = w if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    cfg = FeatureLoaderConfig(
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        output=output,
        device=device,
    )
    loader = RegionFeatureLoader(fs, spec, cfg)
    if len(loader) == 0:
        raise ValueError(
            f"{len(fs)} regions give no batch of {batch_size} on each of {world_size} "
            "rank(s); use a smaller batch_size or drop_last=False"
        )
    return loader


__all__ = [
    "FeatureCropSpec",
    "RegionFeatureLoader",
    "RegionFeatureSet",
    "crop_params",
    "crop_tokens",
    "is_region_feature_folder",
    "make_feature_loader",
]
