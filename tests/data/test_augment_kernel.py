"""``_core.augment_views`` (the fused Rust colour stages) against the torch reference.

Real 256-px H&E patches, real view parameters from :func:`sample_view_params` with each stage
forced on and the full presets; the reference is ``augment_torch.apply_color_stages`` followed
by ``augment_torch.finish`` on the same uint8 crops.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pathflow import _core  # noqa: E402
from pathflow.data import ShardSet  # noqa: E402
from pathflow.data.augment_torch import apply_color_stages, finish  # noqa: E402
from pathflow.data.stain import fit_stain_stats  # noqa: E402
from pathflow.data.views import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    StainStats,
    ViewParams,
    ViewSpec,
    create_views,
    sample_view_params,
)
from pathflow.exceptions import InvalidArgumentError  # noqa: E402

BASE = ViewSpec(size=224, hflip=0.0, jitter=0.0, grayscale=0.0)
FORCED = {
    "stain": replace(BASE, randstain=1.0),
    "hed": replace(BASE, hed=1.0),
    "jitter": replace(BASE, jitter=1.0, grayscale=0.3),
    "blur": replace(BASE, blur=1.0),
    "solarize": replace(BASE, solarize=1.0),
    "all": replace(BASE, randstain=1.0, hed=1.0, jitter=1.0, grayscale=0.2, blur=1.0, solarize=1.0),
    "all-96": replace(BASE, size=96, randstain=1.0, hed=1.0, jitter=1.0, blur=1.0, solarize=0.5),
}
PRESETS = ["simclr", "dino", "pathology-dino"]


@pytest.fixture(scope="module")
def jpegs(sample_shards: Path) -> list[bytes]:
    ss = ShardSet(sample_shards)
    images, _ = ss.read(np.arange(len(ss), dtype=np.int64))
    ss.close()
    assert len(images) >= 40
    return images


@pytest.fixture(scope="module")
def stain_stats(sample_shards: Path) -> StainStats:
    return fit_stain_stats(sample_shards)


def draw(
    jpegs: list[bytes], spec: ViewSpec, seed: int, stats: StainStats | None
) -> tuple[np.ndarray, ViewParams]:
    """Crops (N, S, S, 3) of one view, as the strided [:, 1] slice of a two-view decode."""
    wh, errors = _core.image_info(jpegs)
    assert all(e is None for e in errors)
    rng = np.random.default_rng(seed)
    p = sample_view_params(spec, wh[:, 0], wh[:, 1], rng, stats)
    boxes = np.stack([p.box, p.box[::-1]], axis=1)
    d4 = np.stack([p.d4[::-1], p.d4], axis=1)
    outs, ok, _ = _core.decode_views(jpegs, [boxes], [p.size], [d4])
    assert ok.all()
    return outs[0][:, 1], p


def rust(
    crops: np.ndarray,
    p: ViewParams,
    output: str,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    return _core.augment_views(
        crops, p.stain, p.stain_mean, p.stain_std, p.hed, p.hed_matrix, p.hed_offset,
        p.color, p.color_matrix, p.color_k, p.blur_sigma, p.solarize, mean, std, output,
    )  # fmt: skip


def reference(crops: np.ndarray, p: ViewParams, output: str) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).float() / 255
    x = apply_color_stages(x.contiguous(), p)
    y = finish(x, torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD), output)
    if output == "bfloat16":
        return y.view(torch.int16).numpy().view(np.uint16)
    return y.numpy()


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def check_all_outputs(crops: np.ndarray, p: ViewParams, label: str) -> None:
    got = rust(crops, p, "float")
    want = reference(crops, p, "float")
    assert got.dtype == np.float32 and got.shape == want.shape
    assert got.flags.c_contiguous
    err = np.abs(got - want)
    assert err.max() < 1e-3, f"{label}: float max error {err.max():.2e}"

    got8 = rust(crops, p, "uint8")
    want8 = reference(crops, p, "uint8")
    assert got8.dtype == np.uint8 and got8.shape == want8.shape
    d8 = np.abs(got8.astype(np.int16) - want8.astype(np.int16))
    assert d8.max() <= 1, f"{label}: uint8 off by {d8.max()}"
    assert (d8 > 0).mean() < 1e-3, f"{label}: uint8 differs on {(d8 > 0).mean():.2%}"

    gotb = rust(crops, p, "bfloat16")
    wantb = reference(crops, p, "bfloat16")
    assert gotb.dtype == np.uint16 and gotb.shape == wantb.shape
    # The conversion itself is torch's (round to nearest even), bit for bit ...
    ours = torch.from_numpy(got).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(gotb, ours), f"{label}: bfloat16 rounding differs from torch"
    # ... so against the reference only the float32 differences remain: almost all equal, and
    # at most 1 bf16 ulp apart plus the float32 difference (which matters only near 0, where
    # a bf16 ulp is smaller than float32 rounding noise, and in the ill-conditioned
    # RandStainNA + HED chain).
    same = (gotb == wantb).mean()
    assert same > 0.999, f"{label}: bfloat16 equal on only {same:.4%}"
    a, b = bf16_to_f32(gotb), bf16_to_f32(wantb)
    ulp = np.maximum(np.abs(a), np.abs(b)) * 2.0**-7
    assert (np.abs(a - b) <= ulp + err).all(), f"{label}: bfloat16 more than 1 ulp apart"


@pytest.mark.parametrize("stage", list(FORCED))
def test_each_stage_matches_torch(jpegs: list[bytes], stain_stats: StainStats, stage: str) -> None:
    spec = FORCED[stage]
    crops, p = draw(jpegs, spec, seed=len(stage), stats=stain_stats)
    forced = {"stain": p.stain, "hed": p.hed, "jitter": p.color, "blur": p.blur_sigma > 0}
    if stage in forced:
        assert forced[stage].all()
    if stage == "solarize":
        assert p.solarize.all()
    check_all_outputs(crops, p, stage)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_match_torch(jpegs: list[bytes], stain_stats: StainStats, preset: str) -> None:
    spec = create_views(preset)
    for g, group in enumerate(spec.groups):
        crops, p = draw(jpegs, group, seed=100 + g, stats=stain_stats)
        check_all_outputs(crops, p, f"{preset}[{g}]")


def test_layouts_and_normalisation(jpegs: list[bytes], stain_stats: StainStats) -> None:
    crops, p = draw(jpegs, FORCED["all"], seed=7, stats=stain_stats)
    assert not crops.flags.c_contiguous  # a [:, 1] slice: read in place
    ref = rust(np.ascontiguousarray(crops), p, "float")
    assert np.array_equal(rust(crops, p, "float"), ref)
    # Crops that are not contiguous themselves are copied first: same result.
    flipped = np.ascontiguousarray(crops[:, ::-1])[:, ::-1]
    assert not flipped[0].flags.c_contiguous
    assert np.array_equal(rust(flipped, p, "float"), ref)
    # uint8 ignores the normalisation; float applies (x - mean) / std per channel.
    raw = rust(crops, p, "float", mean=(0, 0, 0), std=(1, 1, 1))
    mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
    assert np.array_equal(ref, (raw - mean) / std)
    u8 = rust(crops, p, "uint8", mean=(9, 9, 9), std=(2, 2, 2))
    assert np.array_equal(u8, np.clip(np.round(raw * 255), 0, 255).astype(np.uint8))
    # Nothing on: exactly the crop, channel-first.
    off = replace(BASE, size=crops.shape[1])
    _, p0 = draw(jpegs, off, seed=1, stats=None)
    p0.blur_sigma[:] = 0
    plain = rust(crops, p0, "uint8")
    assert np.array_equal(plain, crops.transpose(0, 3, 1, 2))
    # An empty batch.
    empty = rust(crops[:0], replace_len(p0, 0), "bfloat16")
    assert empty.shape == (0, 3, *crops.shape[1:3]) and empty.dtype == np.uint16


def replace_len(p: ViewParams, n: int) -> ViewParams:
    return ViewParams(
        **{k: (v[:n] if isinstance(v, np.ndarray) else v) for k, v in vars(p).items()}
    )


def test_bad_arguments_raise(jpegs: list[bytes]) -> None:
    crops, p = draw(jpegs[:4], replace(BASE, size=32, blur=1.0), seed=3, stats=None)
    with pytest.raises(InvalidArgumentError, match="unknown output"):
        rust(crops, p, "half")
    with pytest.raises(InvalidArgumentError, match=r"color_matrix has shape \[3, 3, 3\]"):
        rust(crops, replace(p, color_matrix=p.color_matrix[:3]), "float")
    with pytest.raises(InvalidArgumentError, match="crops has shape"):
        rust(crops[:, :, :31], p, "float")
    with pytest.raises(InvalidArgumentError, match="std != 0"):
        rust(crops, p, "float", std=(1.0, 0.0, 1.0))
    big = p.blur_sigma.copy()
    big[2] = 11.0  # window 67 > 32 px
    with pytest.raises(InvalidArgumentError, match="sample 2: blur_sigma 11"):
        rust(crops, replace(p, blur_sigma=big), "float")
