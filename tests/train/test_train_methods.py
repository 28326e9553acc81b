"""DINO and SimCLR methods: multi-crop grouping, EMA teacher, last-layer freezing, gradient
clipping, centre update, parameter groups."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pathflow.exceptions import ConfigError
from pathflow.train import TrainConfig, create_backbone, create_method, list_methods
from torch import nn


def _dino(**options: Any) -> Any:
    torch.manual_seed(0)
    net, dim = create_backbone("vit_tiny_patch16_224", img_size=32)
    cfg = TrainConfig(
        method="dino", epochs=5, steps_per_epoch=2, options={"out_dim": 64, **options}
    )
    return create_method("dino", net, dim, cfg.resolve())


def _views(batch: int = 2, n_local: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n_local)
    ]


def test_registry() -> None:
    assert list_methods() == [
        "barlowtwins", "byol", "clubyol", "clusiam", "dino", "hipt4k", "mocov2", "mocov3",
        "sgcl", "simclr", "simsiam", "swav",
    ]  # fmt: skip
    net, dim = create_backbone("resnet18")
    with pytest.raises(ConfigError, match="unknown method"):
        create_method("mocov9", net, dim, TrainConfig(steps=1).resolve())


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
    """dino's momentum schedule over 10 steps: 0.996 at step 0, halfway to 1 (0.998) at step 5
    (cos(pi/2) = 0); the teacher is m * teacher + (1 - m) * student."""
    dino = _dino()
    assert dino.momentum(0) == pytest.approx(0.996) and dino.momentum(5) == pytest.approx(0.998)
    assert 0.998 < dino.momentum(9) < 1.0
    for t, s in zip(dino.teacher.parameters(), dino.student.parameters(), strict=True):
        assert torch.equal(t, s)  # the teacher starts as a copy of the student
    with torch.no_grad():
        for p in dino.teacher.parameters():
            p.fill_(1.0)
        for p in dino.student.parameters():
            p.fill_(3.0)
    dino.after_step(5)
    for t in dino.teacher.parameters():  # 0.998 * 1 + 0.002 * 3
        torch.testing.assert_close(t, torch.full_like(t, 1.004))


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


def test_dino_clips_each_parameter_not_the_global_norm() -> None:
    """dino's clip_gradients: a gradient of norm 6 is scaled to norm 3, one of norm 1 is left
    alone (a global clip to 3 would scale both by 3 / sqrt(37))."""
    dino = _dino()
    dino.zero_grad()
    params = list(dino.student.parameters())
    big, small = params[0], params[1]
    big.grad = torch.zeros_like(big)
    big.grad.view(-1)[:2] = torch.tensor([3.6, 4.8])  # norm 6
    small.grad = torch.zeros_like(small)
    small.grad.view(-1)[0] = 1.0
    total = dino.clip_gradients(3.0)
    assert total.item() == pytest.approx(37**0.5)
    assert big.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert small.grad.norm().item() == pytest.approx(1.0)
    torch.testing.assert_close(big.grad.view(-1)[:2], torch.tensor([1.8, 2.4]), rtol=1e-5, atol=0)


def test_simclr_clips_the_global_norm() -> None:
    net, dim = create_backbone("resnet18")
    cfg = TrainConfig(method="simclr", steps=4, options={"proj_hidden_dim": 32, "proj_dim": 8})
    simclr = create_method("simclr", net, dim, cfg.resolve())
    a, b = list(simclr.parameters())[:2]
    simclr.zero_grad()
    a.grad = torch.zeros(a.numel()).index_fill_(0, torch.tensor([0]), 6.0).view(a.shape)
    b.grad = torch.zeros(b.numel()).index_fill_(0, torch.tensor([0]), 8.0).view(b.shape)
    assert simclr.clip_gradients(5.0).item() == pytest.approx(10.0)  # global norm 10 -> 5
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    assert b.grad.norm().item() == pytest.approx(4.0, rel=1e-5)


def test_dino_centre_moves_only_after_the_step() -> None:
    """The centre update waits for ``after_step``: a step stopped by a non-finite loss (the
    trainer raises before it) leaves the centre as it was."""
    dino = _dino()
    out = dino(_views(), 0)
    assert torch.count_nonzero(dino.loss.center) == 0
    assert torch.isfinite(out["loss"])
    dino.after_step(0)
    assert torch.count_nonzero(dino.loss.center) > 0


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


def test_simclr_loss_invariances() -> None:
    """Facts of NT-Xent on the method's own embeddings, not the same code re-run: the loss is
    the same for any order of the images in the batch and with the two views swapped, and
    identical views of well-separated images give a lower loss than unrelated views."""
    torch.manual_seed(0)
    net, dim = create_backbone("resnet18")
    cfg = TrainConfig(method="simclr", steps=4, options={"proj_hidden_dim": 32, "proj_dim": 8})
    simclr = create_method("simclr", net, dim, cfg.resolve())
    assert simclr.encoder.channels_last  # CNN: inputs converted to channels-last
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(6, 3, 32, 32, generator=g), torch.randn(6, 3, 32, 32, generator=g)]
    simclr.eval()  # BatchNorm with running statistics: per-image embeddings
    with torch.no_grad():
        base = simclr(views, 0)["loss"]
        perm = torch.randperm(6, generator=g)
        permuted = simclr([v[perm] for v in views], 0)["loss"]
        swapped = simclr(views[::-1], 0)["loss"]
        same = simclr([views[0], views[0].clone()], 0)["loss"]
    torch.testing.assert_close(permuted, base, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(swapped, base, rtol=1e-5, atol=1e-6)
    assert same < base
    assert isinstance(simclr.backbone_for_export(), nn.Module)
    assert simclr.backbone_for_export() is net
    with pytest.raises(ValueError, match="2 views"):
        simclr(views[:1], 0)
