"""TrainConfig: method recipes, schedule lengths, typed YAML <- CLI, method options, parser."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from pathflow.exceptions import ConfigError
from pathflow.train.config import TrainConfig
from pathflow.train.schedules import cosine_schedule


def test_method_recipes() -> None:
    dino = TrainConfig(method="dino", batch_size=64, steps_per_epoch=50).resolve()
    assert (dino.lr, dino.weight_decay, dino.weight_decay_end, dino.clip_grad) == (
        5e-4, 0.04, 0.4, 3.0,
    )  # fmt: skip
    assert dino.views == "dino" and dino.drop_path_rate == 0.1
    assert dino.options.out_dim == 65536 and dino.options.teacher_temp == 0.07
    assert dino.scaled_lr(world_size=8) == pytest.approx(5e-4 * 64 * 8 / 256)
    simclr = TrainConfig(method="simclr", steps=20, warmup_steps=5).resolve()
    assert simclr.views == "simclr" and simclr.options.temperature == 0.1
    assert simclr.options.proj_dim == 128
    # AdamW defaults: decoupled weight decay 0.05 (1e-6 is LARS's and means none with AdamW)
    assert simclr.weight_decay == simclr.weight_decay_end == 0.05
    assert simclr.total_steps == 20 and simclr.warmup() == 5
    with pytest.raises(ConfigError, match="unknown method 'byoll'"):
        TrainConfig(method="byoll").resolve()
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16").resolve()
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        _ = TrainConfig().resolve().total_steps


def test_epoch_lengths_are_epochs_without_steps() -> None:
    cfg = TrainConfig(method="dino", steps_per_epoch=50).resolve()  # 100 epochs
    assert cfg.total_steps == 5000
    assert cfg.schedule_lengths() == {
        "lr_warmup": 500, "teacher_temp_warmup": 1500, "frozen_last_layer": 50,
    }  # fmt: skip
    assert cfg.schedule_warnings() == []


def test_steps_rescale_epoch_lengths_to_the_recipe_fraction() -> None:
    """5,000 batches per epoch and --steps 1000: the 10-of-100-epoch warmup is the first 10%
    of the run, not all of it (the old rule capped 50,000 steps at 1,000)."""
    cfg = TrainConfig(method="dino", steps=1000, steps_per_epoch=5000).resolve()
    assert cfg.schedule_lengths() == {
        "lr_warmup": 100, "teacher_temp_warmup": 300, "frozen_last_layer": 10,
    }  # fmt: skip
    assert cfg.schedule_warnings() == []
    lr = cosine_schedule(cfg.scaled_lr(), cfg.min_lr, cfg.total_steps, cfg.warmup())
    peak = 5e-4 * 64 / 256
    assert lr.argmax() == 99 and lr[99] == pytest.approx(peak)  # warmup ends, then decays
    assert lr[-1] < 0.01 * peak  # and reaches the end of its cosine
    # explicit step counts win over epochs
    explicit = TrainConfig(
        method="dino", steps=1000, warmup_steps=7,
        options={"warmup_teacher_temp_steps": 20, "freeze_last_layer_steps": 0},
    ).resolve()  # fmt: skip
    assert explicit.schedule_lengths() == {
        "lr_warmup": 7, "teacher_temp_warmup": 20, "frozen_last_layer": 0,
    }  # fmt: skip


def test_warns_when_a_schedule_covers_the_whole_run() -> None:
    cfg = TrainConfig(method="dino", epochs=5, steps_per_epoch=50).resolve()
    warnings = cfg.schedule_warnings()
    assert len(warnings) == 2  # lr warmup (10 epochs) and teacher temperature (30) > 5 epochs
    assert warnings[0].startswith("lr_warmup lasts 250 steps, the whole run of 250")
    assert "teacher_temp_warmup" in warnings[1]


def test_yaml_numbers_are_typed(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 5e-4 as the string '5e-4'; the config converts it."""
    y = tmp_path / "t.yaml"
    y.write_text("lr: 5e-4\nsteps: 1e3\nmin_lr: 1e-6\ncompile: 'yes'\ndino:\n  out_dim: 4.096e3\n")
    cfg = TrainConfig.build(TrainConfig.from_yaml(y), {})
    assert (cfg.lr, cfg.steps, cfg.min_lr, cfg.compile) == (5e-4, 1000, 1e-6, True)
    assert cfg.options.out_dim == 4096 and isinstance(cfg.options.out_dim, int)
    y.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_yaml(y)
    assert str(err.value) == f"{y}: batch_size: expected an integer, got 'lots'"
    y.write_text("steps: 2.5\n")
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 2\.5"):
        TrainConfig.from_yaml(y)
    y.write_text("dino:\n  student_temp: cold\n")
    with pytest.raises(ConfigError, match="dino: student_temp: expected a number, got 'cold'"):
        TrainConfig.build(TrainConfig.from_yaml(y), {})


def test_tile_and_extract_configs_use_the_same_typed_loader(tmp_path: Path) -> None:
    from pathflow.extract.config import ExtractConfig
    from pathflow.tiling.config import TileConfig

    y = tmp_path / "c.yaml"
    y.write_text("tile:\n  a_t: 1e2\n  mpp: 5e-1\n  inputs: slide.svs\n")
    tile = TileConfig.build(TileConfig.from_yaml(y), {})
    assert (tile.a_t, tile.mpp, tile.inputs) == (100.0, 0.5, ["slide.svs"])
    y.write_text("extract:\n  batch_size: '32'\n  inputs: run\n  arch: resnet18\n")
    ext = ExtractConfig.build(ExtractConfig.from_yaml(y), {})
    assert ext.batch_size == 32 and ext.inputs == ["run"]
    y.write_text("tile:\n  patch: big\n")
    with pytest.raises(ConfigError, match="patch: expected an integer, got 'big'"):
        TileConfig.from_yaml(y)


def _parser() -> argparse.ArgumentParser:
    from pathflow.train.cli import add_train_parser

    return add_train_parser(argparse.ArgumentParser().add_subparsers(dest="command"))


def _cli(args: list[str]) -> dict[str, object]:
    ns = _parser().parse_args(args)
    return {k: v for k, v in vars(ns).items() if k not in ("config", "quiet")}


def test_yaml_then_cli_method_sections_and_saved_config(tmp_path: Path) -> None:
    y = tmp_path / "t.yaml"
    y.write_text(
        "train:\n  method: simclr\n  batch-size: 32\n  lr: 0.002\n  compile: true\n"
        "  simclr:\n    temperature: 0.5\n    proj_dim: 64\n  dino:\n    out_dim: 1024\n"
    )
    cli = _cli(["--batch-size", "16", "--no-compile", "--data", "d", "--simclr.proj-dim", "32"])
    cfg = TrainConfig.build(TrainConfig.from_yaml(y), cli)
    assert (cfg.method, cfg.batch_size, cfg.lr, cfg.compile, cfg.data) == (
        "simclr", 16, 0.002, False, "d",
    )  # fmt: skip
    assert (cfg.options.temperature, cfg.options.proj_dim) == (0.5, 32)  # YAML <- CLI
    cfg.save(tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert "simclr:\n  temperature: 0.5\n  proj_hidden_dim: 2048\n  proj_dim: 32\n" in saved
    assert "dino:" not in saved  # only the chosen method's section
    again = TrainConfig.build(TrainConfig.from_yaml(tmp_path / "config.yaml"), {})
    assert again == cfg
    # another method's flag is an error naming it; unknown options too
    with pytest.raises(ConfigError, match=r"--dino.out-dim is an option of method dino"):
        TrainConfig.build({}, _cli(["--method", "simclr", "--dino.out-dim", "8"]))
    y.write_text("epoch: 3\n")
    with pytest.raises(ConfigError, match="unknown option 'epoch'"):
        TrainConfig.from_yaml(y)
    with pytest.raises(ConfigError, match=r"unknown option.*of method dino: out_dims"):
        TrainConfig(method="dino", options={"out_dims": 3}).resolve()


def test_registered_method_reaches_the_cli_without_other_edits() -> None:
    from dataclasses import field

    from pathflow.train.methods import DINO, MethodConfig, list_methods, register_method
    from pathflow.train.methods.registry import _METHODS

    @dataclass
    class ToyConfig(MethodConfig):
        recipe = {"lr": 0.25, "weight_decay": 0.0, "weight_decay_end": 0.0}  # noqa: RUF012
        width: int = field(default=3, metadata={"help": "toy width"})

    @register_method("toy")
    class Toy(DINO):
        config_class = ToyConfig

    try:
        help_text = _parser().format_help()
        choices = "{" + ",".join(list_methods()) + "}"
        assert "toy" in choices and choices in help_text and "--toy.width" in help_text
        cfg = TrainConfig.build({}, _cli(["--method", "toy", "--toy.width", "7"]))
        assert cfg.options == ToyConfig(width=7) and cfg.lr == 0.25
    finally:
        del _METHODS["toy"]
    assert Toy.config_class is ToyConfig


def test_other_commands_do_not_import_torch() -> None:
    code = (
        "import sys; from pathflow.cli import build_parser; "
        "p = build_parser('tile'); p.parse_args(['tile', 'x.svs']); "
        "print('torch' in sys.modules, 'timm' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.split() == ["False", "False"]


def test_resume_differences_skip_run_control() -> None:
    cfg = TrainConfig(method="dino", steps=10, data="a", stop_after=2).resolve()
    saved = TrainConfig(method="dino", steps=10, data="b", log_every=1, lr=1e-3).resolve()
    assert cfg.differences(saved.to_dict()) == ["lr"]
    other = TrainConfig(method="dino", steps=10, options={"out_dim": 8}).resolve()
    assert cfg.differences(other.to_dict()) == ["dino.out_dim"]
