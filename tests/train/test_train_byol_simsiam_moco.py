"""BYOL, SimSiam and MoCo v2: their losses against hand computations, the queue's pointer
arithmetic, BYOL's target momentum, SimSiam's fixed predictor lr, one-batch overfitting on the
real sample shards, exact resume of MoCo (queue included), MoCo under 2-process gloo DDP, and
timm loading the exported backbones."""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pathflow.data import create_views, make_loader
from pathflow.train import TrainConfig, train
from pathflow.train.checkpoint import load_checkpoint
from pathflow.train.distributed import DistInfo, init_distributed
from pathflow.train.export import export_backbone
from pathflow.train.losses import BYOLLoss, InfoNCELoss, KeyQueue, NegativeCosineLoss
from pathflow.train.trainer import (
    build_method,
    build_optimizer,
    set_schedules,
    train_step,
    wrap_ddp,
)

CPU = torch.device("cpu")
ARCH = "test_vit"  # timm's 0.3M-parameter ViT, 64-d features, any input size here

# Tiny heads: every dimension is an option of the method.
SMALL: dict[str, dict[str, Any]] = {
    "simsiam": {"proj_hidden_dim": 64, "proj_dim": 64, "pred_hidden_dim": 16},
    "byol": {"proj_hidden_dim": 64, "proj_dim": 32, "pred_hidden_dim": 64},
    "mocov2": {"proj_hidden_dim": 32, "proj_dim": 16, "queue_size": 8},
}


def _cfg(method: str, **kw: Any) -> TrainConfig:
    options = {**SMALL[method], **kw.pop("options", {})}
    kw.setdefault("steps", 15)
    return TrainConfig(method=method, arch=ARCH, options=options, **kw).resolve()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x**2).sum(axis=1, keepdims=True))


# ---------------------------------------------------------------------------------- losses
def test_infonce_matches_a_hand_computation() -> None:
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    queue = _unit(rng.normal(size=(5, 4)))
    t = 0.2
    want = 0.0
    for i in range(3):
        qn = q[i] / math.sqrt(sum(v * v for v in q[i]))
        kn = k[i] / math.sqrt(sum(v * v for v in k[i]))
        pos = sum(a * b for a, b in zip(qn, kn, strict=True)) / t
        negs = [sum(a * b for a, b in zip(qn, queue[j], strict=True)) / t for j in range(5)]
        want += -pos + math.log(math.exp(pos) + sum(math.exp(n) for n in negs))
    want /= 3
    qt = torch.tensor(q, dtype=torch.float32, requires_grad=True)
    kt = torch.tensor(k, dtype=torch.float32, requires_grad=True)
    got = InfoNCELoss(t)(qt, kt, torch.tensor(queue, dtype=torch.float32))
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert qt.grad is not None and kt.grad is None  # no gradient to the keys


def test_key_queue_overwrites_the_oldest_keys_and_wraps_around() -> None:
    size = 5
    queue = KeyQueue(size, dim=2)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(size))  # random unit vectors
    queue.keys.zero_()
    expected = [[0.0, 0.0] for _ in range(size)]
    ptr, value = 0, 1.0
    for n in (3, 3, 1, 7, 5):  # wraps at the 2nd batch; 7 > size keeps the last 5
        batch = [[value + i, -(value + i)] for i in range(n)]
        value += n
        for row in batch:  # a FIFO by hand, one key at a time
            expected[ptr] = row
            ptr = (ptr + 1) % size
        queue.enqueue(torch.tensor(batch))
        assert int(queue.ptr) == ptr
        assert queue.keys.tolist() == expected, (n, queue.keys.tolist(), expected)
    assert ptr == (3 + 3 + 1 + 7 + 5) % size


def test_negative_cosine_and_byol_losses_match_hand_computations() -> None:
    rng = np.random.default_rng(1)
    p1, p2, z1, z2 = (rng.normal(size=(4, 6)) for _ in range(4))

    def cos(a: np.ndarray, b: np.ndarray) -> float:
        dot = sum(x * y for x, y in zip(a, b, strict=True))
        return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    d12 = -sum(cos(p1[i], z2[i]) for i in range(4)) / 4
    d21 = -sum(cos(p2[i], z1[i]) for i in range(4)) / 4
    simsiam_want = d12 / 2 + d21 / 2
    byol_want = sum((2 - 2 * cos(p1[i], z2[i])) + (2 - 2 * cos(p2[i], z1[i])) for i in range(4)) / 4

    t = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in (p1, p2, z1, z2)]
    got = NegativeCosineLoss()(*t)
    assert got.item() == pytest.approx(simsiam_want, rel=1e-5)
    got.backward()
    assert t[0].grad is not None and t[2].grad is None and t[3].grad is None  # stop-gradient
    # ||p^ - z^||^2 = 2 - 2 cos: the same loss from the normalised difference
    u = [_unit(a) for a in (p1, p2, z1, z2)]
    assert byol_want == pytest.approx(
        float(((u[0] - u[3]) ** 2).sum(1).mean() + ((u[1] - u[2]) ** 2).sum(1).mean())
    )
    got_byol = BYOLLoss()(*t)
    assert got_byol.item() == pytest.approx(byol_want, rel=1e-5)


# ------------------------------------------------------------------------------ schedules
def test_byol_target_follows_the_cosine_momentum() -> None:
    cfg = _cfg("byol", steps=4)
    method = build_method(cfg, CPU)
    # momentum 1 - (1 - 0.996) (cos(pi k / K) + 1) / 2 over K = 4 steps
    m = [1 - 0.004 * (math.cos(math.pi * k / 4) + 1) / 2 for k in range(2)]
    assert m[0] == pytest.approx(0.996) and m[1] == pytest.approx(0.99658578643)
    target = [p.detach().clone().numpy() for p in method.target.parameters()]
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        with torch.no_grad():  # a stand-in for the optimiser step
            for p in method.online.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        online = [p.detach().clone().numpy() for p in method.online.parameters()]
        method.after_step(step)
        target = [m[step] * t + (1 - m[step]) * o for t, o in zip(target, online, strict=True)]
        got = [p.detach().numpy() for p in method.target.parameters()]
        assert len(got) == len(target) > 0
        for g, w in zip(got, target, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
        assert method.momentum(step) == pytest.approx(m[step])


def test_simsiam_predictor_keeps_the_peak_lr() -> None:
    cfg = _cfg("simsiam", batch_size=8)
    assert cfg.optimizer == "sgd" and cfg.lr == 0.05 and cfg.weight_decay == 1e-4
    method = build_method(cfg, CPU)
    opt = build_optimizer(method, cfg, CPU)
    predictor = {id(p) for p in method.predictor.parameters()}
    fixed = [g for g in opt.param_groups if g.get("fixed_lr")]
    assert {id(p) for g in fixed for p in g["params"]} == predictor
    others = [g for g in opt.param_groups if not g.get("fixed_lr")]
    assert not predictor & {id(p) for g in others for p in g["params"]}
    views = [torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)]
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)
    peak = 0.05 * 8 / 256
    for step, lr in ((3, 1e-3), (9, 2e-4)):  # values of the cosine at two steps
        train_step(method, method, opt, views, step, cfg, info, lr=lr, wd=1e-4)
        assert all(g["lr"] == pytest.approx(peak) for g in fixed)
        assert all(g["lr"] == lr for g in others)
    # without fix_pred_lr every group follows the schedule
    cfg = _cfg("simsiam", options={"fix_pred_lr": False})
    opt = build_optimizer(build_method(cfg, CPU), cfg, CPU)
    set_schedules(opt, 1e-3, 0.0, peak_lr=0.05)
    assert [g["lr"] for g in opt.param_groups] == [1e-3] * len(opt.param_groups)


# ------------------------------------------------------------------- training end to end
@pytest.fixture(scope="module")
def one_batch(sample_shards: Path) -> dict[str, list[torch.Tensor]]:
    """One real batch of 8 patches in each view preset (32 px views)."""
    out = {}
    for preset in ("simclr", "byol"):
        loader = make_loader(
            sample_shards, views=create_views(preset, global_size=32), batch_size=8,
            backend="torch", num_workers=0, device="cpu",
        )  # fmt: skip
        out[preset] = next(iter(loader)).views
    return out


@pytest.mark.parametrize(
    ("method_name", "lr", "kw"),
    [
        ("simsiam", 0.3, {}),
        ("byol", 0.3, {}),
        # a fixed batch is MoCo's worst case: the queue fills with the batch's own (previous)
        # keys, so step 0 (against the random initial queue) is left out of the comparison
        ("mocov2", 1e-3, {"optimizer": "adamw", "options": {"momentum": 0.99}}),
    ],
)
def test_methods_overfit_one_real_batch(
    one_batch: dict[str, list[torch.Tensor]], tmp_path: Path, method_name: str, lr: float,
    kw: dict[str, Any],
) -> None:  # fmt: skip
    cfg = _cfg(method_name, **kw)
    views = one_batch[cfg.views]
    method = build_method(cfg, CPU)
    opt = build_optimizer(method, cfg, CPU)
    losses = []
    for step in range(15):
        set_schedules(opt, lr, 0.0)
        out = method(views, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step(step)
        losses.append(out["loss"].item())
    start = losses[1] if method_name == "mocov2" else losses[0]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < start - 0.2, losses  # simsiam -0.43, byol -2.6, mocov2 -0.7
    # the exported backbone loads in timm as pretrained weights
    path = export_backbone(method, tmp_path / "backbone.safetensors", arch=ARCH)
    model = timm.create_model(
        ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
    )
    want = method.backbone_for_export().state_dict()
    assert set(model.state_dict()) == set(want)
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name


def _losses(out: Path) -> dict[int, float]:
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_mocov2_resume_reproduces_the_uninterrupted_run(
    sample_shards: Path, tmp_path: Path
) -> None:
    """3 steps of 8 keys into a queue of 12 (the pointer wraps at step 2); stopped after 2
    steps in the middle of the epoch, resumed for the third."""
    kw: dict[str, Any] = {
        "method": "mocov2", "arch": ARCH, "global_size": 32, "data": str(sample_shards),
        "device": "cpu", "loader_backend": "torch", "num_workers": 0, "batch_size": 8,
        "log_every": 1, "tensorboard": False, "steps": 3,
        "options": {**SMALL["mocov2"], "queue_size": 12},
    }  # fmt: skip
    train(TrainConfig(out=str(tmp_path / "full"), **kw), progress=False)
    part = tmp_path / "part"
    first = train(TrainConfig(out=str(part), stop_after=2, **kw), progress=False)
    assert first.steps == 2 and not first.finished
    assert int(load_checkpoint(part / "checkpoint.pt")["method"]["queue.ptr"]) == 16 % 12
    second = train(TrainConfig(out=str(part), resume=True, **kw), progress=False)
    assert second.start_step == 2 and second.finished
    assert _losses(part) == _losses(tmp_path / "full")
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["method"]
    b = load_checkpoint(part / "checkpoint.pt")["method"]
    assert a.keys() == b.keys() and {"queue.keys", "queue.ptr"} <= set(a)
    assert int(a["queue.ptr"]) == 24 % 12
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the run's export: the query backbone, loadable by timm
    model = timm.create_model(
        ARCH, pretrained=True, num_classes=0,
        pretrained_cfg_overlay={"file": str(part / "backbone.safetensors")},
    )  # fmt: skip
    for name, value in model.state_dict().items():
        assert torch.equal(value, b[f"query.backbone.{name}"]), name


# -------------------------------------------------------------------------- MoCo under DDP
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moco_step(model: torch.nn.Module, method: Any, views: list[torch.Tensor]) -> dict[str, Any]:
    cfg = _cfg("mocov2", options={"queue_size": 32})
    opt = build_optimizer(method, cfg, CPU)
    set_schedules(opt, 0.01, 1e-4)
    out = model(views, 0)
    out["loss"].backward()
    opt.step()
    method.after_step(0)
    return {
        "loss": out["loss"].detach(),
        "state": method.state_dict(),
        "not_broadcast": sorted(getattr(model, "parameters_to_ignore", [])),
    }


def _moco_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    method = build_method(_cfg("mocov2", options={"queue_size": 32}), CPU)
    model = wrap_ddp(method, info)
    views = torch.load(Path(tmp) / "views.pt")
    local = [v.chunk(WORLD)[rank] for v in views]
    torch.save(_moco_step(model, method, local), Path(tmp) / f"r{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_mocov2_ddp_queue_matches_one_process_on_the_global_batch(
    one_batch: dict[str, list[torch.Tensor]], tmp_path: Path
) -> None:
    """Each rank enqueues the keys of all ranks, in the global batch's order (the shuffled
    key views are unshuffled): after one step the queue is that of one process."""
    views = one_batch["simclr"]
    torch.save(views, tmp_path / "views.pt")
    mp.spawn(_moco_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    method = build_method(_cfg("mocov2", options={"queue_size": 32}), CPU)
    initial = method.queue.keys.clone()
    single = _moco_step(method, method, views)
    ranks = [torch.load(tmp_path / f"r{i}.pt") for i in range(WORLD)]
    assert ranks[0]["not_broadcast"] == ranks[1]["not_broadcast"] == ["queue.keys", "queue.ptr"]
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / WORLD, single["loss"])
    keys = single["state"]["queue.keys"]
    assert int(single["state"]["queue.ptr"]) == 8 and torch.equal(keys[8:], initial[8:])
    for r in ranks:
        assert int(r["state"]["queue.ptr"]) == 8
        torch.testing.assert_close(r["state"]["queue.keys"], keys)
    # every rank holds the same weights, queue and key encoder after the step
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
