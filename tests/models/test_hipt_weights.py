"""Loading HIPT's published weights: whole DINO training checkpoints
(``vit256_small_dino.pth``, ``vit4k_xs_dino.pth``), built here from HIPT's key list and
shapes alone (random values), with the teacher's backbone to be taken, strictly.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pathflow.exceptions import PathflowError
from pathflow.extract.model import IMAGENET_MEAN, IMAGENET_STD, load_extractor, resolve_norm
from pathflow.models.hipt import load_hipt_model
from torch import Tensor


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


Layout = dict[str, tuple[int, ...]]


def _blocks(depth: int, dim: int, mlp: int) -> Layout:
    out: Layout = {}
    for n in range(depth):
        p = f"blocks.{n}."
        out |= {
            p + "norm1.weight": (dim,),
            p + "norm1.bias": (dim,),
            p + "attn.qkv.weight": (3 * dim, dim),
            p + "attn.qkv.bias": (3 * dim,),
            p + "attn.proj.weight": (dim, dim),
            p + "attn.proj.bias": (dim,),
            p + "norm2.weight": (dim,),
            p + "norm2.bias": (dim,),
            p + "mlp.fc1.weight": (mlp, dim),
            p + "mlp.fc1.bias": (mlp,),
            p + "mlp.fc2.weight": (dim, mlp),
            p + "mlp.fc2.bias": (dim,),
        }
    return out


def vit4k_layout() -> Layout:
    """HIPT's ``vit4k_xs_dino.pth`` backbone: 384 -> 192, 6 blocks, positions for 14 x 14."""
    return {
        "cls_token": (1, 1, 192),
        "pos_embed": (1, 197, 192),
        "phi.0.weight": (192, 384),
        "phi.0.bias": (192,),
        **_blocks(6, 192, 768),
        "norm.weight": (192,),
        "norm.bias": (192,),
    }


def vit256_layout() -> Layout:
    """HIPT's ``vit256_small_dino.pth`` backbone: DINO's ViT-S/16 (timm's key names)."""
    return {
        "cls_token": (1, 1, 384),
        "pos_embed": (1, 197, 384),
        "patch_embed.proj.weight": (384, 3, 16, 16),
        "patch_embed.proj.bias": (384,),
        **_blocks(12, 384, 1536),
        "norm.weight": (384,),
        "norm.bias": (384,),
    }


def random_state(layout: Layout, seed: int) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: 0.05 * torch.randn(shape, generator=g) for k, shape in layout.items()}


def constant_state(layout: Layout) -> dict[str, Tensor]:
    """Other values in the same layout, each key one constant (an expanded single element,
    so that a ViT-S student adds next to nothing to the file)."""
    return {k: torch.full((1,), float(i + 1)).expand(s) for i, (k, s) in enumerate(layout.items())}


def _dino_head(dim: int, seed: int) -> dict[str, Tensor]:
    """DINO head keys (small made-up sizes: the loader must drop them whatever their shape)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "mlp.0.weight": (64, dim),
        "mlp.0.bias": (64,),
        "mlp.2.weight": (64, 64),
        "mlp.2.bias": (64,),
        "mlp.4.weight": (16, 64),
        "mlp.4.bias": (16,),
        "last_layer.weight_g": (1, 16),
        "last_layer.weight_v": (32, 16),
    }
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def dino_checkpoint(
    teacher: dict[str, Tensor], student: dict[str, Tensor], arch: str
) -> dict[str, Any]:
    """A DINO training checkpoint as HIPT published them (teacher not DDP-wrapped, student
    DDP-wrapped, optimizer, args namespace, loss center)."""
    dim = teacher["cls_token"].shape[-1]
    return {
        "teacher": {
            **{"backbone." + k: v for k, v in teacher.items()},
            **{"head." + k: v for k, v in _dino_head(dim, 10).items()},
        },
        "student": {
            **{"module.backbone." + k: v for k, v in student.items()},
            **{"module.head." + k: v for k, v in _dino_head(dim, 11).items()},
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.zeros(3)}},
            "param_groups": [{"lr": 5e-4, "weight_decay": 0.04, "params": [0]}],
        },
        "epoch": 5,
        "args": argparse.Namespace(
            arch=arch,
            patch_size=16,
            out_dim=65536,
            norm_last_layer=True,
            momentum_teacher=0.996,
            local_crops_scale=(0.05, 0.4),
            data_path="/data/TCGA",
            output_dir="/out",
        ),
        "dino_loss": {"center": torch.zeros(1, 16)},
        "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 3},
    }


def _save(path: Path, ckpt: dict[str, Any]) -> Path:
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def vit4k_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Tensor]]:
    teacher = random_state(vit4k_layout(), 0)
    ckpt = dino_checkpoint(teacher, random_state(vit4k_layout(), 1), "vit4k_xs")
    return _save(tmp_path_factory.mktemp("vit4k") / "vit4k_xs_dino.pth", ckpt), teacher


@pytest.fixture(scope="module")
def vit256_teacher() -> dict[str, Tensor]:
    return random_state(vit256_layout(), 2)


@pytest.fixture(scope="module")
def vit256_ckpt(
    tmp_path_factory: pytest.TempPathFactory, vit256_teacher: dict[str, Tensor]
) -> tuple[Path, dict[str, Tensor]]:
    ckpt = dino_checkpoint(vit256_teacher, constant_state(vit256_layout()), "vit_small")
    path = tmp_path_factory.mktemp("vit256") / "vit256_small_dino.pth"
    return _save(path, ckpt), vit256_teacher


def _assert_teacher(model: torch.nn.Module, layout: Layout, teacher: dict[str, Tensor]) -> None:
    own = model.state_dict()
    assert {k: tuple(v.shape) for k, v in own.items()} == layout  # zero missing, no extra
    for k, v in teacher.items():
        assert torch.equal(own[k], v), k


# --------------------------------------------------------------------------- ViT-4K


def test_vit4k_loads_teacher(vit4k_ckpt: tuple[Path, dict[str, Tensor]]) -> None:
    path, teacher = vit4k_ckpt
    model = load_hipt_model("vit4k_xs", path)
    _assert_teacher(model, vit4k_layout(), teacher)
    student = random_state(vit4k_layout(), 1)
    assert not torch.equal(model.state_dict()["phi.0.weight"], student["phi.0.weight"])
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 384, 16, 16)).shape == (2, 192)


def _mutated(teacher: dict[str, Tensor], how: str) -> tuple[dict[str, Tensor], str]:
    """The teacher state with one fault, and the key the error must name."""
    sd = dict(teacher)
    if how == "extra":
        sd["blocks.0.attn.qkv2.weight"] = torch.zeros(576, 192)
        return sd, "blocks.0.attn.qkv2.weight"
    if how == "renamed":
        sd["blocks.3.mlp.fc_1.weight"] = sd.pop("blocks.3.mlp.fc1.weight")
        return sd, "blocks.3.mlp.fc1.weight"
    if how == "renamed_new":
        sd["blocks.3.mlp.fc_1.weight"] = sd.pop("blocks.3.mlp.fc1.weight")
        return sd, "blocks.3.mlp.fc_1.weight"
    if how == "missing":
        del sd["norm.weight"]
        return sd, "norm.weight"
    if how == "shape":
        sd["phi.0.weight"] = torch.zeros(192, 768)
        return sd, "phi.0.weight"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["extra", "renamed", "renamed_new", "missing", "shape"])
def test_vit4k_wrong_key_is_named(tmp_path: Path, how: str) -> None:
    teacher = random_state(vit4k_layout(), 0)
    bad, key = _mutated(teacher, how)
    path = _save(tmp_path / "bad.pth", dino_checkpoint(bad, teacher, "vit4k_xs"))
    with pytest.raises(PathflowError, match=re.escape(key)):
        load_hipt_model("vit4k_xs", path)


def test_vit4k_student_faults_do_not_matter(tmp_path: Path) -> None:
    """Only the teacher is read: a student with a foreign key does not stop the load."""
    teacher = random_state(vit4k_layout(), 0)
    bad, _ = _mutated(teacher, "extra")
    path = _save(tmp_path / "ok.pth", dino_checkpoint(teacher, bad, "vit4k_xs"))
    _assert_teacher(load_hipt_model("vit4k_xs", path), vit4k_layout(), teacher)


# ------------------------------------------------------------------------- ViT-256


@pytest.fixture(scope="module")
def vit256(vit256_ckpt: tuple[Path, dict[str, Tensor]]) -> torch.nn.Module:
    return load_hipt_model("vit_small_patch16_224", vit256_ckpt[0]).eval()


def test_vit256_loads_teacher(
    vit256: torch.nn.Module, vit256_ckpt: tuple[Path, dict[str, Tensor]]
) -> None:
    _, teacher = vit256_ckpt
    model = vit256
    _assert_teacher(model, vit256_layout(), teacher)
    student = constant_state(vit256_layout())
    assert not torch.equal(model.state_dict()["pos_embed"], student["pos_embed"])


def test_vit256_wrong_key_is_named(tmp_path: Path, vit256_teacher: dict[str, Tensor]) -> None:
    key = "blocks.0.attn.qkv2.weight"
    sd = {**vit256_teacher, key: torch.zeros(1152, 384)}
    student = constant_state(vit256_layout())
    path = _save(tmp_path / "bad.pth", dino_checkpoint(sd, student, "vit_small"))
    with pytest.raises(PathflowError, match=re.escape(key)):
        load_hipt_model("vit_small_patch16_224", path)


def test_vit256_mis_shaped_pos_embed_is_named(
    tmp_path: Path, vit256_teacher: dict[str, Tensor]
) -> None:
    # a position embedding of another width (a ViT-S grid of 14 x 14 must be 384-d); a
    # square grid of another side is a model trained at another size and is rebuilt so
    # (see test_weights_trained_at_another_size_keep_their_grid)
    key = "pos_embed"
    sd = {**vit256_teacher, key: torch.zeros(1, 197, 192)}
    student = constant_state(vit256_layout())
    path = _save(tmp_path / "bad.pth", dino_checkpoint(sd, student, "vit_small"))
    with pytest.raises(PathflowError, match=re.escape(key)):
        load_hipt_model("vit_small_patch16_224", path)


def test_vit256_through_load_extractor(
    vit256: torch.nn.Module, vit256_ckpt: tuple[Path, dict[str, Tensor]]
) -> None:
    path, teacher = vit256_ckpt
    bb = load_extractor("vit_small_patch16_224", weights=str(path), device="cpu")
    _assert_teacher(bb.module, vit256_layout(), teacher)
    assert bb.embed_dim == 384
    # HIPT's files record no normalisation: ImageNet's by default, HIPT's 0.5 on request
    assert (bb.mean, bb.std, bb.norm_source) == (IMAGENET_MEAN, IMAGENET_STD, "imagenet")
    assert resolve_norm("auto") == (IMAGENET_MEAN, IMAGENET_STD, "imagenet")
    assert resolve_norm("auto", fallback="hipt") == ((0.5,) * 3, (0.5,) * 3, "hipt")
    assert resolve_norm("hipt")[:2] == ((0.5,) * 3, (0.5,) * 3)
    assert resolve_norm("imagenet", fallback="hipt")[2] == "imagenet"
    hipt = load_extractor(
        "vit_small_patch16_224", weights=str(path), device="cpu", norm_fallback="hipt"
    )
    assert (hipt.mean, hipt.std, hipt.norm_source) == ((0.5,) * 3, (0.5,) * 3, "hipt")
    assert hipt.attrs()["norm"] == "hipt"

    # the extractor's module is the same ViT-256 as load_hipt_model's (DINO's resize at 256 px)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(bb.forward(x), vit256(x), atol=1e-5, rtol=0)


def test_load_extractor_names_missing_key(
    tmp_path: Path, vit256_teacher: dict[str, Tensor]
) -> None:
    key = "blocks.11.norm2.bias"
    sd = {k: v for k, v in vit256_teacher.items() if k != key}
    student = constant_state(vit256_layout())
    path = _save(tmp_path / "bad.pth", dino_checkpoint(sd, student, "vit_small"))
    with pytest.raises(PathflowError, match=re.escape(key)):
        load_extractor("vit_small_patch16_224", weights=str(path), device="cpu")


def test_vit4k_through_load_extractor(vit4k_ckpt: tuple[Path, dict[str, Tensor]]) -> None:
    path, teacher = vit4k_ckpt
    bb = load_extractor("vit4k_xs", weights=str(path), device="cpu", norm_fallback="hipt")
    _assert_teacher(bb.module, vit4k_layout(), teacher)
    assert bb.embed_dim == 192


def test_weights_trained_at_another_size_keep_their_grid(tmp_path: Path) -> None:
    """A ViT trained at 96 px (6 x 6 position grid, e.g. ``pathflow train --img-size 96``) is
    rebuilt with that grid, not resampled to timm's 224 px default."""
    from pathflow.train.backbones import create_backbone
    from pathflow.train.export import load_backbone

    net, _ = create_backbone("vit_tiny_patch16_224", img_size=96)
    path = tmp_path / "w.pth"
    torch.save(net.state_dict(), path)
    loaded = load_backbone("vit_tiny_patch16_224", path)
    assert loaded.pos_embed.shape == (1, 37, 192)
    assert torch.equal(loaded.pos_embed, net.pos_embed)
