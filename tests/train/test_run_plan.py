"""The config is what the user wrote; the run's facts are its frozen RunPlan."""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import asdict
from pathlib import Path

import pytest
from pathflow.train import TrainConfig, create_backbone, create_method, train
from pathflow.train.plan import RunPlan

TRAIN = Path(__file__).parents[2] / "python" / "pathflow" / "train"


def test_the_plan_counts_the_run_and_is_frozen() -> None:
    cfg = TrainConfig(method="dino", epochs=100, batch_size=64).resolve()
    plan = RunPlan.from_config(cfg, steps_per_epoch=50, world_size=2, precision="bf16")
    # DINO's published schedule (main_dino.py): lr 5e-4 x global batch / 256, 10 warmup
    # epochs, 30 epochs of teacher temperature warmup, the last layer frozen for 1 epoch
    assert plan.total_steps == 100 * 50
    assert plan.peak_lr == pytest.approx(5e-4 * 64 * 2 / 256)
    assert plan.lengths() == {
        "lr_warmup": 500, "teacher_temp_warmup": 1500, "frozen_last_layer": 50,
    }  # fmt: skip
    assert (plan.precision, plan.world_size, plan.method) == ("bf16", 2, "dino")
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps_per_epoch = 3  # type: ignore[misc]
    assert cfg.steps_per_epoch is None and cfg.world_size == 1  # the config is left alone
    with pytest.raises(TypeError, match="unknown run value"):
        RunPlan.from_config(cfg, steps_per_epch=50)


def test_methods_are_built_from_their_options_and_the_plan() -> None:
    cfg = TrainConfig(method="dino", epochs=100, options={"out_dim": 32}).resolve()
    plan = RunPlan.from_config(cfg, steps_per_epoch=20)
    net, dim = create_backbone("resnet18")
    dino = create_method("dino", net, dim, cfg.options, plan)
    temps = dino.loss.teacher_temps
    # 2000 steps; the teacher temperature rises 0.04 -> 0.07 over 30 epochs (600 steps)
    assert len(temps) == 2000 and temps[0] == pytest.approx(0.04)
    # np.linspace(0.04, 0.07, 600) then 0.07, as main_dino.py
    assert temps[598] < 0.07 and temps[599:].min() == pytest.approx(0.07)
    assert dino.student.channels_last  # a CNN: channels-last by default
    flat = create_method("dino", *create_backbone("resnet18"), cfg.options, plan, False)
    assert not flat.student.channels_last


def test_a_run_leaves_its_config_as_written(sample_shards: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        method="simclr", arch="resnet18", data=str(sample_shards), out=str(tmp_path / "run"),
        steps=2, batch_size=4, global_size=32, device="cpu", loader_backend="torch",
        num_workers=0, tensorboard=False, options={"proj_hidden_dim": 16, "proj_dim": 8},
    ).resolve()  # fmt: skip
    before = asdict(cfg)
    summary = train(cfg, progress=False)
    assert asdict(cfg) == before and cfg.precision == "auto" and cfg.steps_per_epoch is None
    assert summary.steps == 2 and summary.precision == "fp32"
    # the saved config records the run: 43 patches in batches of 4 (the last one dropped)
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "steps_per_epoch: 10\n" in saved and "precision: fp32\n" in saved
    assert "world_size: 1\n" in saved and "compile: false\n" in saved


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, wherever (in functions and under TYPE_CHECKING too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_methods_import_neither_the_config_nor_the_trainer() -> None:
    for path in sorted((TRAIN / "methods").glob("*.py")):
        found = _imports(path) & {"pathflow.train.config", "pathflow.train.trainer"}
        assert not found, f"{path.name} imports {found}"


def test_the_trainer_probes_no_hooks() -> None:
    tree = ast.parse((TRAIN / "trainer.py").read_text())
    calls = [
        n.func.id for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        and n.func.id in ("getattr", "hasattr")
    ]  # fmt: skip
    assert calls == []
    from pathflow.train.methods.base import SSLMethod

    # the hooks it calls are the base class's, with their defaults
    assert {"uses_meta", "start_epoch", "before_optimizer_step", "after_step"} <= set(
        vars(SSLMethod)
    )
    assert SSLMethod.uses_meta is False


def test_no_function_of_the_trainer_is_long() -> None:
    tree = ast.parse((TRAIN / "trainer.py").read_text())
    long = {
        n.name: n.end_lineno - n.lineno + 1
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 80
    }
    assert long == {}
