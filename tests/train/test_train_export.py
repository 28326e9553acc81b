"""Export to timm-compatible safetensors and loading of checkpoints of several layouts."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import pytest
import timm
import torch
from pathflow.exceptions import PathflowError
from pathflow.train import TrainConfig, create_backbone, create_method
from pathflow.train.export import export_backbone, load_backbone, load_backbone_state
from safetensors import safe_open
from torch import nn

ARCH = "vit_tiny_patch16_224"


def _dino(img_size: int = 32) -> nn.Module:
    torch.manual_seed(0)
    net, dim = create_backbone(ARCH, img_size=img_size)
    cfg = TrainConfig(method="dino", steps=10, options={"out_dim": 64}).resolve()
    method = create_method("dino", net, dim, cfg)
    # make teacher and student differ, as after training
    with torch.no_grad():
        for p in method.student.parameters():  # type: ignore[union-attr]
            p.add_(0.01)
    return method


def _assert_same_tensors(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(expected)  # strict: no missing, no unexpected key
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_dino_teacher_export_loads_in_timm(tmp_path: Path) -> None:
    method = _dino()
    path = export_backbone(method, tmp_path / "backbone.safetensors", arch=ARCH)
    teacher = method.teacher.backbone.state_dict()  # type: ignore[union-attr]
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["arch"] == ARCH
    assert not any(
        k.startswith(("module.", "backbone.", "teacher.", "student.", "head.")) or "_orig_mod" in k
        for k in keys
    )
    model = timm.create_model(
        ARCH,
        pretrained=True,
        num_classes=0,
        img_size=32,
        pretrained_cfg_overlay={"file": str(path)},
    )
    _assert_same_tensors(model, teacher)
    assert set(keys) == set(model.state_dict())
    # and the student differs from what was exported
    student = method.student.backbone.state_dict()  # type: ignore[union-attr]
    assert not torch.equal(student["cls_token"], teacher["cls_token"])
    _assert_same_tensors(load_backbone(ARCH, path, img_size=32), teacher)


def test_export_from_checkpoint_file_compiled_and_ddp_prefixes(tmp_path: Path) -> None:
    method = _dino()
    teacher = method.teacher.backbone.state_dict()  # type: ignore[union-attr]
    # a training checkpoint as the trainer writes it
    from pathflow.train.checkpoint import save_checkpoint

    ckpt = tmp_path / "checkpoint.pt"
    save_checkpoint(
        ckpt,
        {"method": method.state_dict(), "export_prefix": "teacher.backbone.", "rank_states": []},
    )
    out = export_backbone(ckpt, tmp_path / "b.safetensors", arch=ARCH)
    _assert_same_tensors(load_backbone(ARCH, out, img_size=32), teacher)
    student = method.student.backbone.state_dict()  # type: ignore[union-attr]
    got = load_backbone(ARCH, load_backbone_state(ckpt, which="student"), img_size=32)
    _assert_same_tensors(got, student)
    # the method's own state dict with the keys of a DDP-wrapped, torch.compile'd module
    wrapped = {f"module._orig_mod.{k}": v for k, v in method.state_dict().items()}
    _assert_same_tensors(load_backbone(ARCH, wrapped, img_size=32), teacher)


def test_official_dino_checkpoint_layout(tmp_path: Path) -> None:
    """facebookresearch/dino saves {"student": DDP state (module.backbone.*, module.head.*),
    "teacher": (backbone.*, head.*), "optimizer", "epoch", "args", "dino_loss"}."""
    method = _dino()
    state = method.state_dict()
    teacher = {k[8:]: v for k, v in state.items() if k.startswith("teacher.")}
    student = {"module." + k[8:]: v for k, v in state.items() if k.startswith("student.")}
    official = {
        "student": student,
        "teacher": teacher,
        "epoch": 3,
        "dino_loss": {"center": torch.zeros(1, 64)},
        "args": argparse.Namespace(arch="vit_tiny"),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(official, path)
    # the args Namespace (plain values) is accepted by the safe loader...
    assert set(load_backbone_state(path)) == set(method.teacher.backbone.state_dict())  # type: ignore[union-attr]
    # ...other pickled objects are not
    unsafe = tmp_path / "unsafe.pth"
    torch.save({**official, "sampler": datetime.timezone.utc}, unsafe)
    with pytest.raises(PathflowError, match="weights_only=False"):
        load_backbone_state(unsafe)
    expected_t = method.teacher.backbone.state_dict()  # type: ignore[union-attr]
    expected_s = method.student.backbone.state_dict()  # type: ignore[union-attr]
    sd = load_backbone_state(path, weights_only=False)
    _assert_same_tensors(load_backbone(ARCH, sd, img_size=32), expected_t)
    sd = load_backbone_state(path, which="student", weights_only=False)
    _assert_same_tensors(load_backbone(ARCH, sd, img_size=32), expected_s)
    # DINO's released backbone-only weights are plain timm keys
    bare = tmp_path / "dino_vittiny_pretrain.pth"
    torch.save(expected_t, bare)
    _assert_same_tensors(load_backbone(ARCH, bare, img_size=32), expected_t)


def test_simclr_export_and_resnet50_trunc_through_timm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net, dim = create_backbone("resnet50_trunc")
    cfg = TrainConfig(
        method="simclr", steps=10, options={"proj_hidden_dim": 64, "proj_dim": 16}
    ).resolve()
    method = create_method("simclr", net, dim, cfg)
    path = export_backbone(method, tmp_path / "trunc.safetensors", arch="resnet50_trunc")
    expected = net.state_dict()
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(expected)
        assert "layer4" in f.metadata()["note"]
    # documented route: timm resnet50 + pretrained file (layer4 missing), then drop layer4
    model = timm.create_model(
        "resnet50", pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
    )
    model.layer4 = nn.Identity()  # type: ignore[assignment]
    _assert_same_tensors(model, expected)
    loaded = load_backbone("resnet50_trunc", path)
    _assert_same_tensors(loaded, expected)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))
        assert model(x).shape == (2, 1024)


def test_load_backbone_state_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_backbone_state(tmp_path / "missing.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(PathflowError, match="expected a dict"):
        load_backbone_state(tmp_path / "list.pt")
