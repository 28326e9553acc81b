"""Spatial neighbours of shard samples: the patches of the same slide within a radius.

Every sample of ``pathflow tile --shards`` knows its slide and level-0 position (key
``<slide key>_<x>_<y>``, and ``slide``/``x``/``y``/``patch_size_level0`` in its ``.json``).
:func:`sample_coords` collects them for a whole :class:`~pathflow.data.ShardSet` (from the keys
plus one ``.json`` per slide when the keys carry the coordinates, else from every ``.json``),
and :class:`NeighbourIndex` answers, for any samples, which samples of the same slide lie
within ``radius`` grid steps.

Distances are measured in **grid steps**: level-0 offsets divided by the slide's grid step
(the most frequent horizontal spacing between patches of one row, which is the tiling step
``(patch - overlap)`` at level 0; the JSON's ``patch_size_level0`` when no row has two
patches). Metric ``"chebyshev"`` (default, ``max(|dx|, |dy|)``) or ``"euclidean"``. A neighbour
is a sample with ``0 < distance <= radius``: the sample itself and duplicates at the same
position (CLAM's grid can repeat a patch where two contours' boxes overlap) are not. On a
regular grid, radius 1 is the 8-neighbourhood and radius 2 the 5 x 5 block without its
centre, which is SGCL's ``0 < distance < 3`` with either metric.

The index is a sort of all samples by (slide, grid cell): building it is O(N log N) (about a
second for a million samples) and a query looks up the ``(2 ceil(radius) + 1)^2`` cells around
each anchor with vectorised binary searches, so the loader asks only for its batch's anchors.

:meth:`NeighbourIndex.draw` picks one neighbour per anchor uniformly, from a counter-based hash
of ``(seed, epoch, sample index)``: the same pair whatever the rank, worker or resume point.

Example:
    >>> import numpy as np
    >>> x = np.array([0, 256, 512, 0, 1024])
    >>> y = np.array([0, 0, 0, 256, 0])
    >>> idx = NeighbourIndex(np.zeros(5, np.int64), x, y, np.full(5, 256.0), radius=1)
    >>> indptr, nbrs = idx.query(np.array([0, 4]))
    >>> nbrs[indptr[0] : indptr[1]].tolist(), nbrs[indptr[1] : indptr[2]].tolist()
    ([1, 3], [])
    >>> idx.counts().tolist()
    [2, 3, 1, 2, 0]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from pathflow.data.shardset import ShardSet

I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]
METRICS = ("chebyshev", "euclidean")
_KEY = re.compile(r"^(.*)_(-?\d+)_(-?\d+)$")
_EPS = 1e-6


# ------------------------------------------------------------------------ counter-based draws
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser (a bijection of uint64 with full avalanche)."""
    z = z + _GOLD
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def hash_uniform(seed: int, epoch: int, index: npt.ArrayLike, salt: int = 0) -> F64:
    """Uniform numbers in [0, 1), one per ``index``, a pure function of
    ``(seed, epoch, index, salt)`` (splitmix64 chained over the four; 53-bit resolution).

    Example:
        >>> u = hash_uniform(0, 0, np.arange(3))
        >>> bool(((u >= 0) & (u < 1)).all()), bool((u == hash_uniform(0, 0, np.arange(3))).all())
        (True, True)
    """
    with np.errstate(over="ignore"):
        h = _mix(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        h = _mix(h ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        h = _mix(h ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF))
        z = _mix(h ^ np.asarray(index, dtype=np.int64).astype(np.uint64))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# ---------------------------------------------------------------------------- coordinates
@dataclass
class SampleCoords:
    """Slide and level-0 position of every sample of a shard set (global index order).

    ``slide[i]`` indexes ``slides`` (the slide ids); ``step[i]`` is the grid step of sample
    ``i``'s slide in level-0 pixels.
    """

    slide: I64
    slides: list[str]
    x: I64
    y: I64
    step: F64

    def __len__(self) -> int:
        return len(self.slide)


def _no_coords(ss: ShardSet, i: int) -> ValueError:
    s, j = (int(v[0]) for v in ss.locate(np.asarray([i], dtype=np.int64)))
    return ValueError(
        f"{ss.shards[s].path}: sample {ss.shards[s].keys[j]} has no slide/x/y in its .json; "
        "spatial neighbours need shards written by `pathflow tile --shards`"
    )


def _from_keys(ss: ShardSet) -> tuple[I64, list[str], I64, I64, dict[int, int]] | None:
    """Slide codes and positions parsed from ``<slide key>_<x>_<y>`` keys, checked against one
    ``.json`` per slide (its first sample with a readable one: a corrupt ``.json``, which the
    loader skips, does not hide its slide's positions); None when the keys do not carry
    them."""
    prefixes: dict[str, int] = {}
    codes, xs, ys = [], [], []
    for sh in ss.shards:
        for key in sh.keys:
            m = _KEY.match(Path(key).name)
            if m is None:
                return None
            codes.append(prefixes.setdefault(m.group(1), len(prefixes)))
            xs.append(int(m.group(2)))
            ys.append(int(m.group(3)))
    code = np.asarray(codes, dtype=np.int64)
    order = np.argsort(code, kind="stable")  # the samples of each prefix, in shard order
    bounds = np.searchsorted(code[order], np.arange(len(prefixes) + 1))
    names: list[str] = []
    size0: dict[int, int] = {}
    for c in range(len(prefixes)):
        members = order[bounds[c] : bounds[c + 1]].tolist()
        # read_json gives {} for a missing or corrupt .json: try the prefix's next sample
        i, meta = next(((j, d) for j in members if (d := ss.read_json(j))), (members[0], {}))
        if meta.get("x") != xs[i] or meta.get("y") != ys[i] or "slide" not in meta:
            return None
        names.append(str(meta["slide"]))
        if isinstance(meta.get("patch_size_level0"), (int, float)):
            size0[c] = int(meta["patch_size_level0"])
    # two key prefixes of one slide id (never written by pathflow) become one slide
    uniq = sorted(set(names))
    where = {n: i for i, n in enumerate(uniq)}
    remap = np.asarray([where[n] for n in names], dtype=np.int64)
    size = {int(remap[c]): v for c, v in size0.items()}
    return remap[code], uniq, np.asarray(xs, np.int64), np.asarray(ys, np.int64), size


def _from_json(ss: ShardSet) -> tuple[I64, list[str], I64, I64, dict[int, int]]:
    """Slide and position from every sample's ``.json``."""
    names: dict[str, int] = {}
    n = len(ss)
    code = np.empty(n, dtype=np.int64)
    x = np.empty(n, dtype=np.int64)
    y = np.empty(n, dtype=np.int64)
    size: dict[int, int] = {}
    for i in range(n):
        meta = ss.read_json(i)
        if "slide" not in meta or not isinstance(meta.get("x"), int):
            raise _no_coords(ss, i)
        if not isinstance(meta.get("y"), int):
            raise _no_coords(ss, i)
        c = names.setdefault(str(meta["slide"]), len(names))
        code[i], x[i], y[i] = c, meta["x"], meta["y"]
        if c not in size and isinstance(meta.get("patch_size_level0"), (int, float)):
            size[c] = int(meta["patch_size_level0"])
    order = sorted(names, key=lambda s: s)
    remap = np.empty(len(names), dtype=np.int64)
    for new, name in enumerate(order):
        remap[names[name]] = new
    return remap[code], order, x, y, {int(remap[c]): v for c, v in size.items()}


def grid_steps(slide: I64, x: I64, y: I64, n_slides: int) -> F64:
    """Per slide, the most frequent positive x-spacing between consecutive patches of the same
    row (same slide and y): the tiling step at level 0. NaN for slides with no such pair.

    Example:
        >>> s = np.zeros(4, np.int64)
        >>> grid_steps(s, np.array([0, 128, 256, 0]), np.array([0, 0, 0, 128]), 1).tolist()
        [128.0]
    """
    out = np.full(n_slides, np.nan)
    order = np.lexsort((x, y, slide))
    s, xs, ys = slide[order], x[order], y[order]
    same = (s[1:] == s[:-1]) & (ys[1:] == ys[:-1])
    d = (xs[1:] - xs[:-1])[same]
    sd = s[1:][same]
    pos = d > 0
    d, sd = d[pos], sd[pos]
    if len(d) == 0:
        return out
    pairs, counts = np.unique(np.stack([sd, d], axis=1), axis=0, return_counts=True)
    # per slide, the spacing with the most occurrences (the smallest among ties)
    best = np.lexsort((pairs[:, 1], -counts, pairs[:, 0]))
    first = np.ones(len(best), dtype=np.bool_)
    first[1:] = pairs[best[1:], 0] != pairs[best[:-1], 0]
    top = best[first]
    out[pairs[top, 0]] = pairs[top, 1].astype(np.float64)
    return out


def sample_coords(ss: ShardSet, step: float | None = None) -> SampleCoords:
    """Slide, level-0 x/y and grid step of every sample of ``ss``.

    ``step`` (level-0 pixels) overrides the grid step of every slide; by default it is
    inferred per slide (:func:`grid_steps`), else taken from ``patch_size_level0``.

    Example:
        >>> c = sample_coords(ShardSet("out/shards"))  # doctest: +SKIP
        >>> c.slides, c.step[:1]  # doctest: +SKIP
        (['cmu_small_region'], array([257.]))
    """
    parsed = _from_keys(ss)
    slide, names, x, y, size0 = parsed if parsed is not None else _from_json(ss)
    if step is not None:
        if step <= 0:
            raise ValueError(f"grid step must be > 0 level-0 pixels, got {step}")
        per_slide = np.full(len(names), float(step))
    else:
        per_slide = grid_steps(slide, x, y, len(names))
        for c in np.flatnonzero(np.isnan(per_slide)).tolist():
            if c not in size0 or size0[c] <= 0:
                raise ValueError(
                    f"slide {names[c]}: cannot tell its grid step (no two patches in a row and "
                    "no patch_size_level0 in the .json); pass step="
                )
            per_slide[c] = float(size0[c])
    return SampleCoords(slide=slide, slides=names, x=x, y=y, step=per_slide[slide])


# ---------------------------------------------------------------------------------- index
class NeighbourIndex:
    """Which samples of the same slide lie within ``radius`` grid steps of a sample.

    Args:
        slide: slide code per sample (any integers; equal codes = same slide).
        x, y: level-0 position per sample.
        step: grid step (level-0 pixels) per sample (that of its slide).
        radius: in grid steps; neighbours have ``0 < distance <= radius``.
        metric: ``"chebyshev"`` (``max(|dx|, |dy|)``) or ``"euclidean"``.

    Use :meth:`from_shards` for a :class:`~pathflow.data.ShardSet`. See the module docs.
    """

    def __init__(
        self,
        slide: npt.ArrayLike,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        step: npt.ArrayLike,
        *,
        radius: float = 2.0,
        metric: str = "chebyshev",
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"neighbour metric must be one of {METRICS}, got {metric!r}")
        if not radius > 0 or not math.isfinite(radius):
            raise ValueError(f"neighbour radius must be > 0 grid steps, got {radius}")
        s = np.asarray(slide, dtype=np.int64)
        st = np.asarray(step, dtype=np.float64)
        if np.any(st <= 0):
            raise ValueError("grid steps must be > 0")
        self.radius = float(radius)
        self.metric = metric
        self.gx = np.asarray(x, dtype=np.float64) / st  # positions in grid steps
        self.gy = np.asarray(y, dtype=np.float64) / st
        self.slide = s
        self.coords: SampleCoords | None = None  # set by from_shards
        n = len(s)
        self.reach = math.ceil(self.radius + _EPS)  # cell offsets to search on each axis
        if n == 0:
            self._key = np.zeros(0, dtype=np.int64)
            self._order = np.zeros(0, dtype=np.int64)
            self._sorted = self._key
            self._cols = 1
            return
        cx = np.floor(self.gx + _EPS).astype(np.int64)
        cy = np.floor(self.gy + _EPS).astype(np.int64)
        r = self.reach
        cx -= cx.min() - r
        cy -= cy.min() - r
        sl = s - s.min()
        self._cols = int(cy.max()) + r + 1
        rows = int(cx.max()) + r + 1
        if (int(sl.max()) + 1) * rows * self._cols >= 2**62:
            raise ValueError(
                "slide grids too large for the neighbour index (positions in grid steps)"
            )
        self._key = (sl * rows + cx) * self._cols + cy
        self._order = np.argsort(self._key, kind="stable").astype(np.int64)
        self._sorted = self._key[self._order]

    @classmethod
    def from_shards(
        cls,
        shards: ShardSet | str | Path,
        *,
        radius: float = 2.0,
        metric: str = "chebyshev",
        step: float | None = None,
    ) -> NeighbourIndex:
        """The index of every sample of a shard set (see :func:`sample_coords`).

        Example:
            >>> nb = NeighbourIndex.from_shards("out/shards", radius=2)  # doctest: +SKIP
            >>> nb.counts()[:5]  # doctest: +SKIP
            array([ 4,  5,  7,  9, 13])
        """
        ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
        c = sample_coords(ss, step)
        out = cls(c.slide, c.x, c.y, c.step, radius=radius, metric=metric)
        out.coords = c
        return out

    def __len__(self) -> int:
        return len(self.slide)

    def distance(self, a: npt.ArrayLike, b: npt.ArrayLike) -> F64:
        """Distance in grid steps between samples ``a`` and ``b`` (inf across slides)."""
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        dx = np.abs(self.gx[a] - self.gx[b])
        dy = np.abs(self.gy[a] - self.gy[b])
        d = np.maximum(dx, dy) if self.metric == "chebyshev" else np.hypot(dx, dy)
        return np.where(self.slide[a] == self.slide[b], d, np.inf)

    def query(self, anchors: npt.ArrayLike) -> tuple[I64, I64]:
        """Neighbours of each anchor as CSR ``(indptr, neighbours)``: those of ``anchors[i]``
        are ``neighbours[indptr[i]:indptr[i + 1]]``, global indices in increasing order."""
        a = np.asarray(anchors, dtype=np.int64).ravel()
        n = len(a)
        r = self.reach
        if n == 0 or len(self) == 0:
            return np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        offs = np.arange(-r, r + 1, dtype=np.int64)
        delta = (offs[:, None] * self._cols + offs[None, :]).ravel()  # (K,) key offsets
        q = self._key[a][:, None] + delta[None, :]  # (n, K)
        lo = np.searchsorted(self._sorted, q, side="left")
        hi = np.searchsorted(self._sorted, q, side="right")
        cnt = (hi - lo).ravel()
        total = int(cnt.sum())
        owner = np.repeat(np.repeat(np.arange(n, dtype=np.int64), len(delta)), cnt)
        run_start = np.repeat(lo.ravel() - (np.cumsum(cnt) - cnt), cnt)
        cand = self._order[run_start + np.arange(total, dtype=np.int64)]
        d = self.distance(a[owner], cand)
        keep = (d > _EPS) & (d <= self.radius + _EPS)
        owner, cand = owner[keep], cand[keep]
        order = np.lexsort((cand, owner))
        owner, cand = owner[order], cand[order]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(owner, minlength=n), out=indptr[1:])
        return indptr, cand

    def counts(self, anchors: npt.ArrayLike | None = None, chunk: int = 65536) -> I64:
        """Number of neighbours of each anchor (default: of every sample, queried in index
        order so the binary searches stay cache-friendly)."""
        a = self._order if anchors is None else np.asarray(anchors, dtype=np.int64).ravel()
        parts = [np.diff(self.query(a[i : i + chunk])[0]) for i in range(0, len(a), chunk)]
        out = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if anchors is None:
            full = np.empty_like(out)
            full[a] = out
            return full
        return out

    def draw(
        self, anchors: npt.ArrayLike, seed: int, epoch: int
    ) -> tuple[I64, npt.NDArray[np.bool_]]:
        """One neighbour per anchor, uniform among its neighbours, drawn from
        :func:`hash_uniform` ``(seed, epoch, anchor)``; the anchor itself where it has none.
        Returns ``(partners, alone)`` with ``alone`` True where the anchor had no neighbour."""
        a = np.asarray(anchors, dtype=np.int64).ravel()
        indptr, nbrs = self.query(a)
        deg = np.diff(indptr)
        u = hash_uniform(seed, epoch, a, salt=0x4E1B)
        k = np.minimum(np.floor(u * deg).astype(np.int64), np.maximum(deg - 1, 0))
        alone = deg == 0
        pick = np.where(alone, 0, indptr[:-1] + k)
        if len(nbrs) == 0:
            return a.copy(), alone
        partners = np.where(alone, a, nbrs[np.minimum(pick, len(nbrs) - 1)])
        return partners.astype(np.int64), alone


__all__ = ["NeighbourIndex", "SampleCoords", "grid_steps", "hash_uniform", "sample_coords"]
