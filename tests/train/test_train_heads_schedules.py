"""Heads (DINO, SimCLR projector), schedules and backbones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pathflow.train.backbones import create_backbone, is_cnn
from pathflow.train.heads import DINOHead, SimCLRProjectionHead
from pathflow.train.schedules import cosine_schedule, warmup_constant_schedule
from torch import nn


def test_dino_head_layout_and_weight_normalised_last_layer() -> None:
    head = DINOHead(32, out_dim=100, hidden_dim=64, bottleneck_dim=16)
    keys = set(head.state_dict())
    assert keys == {
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.weight_g", "last_layer.weight_v",
    }  # fmt: skip
    assert isinstance(head.mlp[1], nn.GELU) and isinstance(head.mlp[3], nn.GELU)
    g = head.last_layer.weight_g
    assert not g.requires_grad and torch.equal(g, torch.ones(100, 1))
    x = torch.randn(4, 32)
    # logits = cosine similarity between the l2-normalised bottleneck and each prototype
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    expected = bottleneck @ F.normalize(head.last_layer.weight_v, dim=1).T
    torch.testing.assert_close(head(x), expected)
    # same as torch's weight_norm with the same g and v
    ref = F.linear(bottleneck, torch._weight_norm(head.last_layer.weight_v, g, 0))
    torch.testing.assert_close(head(x), ref)
    assert DINOHead(8, out_dim=10, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_simclr_projection_head_layout() -> None:
    head = SimCLRProjectionHead(384)
    kinds = [type(m).__name__ for m in head.layers]
    assert kinds == ["Linear", "GlobalBatchNorm1d", "ReLU"] * 2 + ["Linear"]
    lin = [m for m in head.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in lin] == [
        (384, 2048, False),
        (2048, 2048, False),
        (2048, 128, True),
    ]
    assert head(torch.randn(6, 384)).shape == (6, 128)


def test_cosine_schedule_values() -> None:
    """dino's cosine_scheduler at known points: a half cosine over n steps takes the values
    1, (1 + cos(pi/4)) / 2, 1/2, (1 - cos(pi/4)) / 2 for n = 4."""
    got = cosine_schedule(1.0, 0.0, total_steps=4)
    np.testing.assert_allclose(got, [1.0, 0.8535533905932737, 0.5, 0.14644660940672627])
    # the teacher momentum 0.996 -> 1 is halfway (0.998) at the middle step
    assert cosine_schedule(0.996, 1.0, total_steps=10)[5] == pytest.approx(0.998)
    # linear warmup 0 -> base over 3 steps (both ends), then cosine from base over 5 steps
    got = cosine_schedule(1e-3, 1e-6, total_steps=8, warmup_steps=3)
    np.testing.assert_allclose(got[:3], [0.0, 5e-4, 1e-3])
    assert got[3] == 1e-3 and got[-1] == pytest.approx(9.639601130971382e-05)
    assert np.all(np.diff(got[3:]) < 0)
    # weight decay 0.04 -> 0.4 increases
    wd = cosine_schedule(0.04, 0.4, 100)
    assert (
        wd[0] == pytest.approx(0.04) and wd[50] == pytest.approx(0.22) and np.all(np.diff(wd) > 0)
    )
    # warmup longer than the run is clamped
    assert len(cosine_schedule(1.0, 0.0, 4, warmup_steps=10)) == 4


def test_teacher_temperature_schedule() -> None:
    got = warmup_constant_schedule(0.04, 0.07, total_steps=6, warmup_steps=4)
    np.testing.assert_allclose(got, [0.04, 0.05, 0.06, 0.07, 0.07, 0.07])


def test_vit_backbone_takes_multi_crop_sizes() -> None:
    net, dim = create_backbone("vit_tiny_patch16_224", img_size=32)
    assert dim == 192
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 192)
    assert net(torch.zeros(3, 3, 16, 16)).shape == (3, 192)
    assert not is_cnn(net)  # ViTs stay in the default memory format


def test_resnet50_trunc_is_clams_layer3_encoder() -> None:
    import timm

    net, dim = create_backbone("resnet50_trunc")
    assert dim == 1024
    keys = set(net.state_dict())
    assert not any(k.startswith(("layer4.", "fc.")) for k in keys)
    assert any(k.startswith("layer3.") for k in keys)
    conv = net.conv1.weight  # type: ignore[union-attr]
    assert conv.is_contiguous(memory_format=torch.channels_last)
    # CLAM's TimmCNNEncoder: timm resnet50 features_only out_indices=(3,) + adaptive avg pool
    clam = timm.create_model("resnet50", features_only=True, out_indices=(3,))
    clam.load_state_dict(net.state_dict(), strict=True)
    net.eval()
    clam.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = F.adaptive_avg_pool2d(clam(x)[0], 1).flatten(1)
        torch.testing.assert_close(net(x), ref)
