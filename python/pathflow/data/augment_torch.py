"""The torch backend's colour stages: batched, per-sample parameters from :mod:`views`.

Crop, resize and D4 happen in Rust (:func:`pathflow._core.decode_views`); this module applies
the float stages to an ``(N, 3, S, S)`` batch exactly as documented in
:mod:`pathflow.data.views`. It runs on whatever device the batch is on (CPU in workers, or the
GPU when the torch backend feeds one).

Example:
    >>> import numpy as np, torch
    >>> from pathflow.data.views import create_views, sample_view_params
    >>> spec = create_views("simclr").groups[0]
    >>> p = sample_view_params(spec, np.full(2, 64), np.full(2, 64), np.random.default_rng(0))
    >>> x = torch.rand(2, 3, 224, 224)
    >>> apply_color_stages(x, p).shape
    torch.Size([2, 3, 224, 224])
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pathflow.data.views import LUMA, ViewParams, blur_window

# sRGB (D65) <-> CIE XYZ, and the D65 white point, as in skimage.color.
_XYZ_FROM_RGB = torch.tensor(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=torch.float64,
)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_LAB_EPS = (6 / 29) ** 3
_LAB_KAPPA = 1 / (3 * (6 / 29) ** 2)


def _mat(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-sample 3x3 colour matrix: (N, 3, H, W), (N, 3, 3) -> (N, 3, H, W)."""
    n, c, h, w = x.shape
    return torch.bmm(m.to(x.dtype), x.reshape(n, c, h * w)).reshape(n, c, h, w)


def rgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] (N, 3, H, W) -> CIE LAB (L in [0, 100])."""
    lin = torch.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    m = (_XYZ_FROM_RGB / _WHITE[:, None]).to(x)
    xyz = torch.einsum("ij,njhw->nihw", m, lin)
    f = torch.where(xyz > _LAB_EPS, xyz.clamp_min(_LAB_EPS) ** (1 / 3), xyz * _LAB_KAPPA + 4 / 29)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack((116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)), dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """CIE LAB (N, 3, H, W) -> sRGB clipped to [0, 1]."""
    fy = (lab[:, 0] + 16) / 116
    fx = fy + lab[:, 1] / 500
    fz = fy - lab[:, 2] / 200
    f = torch.stack((fx, fy, fz), dim=1)
    xyz = torch.where(f > 6 / 29, f**3, (f - 4 / 29) / _LAB_KAPPA)
    m = (_RGB_FROM_XYZ * _WHITE[None, :]).to(lab)
    lin = torch.einsum("ij,njhw->nihw", m, xyz).clamp(0, 1)
    rgb = torch.where(
        lin > 0.0031308, 1.055 * lin.clamp_min(0.0031308) ** (1 / 2.4) - 0.055, lin * 12.92
    )
    return rgb.clamp(0, 1)


def randstain(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """RandStainNA: replace each image's LAB channel mean/std with the targets (N, 3)."""
    lab = rgb_to_lab(x)
    mu = lab.mean(dim=(2, 3), keepdim=True)
    sd = lab.std(dim=(2, 3), keepdim=True, correction=0).clamp_min(1e-3)
    lab = (lab - mu) / sd * std[:, :, None, None] + mean[:, :, None, None]
    return lab_to_rgb(lab)


def hed_jitter(x: torch.Tensor, matrix: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """HED jitter as a linear map on log intensities (see :mod:`views`)."""
    log = torch.log(x.clamp_min(1e-6))
    return torch.exp(_mat(log, matrix) + offset[:, :, None, None]).clamp_(0, 1)


def color_jitter(x: torch.Tensor, matrix: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """x' = clip(M x + k * mean(luma(x)), 0, 1), per sample."""
    luma = torch.as_tensor(LUMA, dtype=x.dtype, device=x.device)
    m = torch.einsum("c,nchw->n", luma, x) / (x.shape[2] * x.shape[3])
    return (_mat(x, matrix) + (k * m)[:, None, None, None]).clamp_(0, 1)


def gaussian_kernels(sigma: np.ndarray, window: np.ndarray) -> np.ndarray:
    """(N, Wmax) normalised 1-D Gaussian taps, centred, zero outside each sample's window."""
    wmax = int(window.max())
    half = wmax // 2
    t = np.arange(-half, half + 1, dtype=np.float64)[None, :]
    s = sigma.astype(np.float64)[:, None]
    g = np.exp(-0.5 * (t / s) ** 2)
    g[np.abs(t) > (window[:, None] // 2)] = 0.0
    return (g / g.sum(axis=1, keepdims=True)).astype(np.float32)


def gaussian_blur(x: torch.Tensor, sigma: np.ndarray) -> torch.Tensor:
    """Separable Gaussian blur with per-sample sigma and reflect-101 borders."""
    window = blur_window(sigma.astype(np.float32))
    taps = torch.from_numpy(gaussian_kernels(sigma, window)).to(x)
    n, c, h, w = x.shape
    k = taps.shape[1]
    half = k // 2
    weight = taps.repeat_interleave(c, dim=0)  # (N*C, K)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (half, half, 0, 0), mode="reflect")
    y = F.conv2d(y, weight[:, None, None, :], groups=n * c)
    y = F.pad(y, (0, 0, half, half), mode="reflect")
    y = F.conv2d(y, weight[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def _solarize(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0.5, 1.0 - x, x)


def apply_color_stages(x: torch.Tensor, p: ViewParams) -> torch.Tensor:
    """Apply stain, HED, colour, blur and solarisation stages to float RGB (N, 3, S, S).

    Each stage runs only on the samples that use it, with their per-sample parameters.
    """
    dev = x.device

    def rows(a: np.ndarray, idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a[idx]).to(dev)

    stages = (
        (p.stain, lambda y, k: randstain(y, rows(p.stain_mean, k), rows(p.stain_std, k))),
        (p.hed, lambda y, k: hed_jitter(y, rows(p.hed_matrix, k), rows(p.hed_offset, k))),
        (p.color, lambda y, k: color_jitter(y, rows(p.color_matrix, k), rows(p.color_k, k))),
        (p.blur_sigma > 0, lambda y, k: gaussian_blur(y, p.blur_sigma[k])),
        (p.solarize, lambda y, k: _solarize(y)),
    )
    for mask, stage in stages:
        idx = np.flatnonzero(mask)
        if idx.size:
            i = torch.from_numpy(idx).to(dev)
            x[i] = stage(x[i], idx)
    return x


def finish(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, output: str) -> torch.Tensor:
    """Float [0, 1] -> the loader's output: uint8 0..255, or normalised float32/bfloat16."""
    if output == "uint8":
        return x.mul_(255).round_().clamp_(0, 255).to(torch.uint8)
    y = (x - mean[:, None, None]) / std[:, None, None]
    return y.to(torch.bfloat16) if output == "bfloat16" else y
