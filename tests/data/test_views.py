"""View specs and parameter sampling (numpy only: no torch, no DALI)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from pathflow.data.views import (
    D4_TABLE,
    HED_FROM_RGB,
    HED_LOG_ADJUST,
    LUMA,
    RGB_FROM_HED,
    StainStats,
    ViewSpec,
    ViewsSpec,
    apply_d4,
    blur_window,
    create_views,
    list_views,
    random_resized_boxes,
    sample_batch_params,
    sample_view_params,
)

N = 4000


def test_presets_follow_the_papers() -> None:
    assert set(list_views()) >= {"simclr", "byol", "dino", "pathology", "eval"}
    dino = create_views("dino")
    assert [v.size for v in dino.expand()] == [224, 224] + [96] * 8
    g1, g2, loc = dino.groups
    assert g1.scale == (0.4, 1.0) and loc.scale == (0.05, 0.4)
    assert (g1.blur, g2.blur, loc.blur) == (1.0, 0.1, 0.5)
    assert (g1.solarize, g2.solarize) == (0.0, 0.2)
    simclr = create_views("simclr")
    assert simclr.num_views == 2 and simclr.groups[0].brightness == 0.8
    byol = create_views("byol")
    assert [g.solarize for g in byol.groups] == [0.0, 0.2]
    path = create_views("pathology").groups[0]
    assert path.vflip > 0 and path.rot90 > 0 and path.hed > 0 and path.randstain > 0
    small = create_views("dino", global_size=160, local_size=64, num_local=4)
    assert [v.size for v in small.expand()] == [160, 160, 64, 64, 64, 64]
    assert ViewsSpec.from_dict(dino.to_dict()) == dino
    with pytest.raises(ValueError, match="unknown views preset"):
        create_views("nope")
    with pytest.raises(ValueError, match="probability"):
        ViewSpec(hflip=1.5)


def test_d4_table_is_rotations_and_flips() -> None:
    img = np.arange(5 * 7 * 3).reshape(5, 7, 3)
    seen = set()
    for k in range(4):
        for h in range(2):
            for v in range(2):
                want = np.rot90(img, k)
                if h:
                    want = want[:, ::-1]
                if v:
                    want = want[::-1]
                code = int(D4_TABLE[k, h, v])
                np.testing.assert_array_equal(apply_d4(img, code), want)
                seen.add(code)
    assert seen == set(range(8))


def test_d4_code_distribution() -> None:
    spec = ViewSpec(hflip=0.5, vflip=0.5, rot90=0.75)
    p = sample_view_params(spec, np.full(N, 256), np.full(N, 256), np.random.default_rng(1))
    counts = np.bincount(p.d4, minlength=8) / N
    np.testing.assert_allclose(counts, 1 / 8, atol=0.02)  # uniform over D4
    p = sample_view_params(ViewSpec(), np.full(N, 256), np.full(N, 256), np.random.default_rng(1))
    assert set(np.unique(p.d4)) == {0, 2} and abs((p.d4 == 2).mean() - 0.5) < 0.03


def test_random_resized_crop_matches_torchvision_distribution() -> None:
    w = np.full(N, 256)
    h = np.full(N, 256)
    boxes = random_resized_boxes(w, h, (0.08, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0))
    x0, y0, bw, bh = boxes.T
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + bw <= 256).all() and (y0 + bh <= 256).all()
    assert (bw == np.round(bw)).all() and (x0 == np.round(x0)).all()
    area = bw * bh / (256 * 256)
    assert area.min() >= 0.08 - 0.01 and area.max() <= 1.0
    aspect = bw / bh
    assert aspect.min() > 3 / 4 - 0.03 and aspect.max() < 4 / 3 + 0.03
    # torchvision's algorithm, scalar, same seed stream layout is different: compare moments
    rng = np.random.default_rng(5)
    ref = []
    for _ in range(N):
        for _ in range(10):
            a = 256 * 256 * rng.uniform(0.08, 1.0)
            r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(a * r)), round(math.sqrt(a / r))
            if 0 < cw <= 256 and 0 < ch <= 256:
                ref.append(cw * ch / 256**2)
                break
        else:
            ref.append(1.0)
    assert abs(area.mean() - np.mean(ref)) < 0.015
    assert abs(np.median(area) - np.median(ref)) < 0.02


def test_fallback_centre_crop_for_extreme_aspect() -> None:
    boxes = random_resized_boxes(
        np.array([1000]), np.array([10]), (0.99, 1.0), (3 / 4, 4 / 3), np.random.default_rng(0)
    )
    x0, y0, bw, bh = boxes[0]
    assert (bh, bw) == (10, round(10 * 4 / 3)) and x0 == (1000 - bw) // 2 and y0 == 0


def test_color_matrix_identity_and_grayscale() -> None:
    off = ViewSpec(jitter=0.0, grayscale=0.0)
    p = sample_view_params(off, np.full(8, 64), np.full(8, 64), np.random.default_rng(0))
    np.testing.assert_allclose(p.color_matrix, np.broadcast_to(np.eye(3), (8, 3, 3)), atol=1e-6)
    assert not p.color.any() and np.allclose(p.color_k, 0)
    gray = ViewSpec(jitter=0.0, grayscale=1.0)
    p = sample_view_params(gray, np.full(8, 64), np.full(8, 64), np.random.default_rng(0))
    np.testing.assert_allclose(
        p.color_matrix, np.broadcast_to(np.tile(LUMA, (3, 1)), (8, 3, 3)), atol=1e-6
    )
    # Any jitter keeps grey pixels grey when the image mean is grey (hue/sat fix the grey axis)
    full = ViewSpec(jitter=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.5)
    p = sample_view_params(full, np.full(64, 64), np.full(64, 64), np.random.default_rng(0))
    g = 0.3
    out = p.color_matrix @ np.full(3, g) + p.color_k[:, None] * g
    assert np.allclose(out, out[:, :1], atol=1e-5)


def test_brightness_contrast_factors_hand_computed() -> None:
    spec = ViewSpec(jitter=1.0, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0)
    p = sample_view_params(spec, np.full(200, 64), np.full(200, 64), np.random.default_rng(3))
    # with saturation and hue off, M = c*b*I and k = (1-c)*b
    cb = p.color_matrix[:, 0, 0]
    assert np.allclose(p.color_matrix, cb[:, None, None] * np.eye(3), atol=1e-6)
    b = cb + p.color_k  # c*b + (1-c)*b
    c = cb / b
    assert b.min() >= 0.6 - 1e-6 and b.max() <= 1.4 + 1e-6
    assert c.min() >= 0.6 - 1e-6 and c.max() <= 1.4 + 1e-6
    assert b.std() > 0.15 and c.std() > 0.15


def test_hed_matrix_is_colour_deconvolution() -> None:
    spec = ViewSpec(hed=1.0, hed_sigma=0.05)
    rng = np.random.default_rng(2)
    p = sample_view_params(spec, np.full(50, 64), np.full(50, 64), rng)
    pixels = np.random.default_rng(0).uniform(0.05, 1.0, (100, 3))
    for i in range(50):
        log = np.log(pixels)
        out = np.exp(log @ p.hed_matrix[i].T + p.hed_offset[i])
        # recover the stain-space change: s' = s * alpha + beta on every pixel
        s = (np.log(pixels) / HED_LOG_ADJUST) @ HED_FROM_RGB
        s2 = (np.log(out) / HED_LOG_ADJUST) @ HED_FROM_RGB
        for ch in range(3):
            alpha, beta = np.polyfit(s[:, ch], s2[:, ch], 1)
            assert 0.95 - 1e-6 <= alpha <= 1.05 + 1e-6
            assert -0.05 - 1e-6 <= beta <= 0.05 + 1e-6
    none = sample_view_params(ViewSpec(hed=0.0), np.full(3, 64), np.full(3, 64), rng)
    np.testing.assert_allclose(none.hed_matrix, np.broadcast_to(np.eye(3), (3, 3, 3)), atol=1e-6)
    assert np.allclose(none.hed_offset, 0)
    assert np.allclose(RGB_FROM_HED @ HED_FROM_RGB, np.eye(3))


def test_blur_solarize_probabilities_and_windows() -> None:
    spec = ViewSpec(blur=0.5, blur_sigma=(0.1, 2.0), solarize=0.2)
    p = sample_view_params(spec, np.full(N, 64), np.full(N, 64), np.random.default_rng(0))
    on = p.blur_sigma > 0
    assert abs(on.mean() - 0.5) < 0.03 and abs(p.solarize.mean() - 0.2) < 0.03
    assert p.blur_sigma[on].min() >= 0.1 and p.blur_sigma[on].max() <= 2.0
    np.testing.assert_array_equal(
        blur_window(np.array([0.0, 0.1, 1.0, 2.0], np.float32)), [0, 3, 7, 13]
    )


def test_randstain_targets_and_missing_stats() -> None:
    stats = StainStats((70, 20, -15), (5, 3, 3), (12, 6, 5), (2, 1, 1))
    spec = ViewSpec(randstain=1.0, randstain_std_hyper=0.0)
    p = sample_view_params(spec, np.full(N, 64), np.full(N, 64), np.random.default_rng(0), stats)
    np.testing.assert_allclose(p.stain_mean.mean(0), [70, 20, -15], atol=0.5)
    np.testing.assert_allclose(p.stain_mean.std(0), [5, 3, 3], rtol=0.1)
    np.testing.assert_allclose(p.stain_std.mean(0), [12, 6, 5], atol=0.3)
    with pytest.raises(ValueError, match="stain statistics"):
        sample_view_params(spec, np.full(2, 64), np.full(2, 64), np.random.default_rng(0))


def test_same_seed_same_params() -> None:
    spec = create_views("pathology-dino")
    stats = StainStats((70, 20, -15), (5, 3, 3), (12, 6, 5), (2, 1, 1))
    a = sample_batch_params(
        spec, np.full(16, 256), np.full(16, 256), np.random.default_rng([1, 2]), stats
    )
    b = sample_batch_params(
        spec, np.full(16, 256), np.full(16, 256), np.random.default_rng([1, 2]), stats
    )
    assert len(a) == spec.num_views
    for pa, pb in zip(a, b, strict=False):
        for f in ("box", "d4", "color_matrix", "hed_matrix", "stain_mean", "blur_sigma"):
            np.testing.assert_array_equal(getattr(pa, f), getattr(pb, f))
    c = sample_batch_params(
        replace(spec, name="x"),
        np.full(16, 256),
        np.full(16, 256),
        np.random.default_rng([1, 3]),
        stats,
    )
    assert not np.array_equal(a[0].box, c[0].box)
