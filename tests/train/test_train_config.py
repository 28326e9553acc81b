"""TrainConfig (defaults, YAML <- CLI) and the ``pathflow train`` parser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pathflow.exceptions import ConfigError
from pathflow.train.config import TrainConfig


def test_method_defaults_and_derived_values() -> None:
    dino = TrainConfig(method="dino", batch_size=64, steps_per_epoch=50).resolve()
    assert (dino.lr, dino.weight_decay, dino.weight_decay_end, dino.clip_grad) == (
        5e-4, 0.04, 0.4, 3.0,
    )  # fmt: skip
    assert dino.views == "dino" and dino.drop_path_rate == 0.1
    assert dino.total_steps == 100 * 50
    assert dino.warmup() == 10 * 50  # 10 epochs
    assert dino.epochs_to_steps(30) == 1500 and dino.epochs_to_steps(1e9) == 5000
    assert dino.scaled_lr(world_size=8) == pytest.approx(5e-4 * 64 * 8 / 256)
    simclr = TrainConfig(method="simclr", steps=20, warmup_steps=5).resolve()
    assert simclr.views == "simclr" and simclr.temperature == 0.1 and simclr.proj_dim == 128
    assert simclr.total_steps == 20 and simclr.warmup() == 5
    with pytest.raises(ConfigError, match="unknown method"):
        TrainConfig(method="byol").resolve()
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16").resolve()
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        _ = TrainConfig().resolve().total_steps


def test_default_views_are_the_methods_presets() -> None:
    from pathflow.train.config import METHOD_DEFAULTS
    from pathflow.train.methods import list_methods, method_class

    assert sorted(METHOD_DEFAULTS) == list_methods()
    for name in list_methods():
        assert METHOD_DEFAULTS[name]["views"] == method_class(name).views_preset


def test_yaml_then_cli_and_saved_config(tmp_path: Path) -> None:
    import argparse

    from pathflow.train.cli import add_train_parser

    y = tmp_path / "t.yaml"
    y.write_text("train:\n  method: simclr\n  batch-size: 32\n  lr: 0.002\n  compile: true\n")
    parser = add_train_parser(argparse.ArgumentParser().add_subparsers(dest="command"))
    ns = parser.parse_args(["--batch-size", "16", "--no-compile", "--data", "d"])
    cli = {k: v for k, v in vars(ns).items() if k not in ("config", "quiet")}
    cfg = TrainConfig.build(TrainConfig.from_yaml(y), cli)
    assert (cfg.method, cfg.batch_size, cfg.lr, cfg.compile, cfg.data) == (
        "simclr", 16, 0.002, False, "d",
    )  # fmt: skip
    cfg.save(tmp_path / "config.yaml")
    again = TrainConfig.build(TrainConfig.from_yaml(tmp_path / "config.yaml"), {})
    assert again == cfg
    y.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        TrainConfig.from_yaml(y)


def test_cli_parser_does_not_import_torch() -> None:
    code = (
        "import sys; from pathflow.cli import build_parser; "
        "build_parser().parse_args(['train', '--method', 'dino']); "
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]
