"""DINO and SimCLR methods: multi-crop grouping, EMA teacher, last-layer freezing, groups."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pathflow.exceptions import ConfigError
from pathflow.train import TrainConfig, create_backbone, create_method, list_methods
from pathflow.train.losses import NTXentLoss
from torch import nn


def _dino(**kw: Any) -> Any:
    torch.manual_seed(0)
    net, dim = create_backbone("vit_tiny_patch16_224", img_size=32)
    values: dict[str, Any] = {"method": "dino", "steps": 10, "steps_per_epoch": 2, "out_dim": 64}
    cfg = TrainConfig(**{**values, **kw}).resolve()
    return create_method("dino", net, dim, cfg)


def _views(batch: int = 2, n_local: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n_local)
    ]


def test_registry() -> None:
    assert list_methods() == ["dino", "simclr"]
    net, dim = create_backbone("resnet18")
    with pytest.raises(ConfigError, match="unknown method"):
        create_method("mocov3", net, dim, TrainConfig(steps=1).resolve())


def test_dino_multi_crop_teacher_sees_global_views_only() -> None:
    dino = _dino()
    calls: dict[str, list[tuple[int, ...]]] = {"student": [], "teacher": []}
    for name in calls:
        getattr(dino, name).backbone.register_forward_hook(
            lambda m, inp, out, name=name: calls[name].append(tuple(inp[0].shape))
        )
    out = dino(_views(batch=2, n_local=3), step=0)
    # dino's MultiCropWrapper: one backbone pass per resolution, crops concatenated
    assert calls["student"] == [(4, 3, 32, 32), (6, 3, 16, 16)]
    assert calls["teacher"] == [(4, 3, 32, 32)]
    assert out["loss"].requires_grad and out["teacher_temp"].item() == pytest.approx(0.04)
    assert all(not p.requires_grad for p in dino.teacher.parameters())


def test_dino_ema_teacher_and_momentum_schedule() -> None:
    dino = _dino(momentum_teacher=0.99)
    for t, s in zip(dino.teacher.parameters(), dino.student.parameters(), strict=True):
        assert torch.equal(t, s)  # the teacher starts as a copy of the student
    teacher0 = [p.detach().clone() for p in dino.teacher.parameters()]
    with torch.no_grad():
        for p in dino.student.parameters():
            p.add_(torch.randn_like(p))
    student = [p.detach().clone() for p in dino.student.parameters()]
    dino.after_step(3)
    m = 1 - (1 - 0.99) * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 3 / 10)).item())
    assert dino.momentum(3) == pytest.approx(m)
    for t, t0, s in zip(dino.teacher.parameters(), teacher0, student, strict=True):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s)


def test_dino_last_layer_frozen_during_the_first_epoch() -> None:
    dino = _dino(freeze_last_layer=1.0)  # 2 steps per epoch
    assert dino.freeze_last_layer_steps == 2
    last_v = dino.student.head.last_layer.weight_v
    for step, frozen in ((0, True), (1, True), (2, False)):
        dino.zero_grad()
        dino(_views(), step)["loss"].backward()
        assert last_v.grad is not None
        dino.before_optimizer_step(step)
        assert (last_v.grad is None) == frozen, step
        assert dino.student.head.mlp[0].weight.grad is not None  # the rest trains


def test_param_groups_exclude_biases_norms_and_frozen() -> None:
    dino = _dino()
    decay, no_decay = dino.param_groups(0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in dino.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "student.backbone.blocks.0.attn.qkv.weight" in decay_names
    assert "student.head.last_layer.weight_v" in decay_names
    assert "student.backbone.blocks.0.norm1.weight" in no_decay_names
    assert "student.backbone.blocks.0.attn.qkv.bias" in no_decay_names
    assert not any(n.startswith("teacher.") for n in decay_names | no_decay_names)
    assert "student.head.last_layer.weight_g" not in decay_names | no_decay_names


def test_simclr_loss_is_ntxent_of_the_projected_views() -> None:
    torch.manual_seed(0)
    net, dim = create_backbone("resnet18")
    cfg = TrainConfig(method="simclr", steps=4, proj_hidden_dim=32, proj_dim=8).resolve()
    simclr = create_method("simclr", net, dim, cfg)
    assert simclr.encoder.channels_last  # CNN: inputs converted to channels-last
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    simclr.eval()  # BatchNorm with running statistics: two calls give the same embeddings
    got = simclr(views, 0)["loss"]
    with torch.no_grad():
        z = simclr.encoder.head(simclr.encoder.backbone(torch.cat(views)))
    torch.testing.assert_close(got, NTXentLoss(0.1)(z[:4], z[4:]))
    assert isinstance(simclr.backbone_for_export(), nn.Module)
    assert simclr.backbone_for_export() is net
    with pytest.raises(ValueError, match="2 views"):
        simclr(views[:1], 0)
