"""SGCL (``pathflow train --method sgcl``): each loss term, the positive masks and the negative
mining against loops written out in numpy on a small bank; the ramp-up values; the bank
update; positions read from the real sample shards; exact resume through the CLI across a
k-means refit; DDP on 2 gloo processes against one process."""

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
import torch.distributed as dist
import torch.multiprocessing as mp
from pathflow.cli import main
from pathflow.train import TrainConfig
from pathflow.train.checkpoint import load_checkpoint
from pathflow.train.losses.sgcl_loss import (
    SpatialMemoryBank,
    beta_rank_profile,
    mine_negatives,
    rampup_weight,
    semantic_positive_mask,
    sgcl_terms,
    spatial_positive_mask,
)

CPU = torch.device("cpu")
WORLD = 2


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ------------------------------------------------------------------ schedules, profiles
def test_rampup_values() -> None:
    assert rampup_weight(0, 10) == pytest.approx(math.exp(-5.0))
    assert rampup_weight(5, 10) == pytest.approx(math.exp(-5.0 * 0.25))
    assert rampup_weight(9, 10) == pytest.approx(math.exp(-5.0 * 0.01))
    assert rampup_weight(10, 10) == rampup_weight(25, 10) == 1.0
    assert rampup_weight(0, 0) == 1.0


def test_beta_rank_profile_is_the_beta_5_15_density_over_ranks() -> None:
    m = 50
    want = np.array([((r + 0.5) / m) ** 4 * (1 - (r + 0.5) / m) ** 14 for r in range(m)])
    np.testing.assert_allclose(beta_rank_profile(m).numpy(), want / want.sum(), rtol=1e-10)
    # drawn ranks follow it: mean rank / M near the Beta(5, 15) mean 0.25
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [torch.multinomial(beta_rank_profile(1000), 1, generator=gen) for _ in range(2000)]
    )
    assert abs(float(draws.double().mean()) / 1000 - 0.25) < 0.01


# --------------------------------------------------------------------------- masks
def test_spatial_mask_by_hand() -> None:
    slide = torch.tensor([0, 0, 0, 0, 1, 1, -1, 0])
    grid = torch.tensor([256, 256, 256, 256, 512, 512, 256, 256])
    x = torch.tensor([0, 256, 512, 768, 0, 1024, 0, 256])
    y = torch.tensor([0, 0, 256, 0, 0, 0, 0, 512])
    anchor = torch.tensor([0, 4, 6, 7])
    got = spatial_positive_mask(anchor, slide, x, y, grid, radius=3.0).numpy()
    for i, a in enumerate(anchor.tolist()):
        for j in range(8):
            d = math.hypot(x[j] - x[a], y[j] - y[a]) / grid[a]
            want = slide[a] >= 0 and slide[j] == slide[a] and 0 < d < 3
            assert got[i, j] == want, (a, j, d)
    # anchor 0: (256,0) d=1, (512,256) d=2.24, (256,512) d=2.24 are in; (768,0) d=3 is not
    assert got[0].nonzero()[0].tolist() == [1, 2, 7]
    assert not got[2].any()  # unknown position


def test_semantic_mask_by_hand() -> None:
    rng = np.random.default_rng(1)
    n, d, runs = 12, 8, 2
    bank = _unit(rng, n, d)
    q = _unit(rng, 3, d)
    anchor = np.array([0, 5, 9])
    labels = rng.integers(0, 2, size=(runs, n))
    spatial = np.zeros((3, n), dtype=bool)
    spatial[0, [1, 2, 3]] = True
    spatial[1, [4]] = True
    topk, aux = 4, 2
    got = semantic_positive_mask(
        torch.from_numpy(q).float(), torch.from_numpy(anchor), torch.from_numpy(bank).float(),
        torch.from_numpy(labels), torch.from_numpy(spatial), topk, aux,
    ).numpy()  # fmt: skip
    want = np.zeros((3, n), dtype=bool)
    for i in range(3):
        sims = bank @ q[i]
        anchors = [(q[i], anchor[i])]
        neigh = [j for j in np.argsort(-sims) if spatial[i, j]][:aux]
        anchors += [(bank[j], j) for j in neigh]
        for f, own in anchors:
            s = bank @ f
            order = [j for j in np.argsort(-s) if j != own][:topk]
            for j in order:
                if all(labels[r, j] == labels[r, own] for r in range(runs)):
                    want[i, j] = True
        want[i, anchor[i]] = False
    np.testing.assert_array_equal(got, want)
    assert want.any()


def test_mined_negatives_by_hand() -> None:
    rng = np.random.default_rng(2)
    n = 40
    logits = rng.standard_normal((3, n))
    positives = np.zeros((3, n), dtype=bool)
    positives[0, np.argsort(-logits[0])[:3]] = True  # the three most similar are positives
    positives[1, 7] = True
    idx, ok = mine_negatives(
        torch.from_numpy(logits).float(), torch.from_numpy(positives), num=5, fraction=0.2,
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    m = int(0.2 * n)  # 8 ranks
    ranks = torch.multinomial(beta_rank_profile(m), 5, generator=torch.Generator().manual_seed(3))
    for i in range(3):
        order = [j for j in np.argsort(-logits[i], kind="stable") if not positives[i, j]][:m]
        assert idx[i].tolist() == [order[r] for r in ranks.tolist()]
        assert ok[i].all() and not positives[i, idx[i].numpy()].any()


# --------------------------------------------------------------------------- terms
def test_loss_terms_by_hand() -> None:
    rng = np.random.default_rng(4)
    n, d, b, tau = 16, 6, 3, 0.07
    bank = _unit(rng, n, d)
    q = _unit(rng, b, d)
    anchor = np.array([2, 9, 14])
    spatial = np.zeros((b, n), dtype=bool)
    spatial[0, [1, 3]] = True
    spatial[2, [13]] = True  # anchor 1 has none
    semantic = np.zeros((b, n), dtype=bool)
    semantic[0, [5, 6, 7]] = True
    semantic[1, [10]] = True  # anchor 2 has none
    negatives = np.array([[0, 4, 8, 11], [0, 1, 2, 3], [4, 5, 6, 7]])
    ok = np.ones_like(negatives, dtype=bool)
    ok[2, 3] = False  # a drawn rank that holds a positive counts for nothing
    qt = torch.from_numpy(q).float().requires_grad_(True)
    terms = sgcl_terms(
        qt, torch.from_numpy(anchor), torch.from_numpy(bank).float(),
        torch.from_numpy(spatial), torch.from_numpy(semantic), torch.from_numpy(negatives),
        torch.from_numpy(ok), tau,
    )  # fmt: skip

    inst = spa = sem = sem_mean = 0.0
    for i in range(b):
        s = np.exp(bank @ q[i] / tau)
        neg = sum(s[j] for j, good in zip(negatives[i], ok[i], strict=True) if good)
        inst += -math.log(s[anchor[i]] / (s[anchor[i]] + neg))
        pos = [s[j] for j in range(n) if spatial[i, j]]
        if pos:
            spa += -math.log(sum(pos) / (sum(pos) + neg))
        fr = [s[j] / (s[j] + neg) for j in range(n) if semantic[i, j]]
        if fr:  # SpatialCL: the fractions summed inside the log
            sem += -math.log(sum(fr))
            sem_mean += -math.log(sum(fr) / len(fr))
    assert float(terms.instance.detach()) == pytest.approx(inst / b, rel=1e-5)
    assert float(terms.spatial.detach()) == pytest.approx(spa / b, rel=1e-5)
    assert float(terms.semantic.detach()) == pytest.approx(sem / b, rel=1e-5)
    mean = sgcl_terms(
        qt, torch.from_numpy(anchor), torch.from_numpy(bank).float(),
        torch.from_numpy(spatial), torch.from_numpy(semantic), torch.from_numpy(negatives),
        torch.from_numpy(ok), tau, "mean",
    )  # fmt: skip
    assert float(mean.semantic.detach()) == pytest.approx(sem_mean / b, rel=1e-5)
    assert float(terms.spatial_positives) == pytest.approx(1.0)
    assert float(terms.semantic_positives) == pytest.approx(4 / 3)
    # anchors without positives add nothing, also to the gradient (no NaN from log 0)
    (terms.instance + terms.spatial + terms.semantic).backward()
    assert qt.grad is not None and torch.isfinite(qt.grad).all() and qt.grad.abs().sum() > 0


def test_bank_update_momentum_and_renormalisation() -> None:
    n = 5
    bank = SpatialMemoryBank(
        torch.zeros(n, dtype=torch.long), torch.zeros(n), torch.zeros(n), torch.ones(n), 4, 3
    )
    before = bank.features.clone()
    feats = torch.tensor([[3.0, 0.0, 0.0, 4.0], [0.0, 2.0, 0.0, 0.0]])
    bank.update(torch.tensor([1, 3]), feats, 0.5)
    for row, f in zip((1, 3), feats.numpy(), strict=True):
        v = 0.5 * before[row].numpy() + 0.5 * f / np.linalg.norm(f)
        np.testing.assert_allclose(bank.features[row].numpy(), v / np.linalg.norm(v), rtol=1e-6)
    for row in (0, 2, 4):
        assert torch.equal(bank.features[row], before[row])
    assert bank.labels.shape == (3, n) and len(set(bank.labels[0].tolist())) == n
    assert int(bank.kmeans_epoch) == -1


@pytest.mark.parametrize("backend", ["faiss", "sklearn"])
def test_kmeans_backends_reach_a_lloyd_fixed_point(backend: str) -> None:
    """Converged Lloyd k-means: every point is nearest to the mean of its own cluster; the
    same seed gives the same labels."""
    from pathflow.train.methods.sgcl import fit_kmeans

    rng = np.random.default_rng(5)
    x = _unit(rng, 200, 8) + np.repeat(4.0 * np.eye(8)[:4], 50, axis=0)
    labels = fit_kmeans(x, 6, seed=1234, iters=50, backend=backend)
    used = sorted(set(labels.tolist()))
    assert 1 < len(used) <= 6
    means = np.stack([x[labels == c].mean(axis=0) for c in used])
    nearest = np.asarray(used)[((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(axis=1)]
    assert np.array_equal(nearest, labels)
    assert np.array_equal(labels, fit_kmeans(x, 6, seed=1234, iters=50, backend=backend))


# --------------------------------------------------------------- the real sample shards
def test_positions_from_the_sample_shards(sample_shards: Path) -> None:
    from pathflow.data import ShardSet
    from pathflow.train.methods.sgcl import read_positions

    ss = ShardSet(sample_shards)
    pos = read_positions(ss)
    _, metas = ss.read(np.arange(len(ss), dtype=np.int64))
    assert pos.x.tolist() == [m["x"] for m in metas]
    assert pos.y.tolist() == [m["y"] for m in metas]
    assert pos.slides == ["cmu_small_region"] and set(pos.slide.tolist()) == {0}
    assert set(pos.grid.tolist()) == {257.0}  # the grid step of a 0.499 um/px slide
    # every sample has spatial positives on this compact grid, all within 3 steps
    mask = spatial_positive_mask(torch.arange(len(ss)), pos.slide, pos.x, pos.y, pos.grid, 3.0)
    assert mask.any(dim=1).all()
    for i, j in mask.nonzero().tolist():
        assert 0 < math.hypot(metas[i]["x"] - metas[j]["x"], metas[i]["y"] - metas[j]["y"]) < 771


def _args(shards: Path, out: Path) -> list[str]:
    return [
        "train", "--method", "sgcl", "--data", str(shards), "--out", str(out),
        "--arch", "test_vit", "--img-size", "32", "--global-size", "32", "--batch-size", "8",
        "--steps", "6", "--device", "cpu", "--precision", "fp32", "--loader-backend", "torch",
        "--num-workers", "0", "--log-every", "1", "--no-tensorboard", "-q",
        "--sgcl.proj-dim", "16", "--sgcl.num-negatives", "4", "--sgcl.rampup-steps", "4",
        "--sgcl.num-clusters", "4", "--sgcl.kmeans-runs", "2",
    ]  # fmt: skip


def _rows(out: Path) -> dict[int, dict[str, Any]]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    skip = {"img_per_s", "mem_gb", "time"}
    return {r["step"]: {k: v for k, v in r.items() if k not in skip} for r in rows}


def test_cli_resume_is_exact_across_the_kmeans_refit(sample_shards: Path, tmp_path: Path) -> None:
    """43 patches, batch 8: 5 steps an epoch, k-means refits at steps 0 and 5. A run stopped
    after 5 steps and resumed (the refit of epoch 1 happens in the resumed job) ends as the
    uninterrupted 6-step run: weights, bank, positions, labels, metrics. (A resume within an
    epoch, which must keep the checkpoint's labels, is test_train_all_methods' sgcl case.)"""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(sample_shards, full)) == 0
    assert main([*_args(sample_shards, part), "--stop-after", "5"]) == 0
    at5 = load_checkpoint(part / "checkpoint.pt")["method"]
    assert main([*_args(sample_shards, part), "--resume"]) == 0

    want, got = _rows(full), _rows(part)
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert got[step] == want[step], (step, got[step], want[step])
    a = load_checkpoint(full / "checkpoint.pt")["method"]
    b = load_checkpoint(part / "checkpoint.pt")["method"]
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    # the state the comparison covers moved: bank rows, k-means labels of epoch 1
    assert int(at5["bank.kmeans_epoch"]) == 0 and int(b["bank.kmeans_epoch"]) == 1
    assert not torch.equal(at5["bank.labels"], b["bank.labels"])
    assert not torch.equal(at5["bank.features"], b["bank.features"])
    assert b["bank.features"].shape == (43, 16) and b["bank.labels"].shape == (2, 43)
    assert want[6]["spatial_positives"] > 0 and want[6]["rampup"] == 1.0
    assert want[1]["rampup"] == pytest.approx(math.exp(-5.0))
    assert (full / "backbone.safetensors").is_file()


def test_errors(sample_shards: Path, tmp_path: Path, capsys: Any) -> None:
    from pathflow.exceptions import ConfigError
    from pathflow.train.trainer import build_method

    assert main([*_args(sample_shards, tmp_path / "x"), "--sgcl.kmeans-backend", "kmeans++"]) == 2
    assert "sgcl kmeans_backend must be one of auto, faiss, sklearn" in capsys.readouterr().err
    cfg = TrainConfig(method="sgcl", arch="test_vit", steps=1, positives="neighbour").resolve()
    with pytest.raises(ConfigError, match="--positives neighbour"):
        build_method(cfg, CPU)


# ------------------------------------------------------------------------------ DDP
def _cfg(shards: str) -> TrainConfig:
    opts = {
        "proj_dim": 16, "num_negatives": 4, "num_clusters": 4, "kmeans_runs": 2,
        "rampup_steps": 0,
    }  # fmt: skip
    return TrainConfig(
        method="sgcl", arch="test_vit", img_size=32, steps=10, data=shards, options=opts
    ).resolve()


def _sgcl_step(model: torch.nn.Module, method: Any, views: list[torch.Tensor], meta: Any) -> Any:
    method.start_epoch(0)
    out = model(views, 0, meta=meta)
    out["loss"].backward()
    method.after_step(0)
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    terms = {k: out[k].detach() for k in ("loss", "instance_loss", "spatial_loss", "semantic_loss")}
    return {"terms": terms, "grads": grads, "bank": method.bank.features.clone(),
            "labels": method.bank.labels.clone()}  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sgcl_worker(rank: int, port: int, shards: str, tmp: str) -> None:
    from pathflow.train.distributed import init_distributed
    from pathflow.train.trainer import build_method, wrap_ddp

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    method = build_method(_cfg(shards), CPU)
    model = wrap_ddp(method, info)
    data = torch.load(Path(tmp) / "batch.pt")
    views = [v.chunk(WORLD)[rank] for v in data["views"]]
    meta = {"index": data["index"].chunk(WORLD)[rank]}
    torch.save(_sgcl_step(model, method, views, meta), Path(tmp) / f"r{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_bank_update_and_loss_equal_one_process(sample_shards: Path, tmp_path: Path) -> None:
    from pathflow.data import ShardSet, create_views, make_loader
    from pathflow.train.trainer import build_method

    loader = make_loader(
        sample_shards, views=create_views("simclr", global_size=32), batch_size=8,
        backend="torch", num_workers=0, rank=0, world_size=1, device="cpu",
    )  # fmt: skip
    batch = next(iter(loader))
    ss = ShardSet(sample_shards)
    keys = [k for sh in ss.shards for k in sh.keys]
    index = torch.as_tensor(batch.meta["index"])
    assert index.tolist() == [keys.index(k) for k in batch.meta["key"]]  # the shard order
    torch.save({"views": batch.views, "index": index}, tmp_path / "batch.pt")
    args = (_free_port(), str(sample_shards), str(tmp_path))
    mp.spawn(_sgcl_worker, args=args, nprocs=WORLD, join=True)

    method = build_method(_cfg(str(sample_shards)), CPU)
    single = _sgcl_step(method, method, batch.views, {"index": index})
    ranks = [torch.load(tmp_path / f"r{i}.pt") for i in range(WORLD)]
    for name, value in single["terms"].items():
        mean = (ranks[0]["terms"][name] + ranks[1]["terms"][name]) / WORLD
        torch.testing.assert_close(mean, value, rtol=1e-5, atol=1e-6)
    assert (
        float(single["terms"]["spatial_loss"]) > 0 and float(single["terms"]["semantic_loss"]) > 0
    )
    for r in ranks:
        assert torch.equal(r["labels"], single["labels"])
        torch.testing.assert_close(r["bank"], single["bank"], rtol=1e-5, atol=1e-6)
        for name, g in single["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6)
    assert torch.equal(ranks[0]["bank"], ranks[1]["bank"])
