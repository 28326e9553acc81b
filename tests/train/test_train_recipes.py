"""``pathflow train --recipe``: the Lunit benchmark recipes resolve to their documented
values, explicit CLI/YAML values win, and their views are pathology views."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pathflow.data import create_views
from pathflow.exceptions import ConfigError
from pathflow.train.config import TrainConfig
from pathflow.train.recipes import get_recipe, list_recipes

# The table of the README (recipe -> shared fields, method options), written out by hand.
DOCUMENTED = {
    "lunit-mocov2": (
        dict(method="mocov2", arch="resnet50", views="pathology", optimizer="sgd", lr=0.03,
             weight_decay=1e-4, weight_decay_end=1e-4, warmup_epochs=0.0, momentum=0.9),
        dict(temperature=0.2, queue_size=65536, momentum=0.999, proj_dim=128),
    ),
    "lunit-swav": (
        dict(method="swav", arch="resnet50", views="pathology-dino", num_local=6,
             optimizer="lars", lr=0.3, weight_decay=1e-6, warmup_epochs=10.0),
        dict(n_prototypes=3000, proj_dim=128, temperature=0.1, epsilon=0.05,
             sinkhorn_iterations=3),
    ),
    "lunit-barlow": (
        dict(method="barlowtwins", arch="resnet50", views="pathology", optimizer="lars",
             lr=0.2, weight_decay=1.5e-6, warmup_epochs=10.0),
        dict(proj_dims="8192-8192-8192", lambd=5e-3),
    ),
    "lunit-dino": (
        dict(method="dino", arch="vit_small_patch16_224", views="pathology-dino",
             optimizer="adamw", lr=5e-4, weight_decay=0.04, weight_decay_end=0.4,
             warmup_epochs=10.0, clip_grad=3.0, drop_path_rate=0.1),
        dict(out_dim=65536, momentum_teacher=0.996, teacher_temp=0.07,
             warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=30.0),
    ),
}  # fmt: skip


def _cli(args: list[str]) -> dict[str, object]:
    from pathflow.train.cli import add_train_parser

    p = add_train_parser(argparse.ArgumentParser().add_subparsers(dest="command"))
    ns = p.parse_args(args)
    return {k: v for k, v in vars(ns).items() if k not in ("config", "quiet")}


def test_list_recipes() -> None:
    assert list_recipes() == sorted(DOCUMENTED)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_recipe_resolves_to_documented_values(name: str) -> None:
    shared, options = DOCUMENTED[name]
    for cfg in (
        TrainConfig(recipe=name).resolve(),
        TrainConfig.build({}, _cli(["--recipe", name, "--data", "d"])),
    ):
        assert cfg.recipe == name
        for key, value in shared.items():
            assert getattr(cfg, key) == value, key
        for key, value in options.items():
            assert getattr(cfg.options, key) == value, key


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_recipe_views_are_pathology_views(name: str) -> None:
    cfg = TrainConfig(recipe=name).resolve()
    spec = create_views(str(cfg.views), num_local=cfg.num_local)
    natural = create_views("dino" if cfg.views == "pathology-dino" else "simclr")
    assert spec.needs_stain_stats  # RandStainNA
    for g in spec.groups:
        assert g.vflip > 0 and g.rot90 > 0 and g.hflip > 0  # all of D4
        assert g.solarize == 0
        assert g.randstain > 0
    # weaker colour jitter than the natural-image preset of the same layout
    for g, n in zip(spec.groups, natural.groups, strict=True):
        assert g.brightness < n.brightness and g.hue < n.hue
        assert all(
            a <= b for a, b in zip(
                (g.brightness, g.contrast, g.saturation, g.hue),
                (n.brightness, n.contrast, n.saturation, n.hue), strict=True,
            )
        )  # fmt: skip
    if name == "lunit-swav":  # 2 global + 6 local crops as SwAV
        assert [g.count for g in spec.groups] == [1, 1, 6]
    if name == "lunit-dino":
        assert [g.count for g in spec.groups] == [1, 1, 8]
        assert [g.size for g in spec.groups] == [224, 224, 96]


def test_explicit_cli_and_yaml_values_win(tmp_path: Path) -> None:
    y = tmp_path / "t.yaml"
    y.write_text(
        "recipe: lunit-mocov2\nlr: 0.05\nviews: simclr\nepochs: 7\n"
        "mocov2:\n  temperature: 0.3\n  queue_size: 1024\n"
    )
    cfg = TrainConfig.build(TrainConfig.from_yaml(y), {})
    assert (cfg.method, cfg.lr, cfg.views, cfg.epochs) == ("mocov2", 0.05, "simclr", 7)
    assert (cfg.options.temperature, cfg.options.queue_size) == (0.3, 1024)
    assert (cfg.arch, cfg.optimizer, cfg.options.momentum) == ("resnet50", "sgd", 0.999)
    # the command line beats the YAML file, which beats the recipe
    cli = _cli(["--lr", "0.07", "--mocov2.queue-size", "2048", "--optimizer", "lars",
                "--arch", "resnet18"])  # fmt: skip
    cfg = TrainConfig.build(TrainConfig.from_yaml(y), cli)
    assert (cfg.lr, cfg.options.queue_size, cfg.options.temperature) == (0.07, 2048, 0.3)
    assert (cfg.optimizer, cfg.arch, cfg.views) == ("lars", "resnet18", "simclr")
    # the recipe beats the method's own recipe (DINO's is lr 5e-4, no warmup change)
    cfg = TrainConfig.build({}, _cli(["--recipe", "lunit-dino", "--weight-decay", "0.1"]))
    assert (cfg.weight_decay, cfg.weight_decay_end, cfg.views) == (0.1, 0.4, "pathology-dino")
    # the Python API: explicit fields and option dicts win too
    cfg = TrainConfig(recipe="lunit-swav", num_local=2, options={"n_prototypes": 10}).resolve()
    assert (cfg.num_local, cfg.options.n_prototypes, cfg.options.epsilon) == (2, 10, 0.05)


def test_method_must_match_the_recipe() -> None:
    cfg = TrainConfig.build({}, _cli(["--recipe", "lunit-barlow", "--method", "barlowtwins"]))
    assert cfg.method == "barlowtwins"
    with pytest.raises(ConfigError, match="recipe lunit-barlow trains method barlowtwins, not "
                       "simclr"):  # fmt: skip
        TrainConfig.build({}, _cli(["--recipe", "lunit-barlow", "--method", "simclr"]))
    with pytest.raises(ConfigError, match="not dino"):  # explicit, even the default method
        TrainConfig.build({}, _cli(["--recipe", "lunit-swav", "--method", "dino"]))
    with pytest.raises(ConfigError, match="trains method swav, not simclr"):
        TrainConfig(recipe="lunit-swav", method="simclr").resolve()
    # a recipe's method flags are accepted without --method
    cfg = TrainConfig.build({}, _cli(["--recipe", "lunit-swav", "--swav.epsilon", "0.03"]))
    assert cfg.options.epsilon == 0.03


def test_unknown_recipe_is_a_one_line_error() -> None:
    for make in (
        lambda: TrainConfig(recipe="lunit-moco").resolve(),
        lambda: TrainConfig.build({}, _cli(["--recipe", "lunit-moco"])),
    ):
        with pytest.raises(ConfigError) as err:
            make()
        text = str(err.value)
        assert "\n" not in text
        assert "unknown recipe 'lunit-moco'" in text and "did you mean lunit-mocov2" in text
    with pytest.raises(ConfigError, match="unknown recipe"):
        get_recipe("nope")


def test_saved_config_round_trips_and_old_runs_resume(tmp_path: Path) -> None:
    cfg = TrainConfig.build({}, _cli(["--recipe", "lunit-barlow", "--data", "d"]))
    cfg.save(tmp_path / "config.yaml")
    again = TrainConfig.build(TrainConfig.from_yaml(tmp_path / "config.yaml"), {})
    assert again == cfg
    plain = TrainConfig(method="simclr").resolve()
    old = plain.to_dict()
    del old["recipe"]  # a run saved before --recipe existed
    assert plain.differences(old) == []
