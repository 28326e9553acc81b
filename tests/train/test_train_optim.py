"""Optimiser choice of the trainer: LARS against a hand computation, excluded groups as plain
SGD with momentum, and ``--optimizer adamw|sgd|lars`` from TrainConfig and the CLI."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pathflow.exceptions import ConfigError
from pathflow.train import TrainConfig, train
from pathflow.train.distributed import DistInfo
from pathflow.train.methods.base import split_decay_groups
from pathflow.train.optim import LARS
from pathflow.train.trainer import build_method, build_optimizer, train_step

CPU = torch.device("cpu")
SMALL: dict[str, Any] = {"proj_hidden_dim": 16, "proj_dim": 8}

W0 = [[1.0, -2.0], [0.5, 2.0]]
W_GRADS = [[[0.1, 0.2], [-0.3, 0.4]], [[-0.2, 0.05], [0.3, 0.1]]]
B0 = [0.5, -1.0]
B_GRADS = [[1.0, 2.0], [0.5, -0.5]]
LRS = [0.5, 0.25]


def _norm(rows: list[list[float]]) -> float:
    return math.sqrt(sum(x * x for row in rows for x in row))


def test_lars_two_steps_match_hand_computation() -> None:
    """Barlow Twins' LARS: d = g + wd w, q = eta ||w|| / ||d||, mu = m mu + q d, w -= lr mu;
    the lr of the second step changes (the trainer's schedule), the buffer keeps q d."""
    wd, eta, m = 0.1, 0.02, 0.9
    w = torch.nn.Parameter(torch.tensor(W0, dtype=torch.float64))
    opt = LARS([w], lr=LRS[0], momentum=m, weight_decay=wd, eta=eta)
    # the hand computation, element by element
    ref = [row[:] for row in W0]
    mu = [[0.0, 0.0], [0.0, 0.0]]
    for grad, lr in zip(W_GRADS, LRS, strict=True):
        d = [[grad[i][j] + wd * ref[i][j] for j in range(2)] for i in range(2)]
        q = eta * _norm(ref) / _norm(d)
        mu = [[m * mu[i][j] + q * d[i][j] for j in range(2)] for i in range(2)]
        ref = [[ref[i][j] - lr * mu[i][j] for j in range(2)] for i in range(2)]
        for group in opt.param_groups:
            group["lr"] = lr
        w.grad = torch.tensor(grad, dtype=torch.float64)
        opt.step()
        np.testing.assert_allclose(w.detach().numpy(), np.array(ref), rtol=1e-12, atol=1e-14)
    # first step by hand in closed form: ||w|| = sqrt(9.25), d = g + 0.1 w
    d1 = np.array(W_GRADS[0]) + 0.1 * np.array(W0)
    q1 = 0.02 * math.sqrt(9.25) / math.sqrt(float((d1**2).sum()))
    assert 0 < q1 < 1  # the trust ratio scales the update down here


def test_lars_excluded_group_is_plain_sgd_with_momentum() -> None:
    """``lars_exclude``: no trust ratio and no weight decay (even if the group has one), the
    same trajectory as torch's SGD with momentum and no decay."""
    b = torch.nn.Parameter(torch.tensor(B0, dtype=torch.float64))
    b_sgd = torch.nn.Parameter(torch.tensor(B0, dtype=torch.float64))
    lars = LARS(
        [{"params": [b], "weight_decay": 0.3, "lars_exclude": True}], lr=LRS[0], momentum=0.9
    )
    sgd = torch.optim.SGD([b_sgd], lr=LRS[0], momentum=0.9)
    ref, mu = list(B0), [0.0, 0.0]
    for grad, lr in zip(B_GRADS, LRS, strict=True):
        mu = [0.9 * mu[i] + grad[i] for i in range(2)]
        ref = [ref[i] - lr * mu[i] for i in range(2)]
        for opt, p in ((lars, b), (sgd, b_sgd)):
            opt.param_groups[0]["lr"] = lr
            p.grad = torch.tensor(grad, dtype=torch.float64)
            opt.step()
        np.testing.assert_allclose(b.detach().numpy(), ref, rtol=1e-12)
        np.testing.assert_allclose(b.detach().numpy(), b_sgd.detach().numpy(), rtol=1e-12)


def test_lars_zero_norms_and_missing_gradients() -> None:
    """A zero weight (or zero update) has trust ratio 1; a parameter without gradient is
    left alone and gets no state."""
    z = torch.nn.Parameter(torch.zeros(3))
    idle = torch.nn.Parameter(torch.ones(2))
    opt = LARS([z, idle], lr=0.1, momentum=0.9, eta=0.001)
    z.grad = torch.tensor([1.0, -2.0, 4.0])
    opt.step()
    assert z.detach().tolist() == pytest.approx([-0.1, 0.2, -0.4])
    assert idle.detach().tolist() == [1.0, 1.0] and idle not in opt.state


def test_split_decay_groups_flags_the_no_decay_group_for_lars() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = split_decay_groups(net, 0.05)
    assert not decay.get("lars_exclude", False) and decay["params"] == [net[0].weight]
    assert no_decay["lars_exclude"] is True and len(no_decay["params"]) == 3


def _cfg(**kw: Any) -> TrainConfig:
    return TrainConfig(
        method="simclr", arch="test_resnet", steps=4, batch_size=4, device="cpu",
        options=dict(SMALL), **kw,
    ).resolve()  # fmt: skip


def test_optimizer_choice_from_train_config() -> None:
    cfg = _cfg()
    assert (cfg.optimizer, cfg.momentum, cfg.lars_eta) == ("adamw", None, 0.001)
    method = build_method(cfg, CPU)
    assert type(build_optimizer(method, cfg, CPU)) is torch.optim.AdamW

    cfg = _cfg(optimizer="sgd")
    assert cfg.momentum == 0.9  # the default of sgd and lars
    opt = build_optimizer(build_method(cfg, CPU), cfg, CPU)
    assert type(opt) is torch.optim.SGD
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.9]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]

    cfg = _cfg(optimizer="lars", momentum=0.8, lars_eta=0.02)
    opt = build_optimizer(build_method(cfg, CPU), cfg, CPU)
    assert type(opt) is LARS
    assert [(g["momentum"], g["eta"], g["lars_exclude"]) for g in opt.param_groups] == [
        (0.8, 0.02, False),
        (0.8, 0.02, True),
    ]


def test_lars_trains_through_the_trainer_step_and_resumes_exactly() -> None:
    cfg = _cfg(optimizer="lars")
    method = build_method(cfg, CPU)
    opt = build_optimizer(method, cfg, CPU)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)
    g = torch.Generator().manual_seed(0)
    views = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    before = [p.detach().clone() for p in method.parameters()]
    loss, _, _ = train_step(method, method, opt, views, 0, cfg, info, lr=0.1, wd=1e-4)
    assert math.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, method.parameters(), strict=True))
    assert [grp["weight_decay"] for grp in opt.param_groups] == [1e-4, 0.0]
    # the momentum buffers are the optimiser's state: a reloaded LARS continues identically
    again = build_optimizer(method, cfg, CPU)
    again.load_state_dict(opt.state_dict())
    for p in method.parameters():
        if p in opt.state:
            assert torch.equal(again.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_optimizer_default_is_the_method_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    from pathflow.train.methods.simclr import SimCLRConfig

    monkeypatch.setattr(SimCLRConfig, "recipe", {**SimCLRConfig.recipe, "optimizer": "lars"})
    assert _cfg().optimizer == "lars"
    assert _cfg(optimizer="sgd").optimizer == "sgd"  # an explicit choice wins


def test_optimizer_options_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"optimizer must be one of .*got 'lasr'"):
        _cfg(optimizer="lasr")
    with pytest.raises(ConfigError, match="momentum is an option of --optimizer sgd or lars"):
        _cfg(momentum=0.9)
    with pytest.raises(ConfigError, match=r"momentum must be in \[0, 1\)"):
        _cfg(optimizer="sgd", momentum=1.0)
    with pytest.raises(ConfigError, match="lars_eta must be > 0"):
        _cfg(optimizer="lars", lars_eta=0.0)


def test_optimizer_flags_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from pathflow.cli import main
    from pathflow.train.cli import add_train_parser

    parser = add_train_parser(argparse.ArgumentParser().add_subparsers(dest="command"))
    ns = parser.parse_args(
        ["--method", "simclr", "--arch", "test_resnet", "--steps", "2",
         "--optimizer", "lars", "--momentum", "0.8", "--lars-eta", "0.01"]
    )  # fmt: skip
    cfg = TrainConfig.build({}, {k: v for k, v in vars(ns).items() if k not in ("config", "quiet")})
    assert (cfg.optimizer, cfg.momentum, cfg.lars_eta) == ("lars", 0.8, 0.01)

    assert main(["train", "--optimizer", "lasr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optimizer must be one of" in err[0] and "'lasr'" in err[0]


def test_lars_run_logs_the_collapse_monitors(sample_shards: Path, tmp_path: Path) -> None:
    """A SimCLR run with LARS on the sample shards: the optimiser is in config.yaml and the
    monitors of the method's outputs are logged with the loss."""
    out = tmp_path / "run"
    cfg = TrainConfig(
        method="simclr", arch="test_resnet", data=str(sample_shards), out=str(out),
        device="cpu", loader_backend="torch", num_workers=0, batch_size=8, steps=2,
        log_every=1, tensorboard=False, global_size=32, optimizer="lars", lr=0.3,
        options=dict(SMALL),
    )  # fmt: skip
    assert train(cfg, progress=False).finished
    saved = (out / "config.yaml").read_text()
    assert "optimizer: lars" in saved and "momentum: 0.9" in saved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0 < r["embed_std"] < 1 and 1 <= r["eff_rank"] <= 8 + 1e-3
