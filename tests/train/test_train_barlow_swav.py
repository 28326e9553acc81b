"""Barlow Twins and SwAV: losses against numpy loops, the prototypes' and queue's life cycle,
overfitting a real batch, exact resume, and 2-process gloo DDP against one process."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pathflow.exceptions import ConfigError
from pathflow.train import TrainConfig, train
from pathflow.train.checkpoint import load_checkpoint
from pathflow.train.losses.barlow_loss import BarlowTwinsLoss, batch_standardize
from pathflow.train.losses.swav_loss import SwAVLoss, sinkhorn_knopp
from pathflow.train.methods.swav import local_queue_rows
from pathflow.train.trainer import build_method, build_optimizer, set_schedules

CPU = torch.device("cpu")
TINY: dict[str, Any] = {"arch": "test_vit", "img_size": 32, "drop_path_rate": 0.0}
BARLOW_OPTS: dict[str, Any] = {"proj_dims": "32-32-32"}
SWAV_OPTS: dict[str, Any] = {
    "proj_hidden_dim": 32, "proj_dim": 16, "n_prototypes": 16, "queue_length": 0,
    "freeze_prototypes_steps": 0,
}  # fmt: skip


def _cfg(method: str, options: dict[str, Any], **kw: Any) -> TrainConfig:
    values = {**TINY, "steps": 10, **kw}
    return TrainConfig(method=method, options=options, **values).resolve()


# --------------------------------------------------------------------------- numpy references
def _np_barlow(z1: np.ndarray, z2: np.ndarray, lambd: float, eps: float = 1e-5) -> float:
    n, d = z1.shape

    def standardize(z: np.ndarray) -> np.ndarray:
        out = np.zeros_like(z)
        for j in range(d):
            mean = sum(z[b, j] for b in range(n)) / n
            var = sum((z[b, j] - mean) ** 2 for b in range(n)) / n  # biased, as BatchNorm
            for b in range(n):
                out[b, j] = (z[b, j] - mean) / math.sqrt(var + eps)
        return out

    a, b_ = standardize(z1), standardize(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[b, i] * b_[b, j] for b in range(n)) / n
            loss += (1 - c_ij) ** 2 if i == j else lambd * c_ij**2
    return loss


def _np_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """swav's ``distributed_sinkhorn`` in one process, with loops: ``[B, K]`` codes."""
    n_b, n_k = scores.shape
    q = [[math.exp(scores[b][k] / eps) for b in range(n_b)] for k in range(n_k)]  # [K][B]
    total = sum(sum(row) for row in q)
    q = [[v / total for v in row] for row in q]
    for _ in range(iters):
        for k in range(n_k):  # every prototype's row sums to 1/K
            r = sum(q[k])
            q[k] = [v / r / n_k for v in q[k]]
        for b in range(n_b):  # every sample's column sums to 1/B
            c = sum(q[k][b] for k in range(n_k))
            for k in range(n_k):
                q[k][b] = q[k][b] / c / n_b
    return np.array([[q[k][b] * n_b for k in range(n_k)] for b in range(n_b)])


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        m = max(x[b])
        lse = m + math.log(sum(math.exp(v - m) for v in x[b]))
        out[b] = x[b] - lse
    return out


# ------------------------------------------------------------------------------- Barlow loss
def test_barlow_loss_matches_numpy_loops() -> None:
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(6, 4))
    z2 = z1 + 0.5 * rng.normal(size=(6, 4))
    for lambd in (5e-3, 0.7):  # 0.7: the off-diagonal weight matters
        got = BarlowTwinsLoss(lambd)(torch.tensor(z1).float(), torch.tensor(z2).float())
        assert got.item() == pytest.approx(_np_barlow(z1, z2, lambd), rel=1e-5)
    # the normalisation is BatchNorm1d(affine=False) in training mode
    bn = torch.nn.BatchNorm1d(4, affine=False).train()
    z = torch.tensor(z1).float()
    torch.testing.assert_close(batch_standardize(z), bn(z))
    # identical views: C_ii = var / (var + eps) ~ 1, the loss is the off-diagonal term only
    c = BarlowTwinsLoss().cross_correlation(z, z)
    torch.testing.assert_close(torch.diagonal(c), torch.ones(4), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------- SwAV
def test_sinkhorn_matches_numpy_loop_and_its_marginals() -> None:
    rng = np.random.default_rng(1)
    scores = rng.uniform(-1, 1, size=(5, 3))  # cosines: 5 samples, 3 prototypes
    got = sinkhorn_knopp(torch.tensor(scores).float(), epsilon=0.05, iterations=3)
    want = _np_sinkhorn(scores, 0.05, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-6)
    # exact marginal: every sample's code sums to 1 (the last step normalises the columns)
    np.testing.assert_allclose(got.sum(1).numpy(), np.ones(5), atol=1e-6)
    # the prototype marginal B/K holds in the limit of many iterations, not after 3
    assert np.abs(want.sum(0) - 5 / 3).max() > 1e-3
    many = sinkhorn_knopp(torch.tensor(scores).double(), epsilon=0.05, iterations=500)
    np.testing.assert_allclose(many.sum(0).numpy(), np.full(3, 5 / 3), rtol=1e-6)
    np.testing.assert_allclose(many.sum(1).numpy(), np.ones(5), rtol=1e-6)


def test_swav_loss_two_crops_by_hand() -> None:
    rng = np.random.default_rng(2)
    s0, s1 = rng.uniform(-1, 1, size=(2, 4, 3))  # 2 crops, batch 4, 3 prototypes
    temp, eps = 0.1, 0.05
    q0, q1 = _np_sinkhorn(s0, eps, 3), _np_sinkhorn(s1, eps, 3)
    lp0, lp1 = _np_log_softmax(s0 / temp), _np_log_softmax(s1 / temp)
    # crop 1 predicts crop 0's codes and crop 0 predicts crop 1's, each averaged over the batch
    ce_01 = -sum(sum(q0[b, k] * lp1[b, k] for k in range(3)) for b in range(4)) / 4
    ce_10 = -sum(sum(q1[b, k] * lp0[b, k] for k in range(3)) for b in range(4)) / 4
    scores = torch.tensor(np.concatenate([s0, s1])).float().requires_grad_(True)
    loss, codes = SwAVLoss(temp, eps, 3)(scores, batch=4)
    assert loss.item() == pytest.approx((ce_01 + ce_10) / 2, rel=1e-5)
    np.testing.assert_allclose(codes.numpy(), np.stack([q0, q1]), rtol=1e-4, atol=1e-6)
    # the codes get no gradient: d loss / d s0 = (softmax(s0 / T) - q1) / (T * B * 2)
    loss.backward()
    assert scores.grad is not None
    p0 = np.exp(lp0)
    np.testing.assert_allclose(scores.grad[:4].numpy(), (p0 - q1) / (temp * 4 * 2), atol=1e-5)


def test_swav_recipe_queue_rows_and_options() -> None:
    cfg = TrainConfig(method="swav", steps=1000, batch_size=64).resolve()
    assert (cfg.views, cfg.num_local, cfg.optimizer, cfg.lr) == ("dino", 6, "lars", 0.3)
    assert cfg.schedule_lengths()["frozen_prototypes"] == 10  # 1 of 100 epochs
    assert cfg.schedule_lengths()["queue_start"] == 150  # 15 of 100 epochs
    assert local_queue_rows(3840, 64, 1) == 3840
    assert local_queue_rows(3840, 100, 2) == 1900  # 3800 (a multiple of 200) over 2 ranks
    assert local_queue_rows(100, 64, 2) == 0  # shorter than the global batch: no queue
    barlow = TrainConfig(method="barlowtwins", steps=10).resolve()
    assert (barlow.views, barlow.optimizer, barlow.lr, barlow.weight_decay) == (
        "byol", "lars", 0.2, 1.5e-6,
    )  # fmt: skip
    assert barlow.options.projector_dims(2048) == [8192] * 3
    assert barlow.options.projector_dims(64) == [256] * 3
    with pytest.raises(ConfigError, match="proj_dims"):
        TrainConfig(method="barlowtwins", options={"proj_dims": "512-x"}).resolve()


def test_swav_prototypes_frozen_then_normalised_and_queue_filled() -> None:
    opts = {**SWAV_OPTS, "freeze_prototypes_steps": 2, "queue_length": 8,
            "queue_start_steps": 1}  # fmt: skip
    cfg = _cfg("swav", opts, batch_size=4, optimizer="adamw")
    swav = build_method(cfg, CPU)
    assert swav.queue.shape == (2, 8, 16) and {"queue", "queue_filled"} <= set(swav.state_dict())
    opt = build_optimizer(swav, cfg, CPU)
    torch.manual_seed(0)
    views = [torch.randn(4, 3, 32, 32) for _ in range(2)] + [torch.randn(4, 3, 16, 16)] * 2
    initial = swav.prototypes.weight.detach().clone()
    torch.testing.assert_close(initial.norm(dim=1), torch.ones(16))
    in_use = []
    for step in range(4):
        if step == 2:  # not unit any more: the step's re-normalisation must restore it
            with torch.no_grad():
                swav.prototypes.weight.mul_(3.0)
        set_schedules(opt, 1e-2, 0.0)
        out = swav(views, step)
        in_use.append(out["queue_in_use"].item())
        opt.zero_grad()
        out["loss"].backward()
        swav.before_optimizer_step(step)
        opt.step()
        swav.after_step(step)
        w = swav.prototypes.weight.detach()
        if step < 2:  # frozen: untouched, bit for bit
            assert torch.equal(w, initial), step
            # queue: filled from step 1 on, newest first
            want_filled = 4 if step == 1 else 0
            assert int(swav.queue_filled) == want_filled
        else:
            assert not torch.equal(w, initial)
            torch.testing.assert_close(w.norm(dim=1), torch.ones(16))
    assert int(swav.queue_filled) == 8
    assert in_use == [0.0, 0.0, 0.0, 1.0]  # full after the push of step 2
    # the newest projections first: those of the last step's first global crop
    assert swav._pending is None
    torch.testing.assert_close(swav.queue[0, :4].norm(dim=1), torch.ones(4))


# --------------------------------------------------------------------- overfit a real batch
def _overfit(cfg: TrainConfig, views_spec: Any, shards: Path, lr: float, steps: int) -> list[float]:
    from pathflow.data import make_loader

    loader = make_loader(
        shards, views=views_spec, batch_size=8, backend="torch", num_workers=0, device="cpu"
    )
    batch = next(iter(loader))
    method = build_method(cfg, CPU)
    opt = build_optimizer(method, cfg, CPU)
    losses = []
    for step in range(steps):
        set_schedules(opt, lr, 0.0)
        loss = method(batch.views, step)["loss"]
        opt.zero_grad()
        loss.backward()
        method.before_optimizer_step(step)
        opt.step()
        method.after_step(step)
        losses.append(loss.item())
    return losses


def test_barlow_overfits_a_real_batch(sample_shards: Path) -> None:
    from pathflow.data import create_views

    cfg = _cfg("barlowtwins", BARLOW_OPTS, optimizer="adamw")
    losses = _overfit(cfg, create_views("byol", global_size=32), sample_shards, 1e-3, 8)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses


def test_swav_overfits_a_real_batch(sample_shards: Path) -> None:
    from pathflow.data import create_views

    cfg = _cfg("swav", SWAV_OPTS, optimizer="adamw", global_size=32, local_size=16, num_local=2)
    views = create_views("dino", global_size=32, local_size=16, num_local=2)
    losses = _overfit(cfg, views, sample_shards, 1e-3, 8)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.2, losses


def test_barlow_trains_with_its_lars_recipe(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "barlow"
    summary = train(
        TrainConfig(method="barlowtwins", options=BARLOW_OPTS, data=str(sample_shards),
                    out=str(out), device="cpu", loader_backend="torch", num_workers=0,
                    batch_size=8, steps=2, global_size=32, tensorboard=False, **TINY),
        progress=False,
    )  # fmt: skip
    assert summary.finished and math.isfinite(summary.final_loss or math.nan)
    saved = (out / "config.yaml").read_text()
    assert "optimizer: lars" in saved and "views: byol" in saved
    assert (out / "backbone.safetensors").is_file()


# --------------------------------------------------------------------------------- resume
def test_swav_resume_reproduces_the_uninterrupted_run(sample_shards: Path, tmp_path: Path) -> None:
    """4 steps of 8 images; the queue (16 rows) fills at steps 1-2 and is used at step 3, the
    prototypes train from step 2. Stopped after 3 steps, the resumed step 3 needs the saved
    queue and prototypes to give the same loss and weights."""
    opts = {**SWAV_OPTS, "queue_length": 16, "queue_start_steps": 1,
            "freeze_prototypes_steps": 2}  # fmt: skip
    common: dict[str, Any] = {
        **TINY, "data": str(sample_shards), "device": "cpu", "loader_backend": "torch",
        "num_workers": 0, "batch_size": 8, "log_every": 1, "tensorboard": False,
        "global_size": 32, "local_size": 16, "num_local": 2, "steps": 4, "warmup_steps": 1,
        "lr": 0.5,
    }  # fmt: skip

    def run(out: Path, **kw: Any) -> Any:
        return train(TrainConfig(method="swav", options=opts, out=str(out), **common, **kw),
                     progress=False)  # fmt: skip

    def rows(out: Path) -> dict[int, dict[str, Any]]:
        lines = (out / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r for r in map(json.loads, lines)}

    run(tmp_path / "full")
    assert run(tmp_path / "part", stop_after=3).steps == 3
    second = run(tmp_path / "part", resume=True)
    assert second.start_step == 3 and second.finished
    want, got = rows(tmp_path / "full"), rows(tmp_path / "part")
    assert [want[s]["queue_in_use"] for s in (1, 2, 3, 4)] == [0.0, 0.0, 0.0, 1.0]
    for step in (1, 2, 3, 4):
        assert got[step]["loss"] == want[step]["loss"], step
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["method"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["method"]
    assert a.keys() == b.keys() and int(a["queue_filled"]) == 16
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -------------------------------------------------------------------------------- DDP (gloo)
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_cfgs(world_size: int) -> dict[str, TrainConfig]:
    swav = {**SWAV_OPTS, "queue_length": 8}  # global queue of 8 = one global batch
    kw: dict[str, Any] = {"world_size": world_size, "batch_size": 8 // world_size}
    return {"barlowtwins": _cfg("barlowtwins", BARLOW_OPTS, **kw), "swav": _cfg("swav", swav, **kw)}


def _ddp_step(model: torch.nn.Module, method: Any, views: list[torch.Tensor]) -> dict[str, Any]:
    out = model(views, 0)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    result: dict[str, Any] = {"loss": out["loss"].detach(), "grads": grads}
    with torch.no_grad():
        if hasattr(method, "last_codes"):
            result["codes"] = method.last_codes
        else:  # Barlow: the cross-correlation of the two views' projections
            z1, z2 = method.encoder(views[:1]), method.encoder(views[1:2])
            result["c"] = method.loss.cross_correlation(z1, z2)
    return result


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    import torch.distributed as dist
    from pathflow.train.distributed import init_distributed
    from pathflow.train.trainer import wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    data = torch.load(Path(tmp) / "data.pt")
    results = {}
    for name, cfg in _ddp_cfgs(WORLD).items():
        method = build_method(cfg, CPU)
        if name == "swav":  # this rank's half of the (full) queue
            method.queue.copy_(data["queue"].chunk(WORLD, dim=1)[rank])
            method.queue_filled.fill_(method.queue.shape[1])
        model = wrap_ddp(method, info)
        views = [v.chunk(WORLD)[rank] for v in data[name]]
        results[name] = _ddp_step(model, method, views)
    torch.save(results, Path(tmp) / f"r{rank}.pt")
    dist.destroy_process_group()


def _close(got: torch.Tensor, want: torch.Tensor, name: str, floor: float = 0.0) -> None:
    """Equal up to float32 summation order (relative to the norm, or to ``floor``)."""
    err = (got.double() - want.double()).norm().item()
    assert err <= 1e-4 * max(want.double().norm().item(), floor), (name, err)


@pytest.mark.slow
def test_ddp_matches_one_process_on_the_global_batch(tmp_path: Path) -> None:
    """2 gloo ranks of 4 images = 1 process of 8: Barlow's cross-correlation, SwAV's Sinkhorn
    codes (with a full queue split between the ranks), the losses and DDP's gradients."""
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    data = {
        "barlowtwins": [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)],
        "swav": [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32),
                 torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)],
        "queue": F.normalize(torch.randn(2, 8, 16), dim=-1),
    }  # fmt: skip
    torch.save(data, tmp_path / "data.pt")
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"r{r}.pt") for r in range(WORLD)]

    for name, cfg in _ddp_cfgs(1).items():
        method = build_method(cfg, CPU)
        if name == "swav":
            method.queue.copy_(data["queue"])
            method.queue_filled.fill_(8)
        single = _ddp_step(method, method, data[name])
        if name == "barlowtwins":  # every rank holds the global C; its loss is the global one
            for r in ranks:
                _close(r[name]["c"], single["c"], "C")
                _close(r[name]["loss"], single["loss"], "loss")
        else:  # each rank's codes are its rows of the global codes; the loss is a local mean
            codes = torch.cat([r[name]["codes"] for r in ranks], dim=1)
            _close(codes, single["codes"], "codes")
            torch.testing.assert_close(codes.sum(-1), torch.ones(2, 8))
            mean = sum(r[name]["loss"] for r in ranks) / WORLD
            _close(mean, single["loss"], "loss")
        grads = single["grads"]
        assert grads and set(ranks[0][name]["grads"]) == set(grads)
        floor = 1e-3 * float(sum(g.double().norm() ** 2 for g in grads.values())) ** 0.5
        for n, g in grads.items():
            torch.testing.assert_close(ranks[0][name]["grads"][n], ranks[1][name]["grads"][n])
            _close(ranks[0][name]["grads"][n], g, f"{name}:{n}", floor)
