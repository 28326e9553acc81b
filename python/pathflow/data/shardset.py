"""Random access to WebDataset shards and the per-epoch sample order of each rank.

A :class:`ShardSet` indexes plain WebDataset tar shards: those written by ``pathflow tile
--shards`` (a directory with ``shards.json`` and a DALI ``.idx`` beside every tar) or any other
WebDataset (tars with ``<key>.jpg``/``.png`` plus optional ``.json``/``.cls``; the index is then
built by scanning the tar headers once). Samples are read with ``os.pread`` straight from the
tar, so nothing is extracted and workers can jump to any sample.

The order of an epoch (:func:`epoch_order`) is a pure function of (seed, epoch, rank, world).
By default (``mode="permutation"``) all samples are permuted at random (seeded by seed and
epoch, the same on every rank) and the permutation is cut into ``world`` equal parts, one per
rank: every sample exactly once per epoch, and every rank, every batch, draws from all slides
in their proportions, even when ``pathflow tile --shards`` wrote the slides one after another
(samples are read by random access, so this costs nothing). ``mode="buffer"`` is the
streaming order for inputs read sequentially: shards permuted, their samples concatenated, cut
into contiguous parts, each streamed through a seeded shuffle buffer; over unshuffled shards
larger than the buffer a batch then holds patches of one or two slides only. Batches are
dealt to DataLoader workers round-robin, so the batch sequence does not depend on the number
of workers and a run can resume at any batch.

Example:
    >>> import numpy as np
    >>> counts = np.array([5, 3])  # two shards
    >>> a = epoch_order(counts, epoch=0, seed=0, rank=0, world=2)
    >>> b = epoch_order(counts, epoch=0, seed=0, rank=1, world=2)
    >>> sorted(np.concatenate([a, b]).tolist())
    [0, 1, 2, 3, 4, 5, 6, 7]
    >>> ss = ShardSet("out/shards")  # doctest: +SKIP
    >>> ss.shuffled  # True when tiled with ``--shards --shuffle``  # doctest: +SKIP
    False
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pathflow.exceptions import CorruptShardError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SHUFFLE_MODES = ("permutation", "buffer")
I64 = npt.NDArray[np.int64]


def scale_mpp(ext: str) -> float | None:
    """The mpp of a multi-magnification entry ``mpp<v>.<image ext>`` (``mpp1.jpg`` -> 1.0), or
    None for any other extension.

    Example:
        >>> scale_mpp("mpp1.jpg"), scale_mpp("mpp0.25.webp"), scale_mpp("json")
        (1.0, 0.25, None)
    """
    head, _, tail = ext.rpartition(".")  # "mpp0.25.jpg" -> ("mpp0.25", "jpg")
    if not head.startswith("mpp") or tail not in IMAGE_EXTS:
        return None
    try:
        return float(head[3:])
    except ValueError:
        return None


@dataclass
class ShardIndex:
    """Byte ranges of every sample of one tar shard."""

    path: Path
    keys: list[str]
    img_off: I64
    img_size: I64
    meta_off: I64  # -1 where the sample has no .json
    meta_size: I64
    cls_off: I64  # -1 where the sample has no .cls
    cls_size: I64
    # multi-magnification entries (``mpp1.jpg``...): ext -> (offsets, sizes), -1 where absent
    scales: dict[str, tuple[I64, I64]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def _from_records(path: Path, records: list[tuple[str, str, int, int]]) -> ShardIndex:
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    for key, ext, off, size in records:
        samples.setdefault(key, {})[ext] = (off, size)
    keys, io, isz, mo, ms, co, cs = [], [], [], [], [], [], []
    scale_exts = sorted({e for p in samples.values() for e in p if scale_mpp(e) is not None})
    so: dict[str, list[int]] = {e: [] for e in scale_exts}
    ss: dict[str, list[int]] = {e: [] for e in scale_exts}
    for key, parts in samples.items():
        img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
        if img is None:
            continue
        for e in scale_exts:
            o, z = parts.get(e, (-1, 0))
            so[e].append(o)
            ss[e].append(z)
        keys.append(key)
        io.append(img[0])
        isz.append(img[1])
        m = parts.get("json", (-1, 0))
        mo.append(m[0])
        ms.append(m[1])
        c = parts.get("cls", (-1, 0))
        co.append(c[0])
        cs.append(c[1])

    def arr(x: list[int]) -> I64:
        return np.asarray(x, dtype=np.int64)

    scales = {e: (arr(so[e]), arr(ss[e])) for e in scale_exts}
    return ShardIndex(path, keys, arr(io), arr(isz), arr(mo), arr(ms), arr(co), arr(cs), scales)


def read_dali_index(tar: Path, idx: Path) -> ShardIndex:
    """Parse a DALI webdataset index (``v1.2 N`` then ``ext off size name ...`` per sample)."""
    lines = idx.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2"):
        raise ValueError(f"{idx}: not a DALI v1.2 webdataset index")
    records: list[tuple[str, str, int, int]] = []
    for line in lines[1:]:
        f = line.split()
        for j in range(0, len(f) - 3, 4):
            key, ext = _split_key(f[j + 3])
            records.append((key, ext, int(f[j + 1]), int(f[j + 2])))
    return _from_records(tar, records)


def scan_tar(tar: Path) -> ShardIndex:
    """Index a tar by reading its member headers (for WebDatasets without ``.idx``).

    Raises :class:`~pathflow.exceptions.CorruptShardError` when the headers cannot be read
    (a damaged or truncated tar)."""
    records = []
    try:
        with tarfile.open(tar, "r:") as tf:
            for m in tf:
                if m.isfile():
                    key, ext = _split_key(m.name)
                    records.append((key, ext, m.offset_data, m.size))
    except tarfile.TarError as exc:
        raise CorruptShardError(f"{tar}: not a readable tar shard ({exc})") from None
    return _from_records(tar, records)


def index_extent(sh: ShardIndex) -> int:
    """The byte just past the last entry the index of ``sh`` points at: the shard's tar must
    be at least this long.

    Example:
        >>> z = np.zeros(1, np.int64)
        >>> sh = ShardIndex(Path("a.tar"), ["k"], z + 512, z + 100, z + 1024, z + 30, z - 1, z)
        >>> index_extent(sh)
        1054
    """
    end = 0
    pairs = [(sh.img_off, sh.img_size), (sh.meta_off, sh.meta_size), (sh.cls_off, sh.cls_size)]
    for off, size in [*pairs, *sh.scales.values()]:
        present = off >= 0
        if present.any():
            end = max(end, int((off[present] + size[present]).max()))
    return end


def check_shard_size(sh: ShardIndex, size: int, expected: int | None = None) -> None:
    """Raise :class:`~pathflow.exceptions.CorruptShardError` when the tar of ``sh`` (``size``
    bytes, from ``os.stat``) is shorter than its index needs, or than ``expected`` (the
    ``bytes`` that ``shards.json`` recorded when the shard was written)."""
    if expected is not None and size < expected:
        raise CorruptShardError(
            f"{sh.path}: truncated: {size} bytes, shards.json recorded {expected}; copy or "
            "write the shard again"
        )
    end = index_extent(sh)
    if size < end:
        raise CorruptShardError(
            f"{sh.path}: truncated: {size} bytes, but its index points at samples up to byte "
            f"{end}; copy or write the shard again"
        )


@dataclass
class _Manifest:
    """What a ``shards.json`` says: the tars, their recorded sizes, the ``shuffled`` flag."""

    paths: list[Path]
    sizes: list[int | None]
    shuffled: bool | None
    written_by_pathflow: bool


def _shard_paths(source: str | Path | Sequence[str | Path]) -> _Manifest:
    """The tars of ``source``, with what its ``shards.json`` (if any) says about them."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            manifest = p / "shards.json"
            if manifest.is_file():
                info = json.loads(manifest.read_text())
                shuffled = info.get("shuffled")
                flag = bool(shuffled) if isinstance(shuffled, bool) else None
                entries = info["shards"]
                sizes = [
                    int(s["bytes"]) if isinstance(s.get("bytes"), int) else None for s in entries
                ]
                return _Manifest([p / s["name"] for s in entries], sizes, flag, True)
            tars = sorted(p.glob("*.tar"))
            if not tars:
                raise FileNotFoundError(f"{p}: no shards.json and no .tar shards")
            return _Manifest(tars, [None] * len(tars), None, False)
        if p.name == "shards.json":
            return _shard_paths(p.parent)
        if p.suffix == ".tar":
            return _Manifest([p], [None], None, False)
        raise FileNotFoundError(f"{p}: not a shard directory, shards.json or .tar")
    paths = [Path(s) for s in source]
    return _Manifest(paths, [None] * len(paths), None, False)


#: Fields every sample ``.json`` written by ``pathflow tile --shards`` has.
REQUIRED_META = ("slide", "x", "y")


def _as_int(value: Any) -> int | None:
    """``value`` as an int (ints, integral floats, digit strings), None if it is none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def parse_meta(
    raw: bytes | None, required: Sequence[str] = ()
) -> tuple[dict[str, Any], str | None]:
    """A sample's ``.json`` (None: it has none) and what is wrong with it (None: nothing).

    Wrong: bytes that are not JSON, JSON that is not an object, ``x``/``y`` that are not
    integers, a ``slide`` that is not a string or integer, a missing ``required`` field.

    Example:
        >>> parse_meta(b'{"slide": "s", "x": 0, "y": 256}', REQUIRED_META)[1] is None
        True
        >>> parse_meta(b"garbage")[1]
        'the .json is not valid JSON (Expecting value: line 1 column 1 (char 0))'
        >>> parse_meta(b'{"slide": "s", "x": 0}', REQUIRED_META)[1]
        'the .json has no y'
    """
    if raw is None:
        return {}, "the sample has no .json" if required else None
    try:
        meta = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        return {}, f"the .json is not valid JSON ({exc})"
    if not isinstance(meta, dict):
        return {}, f"the .json is a {type(meta).__name__}, not an object"
    for name in required:
        if name not in meta:
            return meta, f"the .json has no {name}"
    for name in ("x", "y"):
        if name in meta and _as_int(meta[name]) is None:
            return meta, f"the .json's {name} is {meta[name]!r}, not an integer"
    slide = meta.get("slide")
    if "slide" in meta and (not isinstance(slide, (str, int)) or isinstance(slide, bool)):
        return meta, f"the .json's slide is {slide!r}, not a string"
    return meta, None


class ShardSet:
    """All samples of a list of shards, addressable by a global index.

    ``shuffled`` is the ``shuffled`` field of ``shards.json`` (True when ``pathflow tile
    --shards --shuffle`` interleaved the slides across shards, False when it wrote them one
    after another), or None when unknown (a plain WebDataset, a list of tars).

    Opening checks every tar's size (``os.stat``, nothing is read) against its index and the
    size ``shards.json`` recorded: a truncated shard raises
    :class:`~pathflow.exceptions.CorruptShardError` naming it, before any training starts.
    :meth:`read` flags samples whose ``.json`` is corrupt (:func:`parse_meta`).

    Example:
        >>> ss = ShardSet("out/shards")  # doctest: +SKIP
        >>> len(ss), ss.counts, ss.shuffled  # doctest: +SKIP
        (43, array([43]), False)
    """

    def __init__(self, source: str | Path | Sequence[str | Path]) -> None:
        manifest = _shard_paths(source)
        self.shuffled = manifest.shuffled
        # every .json of pathflow's shards has slide, x and y: one without is corrupt
        required = REQUIRED_META if manifest.written_by_pathflow else ()
        self.required_meta: tuple[str, ...] = required
        self.shards: list[ShardIndex] = []
        for tar, expected in zip(manifest.paths, manifest.sizes, strict=True):
            if not tar.is_file():
                raise FileNotFoundError(f"{tar}: shard not found")
            idx = tar.with_suffix(".idx")
            sh = read_dali_index(tar, idx) if idx.is_file() else scan_tar(tar)
            check_shard_size(sh, tar.stat().st_size, expected)  # truncated: fail now, by name
            self.shards.append(sh)
        self.counts = np.asarray([len(s) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        if self.counts.sum() == 0:
            raise ValueError(f"{source}: the shards hold no image samples")
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: never share file offsets with the parent
            self._fds = {}
            self._pid = os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = os.open(self.shards[shard].path, os.O_RDONLY)
            self._fds[shard] = fd
        return fd

    @property
    def scale_exts(self) -> list[str]:
        """The multi-magnification entries (``mpp1.jpg``, ``mpp2.jpg``...) of the shards
        (``pathflow tile --shards --shard-mpps 0.5,1,2``), by increasing mpp; the sample's main
        image (the finest mpp) is not listed. Empty for single-resolution shards."""
        exts = {e for s in self.shards for e in s.scales}
        return sorted(exts, key=lambda e: (scale_mpp(e) or 0.0, e))

    def scale_mask(self, idx: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        """``(len(idx), len(scale_exts))``: which multi-magnification entries each sample has."""
        exts = self.scale_exts
        shards, local = self.locate(np.asarray(idx, dtype=np.int64))
        out = np.zeros((len(shards), len(exts)), dtype=np.bool_)
        for s in np.unique(shards).tolist():
            sel = shards == s
            for j, e in enumerate(exts):
                entry = self.shards[s].scales.get(e)
                if entry is not None:
                    out[sel, j] = entry[0][local[sel]] >= 0
        return out

    def read_images(
        self, idx: npt.NDArray[np.int64], exts: Sequence[str | None] | None = None
    ) -> list[bytes]:
        """Encoded bytes of one entry per sample: the main image, or ``exts[i]`` (a
        multi-magnification entry such as ``mpp1.jpg``; None = the main image)."""
        shards, local = self.locate(np.asarray(idx, dtype=np.int64))
        out: list[bytes] = []
        for k, (s, i) in enumerate(zip(shards.tolist(), local.tolist(), strict=True)):
            sh = self.shards[s]
            ext = exts[k] if exts is not None else None
            if ext is None:
                off, size = int(sh.img_off[i]), int(sh.img_size[i])
            else:
                entry = sh.scales.get(ext)
                if entry is None or entry[0][i] < 0:
                    raise KeyError(f"{sh.path}: sample {sh.keys[i]} has no {ext} entry")
                off, size = int(entry[0][i]), int(entry[1][i])
            out.append(self._pread(s, off, size))
        return out

    def key_of(self, idx: int) -> str:
        """The key of global sample ``idx``."""
        shards, local = self.locate(np.asarray([idx], dtype=np.int64))
        return self.shards[int(shards[0])].keys[int(local[0])]

    def read_json(self, idx: int) -> dict[str, Any]:
        """The parsed ``.json`` of global sample ``idx`` ({} when it has none or it is not
        valid JSON)."""
        shards, local = self.locate(np.asarray([idx], dtype=np.int64))
        s, i = int(shards[0]), int(local[0])
        sh = self.shards[s]
        if sh.meta_off[i] < 0:
            return {}
        try:
            meta = json.loads(self._pread(s, int(sh.meta_off[i]), int(sh.meta_size[i])))
        except ValueError:
            return {}
        return meta if isinstance(meta, dict) else {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def locate(self, idx: npt.NDArray[np.int64]) -> tuple[I64, I64]:
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        return shard.astype(np.int64), (idx - self.starts[shard]).astype(np.int64)

    def _pread(self, shard: int, off: int, size: int) -> bytes:
        data = os.pread(self._fd(shard), size, off)
        if len(data) != size:
            raise OSError(
                f"{self.shards[shard].path}: short read at byte {off} "
                f"({len(data)} of {size} bytes); the shard is truncated"
            )
        return data

    def read(self, idx: npt.NDArray[np.int64]) -> tuple[list[bytes], list[dict[str, Any]]]:
        """Encoded image bytes and metadata (key, slide, x, y, label, ``index``, the global
        sample index, and ``error``: what is wrong with the sample's ``.json``, see
        :func:`parse_meta`, or None) of global samples. A sample with an ``error`` has the
        defaults (slide = key, x = y = label = -1): the loader skips it like a corrupt
        image."""
        idx = np.asarray(idx, dtype=np.int64)
        shards, local = self.locate(idx)
        images: list[bytes] = []
        metas: list[dict[str, Any]] = []
        for g, s, i in zip(idx.tolist(), shards.tolist(), local.tolist(), strict=False):
            sh = self.shards[s]
            images.append(self._pread(s, int(sh.img_off[i]), int(sh.img_size[i])))
            raw = (
                self._pread(s, int(sh.meta_off[i]), int(sh.meta_size[i]))
                if sh.meta_off[i] >= 0
                else None
            )
            meta, error = parse_meta(raw, self.required_meta)
            if error is not None:
                meta = {}
            label = meta.get("label", -1)
            if sh.cls_off[i] >= 0:
                raw = self._pread(s, int(sh.cls_off[i]), int(sh.cls_size[i]))
                try:
                    label = int(raw.decode().strip())
                except ValueError:
                    label = -1
            key = sh.keys[i]
            metas.append(
                {
                    "key": key,
                    "index": g,
                    "slide": str(meta.get("slide", Path(key).name)),
                    "x": _as_int(meta.get("x", -1)),
                    "y": _as_int(meta.get("y", -1)),
                    "label": int(label)
                    if isinstance(label, (int, float, str)) and str(label).lstrip("-").isdigit()
                    else -1,
                    "error": error,
                }
            )
        return images, metas


def shuffle_buffer(seq: I64, size: int, rng: np.random.Generator) -> I64:
    """Stream ``seq`` through a shuffle buffer of ``size`` (WebDataset-style, seeded)."""
    n = len(seq)
    if size <= 1 or n <= 1:
        return seq.copy()
    size = min(size, n)
    buf = seq[:size].tolist()
    picks = rng.integers(0, size, n).tolist()
    out = np.empty(n, dtype=np.int64)
    k = 0
    for item, j in zip(seq[size:].tolist(), picks, strict=False):
        out[k] = buf[j]
        buf[j] = item
        k += 1
    tail = np.asarray(buf, dtype=np.int64)
    out[k:] = tail[rng.permutation(len(tail))]
    return out


def epoch_order(
    counts: npt.NDArray[np.int64],
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    world: int = 1,
    shuffle: bool = True,
    mode: str = "permutation",
    buffer: int = 8192,
    equal: bool = False,
) -> I64:
    """Global sample indices this rank visits in ``epoch``.

    Every sample belongs to exactly one rank. With ``equal`` every rank gets ``N // world``
    samples (the few left over this epoch are skipped; they differ from epoch to epoch), which
    keeps DDP ranks in lock-step.

    ``mode="permutation"`` (default): a seeded permutation of all ``N`` samples (the same on
    every rank) cut into ``world`` parts, so each rank's share is a uniform random subset in
    random order and each batch mixes all shards (slides). ``mode="buffer"``: shards permuted,
    cut into contiguous parts, each streamed through a shuffle buffer of ``buffer`` samples
    (for sequential, streaming reads; a batch only mixes shards within ``buffer`` samples of
    each other). ``shuffle=False``: shard order, contiguous parts, in either mode.

    Example:
        >>> import numpy as np
        >>> epoch_order(np.array([4, 4]), epoch=0, seed=0, shuffle=False, world=2, rank=1)
        array([4, 5, 6, 7])
        >>> len(epoch_order(np.array([4, 3]), epoch=0, seed=0, world=2, equal=True))
        3
    """
    if mode not in SHUFFLE_MODES:
        raise ValueError(f"shuffle mode must be one of {SHUFFLE_MODES}, got {mode!r}")
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if shuffle and mode == "permutation":
        seq = rng.permutation(total).astype(np.int64)
    else:
        starts = np.concatenate([[0], np.cumsum(counts)])
        shard_order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
        seq = np.concatenate(
            [np.arange(starts[s], starts[s + 1], dtype=np.int64) for s in shard_order]
        )
    if equal:
        per = len(seq) // world
        part = seq[rank * per : (rank + 1) * per]
    else:
        part = np.array_split(seq, world)[rank]
    if shuffle and mode == "buffer":
        part = shuffle_buffer(part, buffer, np.random.default_rng([seed, epoch, rank, 0xB0F]))
    return np.array(part, dtype=np.int64)  # a copy: the full permutation is freed
