"""Adding an SSL method is one new file plus one registration line: a toy method written to a
file of its own, registered, trains from ``pathflow train --method toy`` on the real sample
shards."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from pathflow.train.checkpoint import load_checkpoint

# A real (tiny) SSL method: the negative cosine between the projections of two views of a
# patch, the second view's gradient stopped (SimSiam without its predictor).
TOY_METHOD = """
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from pathflow.train.methods.base import MethodConfig, MultiCropEncoder, SSLMethod
from pathflow.train.plan import RunPlan, h


@dataclass
class ToyConfig(MethodConfig):
    recipe = {"lr": 0.05, "weight_decay": 0.0, "weight_decay_end": 0.0}
    proj_dim: int = field(default=16, metadata=h("projection width"))


class Toy(SSLMethod):
    views_preset = "simclr"
    export_prefix = "encoder.backbone."
    config_class = ToyConfig

    def __init__(self, backbone, embed_dim, opts, plan: RunPlan, channels_last=False):
        super().__init__()
        head = nn.Linear(embed_dim, opts.proj_dim)
        self.encoder = MultiCropEncoder(backbone, head, channels_last)
        self.planned_steps = plan.total_steps

    def forward(self, views: list[Tensor], step: int) -> dict[str, Tensor]:
        z1, z2 = self.encoder(views[:2]).chunk(2)
        return {"loss": -F.cosine_similarity(z1, z2.detach(), dim=1).mean()}

    def backbone_for_export(self) -> nn.Module:
        return self.encoder.backbone
"""


def test_a_method_in_one_file_trains_from_the_cli(
    sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathflow.cli import main
    from pathflow.train.methods import register_method
    from pathflow.train.methods.registry import _METHODS

    path = tmp_path / "toy_method.py"
    path.write_text(TOY_METHOD)
    spec = importlib.util.spec_from_file_location("toy_method", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    register_method("toy")(module.Toy)  # the one registration line
    out = tmp_path / "run"
    try:
        code = main(
            [
                "train", "--method", "toy", "--arch", "resnet18", "--data", str(sample_shards),
                "--out", str(out), "--steps", "2", "--batch-size", "4", "--global-size", "32",
                "--toy.proj-dim", "8", "--loader-backend", "torch", "--num-workers", "0",
                "--no-tensorboard", "-q", "--device", "cpu",
            ]
        )  # fmt: skip
    finally:
        del _METHODS["toy"]
    assert code == 0, capsys.readouterr().err
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["method_name"] == "toy" and ckpt["step"] == 2
    assert ckpt["config"]["toy"] == {"proj_dim": 8}
    assert ckpt["method"]["encoder.head.weight"].shape == (8, 512)  # resnet18: 512 features
    summary = json.loads((out / "summary.json").read_text())
    loss = summary["final_loss"]
    assert loss is not None and math.isfinite(loss) and -1.0 <= loss <= 1.0  # -cos in [-1, 1]
    assert (out / "backbone.safetensors").is_file()
    assert "pathflow train: toy/resnet18" in capsys.readouterr().err
