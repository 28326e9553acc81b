"""The DALI backend of the SSL loader: decode and augment on the GPU, or the same graph on the CPU.

:class:`DaliViews` builds one DALI pipeline for a :class:`~pathflow.data.views.ViewsSpec` and
applies, per view, exactly the stages documented in :mod:`pathflow.data.views` with the
per-sample parameters drawn there (:class:`~pathflow.data.views.ViewParams`); it draws no random
number itself. The pipeline pulls :class:`~pathflow.data.batch.RawBatch` objects from a Python
iterator through ``fn.external_source`` (so DALI's prefetching overlaps the reading), and yields
``[B, 3, S, S]`` torch tensors per view together with the batch they came from.

Graph, per image: decode once (``device="mixed"``: nvJPEG on the GPU; ``"cpu"``:
libjpeg-turbo; PNG and WebP samples, e.g. of ``pathflow tile --shards --format webp``, go to
DALI's CPU decoders in either mode: lossless WebP gives PIL's pixels exactly. DALI reads only
simple-format WebP, which is what pathflow writes, not extended ``VP8X`` files), then per view:

- crop + resize in one ``fn.resize`` (ROI = the view's box in (y, x) order, antialiased linear,
  uint8 out, like PIL's ``resize(box=...)``);
- D4: a conditional ``fn.transpose`` (code bit 0) then ``fn.flip`` (bit 1 horizontal, bit 2
  vertical), bit-exact against :func:`pathflow.data.views.apply_d4`;
- float stages on ``x / 255``: RandStainNA and HED inside DALI conditionals on their per-sample
  flags; colour, blur and solarisation either conditional too (CPU default) or run on every
  sample with exact-identity parameters for the others (GPU default, fewer operators; same
  output bit for bit). Per-sample 3x3 maps go to ``fn.coord_transform`` as argument inputs;
  per-image statistics computed on the device (LAB mean/std, mean luma) are applied by
  broadcasting arithmetic, since argument inputs must live on the CPU;
- ``fn.crop_mirror_normalize`` to CHW: normalised float32 (bfloat16 is converted in torch on the
  device; DALI has no bf16), or uint8 0..255.

The CPU and GPU graphs differ only in the decoder's device, where the ops run, the
``conditionals`` default and, on the GPU, the executor running independent views concurrently.
Outputs reach torch without a copy (DLPack): the dynamic executor never recycles an output
buffer into a later iteration, so a yielded tensor stays valid for as long as it is referenced.

Known differences from the torch backend (all sub-quantum on average, see the tests):

- At the image border, DALI's antialiased resize replicates edge pixels where PIL (which the
  torch backend's Rust resize follows) renormalises the truncated filter. This changes the
  outermost output row/column of a view whose box touches the image border *and* which is
  downscaled (up to ~12 levels on real H&E, 0.1 level on average); upscaling is unaffected.
- nvJPEG (GPU) decodes a few values up to 3 levels away from libjpeg-turbo/PIL (mean 0.01).
- The piecewise sRGB/LAB curves are evaluated through their tangents (see below) and the sRGB
  linearisation by a 256-entry table; differences are at float32 rounding level.

Example:
    >>> spec = create_views("simclr")  # doctest: +SKIP
    >>> dv = DaliViews(spec, batch_size=64, device="cpu", num_threads=2)  # doctest: +SKIP
    >>> for views, raw in dv.iterate(raw_batches):  # doctest: +SKIP
    ...     v1, v2 = views  # [B, 3, 224, 224] float32
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from pathflow.data import augment_torch as _at
from pathflow.data.batch import Batch, RawBatch
from pathflow.data.views import LUMA, ViewParams, ViewSpec, ViewsSpec, blur_window, pair_sources
from pathflow.exceptions import BackendUnavailableError, InvalidArgumentError, PathflowError

if TYPE_CHECKING:
    from pathflow.data.raw_batches import BatchSource, LoaderConfig

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali import math as dmath
    from nvidia.dali.pipeline import OperatorConcurrency, StreamPolicy

    HAVE_DALI = True
except ImportError:  # pragma: no cover - exercised only where DALI is absent
    HAVE_DALI = False

OUTPUTS = ("float", "bfloat16", "uint8")
DEVICES = ("cpu", "gpu")

# Colour-space constants shared with the torch backend (float64 there, float32 in the graph).
_XYZ_FROM_RGB_W = (_at._XYZ_FROM_RGB / _at._WHITE[:, None]).numpy()  # lin RGB -> XYZ / white
_RGB_FROM_XYZ_W = (_at._RGB_FROM_XYZ * _at._WHITE[None, :]).numpy()  # XYZ / white -> lin RGB
_LAB_EPS = float(_at._LAB_EPS)
_LAB_KAPPA = float(_at._LAB_KAPPA)
# f = (fx, fy, fz) -> LAB, and back.
_LAB_FROM_F = np.array([[0.0, 116.0, 0.0], [500.0, -500.0, 0.0], [0.0, 200.0, -200.0]])
_LAB_FROM_F_T = np.array([-16.0, 0.0, 0.0])
_F_FROM_LAB = np.linalg.inv(_LAB_FROM_F)
_F_FROM_LAB_T = -_F_FROM_LAB @ _LAB_FROM_F_T


class DaliPipelineError(PathflowError, RuntimeError):
    """DALI failed while decoding or augmenting a batch (the message names the batch)."""


def _srgb_to_linear_lut() -> list[float]:
    """sRGB -> linear RGB for the 256 uint8 levels, computed like the torch backend (float32)."""
    x = torch.arange(256, dtype=torch.float32) / 255
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    return [float(v) for v in lin.tolist()]


def _flat(m: npt.NDArray[Any]) -> list[float]:
    return [float(v) for v in np.asarray(m, dtype=np.float64).ravel()]


# ------------------------------------------------------------------------ what each view needs


@dataclass(frozen=True)
class _Stages:
    """Which stages a view's graph contains (decided from the spec's probabilities)."""

    transpose: bool
    flip: bool
    stain: bool
    hed: bool
    color: bool
    blur: bool
    solar: bool

    @classmethod
    def of(cls, v: ViewSpec) -> _Stages:
        return cls(
            transpose=v.rot90 > 0,
            flip=v.rot90 > 0 or v.hflip > 0 or v.vflip > 0,
            stain=v.randstain > 0,
            hed=v.hed > 0,
            color=v.jitter > 0 or v.grayscale > 0,
            blur=v.blur > 0,
            solar=v.solarize > 0,
        )

    @property
    def any_float(self) -> bool:
        return self.stain or self.hed or self.color or self.blur or self.solar

    def fields(self, conditionals: bool) -> list[str]:
        """Names of the per-sample inputs this view's graph uses, in feeding order.

        With ``conditionals`` the colour/blur/solarise stages take their per-sample flag;
        without, they run on every sample and need no flag (solarise takes its constant).
        """
        out = ["roi_start", "roi_end"]
        if self.transpose:
            out.append("transpose")
        if self.flip:
            out += ["hflip", "vflip"]
        if self.stain:
            out += ["stain", "stain_mean", "stain_std"]
        if self.hed:
            out += ["hed", "hed_matrix", "hed_offset"]
        if self.color:
            out += ["color"] if conditionals else []
            out += ["color_matrix", "color_k"]
        if self.blur:
            out += ["blur"] if conditionals else []
            out += ["blur_sigma", "blur_window"]
        if self.solar:
            out.append("solarize" if conditionals else "solar_c")
        return out


def _view_inputs(p: ViewParams, st: _Stages, view: int) -> dict[str, npt.NDArray[Any]]:
    """The per-sample arrays (leading dimension = batch) fed for one view."""
    n = len(p)
    box = np.asarray(p.box, dtype=np.float32)
    x0, y0, w, h = box[:, 0], box[:, 1], box[:, 2], box[:, 3]
    d4 = np.asarray(p.d4, dtype=np.uint8)
    # Stages absent from the graph must be the identity in the parameters.
    absent = {
        "transpose (rot90)": (not st.transpose) and bool(np.any(d4 & 1)),
        "flips": (not st.flip) and bool(np.any(d4 & 6)),
        "stain": (not st.stain) and bool(np.any(p.stain)),
        "hed": (not st.hed) and bool(np.any(p.hed)),
        "color": (not st.color) and bool(np.any(p.color)),
        "blur": (not st.blur) and bool(np.any(p.blur_sigma > 0)),
        "solarize": (not st.solar) and bool(np.any(p.solarize)),
    }
    bad = [k for k, v in absent.items() if v]
    if bad:
        raise InvalidArgumentError(
            f"view {view}: parameters use {', '.join(bad)} but the view spec the DALI pipeline "
            "was built for has probability 0 there; draw ViewParams from the same ViewsSpec"
        )
    out: dict[str, npt.NDArray[Any]] = {
        # DALI's ROI follows the tensor's spatial order: (y, x) for HWC.
        "roi_start": np.ascontiguousarray(np.stack([y0, x0], axis=1)),
        "roi_end": np.ascontiguousarray(np.stack([y0 + h, x0 + w], axis=1)),
    }
    if st.transpose:
        out["transpose"] = (d4 & 1).astype(np.bool_)
    if st.flip:
        out["hflip"] = ((d4 >> 1) & 1).astype(np.int32)
        out["vflip"] = ((d4 >> 2) & 1).astype(np.int32)
    if st.stain:
        out["stain"] = np.asarray(p.stain, dtype=np.bool_)
        out["stain_mean"] = np.asarray(p.stain_mean, dtype=np.float32).reshape(n, 1, 1, 3)
        out["stain_std"] = np.asarray(p.stain_std, dtype=np.float32).reshape(n, 1, 1, 3)
    if st.hed:
        out["hed"] = np.asarray(p.hed, dtype=np.bool_)
        out["hed_matrix"] = np.ascontiguousarray(p.hed_matrix, dtype=np.float32)
        out["hed_offset"] = np.ascontiguousarray(p.hed_offset, dtype=np.float32)
    # Samples that skip colour, blur or solarisation get parameters for which the stage is an
    # exact identity, so the graph may also run those stages unconditionally (see ``DaliViews``).
    if st.color:
        on = np.asarray(p.color, dtype=np.bool_)
        out["color"] = on
        out["color_matrix"] = np.where(
            on[:, None, None], np.asarray(p.color_matrix, dtype=np.float32), np.eye(3)
        ).astype(np.float32)  # I x + 0 == x exactly (and x is already in [0, 1])
        out["color_k"] = np.where(on, p.color_k, 0).astype(np.float32).reshape(n, 1, 1, 1)
    if st.blur:
        sigma = np.asarray(p.blur_sigma, dtype=np.float32)
        on = sigma > 0
        out["blur"] = on
        out["blur_sigma"] = np.where(on, sigma, np.float32(1.0)).astype(np.float32)
        out["blur_window"] = np.where(on, blur_window(sigma), 1).astype(np.int32)  # 1: identity
    if st.solar:
        on = np.asarray(p.solarize, dtype=np.bool_)
        out["solarize"] = on
        # min(x, c - x): c = 1 solarises, c = 3 keeps x (3 - x > x on [0, 1])
        out["solar_c"] = np.where(on, 1.0, 3.0).astype(np.float32).reshape(n, 1, 1, 1)
    return out


# ----------------------------------------------------------------------------- graph pieces
# These run inside a pipeline definition with conditionals enabled (DALI's autograph converts
# the ``if`` statements on DataNodes into per-sample split/merge). Every arithmetic operator is
# one pass over the image in DALI (no fusion), so the formulas below are written for few passes:
# ``min(max(x, 0), 1)`` for clamp (``dali.math.clamp`` is 3x slower on the CPU), and the
# piecewise sRGB/LAB curves through their tangent points instead of a select:
# ``where(x > t, g(x), l(x)) == g(max(x, t)) + slope * min(x - t, 0)`` where ``l`` is the
# tangent of ``g`` at ``t`` (exact for LAB's f and its inverse; sRGB's two pieces meet within
# 1e-9, below float32 resolution).


def _clamp01(x: Any) -> Any:
    return dmath.min(dmath.max(x, 0.0), 1.0)


def _rgb_to_lab_u8(img: Any) -> Any:
    """uint8 sRGB (HWC) -> CIE LAB float, like ``augment_torch.rgb_to_lab`` on ``img / 255``."""
    lin = fn.lookup_table(
        img, keys=list(range(256)), values=_srgb_to_linear_lut(), dtype=types.DALIDataType.FLOAT
    )
    xyz = fn.coord_transform(lin, M=_flat(_XYZ_FROM_RGB_W))
    # f = xyz ** (1/3) above eps, else kappa * xyz + 4/29 (the tangent at eps)
    f = dmath.pow(dmath.max(xyz, _LAB_EPS), 1 / 3) + _LAB_KAPPA * dmath.min(xyz - _LAB_EPS, 0.0)
    return fn.coord_transform(f, M=_flat(_LAB_FROM_F), T=_flat(_LAB_FROM_F_T))


def _lab_to_rgb(lab: Any) -> Any:
    """CIE LAB -> sRGB clipped to [0, 1], like ``augment_torch.lab_to_rgb``."""
    f = fn.coord_transform(lab, M=_flat(_F_FROM_LAB), T=_flat(_F_FROM_LAB_T))
    # xyz = f ** 3 above 6/29, else (f - 4/29) / kappa (the tangent at 6/29)
    fc = dmath.max(f, 6 / 29)
    xyz = fc * fc * fc + dmath.min(f - 6 / 29, 0.0) * (1 / _LAB_KAPPA)
    lin = _clamp01(fn.coord_transform(xyz, M=_flat(_RGB_FROM_XYZ_W)))
    # rgb = 1.055 * lin ** (1/2.4) - 0.055 above 0.0031308, else 12.92 * lin
    g = dmath.pow(dmath.max(lin, 0.0031308), 1 / 2.4) * 1.055 - 0.055
    return _clamp01(g + dmath.min(lin - 0.0031308, 0.0) * 12.92)


def _randstain(lab: Any, t_mean: Any, t_std: Any) -> Any:
    """lab' = (lab - mean) / std * t_std + t_mean with per-image LAB statistics."""
    mu = fn.reductions.mean(lab, axes=[0, 1], keep_dims=True)
    sd = dmath.max(fn.reductions.std_dev(lab, mu, axes=[0, 1], keep_dims=True), 1e-3)
    scale = t_std / sd  # (1, 1, 3) per image: cheap
    return _lab_to_rgb(lab * scale + (t_mean - mu * scale))


def _hed(x: Any, matrix: Any, offset: Any) -> Any:
    log = dmath.log(dmath.max(x, 1e-6))
    return dmath.min(dmath.exp(fn.coord_transform(log, M=matrix, T=offset)), 1.0)  # exp > 0


def _color(x: Any, matrix: Any, k: Any) -> Any:
    mu = fn.reductions.mean(x, axes=[0, 1], keep_dims=True)  # (1, 1, 3)
    luma = fn.coord_transform(mu, M=_flat(LUMA))  # (1, 1, 1): the image's mean luma
    return _clamp01(fn.coord_transform(x, M=matrix) + k * luma)


def _solarize(x: Any) -> Any:
    return dmath.min(x, 1.0 - x)  # == where(x >= 0.5, 1 - x, x) for x in [0, 1]


# Per-sample conditional stages: ``if flag:`` on a DataNode splits the batch, runs the branch
# on the samples whose flag is set and merges the results back in order.


def _maybe_transpose(x: Any, flag: Any) -> Any:
    if flag:
        x = fn.transpose(x, perm=[1, 0, 2], transpose_layout=False)  # square: shape unchanged
    return x


def _stain_stage(x: Any, u8: Any, flag: Any, t_mean: Any, t_std: Any) -> Any:
    if flag:
        x = _randstain(_rgb_to_lab_u8(u8), t_mean, t_std)  # first stage: its input is u8 / 255
    return x


def _hed_stage(x: Any, flag: Any, matrix: Any, offset: Any) -> Any:
    if flag:
        x = _hed(x, matrix, offset)
    return x


def _color_stage(x: Any, flag: Any, matrix: Any, k: Any) -> Any:
    if flag:
        x = _color(x, matrix, k)
    return x


def _blur_stage(x: Any, flag: Any, sigma: Any, window: Any) -> Any:
    if flag:
        x = fn.gaussian_blur(x, sigma=sigma, window_size=window)
    return x


def _solar_stage(x: Any, flag: Any) -> Any:
    if flag:
        x = _solarize(x)
    return x


def _solar_all(x: Any, c: Any) -> Any:
    """Solarise without a conditional: ``min(x, c - x)`` with c = 1 (on) or 3 (identity)."""
    return dmath.min(x, c - x)


# ------------------------------------------------------------------------------- the backend


class DaliViews:
    """Decode + SSL views with NVIDIA DALI, on the GPU (``device="gpu"``) or the CPU.

    Args:
        spec: the views (the pipeline contains only the stages whose probability is > 0).
        batch_size: largest batch fed (shorter batches, e.g. an epoch's last, are fine).
        device: ``"gpu"`` (nvJPEG via ``mixed`` decode, GPU ops) or ``"cpu"``.
        output: ``"float"`` (normalised float32), ``"bfloat16"`` (normalised) or ``"uint8"``.
        num_threads: DALI CPU worker threads.
        prefetch: DALI's prefetch queue depth (batches in flight).
        device_id: CUDA device for ``device="gpu"`` (default: torch's current device);
            ignored (no GPU used) for ``device="cpu"``.
        conditionals: run the colour, blur and solarisation stages only on the samples that
            use them (DALI conditionals), or on every sample with identity parameters for the
            others (exactly the same output: ``I x + 0``, a 1-tap blur, ``min(x, 3 - x)``).
            The first saves arithmetic on the CPU, the second saves operators (split/merge)
            on the GPU, where per-operator overhead dominates; default: True on the CPU,
            False on the GPU. RandStainNA, HED and the transpose are always conditional.
        sources: for positive pairs (``RawBatch.partner``): per view, 0 = cut from the
            anchor image, 1 = from the partner (both decoded once per batch); None: every
            view from the one image (the default).
    """

    def __init__(
        self,
        spec: ViewsSpec,
        batch_size: int,
        device: str = "cpu",
        output: str = "float",
        num_threads: int = 2,
        prefetch: int = 2,
        device_id: int | None = None,
        conditionals: bool | None = None,
        sources: list[int] | None = None,
    ) -> None:
        if not HAVE_DALI:
            raise BackendUnavailableError(
                "the DALI loader backend needs NVIDIA DALI: pip install nvidia-dali-cuda130"
            )
        if device not in DEVICES:
            raise InvalidArgumentError(f"device must be one of {DEVICES}, got {device!r}")
        if output not in OUTPUTS:
            raise InvalidArgumentError(f"output must be one of {OUTPUTS}, got {output!r}")
        if batch_size < 1 or num_threads < 1 or prefetch < 1:
            raise InvalidArgumentError(
                f"batch_size, num_threads and prefetch must be >= 1, got "
                f"{batch_size}/{num_threads}/{prefetch}"
            )
        if device == "gpu" and device_id is None:
            device_id = torch.cuda.current_device()
        self.spec = spec
        self.batch_size = int(batch_size)
        self.device = device
        self.output = output
        self.num_threads = int(num_threads)
        self.prefetch = int(prefetch)
        self.device_id = device_id if device == "gpu" else None
        self.conditionals = (device == "cpu") if conditionals is None else bool(conditionals)
        self.views = spec.expand()
        if sources is not None and (
            len(sources) != len(self.views) or any(s not in (0, 1) for s in sources)
        ):
            raise InvalidArgumentError(
                f"sources must give 0 or 1 for each of the {len(self.views)} views, got {sources}"
            )
        self.sources = list(sources) if sources is not None else None
        self.stages = [_Stages.of(v) for v in self.views]
        self._fields = [st.fields(self.conditionals) for st in self.stages]
        self._fifo: collections.deque[RawBatch] = collections.deque()
        self._source: Iterator[RawBatch] | None = None
        self._source_error: BaseException | None = None
        self._pipe: Any = None
        self._clean = False  # the pipeline finished its last epoch and can be reset for reuse

    # ---------------------------------------------------------------------------- feeding
    def _feed(self) -> tuple[Any, ...]:
        """external_source callback: the next RawBatch as one tuple of batches."""
        if self._source is None:
            raise StopIteration
        try:
            raw = next(self._source)  # StopIteration ends DALI's epoch
        except StopIteration:
            raise
        except Exception as e:
            self._source_error = e  # re-raised as is by ``iterate``, not as a DALI failure
            raise
        n = len(raw)
        if not 0 < n <= self.batch_size:
            raise InvalidArgumentError(
                f"batch {raw.index} has {n} samples; the pipeline takes 1..{self.batch_size}"
            )
        if len(raw.params) != len(self.views):
            raise InvalidArgumentError(
                f"batch {raw.index} has parameters for {len(raw.params)} views, "
                f"the spec has {len(self.views)}"
            )
        out: list[Any] = [[np.asarray(d, dtype=np.uint8) for d in raw.data]]
        if self.sources is not None:
            if raw.partner is None or len(raw.partner) != n:
                raise InvalidArgumentError(
                    f"batch {raw.index} has no partner images; the pipeline was built for pairs"
                )
            out.append([np.asarray(d, dtype=np.uint8) for d in raw.partner])
        elif raw.partner is not None:
            raise InvalidArgumentError(
                f"batch {raw.index} holds pairs; build the pipeline with sources="
            )
        for v, (p, st, fields) in enumerate(
            zip(raw.params, self.stages, self._fields, strict=True)
        ):
            if len(p) != n:
                raise InvalidArgumentError(
                    f"batch {raw.index}, view {v}: {len(p)} parameter rows for {n} images"
                )
            if p.size != self.views[v].size:
                raise InvalidArgumentError(
                    f"batch {raw.index}, view {v}: parameters for size {p.size}, "
                    f"spec says {self.views[v].size}"
                )
            arrays = _view_inputs(p, st, v)
            out.extend(arrays[f] for f in fields)
        self._fifo.append(raw)
        return tuple(out)

    # ---------------------------------------------------------------------------- graph
    def _graph(self) -> tuple[Any, ...]:
        n_images = 1 if self.sources is None else 2
        n_inputs = n_images + sum(len(f) for f in self._fields)
        inputs = fn.external_source(
            source=self._feed, num_outputs=n_inputs, batch=True, no_copy=False
        )
        decoder = "mixed" if self.device == "gpu" else "cpu"
        imgs = [
            fn.decoders.image(inputs[k], device=decoder, output_type=types.DALIImageType.RGB)
            for k in range(n_images)
        ]
        sources = self.sources if self.sources is not None else [0] * len(self.views)
        outs = []
        pos = n_images
        # (autograph converts this function: no zip(strict=...) here)
        for i in range(len(self.views)):
            fields = self._fields[i]
            a = {f: inputs[pos + j] for j, f in enumerate(fields)}
            pos += len(fields)
            outs.append(self._view_graph(imgs[sources[i]], self.views[i], self.stages[i], a))
        return tuple(outs)

    def _dev(self, node: Any) -> Any:
        """A per-sample CPU input used as a regular (broadcast) operand on the view's device."""
        return node.gpu() if self.device == "gpu" else node

    def _view_graph(self, img: Any, view: ViewSpec, st: _Stages, a: dict[str, Any]) -> Any:
        s = view.size
        x: Any = fn.resize(
            img,
            size=[s, s],
            roi_start=a["roi_start"],
            roi_end=a["roi_end"],
            antialias=True,
            interp_type=types.DALIInterpType.INTERP_LINEAR,
        )
        if st.transpose:
            x = _maybe_transpose(x, a["transpose"])
        if st.flip:
            x = fn.flip(x, horizontal=a["hflip"], vertical=a["vflip"])
        mean = [float(m) for m in self.spec.mean]
        std = [float(v) for v in self.spec.std]
        if not st.any_float:
            if self.output == "uint8":
                return fn.transpose(x, perm=[2, 0, 1])
            return fn.crop_mirror_normalize(
                x,
                mean=[255 * m for m in mean],
                std=[255 * v for v in std],
                output_layout="CHW",
                dtype=types.DALIDataType.FLOAT,
            )
        u8 = x
        x = x / 255.0
        # Each stage is a Python-level choice (is it in the graph at all?) around a per-sample
        # DALI conditional inside the helper.
        if st.stain:
            x = _stain_stage(
                x, u8, a["stain"], self._dev(a["stain_mean"]), self._dev(a["stain_std"])
            )
        if st.hed:
            x = _hed_stage(x, a["hed"], a["hed_matrix"], a["hed_offset"])
        if st.color and self.conditionals:
            x = _color_stage(x, a["color"], a["color_matrix"], self._dev(a["color_k"]))
        elif st.color:
            x = _color(x, a["color_matrix"], self._dev(a["color_k"]))
        if st.blur and self.conditionals:
            x = _blur_stage(x, a["blur"], a["blur_sigma"], a["blur_window"])
        elif st.blur:
            x = fn.gaussian_blur(x, sigma=a["blur_sigma"], window_size=a["blur_window"])
        if st.solar and self.conditionals:
            x = _solar_stage(x, a["solarize"])
        elif st.solar:
            x = _solar_all(x, self._dev(a["solar_c"]))
        if self.output == "uint8":
            return fn.crop_mirror_normalize(
                x,
                mean=0.0,
                std=1.0,
                scale=255.0,
                output_layout="CHW",
                dtype=types.DALIDataType.UINT8,
            )
        return fn.crop_mirror_normalize(
            x, mean=mean, std=std, output_layout="CHW", dtype=types.DALIDataType.FLOAT
        )

    def _build(self) -> Any:
        @pipeline_def(enable_conditionals=True)  # type: ignore[untyped-decorator]
        def views_pipeline() -> tuple[Any, ...]:
            return self._graph()

        kw: dict[str, Any] = {}
        if self.device == "gpu":
            # The views are independent subgraphs of small operators: let the executor run
            # them concurrently, each on its own stream.
            kw = {
                "concurrency": OperatorConcurrency.FULL,
                "stream_policy": StreamPolicy.PER_OPERATOR,
            }
        pipe = views_pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            prefetch_queue_depth=self.prefetch,
            seed=0,
            exec_dynamic=True,
            **kw,
        )
        pipe.build()
        return pipe

    # ------------------------------------------------------------------------- iteration
    def _to_torch(self, tl: Any) -> torch.Tensor:
        # Zero copy (DLPack) on both devices: with DALI's dynamic executor (exec_dynamic=True)
        # output buffers are reference-counted and never recycled into a later iteration, so
        # the torch tensor stays valid for as long as it is referenced. On the GPU the outputs
        # were produced on (or synchronised with) torch's current stream, see ``iterate``.
        if tl.is_dense_tensor():
            t = torch.from_dlpack(tl.as_tensor())
        else:  # never for square views; samples in separate buffers: gather them
            t = torch.stack([torch.from_dlpack(tl[i]) for i in range(len(tl))])
        if self.output == "bfloat16":
            t = t.to(torch.bfloat16)
        return t

    def iterate(self, source: Iterable[RawBatch]) -> Iterator[tuple[list[torch.Tensor], RawBatch]]:
        """Augment every batch of ``source``; yields (per-view ``[B, 3, S, S]`` tensors, batch).

        Tensors live on ``cuda:device_id`` for ``device="gpu"``, else on the CPU. One
        iteration at a time per instance; abandoning an iteration early is allowed.
        """
        if self._pipe is not None and not self._clean:
            self.close()  # a previous iteration was abandoned with batches in flight
        if self._pipe is None:
            self._pipe = self._build()
        else:
            self._pipe.reset()
        self._clean = False
        self._fifo.clear()
        self._source = iter(source)
        self._source_error = None
        stream = None
        if self.device == "gpu":
            stream = torch.cuda.current_stream(self.device_id)
        try:
            while True:
                try:
                    outs = self._pipe.run(stream) if stream is not None else self._pipe.run()
                except StopIteration:
                    break
                except Exception as e:
                    if isinstance(e, PathflowError) or e is self._source_error:
                        raise
                    idx = self._fifo[0].index if self._fifo else "?"
                    raise DaliPipelineError(
                        f"DALI pipeline failed on batch {idx} ({self.device}): {e}"
                    ) from e
                raw = self._fifo.popleft()
                views = [self._to_torch(tl) for tl in outs]
                yield views, raw
            self._clean = True
        finally:
            self._source = None
            if not self._clean:
                self.close()

    def close(self) -> None:
        """Release the pipeline (it is rebuilt on the next :meth:`iterate`)."""
        self._pipe = None
        self._fifo.clear()
        self._clean = False

    def __enter__(self) -> DaliViews:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DaliBackend:
    """The ``dali`` loader backend: one :class:`DaliViews` pipeline per loader (built on the
    first epoch, reused by the next), on ``cfg.device``'s GPU or the CPU."""

    def __init__(self, cfg: LoaderConfig, spec: ViewsSpec) -> None:
        self.cfg = cfg
        self.spec = spec
        self._views: DaliViews | None = None

    def _pipeline(self) -> DaliViews:
        if self._views is None:
            cfg = self.cfg
            dev = "gpu" if cfg.device.startswith("cuda") else "cpu"
            device_id = None
            if dev == "gpu":
                device_id = torch.device(cfg.device).index
                if device_id is None:
                    device_id = torch.cuda.current_device()
            self._views = DaliViews(
                self.spec,
                batch_size=cfg.batch_size,
                device=dev,
                output=cfg.output,
                num_threads=max(1, cfg.num_workers),
                device_id=device_id,
                sources=None if cfg.positives == "augment" else pair_sources(self.spec),
            )
        return self._views

    def iterate(self, source: BatchSource, start: int) -> Iterator[Batch]:
        for views, raw in self._pipeline().iterate(source.raw_batches(start)):
            yield Batch.from_raw(views, raw)

    def close(self) -> None:
        if self._views is not None:
            self._views.close()
        self._views = None
