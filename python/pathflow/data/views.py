"""SSL view specifications, presets and per-sample augmentation parameters.

A *view* is one augmented crop of a patch. A :class:`ViewsSpec` lists view groups (each a
:class:`ViewSpec` repeated ``count`` times): SimCLR/BYOL use two 224 px views, DINO two global
224 px views and eight local 96 px views. All randomness is drawn here, on the CPU, with numpy,
into plain arrays (:class:`ViewParams`); the DALI and torch backends only *apply* them. So both
backends see the same crops, flips and colour parameters for the same seed, and a run is
reproducible and resumable batch by batch.

Per view, the stages are applied in this order (images as float RGB in [0, 1] after the crop)::

    crop   box (x0, y0, w, h) in source pixels, resized to size x size with antialiased
           bilinear filtering, then a D4 code (bit 0 transpose, bit 1 horizontal flip,
           bit 2 vertical flip, applied in that order): flips and 90-degree rotations.
    stain  RandStainNA: LAB (sRGB, D65) per-image channel mean/std are replaced by targets
           drawn from a fitted distribution: lab' = (lab - mean) / std * t_std + t_mean.
    hed    HED jitter in optical-density space: L = log(max(x, 1e-6)) (per pixel, column
           vector), L' = hed_matrix @ L + hed_offset, x = clip(exp(L'), 0, 1). This equals
           colour deconvolution with skimage's ``rgb_from_hed`` stain matrix, scaling each
           stain concentration by alpha ~ U(1-s, 1+s) and shifting it by beta ~ U(-s, s),
           then recombining (without clipping negative concentrations, so it is the identity
           for alpha=1, beta=0).
    color  colour jitter (brightness, contrast, saturation, hue) and grayscale, composed into
           one linear map: x' = clip(color_matrix @ x + color_k * mean(luma(x)), 0, 1),
           luma = (0.299, 0.587, 0.114). Contrast blends with the image's mean luma like
           torchvision; hue rotates the chroma plane of YIQ.
    blur   Gaussian blur with sigma (0 = off), window 2 * ceil(3 sigma) + 1, reflect-101 border.
    solar  solarisation: x >= 0.5 -> 1 - x.

Example:
    >>> spec = create_views("dino")
    >>> [v.size for v in spec.expand()][:3], spec.num_views
    ([224, 224, 96], 10)
    >>> rng = np.random.default_rng(0)
    >>> p = sample_view_params(spec.groups[0], np.full(4, 256), np.full(4, 256), rng)
    >>> p.box.shape, p.color_matrix.shape
    ((4, 4), (4, 3, 3))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)

# skimage.color.rgb_from_hed (rows: haematoxylin, eosin, DAB optical-density vectors).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
HED_LOG_ADJUST = math.log(1e-6)

_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float64
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class StainStats:
    """RandStainNA's fitted distribution of per-image LAB statistics (L, a, b order).

    ``mean_mean``/``mean_std``: mean and spread over images of the per-image channel means;
    ``std_mean``/``std_std``: the same for the per-image channel standard deviations.
    Fit them on your training patches with :func:`pathflow.data.fit_stain_stats`.
    """

    mean_mean: tuple[float, float, float]
    mean_std: tuple[float, float, float]
    std_mean: tuple[float, float, float]
    std_std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StainStats:
        return cls(
            **{  # type: ignore[arg-type]
                k: tuple(float(x) for x in d[k])
                for k in ("mean_mean", "mean_std", "std_mean", "std_std")
            }
        )  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ViewSpec:
    """One group of identically-distributed views.

    Probabilities are per view; magnitudes follow torchvision's ``ColorJitter`` convention
    (brightness 0.4 draws a factor in [0.6, 1.4]; hue 0.1 draws a shift in [-0.1, 0.1] turns).
    """

    size: int = 224
    count: int = 1
    crop: str = "random"  # "random" (RandomResizedCrop) or "full" (whole image, resized)
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    vflip: float = 0.0
    rot90: float = 0.0  # probability of a random 90/180/270-degree rotation
    jitter: float = 0.0  # probability of applying colour jitter
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.0
    blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0
    hed: float = 0.0  # probability of HED stain jitter
    hed_sigma: float = 0.05
    randstain: float = 0.0  # probability of RandStainNA
    randstain_std_hyper: float = -0.3  # scales the spread of the fitted distribution by (1 + h)
    # (x0, y0, w, h) as fractions of the image: the part the view is cut from (the crop is
    # drawn within it; "full" takes all of it). A region of width w spans floor(w * W) pixels,
    # at offset round(x0 / (1 - w) * (W - floor(w * W))): corners stay aligned to corners.
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)

    def __post_init__(self) -> None:
        if self.size < 8 or self.count < 1:
            raise ValueError(f"view size must be >= 8 and count >= 1, got {self.size}/{self.count}")
        if self.crop not in ("random", "full"):
            raise ValueError(f"view crop must be 'random' or 'full', got {self.crop!r}")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"view scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"view ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")
        x0, y0, rw, rh = self.region
        if min(x0, y0) < 0 or min(rw, rh) <= 0 or x0 + rw > 1 or y0 + rh > 1:
            raise ValueError(
                f"view region (x0, y0, w, h) must lie within the image, got {self.region}"
            )
        if self.blur_sigma[0] <= 0 or self.blur_sigma[1] < self.blur_sigma[0]:
            raise ValueError(f"blur_sigma must satisfy 0 < lo <= hi, got {self.blur_sigma}")
        for name in (
            "hflip",
            "vflip",
            "rot90",
            "jitter",
            "grayscale",
            "blur",
            "solarize",
            "hed",
            "randstain",
        ):
            p = getattr(self, name)
            if not 0 <= p <= 1:
                raise ValueError(f"view probability {name} must be in [0, 1], got {p}")


@dataclass(frozen=True)
class ViewsSpec:
    """All views of one sample, group by group, plus output normalisation."""

    groups: tuple[ViewSpec, ...]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    name: str = "custom"

    @property
    def num_views(self) -> int:
        return sum(g.count for g in self.groups)

    def expand(self) -> list[ViewSpec]:
        """One entry per view, in output order."""
        return [g for g in self.groups for _ in range(g.count)]

    @property
    def needs_stain_stats(self) -> bool:
        return any(g.randstain > 0 for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mean": list(self.mean),
            "std": list(self.std),
            "groups": [asdict(g) for g in self.groups],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViewsSpec:
        groups = []
        for g in d["groups"]:
            kw = {k: tuple(v) if isinstance(v, list) else v for k, v in g.items()}
            groups.append(ViewSpec(**kw))  # type: ignore[arg-type]
        return cls(
            groups=tuple(groups),
            mean=tuple(d.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
            std=tuple(d.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
            name=str(d.get("name", "custom")),
        )


# --------------------------------------------------------------------------- presets

_SIMCLR = ViewSpec(
    size=224,
    count=2,
    scale=(0.08, 1.0),
    jitter=0.8,
    brightness=0.8,
    contrast=0.8,
    saturation=0.8,
    hue=0.2,
    grayscale=0.2,
    blur=0.5,
)
_BYOL_1 = ViewSpec(
    size=224,
    scale=(0.08, 1.0),
    jitter=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    grayscale=0.2,
    blur=1.0,
)
_DINO_G1 = ViewSpec(
    size=224,
    scale=(0.4, 1.0),
    jitter=0.8,
    brightness=0.4,
    contrast=0.4,
    saturation=0.2,
    hue=0.1,
    grayscale=0.2,
    blur=1.0,
)
_DINO_LOCAL = replace(_DINO_G1, size=96, count=8, scale=(0.05, 0.4), blur=0.5)
# Pathology: orientation carries no meaning (all of D4), stain variation is the main nuisance
# (HED jitter + RandStainNA), hue/saturation jitter kept mild, no solarisation.
_PATH = ViewSpec(
    size=224,
    count=2,
    scale=(0.2, 1.0),
    hflip=0.5,
    vflip=0.5,
    rot90=0.75,
    jitter=0.8,
    brightness=0.25,
    contrast=0.25,
    saturation=0.15,
    hue=0.04,
    grayscale=0.1,
    blur=0.5,
    hed=0.5,
    hed_sigma=0.05,
    randstain=0.5,
)
_PATH_G = replace(_PATH, count=1, scale=(0.4, 1.0))
_PATH_LOCAL = replace(_PATH, size=96, count=8, scale=(0.05, 0.4))

# SGCL's reference (HHHedo/SGCL, configs/selfsup/sslp): one view per patch (spatialcl.py:
# RandomResizedCrop 224 of scale 0.2-1, grayscale 0.2, colour jitter 0.4 of all four always,
# horizontal flip), and for multi-crop (npidsslpmcrop.py) four 96 px local crops more, one
# from each corner crop of half the patch size (FiveCrop(128) of a 256 px patch), scale
# 0.2-0.56 of the corner.
_SGCL = ViewSpec(
    size=224,
    scale=(0.2, 1.0),
    jitter=1.0,
    brightness=0.4,
    contrast=0.4,
    saturation=0.4,
    hue=0.4,
    grayscale=0.2,
)
_SGCL_QUADRANTS = tuple(
    replace(_SGCL, size=96, scale=(0.2, 0.56), region=(x, y, 0.5, 0.5))
    for x, y in ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (0.5, 0.5))
)

_PRESETS: dict[str, Callable[[], ViewsSpec]] = {
    "simclr": lambda: ViewsSpec((_SIMCLR,), name="simclr"),
    "byol": lambda: ViewsSpec((_BYOL_1, replace(_BYOL_1, blur=0.1, solarize=0.2)), name="byol"),
    "dino": lambda: ViewsSpec(
        (_DINO_G1, replace(_DINO_G1, blur=0.1, solarize=0.2), _DINO_LOCAL), name="dino"
    ),
    "pathology": lambda: ViewsSpec((_PATH,), name="pathology"),
    "pathology-dino": lambda: ViewsSpec(
        (_PATH_G, replace(_PATH_G, blur=0.1), _PATH_LOCAL), name="pathology-dino"
    ),
    "eval": lambda: ViewsSpec((ViewSpec(size=224, crop="full", hflip=0.0),), name="eval"),
    "sgcl": lambda: ViewsSpec((_SGCL,), name="sgcl"),
    "sgcl-mcrop": lambda: ViewsSpec((_SGCL, *_SGCL_QUADRANTS), name="sgcl-mcrop"),
}


def list_views() -> list[str]:
    """Names of the built-in view presets."""
    return sorted(_PRESETS)


def create_views(
    name: str | ViewsSpec,
    *,
    global_size: int | None = None,
    local_size: int | None = None,
    num_local: int | None = None,
) -> ViewsSpec:
    """A preset by name (``simclr``, ``byol``, ``dino``, ``pathology``, ``pathology-dino``,
    ``eval``, ``sgcl``, ``sgcl-mcrop``), optionally resized: ``global_size`` for the first
    groups' size, ``local_size`` and ``num_local`` for multi-crop's local group (local views
    cut from fixed regions, as ``sgcl-mcrop``'s one per corner, keep their number)."""
    if isinstance(name, ViewsSpec):
        spec = name
    else:
        if name not in _PRESETS:
            raise ValueError(f"unknown views preset {name!r}; choose from {list_views()}")
        spec = _PRESETS[name]()
    groups = list(spec.groups)
    big = max(g.size for g in groups)
    fixed = sum(g.count for g in groups if g.size < big and g.region != (0.0, 0.0, 1.0, 1.0))
    if num_local is not None and fixed and num_local != fixed:
        raise ValueError(
            f"views {spec.name} cut their {fixed} local views from fixed regions of the "
            f"image; their number is not changed (num_local {num_local})"
        )
    for i, g in enumerate(groups):
        is_local = g.size < big
        if is_local and (local_size is not None or num_local is not None):
            groups[i] = replace(
                g,
                size=local_size if local_size is not None else g.size,
                count=num_local if num_local is not None else g.count,
            )
        elif not is_local and global_size is not None:
            groups[i] = replace(g, size=global_size)
    groups = [g for g in groups if g.count > 0]
    return replace(spec, groups=tuple(groups))


# ------------------------------------------------------------------- parameter sampling


# D4 codes: bit 0 transpose, bit 1 horizontal flip, bit 2 vertical flip (in that order).
def _apply_code(a: npt.NDArray[Any], code: int) -> npt.NDArray[Any]:
    if code & 1:
        a = a.T
    if code & 2:
        a = a[:, ::-1]
    if code & 4:
        a = a[::-1, :]
    return a


def apply_d4(img: npt.NDArray[Any], code: int) -> npt.NDArray[Any]:
    """Reference D4 transform of an (H, W, ...) array (used by tests and docs)."""
    if code & 1:
        img = np.swapaxes(img, 0, 1)
    if code & 2:
        img = img[:, ::-1]
    if code & 4:
        img = img[::-1]
    return img


def _d4_table() -> npt.NDArray[np.uint8]:
    """table[k, h, v] = code of vflip^v(hflip^h(rot90^k(image)))."""
    probe = np.arange(9).reshape(3, 3)
    by_result = {_apply_code(probe, c).tobytes(): c for c in range(8)}
    table = np.zeros((4, 2, 2), dtype=np.uint8)
    for k in range(4):
        for h in range(2):
            for v in range(2):
                a = np.rot90(probe, k)
                if h:
                    a = a[:, ::-1]
                if v:
                    a = a[::-1, :]
                table[k, h, v] = by_result[np.ascontiguousarray(a).tobytes()]
    return table


D4_TABLE = _d4_table()


@dataclass
class ViewParams:
    """Per-sample parameters of one view for a batch of ``n`` samples (see module docs)."""

    box: F32  # (n, 4) x0, y0, w, h in source pixels
    d4: npt.NDArray[np.uint8]  # (n,)
    stain: npt.NDArray[np.bool_]  # (n,) apply RandStainNA
    stain_mean: F32  # (n, 3) target LAB mean
    stain_std: F32  # (n, 3) target LAB std
    hed: npt.NDArray[np.bool_]  # (n,) apply HED jitter
    hed_matrix: F32  # (n, 3, 3)
    hed_offset: F32  # (n, 3)
    color: npt.NDArray[np.bool_]  # (n,) colour stage is not the identity
    color_matrix: F32  # (n, 3, 3)
    color_k: F32  # (n,)
    blur_sigma: F32  # (n,), 0 = no blur
    solarize: npt.NDArray[np.bool_]  # (n,)
    size: int = 224

    def __len__(self) -> int:
        return int(self.box.shape[0])

    @property
    def blur_window(self) -> npt.NDArray[np.int32]:
        return blur_window(self.blur_sigma)


def blur_window(sigma: npt.NDArray[np.float32]) -> npt.NDArray[np.int32]:
    """Gaussian window length per sigma: 2 * ceil(3 sigma) + 1 (0 where sigma is 0)."""
    w = 2 * np.ceil(3.0 * sigma.astype(np.float64)).astype(np.int32) + 1
    return np.where(sigma > 0, w, 0).astype(np.int32)


def random_resized_boxes(
    widths: npt.NDArray[Any],
    heights: npt.NDArray[Any],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
    attempts: int = 10,
) -> F32:
    """torchvision's ``RandomResizedCrop.get_params``, vectorised over samples.

    Up to ``attempts`` draws of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first
    that fits is used, else the centre crop clamped to ``ratio``. Returns float boxes
    (x0, y0, w, h) with integer-valued sizes and offsets, as torchvision does.
    """
    n = len(widths)
    w_img = np.asarray(widths, dtype=np.float64)
    h_img = np.asarray(heights, dtype=np.float64)
    area = w_img * h_img
    target = area[:, None] * rng.uniform(scale[0], scale[1], size=(n, attempts))
    logr = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, attempts))
    aspect = np.exp(logr)
    cw = np.round(np.sqrt(target * aspect))
    ch = np.round(np.sqrt(target / aspect))
    fits = (cw > 0) & (ch > 0) & (cw <= w_img[:, None]) & (ch <= h_img[:, None])
    first = np.argmax(fits, axis=1)
    any_fit = fits[np.arange(n), first]
    u = rng.random(size=(n, 2))
    box = np.zeros((n, 4), dtype=np.float64)
    rows = np.arange(n)
    bw = cw[rows, first]
    bh = ch[rows, first]
    # Fallback: central crop with the aspect clamped into ratio.
    in_ratio = w_img / np.maximum(h_img, 1)
    fw = np.where(
        in_ratio < ratio[0], w_img, np.where(in_ratio > ratio[1], np.round(h_img * ratio[1]), w_img)
    )
    fh = np.where(
        in_ratio < ratio[0], np.round(w_img / ratio[0]), np.where(in_ratio > ratio[1], h_img, h_img)
    )
    bw = np.where(any_fit, bw, fw)
    bh = np.where(any_fit, bh, fh)
    x0 = np.where(any_fit, np.floor(u[:, 0] * (w_img - bw + 1)), (w_img - bw) // 2)
    y0 = np.where(any_fit, np.floor(u[:, 1] * (h_img - bh + 1)), (h_img - bh) // 2)
    box[:, 0], box[:, 1], box[:, 2], box[:, 3] = x0, y0, bw, bh
    return box.astype(np.float32)


def _color_matrices(
    n: int, spec: ViewSpec, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    apply = rng.random(n) < spec.jitter
    b = rng.uniform(max(0.0, 1 - spec.brightness), 1 + spec.brightness, n)
    c = rng.uniform(max(0.0, 1 - spec.contrast), 1 + spec.contrast, n)
    s = rng.uniform(max(0.0, 1 - spec.saturation), 1 + spec.saturation, n)
    h = rng.uniform(-spec.hue, spec.hue, n)
    gray = rng.random(n) < spec.grayscale
    b = np.where(apply, b, 1.0)
    c = np.where(apply, c, 1.0)
    s = np.where(apply, s, 1.0)
    h = np.where(apply, h, 0.0)
    eye = np.eye(3)
    ones_luma = np.outer(np.ones(3), LUMA)  # x -> luma(x) in every channel
    sat = s[:, None, None] * eye + (1 - s)[:, None, None] * ones_luma
    theta = 2 * math.pi * h
    rot = np.zeros((n, 3, 3))
    rot[:, 0, 0] = 1
    rot[:, 1, 1] = np.cos(theta)
    rot[:, 1, 2] = -np.sin(theta)
    rot[:, 2, 1] = np.sin(theta)
    rot[:, 2, 2] = np.cos(theta)
    hue = _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ
    m = (c * b)[:, None, None] * (hue @ sat)
    m = np.where(gray[:, None, None], ones_luma @ m, m)
    k = (1 - c) * b
    active = apply | gray
    return m, k, active


def _hed_matrices(
    n: int, spec: ViewSpec, rng: np.random.Generator
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    apply = rng.random(n) < spec.hed
    sig = spec.hed_sigma
    alpha = rng.uniform(1 - sig, 1 + sig, (n, 3))
    beta = rng.uniform(-sig, sig, (n, 3))
    alpha = np.where(apply[:, None], alpha, 1.0)
    beta = np.where(apply[:, None], beta, 0.0)
    # Row-vector form: L' = L @ (Minv diag(a) M) + la * (beta @ M); we store the column form.
    a_row = HED_FROM_RGB[None] @ (alpha[:, :, None] * RGB_FROM_HED[None])
    matrix = np.transpose(a_row, (0, 2, 1))
    offset = HED_LOG_ADJUST * (beta @ RGB_FROM_HED)
    return matrix, offset, apply


def region_boxes(
    region: tuple[float, float, float, float],
    widths: npt.NDArray[Any],
    heights: npt.NDArray[Any],
) -> tuple[F32, F32, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Offsets ``x``, ``y`` and sizes ``w``, ``h`` (pixels) of a view's ``region`` (fractions
    ``(x0, y0, w, h)``, :class:`ViewSpec`) in images of the given sizes.

    Example:
        >>> ox, oy, w, h = region_boxes((0.5, 0, 0.5, 0.5), np.array([256, 257]), np.array([9, 9]))
        >>> ox.tolist(), oy.tolist(), w.tolist(), h.tolist()
        ([128.0, 129.0], [0.0, 0.0], [128, 128], [4, 4])
    """
    out = []
    for pos, frac, size in ((region[0], region[2], widths), (region[1], region[3], heights)):
        full = np.asarray(size, dtype=np.int64)
        part = np.maximum(np.floor(full * frac + 1e-9).astype(np.int64), 1)
        off = np.round(pos / (1.0 - frac) * (full - part)) if frac < 1 else np.zeros(len(full))
        out.append((off.astype(np.float32), part))
    (ox, w), (oy, h) = out
    return ox, oy, w, h


def sample_view_params(
    spec: ViewSpec,
    widths: npt.NDArray[Any],
    heights: npt.NDArray[Any],
    rng: np.random.Generator,
    stain_stats: StainStats | None = None,
) -> ViewParams:
    """Draw one view's parameters for ``len(widths)`` samples of the given image sizes."""
    n = len(widths)
    ox, oy, widths, heights = region_boxes(spec.region, widths, heights)
    if spec.crop == "full":
        box = np.zeros((n, 4), dtype=np.float32)
        box[:, 2] = widths
        box[:, 3] = heights
    else:
        box = random_resized_boxes(widths, heights, spec.scale, spec.ratio, rng)
    box[:, 0] += ox
    box[:, 1] += oy
    k = np.where(rng.random(n) < spec.rot90, rng.integers(1, 4, n), 0)
    hf = (rng.random(n) < spec.hflip).astype(np.int64)
    vf = (rng.random(n) < spec.vflip).astype(np.int64)
    d4 = D4_TABLE[k, hf, vf]

    stain = rng.random(n) < spec.randstain
    stain_mean = np.zeros((n, 3), dtype=np.float32)
    stain_std = np.ones((n, 3), dtype=np.float32)
    if spec.randstain > 0:
        if stain_stats is None:
            raise ValueError(
                "views use RandStainNA (randstain > 0) but no stain statistics "
                "were given; fit them with pathflow.data.fit_stain_stats"
            )
        spread = 1.0 + spec.randstain_std_hyper
        mm = np.asarray(stain_stats.mean_mean)
        ms = np.asarray(stain_stats.mean_std) * spread
        sm = np.asarray(stain_stats.std_mean)
        ss = np.asarray(stain_stats.std_std) * spread
        stain_mean = rng.normal(mm, ms, (n, 3)).astype(np.float32)
        stain_std = np.maximum(rng.normal(sm, ss, (n, 3)), 0.1 * sm).astype(np.float32)
        stain_mean[~stain] = 0.0
        stain_std[~stain] = 1.0

    hed_m, hed_o, hed = _hed_matrices(n, spec, rng)
    col_m, col_k, color = _color_matrices(n, spec, rng)
    blur = rng.random(n) < spec.blur
    draws = rng.uniform(spec.blur_sigma[0], spec.blur_sigma[1], n)
    sigma = np.where(blur, draws, 0.0).astype(np.float32)
    solar = rng.random(n) < spec.solarize
    return ViewParams(
        box=np.ascontiguousarray(box, dtype=np.float32),
        d4=d4.astype(np.uint8),
        stain=stain,
        stain_mean=stain_mean,
        stain_std=stain_std,
        hed=hed,
        hed_matrix=np.ascontiguousarray(hed_m, dtype=np.float32),
        hed_offset=hed_o.astype(np.float32),
        color=color,
        color_matrix=np.ascontiguousarray(col_m, dtype=np.float32),
        color_k=col_k.astype(np.float32),
        blur_sigma=sigma,
        solarize=solar,
        size=spec.size,
    )


def pair_sources(spec: ViewsSpec) -> list[int]:
    """For positive pairs (``make_loader(positives="neighbour"|"scale")``): the image each
    output view is cut from, 0 = the anchor, 1 = its partner. Views of the same size alternate,
    starting with the anchor: SimCLR/BYOL/MoCo's two views are (anchor, partner), DINO's two
    global views (anchor, partner) and its local views anchor, partner, anchor, ...

    Example:
        >>> pair_sources(create_views("simclr")), pair_sources(create_views("dino"))[:4]
        ([0, 1], [0, 1, 0, 1])
    """
    seen: dict[int, int] = {}
    out = []
    for v in spec.expand():
        k = seen.get(v.size, 0)
        seen[v.size] = k + 1
        out.append(k % 2)
    return out


def sample_pair_params(
    spec: ViewsSpec,
    sizes: tuple[npt.NDArray[Any], npt.NDArray[Any]],
    sources: list[int],
    rng: np.random.Generator,
    stain_stats: StainStats | None = None,
) -> list[ViewParams]:
    """Parameters for every view of a batch of pairs: view ``v`` is cut from image
    ``sources[v]`` (0 anchor, 1 partner) whose ``(n, 2)`` width/height array is
    ``sizes[sources[v]]``."""
    return [
        sample_view_params(v, sizes[s][:, 0], sizes[s][:, 1], rng, stain_stats)
        for v, s in zip(spec.expand(), sources, strict=True)
    ]


def sample_batch_params(
    spec: ViewsSpec,
    widths: npt.NDArray[Any],
    heights: npt.NDArray[Any],
    rng: np.random.Generator,
    stain_stats: StainStats | None = None,
) -> list[ViewParams]:
    """Parameters for every view (in output order) of a batch."""
    return [sample_view_params(v, widths, heights, rng, stain_stats) for v in spec.expand()]


@dataclass
class ViewsConfig:
    """YAML/CLI-friendly description of the views: a preset plus size overrides."""

    preset: str = "dino"
    global_size: int | None = None
    local_size: int | None = None
    num_local: int | None = None

    def build(self) -> ViewsSpec:
        return create_views(
            self.preset,
            global_size=self.global_size,
            local_size=self.local_size,
            num_local=self.num_local,
        )
