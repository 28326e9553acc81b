"""RandStainNA statistics: per-image LAB mean/std distributions fitted on the shards.

Shen et al., "RandStainNA: Learning Stain-Agnostic Features from Histology Slides by Bridging
Stain Augmentation and Normalization" (MICCAI 2022): the per-image channel means and standard
deviations in LAB are modelled over the training set; each augmented image gets targets drawn
from that distribution.

Example:
    >>> stats = fit_stain_stats("out/shards", num_samples=256)  # doctest: +SKIP
    >>> tuple(round(v, 1) for v in stats.mean_mean)  # cmu-small's 43 patches  # doctest: +SKIP
    (63.7, 19.1, -8.3)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from pathflow.data.shardset import ShardSet
from pathflow.data.views import StainStats

_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def rgb_to_lab(rgb: npt.NDArray[np.uint8]) -> npt.NDArray[np.float64]:
    """sRGB uint8 (..., 3) -> CIE LAB (D65), the formulas of skimage.color.rgb2lab."""
    x = rgb.astype(np.float64) / 255.0
    lin = np.where(x > 0.04045, ((x + 0.055) / 1.055) ** 2.4, x / 12.92)
    xyz = lin @ (_XYZ_FROM_RGB / _WHITE[:, None]).T
    eps = (6 / 29) ** 3
    f = np.where(xyz > eps, np.cbrt(np.maximum(xyz, eps)), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.empty_like(f)
    lab[..., 0] = 116 * f[..., 1] - 16
    lab[..., 1] = 500 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200 * (f[..., 1] - f[..., 2])
    return lab


def fit_stain_stats(
    shards: str | Path | ShardSet, num_samples: int = 512, seed: int = 0, size: int = 224
) -> StainStats:
    """Fit RandStainNA's LAB statistics on up to ``num_samples`` images of the shards."""
    from pathflow import _core

    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    rng = np.random.default_rng([seed, 0x57A1])
    n = min(num_samples, len(ss))
    idx = np.sort(rng.choice(len(ss), size=n, replace=False)).astype(np.int64)
    images, _ = ss.read(idx)
    wh, errors = _core.image_info(images)
    keep = [i for i, e in enumerate(errors) if e is None]
    if len(keep) < 2:
        raise ValueError(f"{shards}: fewer than 2 decodable images to fit stain statistics")
    images = [images[i] for i in keep]
    wh = wh[keep]
    boxes = np.zeros((len(images), 1, 4), dtype=np.float32)
    boxes[:, 0, 2:] = wh
    d4 = np.zeros((len(images), 1), dtype=np.uint8)
    outs, ok, _ = _core.decode_views(images, [boxes], [size], [d4])
    lab = rgb_to_lab(outs[0][ok, 0])  # (n, S, S, 3)
    means = lab.mean(axis=(1, 2))
    stds = lab.std(axis=(1, 2))

    def t(a: npt.NDArray[np.float64]) -> tuple[float, float, float]:
        return (float(a[0]), float(a[1]), float(a[2]))

    return StainStats(
        mean_mean=t(means.mean(0)),
        mean_std=t(means.std(0)),
        std_mean=t(stds.mean(0)),
        std_std=t(stds.std(0)),
    )
