"""MoCo v3: the contrastive loss against a hand computation (numpy loops), its rank offset
under 2-process gloo DDP, the momentum schedule and update timing, the frozen random patch
projection, one-batch overfitting on the real sample shards and timm loading the export."""

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
from pathflow.train import TrainConfig
from pathflow.train.export import export_backbone
from pathflow.train.methods.mocov3 import contrastive_loss
from pathflow.train.trainer import build_method, build_optimizer, set_schedules

CPU = torch.device("cpu")
ARCH = "test_vit"
SMALL = {"proj_hidden_dim": 32, "proj_dim": 16}
WORLD = 2


def _cfg(**kw: Any) -> TrainConfig:
    options = {**SMALL, **kw.pop("options", {})}
    kw.setdefault("steps", 15)
    return TrainConfig(method="mocov3", arch=ARCH, options=options, **kw).resolve()


def _hand_ctr(q: np.ndarray, k: np.ndarray, t: float, offset: int = 0) -> float:
    """2 t * mean_i -log( exp(q_i.k_{offset+i}/t) / sum_j exp(q_i.k_j/t) ), unit vectors."""
    total = 0.0
    for i in range(len(q)):
        qi = q[i] / math.sqrt(sum(v * v for v in q[i]))
        logits = []
        for j in range(len(k)):
            kj = k[j] / math.sqrt(sum(v * v for v in k[j]))
            logits.append(sum(a * b for a, b in zip(qi, kj, strict=True)) / t)
        m = max(logits)
        log_z = m + math.log(sum(math.exp(v - m) for v in logits))
        total += log_z - logits[offset + i]
    return 2 * t * total / len(q)


def test_contrastive_loss_matches_a_hand_computation() -> None:
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    for t in (0.2, 1.0):
        got = contrastive_loss(torch.tensor(q), torch.tensor(k), t)
        assert float(got) == pytest.approx(_hand_ctr(q, k, t), rel=1e-5)
    # identical unit queries and keys that are orthogonal to each other: each query's
    # positive logit is 1/t, the others 0 -> 2t * (log(e^{1/t} + 3) - 1/t)
    eye = np.eye(4)
    t = 0.2
    closed = 2 * t * (math.log(math.exp(1 / t) + 3) - 1 / t)
    assert float(contrastive_loss(torch.tensor(eye), torch.tensor(eye), t)) == pytest.approx(
        closed, rel=1e-6
    )


def test_defaults_follow_moco_v3_and_the_patch_projection_is_frozen() -> None:
    cfg = TrainConfig(method="mocov3", arch=ARCH, steps=10).resolve()
    o = cfg.options
    assert (o.temperature, o.momentum, o.proj_hidden_dim, o.proj_dim) == (0.2, 0.99, 4096, 256)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.warmup_epochs) == (
        "adamw",
        1.5e-4,
        0.1,
        40.0,
    )
    method = build_method(_cfg(), CPU)
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    assert {n for n in frozen if n.startswith("base.")} == {
        "base.backbone.patch_embed.proj.weight", "base.backbone.patch_embed.proj.bias"
    }  # fmt: skip
    assert all(n.startswith(("base.backbone.patch_embed", "momentum_encoder.")) for n in frozen)
    # projector: 3 bias-free Linear layers and a final affine-free BatchNorm; predictor: 2
    # Linear layers, no bias on the last, no final BatchNorm
    proj = list(method.base.head.layers)
    linears = [m for m in proj if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and all(m.bias is None for m in linears)
    assert type(proj[-1]).__name__ == "GlobalBatchNorm1d" and not proj[-1].affine
    pred = [m for m in method.predictor.layers if isinstance(m, torch.nn.Linear)]
    assert len(pred) == 2 and pred[-1].bias is None
    assert not isinstance(method.predictor.layers[-1], torch.nn.modules.batchnorm._BatchNorm)
    unfrozen = build_method(_cfg(options={"freeze_patch_embed": False}), CPU)
    assert all(p.requires_grad for p in unfrozen.base.parameters())


def test_momentum_encoder_update_uses_the_next_steps_momentum() -> None:
    """moco-v3 updates at the start of iteration i with m(i): after step 0 the momentum
    encoder is m(1) * initial + (1 - m(1)) * online (cosine from 0.99 to 1 over 10 steps)."""
    cfg = _cfg(steps=10)
    method = build_method(cfg, CPU)
    before = {n: p.detach().clone() for n, p in method.momentum_encoder.named_parameters()}
    with torch.no_grad():
        for p in method.base.parameters():
            p.add_(1.0)
    method.after_step(0)
    m1 = 1 - (1 - 0.99) * (math.cos(math.pi * 1 / 10) + 1) / 2
    for n, p in method.momentum_encoder.named_parameters():
        online = dict(method.base.named_parameters())[n]
        torch.testing.assert_close(p, m1 * before[n] + (1 - m1) * online.detach())


@pytest.fixture(scope="module")
def byol_batch(sample_shards: Path) -> list[torch.Tensor]:
    loader = make_loader(
        sample_shards, views=create_views("byol", global_size=32), batch_size=8,
        backend="torch", num_workers=0, device="cpu",
    )  # fmt: skip
    return list(next(iter(loader)).views)


def test_mocov3_overfits_one_real_batch_and_exports_to_timm(
    byol_batch: list[torch.Tensor], tmp_path: Path
) -> None:
    cfg = _cfg(options={"momentum": 0.9})
    method = build_method(cfg, CPU)
    opt = build_optimizer(method, cfg, CPU)
    patch = method.base.backbone.patch_embed.proj.weight.detach().clone()
    losses = []
    for step in range(15):
        set_schedules(opt, 3e-3, 0.0)
        out = method(byol_batch, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step(step)
        losses.append(out["loss"].item())
        assert float(out["embed_std"]) > 0 and float(out["eff_rank"]) >= 1
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.2, losses
    assert torch.equal(method.base.backbone.patch_embed.proj.weight, patch)  # frozen
    path = export_backbone(method, tmp_path / "backbone.safetensors", arch=ARCH)
    model = timm.create_model(
        ARCH, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)}
    )
    want = method.backbone_for_export().state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, want[name]), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ctr_worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    q, k = torch.load(Path(tmp) / "qk.pt")
    loss = contrastive_loss(q.chunk(WORLD)[rank], k.chunk(WORLD)[rank], 0.2)
    torch.save(loss, Path(tmp) / f"r{rank}.pt")
    dist.destroy_process_group()


def test_contrastive_loss_under_ddp_uses_the_global_batch(tmp_path: Path) -> None:
    """Each rank's queries see the keys of both ranks with positives at N * rank + i: the
    mean of the ranks' losses equals one process's loss on the whole batch."""
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    torch.save((torch.tensor(q), torch.tensor(k)), tmp_path / "qk.pt")
    mp.spawn(_ctr_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [float(torch.load(tmp_path / f"r{i}.pt")) for i in range(WORLD)]
    assert ranks[1] == pytest.approx(_hand_ctr(q[3:], k, 0.2, offset=3), rel=1e-5)
    assert sum(ranks) / WORLD == pytest.approx(_hand_ctr(q, k, 0.2), rel=1e-5)
