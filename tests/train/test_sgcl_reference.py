"""SGCL against its reference code (HHHedo/SGCL, ``openselfsup/models/spatialcl.py`` class
``SpatialCL`` with ``configs/selfsup/sslp/spatialcl.py``; multi-crop: ``SpatialCLMcrop`` with
``configs/selfsup/sslp/npidsslpmcrop.py``): the whole loss of a forward pass against the
reference's equations written out in numpy loops on a crafted bank; the local-crop term by
hand; the ``sgcl-mcrop`` views cut from the quadrants of real sample patches (decoded pixels);
a multi-crop run through the CLI on the sample shards, resumed exactly; and resuming runs saved
before these options existed."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pathflow.cli import main
from pathflow.train import TrainConfig
from pathflow.train.checkpoint import load_checkpoint
from pathflow.train.losses.sgcl_loss import local_instance_loss

CPU = torch.device("cpu")


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    v = rng.standard_normal((n, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# --------------------------------------------------------------------------- defaults
def test_defaults_are_those_of_the_reference_config() -> None:
    """``spatialcl.py``: ContrastiveHead temperature 0.07, aux_num 1, nei_k 4096, k 4096; the
    loss is the plain sum of ``SpatialCL``'s three entries (``loss_lambda`` is never used);
    ``npidsslpmcrop.py``: head temperature 0.2 and k = 65536 for the local-crop term."""
    o = TrainConfig(method="sgcl", steps=10).resolve().options
    assert (o.temperature, o.aux_anchors, o.semantic_topk, o.num_negatives) == (
        0.07, 1, 4096, 4096,
    )  # fmt: skip
    assert (o.loss_weight, o.semantic_reduction) == (1.0, "sum")
    assert (o.local_temperature, o.local_negatives, o.local_weight) == (0.2, 65536, 1.0)


# -------------------------------------------------------------- the whole loss, by hand
def _reference_loss(
    q: np.ndarray,
    bank: np.ndarray,
    anchor: np.ndarray,
    slide: np.ndarray,
    xy: np.ndarray,
    grid: float,
    labels: np.ndarray,
    topk: int,
    tau: float,
    w: float,
) -> dict[str, float]:
    """SpatialCL.forward_train with all non-positives as negatives (hard_fraction 1, as many
    draws as ranks), written as loops: spatial positives within 3 grid steps on the same
    slide, the most similar one as the auxiliary anchor, the union of the (auxiliary)
    anchors' top-k that share the cluster in every run, and the three terms summed."""
    n = bank.shape[0]
    inst = spa = sem = 0.0
    for i, a in enumerate(anchor):
        s = np.exp(bank @ q[i] / tau)
        spatial = [
            j for j in range(n)
            if slide[j] == slide[a] and 0 < math.dist(xy[j], xy[a]) / grid < 3
        ]  # fmt: skip
        searchers = [(q[i], a)]
        if spatial:
            best = max(spatial, key=lambda j: s[j])
            searchers.append((bank[best], best))
        semantic: set[int] = set()
        for f, own in searchers:
            sims = bank @ f
            near = sorted((j for j in range(n) if j != own), key=lambda j: -sims[j])[:topk]
            semantic |= {j for j in near if all(labels[:, j] == labels[:, own])}
        semantic.discard(int(a))
        positive = set(spatial) | semantic | {int(a)}
        neg = sum(s[j] for j in range(n) if j not in positive)
        inst += -math.log(s[a] / (s[a] + neg))
        if spatial:
            sp = sum(s[j] for j in spatial)
            spa += -math.log(sp / (sp + neg))
        if semantic:  # the per-positive fractions summed inside the log
            sem += -math.log(sum(s[j] / (s[j] + neg) for j in semantic))
    b = len(anchor)
    terms = {"instance": inst / b, "spatial": spa / b, "semantic": sem / b}
    terms["loss"] = terms["instance"] + w * (terms["spatial"] + terms["semantic"])
    return terms


def test_forward_loss_is_the_reference_equations_on_a_crafted_bank() -> None:
    from pathflow.train.backbones import create_backbone
    from pathflow.train.losses.sgcl_loss import rampup_weight
    from pathflow.train.methods.sgcl import SGCL, SamplePositions

    rng = np.random.default_rng(7)
    n, d, b, grid, topk = 24, 16, 4, 256.0, 6
    # two slides on a 4 x 3 grid each (level-0 pixels); sample 23 is alone on a third slide
    slide = np.array([0] * 12 + [1] * 11 + [2])
    cells = [(c % 4, c // 4) for c in range(12)]
    xy = np.array([cells[i % 12] for i in range(n)], dtype=np.float64) * grid
    xy[23] = (0, 0)
    positions = SamplePositions(
        slides=["a", "b", "c"],
        slide=torch.from_numpy(slide),
        x=torch.from_numpy(xy[:, 0].astype(np.int64)),
        y=torch.from_numpy(xy[:, 1].astype(np.int64)),
        grid=torch.full((n,), grid, dtype=torch.float64),
    )
    opts = {
        "proj_dim": d, "num_negatives": 10_000, "hard_fraction": 1.0, "semantic_topk": topk,
        "kmeans_runs": 2, "rampup_steps": 4,
    }  # fmt: skip
    cfg = TrainConfig(method="sgcl", arch="test_vit", img_size=32, steps=10, options=opts).resolve()
    torch.manual_seed(0)
    backbone, embed_dim = create_backbone("test_vit", img_size=32)
    method = SGCL(backbone, embed_dim, cfg, positions=positions).eval()
    bank = _unit(rng, n, d)
    labels = rng.integers(0, 2, size=(2, n))
    method.bank.features.copy_(torch.from_numpy(bank).float())
    method.bank.labels.copy_(torch.from_numpy(labels))
    anchor = np.array([5, 14, 23, 0])  # 23 has no spatial positive
    views = [torch.randn(b, 3, 32, 32)]
    step = 2
    out = method(views, step, meta={"index": torch.from_numpy(anchor)})
    with torch.no_grad():
        q = F.normalize(method.encoder(views).float(), dim=1).double().numpy()
    bank32 = method.bank.features.double().numpy()
    want = _reference_loss(
        q, bank32, anchor, slide, xy, grid, labels, topk, 0.07, rampup_weight(step, 4)
    )
    assert float(out["instance_loss"]) == pytest.approx(want["instance"], rel=1e-4)
    assert float(out["spatial_loss"]) == pytest.approx(want["spatial"], rel=1e-4)
    assert float(out["semantic_loss"]) == pytest.approx(want["semantic"], rel=1e-4)
    assert float(out["loss"].detach()) == pytest.approx(want["loss"], rel=1e-4)
    assert want["spatial"] > 0 and want["semantic"] != 0


# ---------------------------------------------------------------------- local crops
def test_local_instance_loss_by_hand() -> None:
    """SpatialCLMcrop's loss_contra_mcrop: crop l of sample i against row i of bank l, the
    drawn rows of every local bank (the same for every crop) as negatives, cross-entropy at
    temperature tau."""
    rng = np.random.default_rng(3)
    g, n, d, b, k, tau = 3, 10, 5, 2, 4, 0.2
    banks = np.stack([_unit(rng, n, d) for _ in range(g)])
    q = rng.standard_normal((g * b, d))  # not normalised: the loss normalises
    own = np.repeat(np.arange(g), b)
    index = np.tile(np.array([3, 8]), g)
    neg = rng.integers(0, n, size=(g, k))
    got = local_instance_loss(
        torch.from_numpy(q).float(), torch.from_numpy(banks).float(), torch.from_numpy(own),
        torch.from_numpy(index), torch.from_numpy(neg), tau,
    )  # fmt: skip
    total = 0.0
    for r in range(g * b):
        u = q[r] / np.linalg.norm(q[r])
        pos = math.exp(u @ banks[own[r], index[r]] / tau)
        negs = sum(math.exp(u @ banks[h, neg[h, j]] / tau) for h in range(g) for j in range(k))
        total += -math.log(pos / (pos + negs))
    assert float(got) == pytest.approx(total / (g * b), rel=1e-5)


def test_sgcl_mcrop_local_views_are_cut_from_the_quadrants(sample_shards: Path) -> None:
    """Views with the ``sgcl-mcrop`` regions but whole-region crops (no jitter, no flips):
    local view l is the l-th quadrant (tl, tr, bl, br) of the decoded 256 px patch; the
    preset's random local crops stay inside their quadrant."""
    from dataclasses import replace

    from pathflow.data import ShardSet, create_views, make_loader
    from pathflow.data.views import ViewsSpec, sample_view_params
    from PIL import Image

    preset = create_views("sgcl-mcrop")
    assert [v.size for v in preset.expand()] == [224, 96, 96, 96, 96]
    plain = ViewsSpec(
        tuple(
            replace(g, size=256 if i == 0 else 128, crop="full", hflip=0.0, jitter=0.0,
                    grayscale=0.0)
            for i, g in enumerate(preset.groups)
        ),
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    )  # fmt: skip
    loader = make_loader(
        sample_shards, views=plain, batch_size=4, backend="torch", num_workers=0,
        device="cpu", shuffle=False,
    )  # fmt: skip
    batch = next(iter(loader))
    ss = ShardSet(sample_shards)
    idx = np.asarray(batch.meta["index"], dtype=np.int64)
    for row, data in enumerate(ss.read_images(idx)):
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32) / 255
        assert img.shape == (256, 256, 3)
        for v, (y0, x0) in enumerate(((0, 0), (0, 128), (128, 0), (128, 128)), start=1):
            view = batch.views[v][row].permute(1, 2, 0).numpy()
            err = np.abs(view - img[y0 : y0 + 128, x0 : x0 + 128]).mean()
            assert err < 2 / 255, (row, v, err)
    ss.close()
    rng = np.random.default_rng(0)
    for v, g in enumerate(preset.groups[1:]):
        box = sample_view_params(g, np.full(500, 256), np.full(500, 256), rng).box
        x0, y0 = 128 * (v % 2), 128 * (v // 2)
        assert (box[:, 0] >= x0).all() and (box[:, 0] + box[:, 2] <= x0 + 128).all()
        assert (box[:, 1] >= y0).all() and (box[:, 1] + box[:, 3] <= y0 + 128).all()
        area = box[:, 2] * box[:, 3] / 128**2
        assert area.min() >= 0.19 and area.max() <= 0.57  # scale 0.2-0.56 of the quadrant


def _args(shards: Path, out: Path) -> list[str]:
    return [
        "train", "--method", "sgcl", "--data", str(shards), "--out", str(out),
        "--arch", "test_vit", "--img-size", "32", "--views", "sgcl-mcrop",
        "--global-size", "32", "--local-size", "16", "--batch-size", "8", "--steps", "7",
        "--device", "cpu", "--precision", "fp32", "--loader-backend", "torch",
        "--num-workers", "0", "--log-every", "1", "--no-tensorboard", "-q",
        "--sgcl.proj-dim", "16", "--sgcl.num-negatives", "4", "--sgcl.local-negatives", "64",
        "--sgcl.rampup-steps", "4", "--sgcl.num-clusters", "4", "--sgcl.kmeans-runs", "2",
    ]  # fmt: skip


def _rows(out: Path) -> dict[int, dict[str, Any]]:
    rows = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    skip = {"img_per_s", "mem_gb", "time"}
    return {r["step"]: {k: v for k, v in r.items() if k not in skip} for r in rows}


def test_cli_multicrop_run_and_exact_resume(sample_shards: Path, tmp_path: Path) -> None:
    """1 x 32 + 4 x 16 px views of the 43 sample patches: a local-crop term next to SGCL's,
    one bank per local crop moved by its crops; a run stopped after 3 steps and resumed ends
    as the uninterrupted one (weights, both kinds of banks, metrics)."""
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(sample_shards, full)) == 0
    assert main([*_args(sample_shards, part), "--stop-after", "3"]) == 0
    at3 = load_checkpoint(part / "checkpoint.pt")["method"]
    assert main([*_args(sample_shards, part), "--resume"]) == 0
    want, got = _rows(full), _rows(part)
    assert sorted(want) == sorted(got) == list(range(1, 8))
    for step in want:
        assert got[step] == want[step], step
        row = want[step]
        assert all(math.isfinite(row[k]) for k in ("loss", "local_loss", "instance_loss"))
        # the local term of random banks starts near log(1 + 64): 16 negatives x 4 banks
        assert 0 < row["local_loss"] < 20
    assert want[1]["local_loss"] == pytest.approx(math.log(65), abs=1.0)
    a = load_checkpoint(full / "checkpoint.pt")["method"]
    b = load_checkpoint(part / "checkpoint.pt")["method"]
    for k, v in a.items():
        assert torch.equal(v, b[k]), k
    assert a["local_bank"].shape == (4, 43, 16) and a["bank.features"].shape == (43, 16)
    moved = (a["local_bank"] - at3["local_bank"]).norm(dim=2) > 0  # [4, 43]
    assert moved.any(dim=1).all()  # every local bank moved after step 3
    norms = a["local_bank"].norm(dim=2)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    cfg = (full / "config.yaml").read_text()
    assert "sgcl-mcrop" in cfg


def test_local_crops_unused_with_weight_0_and_errors(sample_shards: Path) -> None:
    from pathflow.exceptions import ConfigError
    from pathflow.train.trainer import build_method

    base = {"proj_dim": 8, "num_clusters": 2, "kmeans_runs": 1}
    cfg = TrainConfig(
        method="sgcl", arch="test_vit", img_size=32, steps=1, data=str(sample_shards),
        views="sgcl-mcrop", options={**base, "local_weight": 0.0},
    ).resolve()  # fmt: skip
    method = build_method(cfg, CPU)
    assert method.num_local == 0 and "local_bank" not in method.state_dict()
    cfg = TrainConfig(
        method="sgcl", arch="test_vit", img_size=32, steps=1, data=str(sample_shards),
        views="sgcl-mcrop", options=base,
    ).resolve()  # fmt: skip
    method = build_method(cfg, CPU)
    assert method.num_local == 4
    with pytest.raises(ValueError, match="built for 4 local crops per sample, got 0"):
        method([torch.randn(2, 3, 32, 32)], 0, meta={"index": torch.tensor([0, 1])})
    with pytest.raises(ConfigError, match="semantic_reduction must be one of sum, mean"):
        TrainConfig(method="sgcl", steps=1, options={"semantic_reduction": "avg"}).resolve()
    with pytest.raises(ValueError, match="fixed regions"):
        from pathflow.data import create_views

        create_views("sgcl-mcrop", num_local=8)


# ------------------------------------------------------------------ older checkpoints
def test_runs_saved_before_the_reference_defaults_resume_with_their_settings() -> None:
    """A config saved by the earlier SGCL (no semantic_reduction / local_* keys, aux 3, top
    2048, loss x 1/3, semantic mean): resuming it with the new defaults names exactly the
    changed options; given the old values it resumes, the missing keys read as their older
    behaviour."""
    old_opts = {"aux_anchors": 3, "semantic_topk": 2048, "loss_weight": 1.0 / 3.0}
    saved = TrainConfig(method="sgcl", steps=10, options=old_opts).resolve().to_dict()
    for k in ("semantic_reduction", "local_weight", "local_temperature", "local_negatives"):
        del saved["sgcl"][k]
    new = TrainConfig(method="sgcl", steps=10).resolve()
    assert new.differences(saved) == [
        "sgcl.aux_anchors", "sgcl.loss_weight", "sgcl.semantic_reduction", "sgcl.semantic_topk",
    ]  # fmt: skip
    same = TrainConfig(
        method="sgcl", steps=10, options={**old_opts, "semantic_reduction": "mean"}
    ).resolve()
    assert same.differences(saved) == []


# ------------------------------------------------------------------------------ DDP
WORLD = 2


def _mcrop_cfg(shards: str) -> TrainConfig:
    opts = {
        "proj_dim": 16, "num_negatives": 4, "num_clusters": 4, "kmeans_runs": 2,
        "rampup_steps": 0, "local_negatives": 32,
    }  # fmt: skip
    return TrainConfig(
        method="sgcl", arch="test_vit", img_size=32, steps=10, data=shards, views="sgcl-mcrop",
        global_size=32, local_size=16, options=opts,
    ).resolve()  # fmt: skip


def _mcrop_step(model: torch.nn.Module, method: Any, views: list[torch.Tensor], meta: Any) -> Any:
    method.start_epoch(0)
    out = model(views, 0, meta=meta)
    out["loss"].backward()
    method.after_step(0)
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    terms = {k: out[k].detach() for k in ("loss", "local_loss", "instance_loss")}
    return {"terms": terms, "grads": grads, "bank": method.bank.features.clone(),
            "local": method.local_bank.clone()}  # fmt: skip


def _mcrop_worker(rank: int, port: int, shards: str, tmp: str) -> None:
    import os

    import torch.distributed as dist
    from pathflow.train.distributed import init_distributed
    from pathflow.train.trainer import build_method, wrap_ddp

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank),
    )  # fmt: skip
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    method = build_method(_mcrop_cfg(shards), CPU)
    model = wrap_ddp(method, info)
    data = torch.load(Path(tmp) / "batch.pt")
    views = [v.chunk(WORLD)[rank] for v in data["views"]]
    meta = {"index": data["index"].chunk(WORLD)[rank]}
    torch.save(_mcrop_step(model, method, views, meta), Path(tmp) / f"r{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_multicrop_equals_one_process(sample_shards: Path, tmp_path: Path) -> None:
    """A multi-crop batch of 8 split over 2 gloo processes: the mean of the ranks' losses, the
    gradients, the main bank and the local banks equal one process on the whole batch."""
    import socket

    import torch.multiprocessing as mp
    from pathflow.data import create_views, make_loader
    from pathflow.train.trainer import build_method

    loader = make_loader(
        sample_shards, views=create_views("sgcl-mcrop", global_size=32, local_size=16),
        batch_size=8, backend="torch", num_workers=0, rank=0, world_size=1, device="cpu",
    )  # fmt: skip
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch.views] == [(8, 3, 32, 32)] + [(8, 3, 16, 16)] * 4
    index = torch.as_tensor(batch.meta["index"])
    torch.save({"views": batch.views, "index": index}, tmp_path / "batch.pt")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    mp.spawn(_mcrop_worker, args=(port, str(sample_shards), str(tmp_path)), nprocs=WORLD, join=True)
    method = build_method(_mcrop_cfg(str(sample_shards)), CPU)
    before = method.local_bank.clone()
    single = _mcrop_step(method, method, batch.views, {"index": index})
    ranks = [torch.load(tmp_path / f"r{i}.pt") for i in range(WORLD)]
    for name, value in single["terms"].items():
        mean = (ranks[0]["terms"][name] + ranks[1]["terms"][name]) / WORLD
        torch.testing.assert_close(mean, value, rtol=1e-5, atol=1e-6)
    for r in ranks:
        torch.testing.assert_close(r["bank"], single["bank"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(r["local"], single["local"], rtol=1e-5, atol=1e-6)
        for name, g in single["grads"].items():
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-6)
    # exactly the batch's rows of every local bank moved
    moved = (single["local"] - before).norm(dim=2) > 0
    want = torch.zeros_like(moved)
    want[:, index] = True
    assert torch.equal(moved, want)


def test_resuming_without_local_banks_is_a_one_line_error(sample_shards: Path) -> None:
    """A checkpoint whose run ignored its local crops (SGCL before multi-crop, or local weight
    0) does not load into a model with local banks; the error names the flags that resume it,
    and those flags are accepted (``--allow-changed METHOD.NAME``, as the resume check says)."""
    from pathflow.exceptions import ConfigError
    from pathflow.train.trainer import build_method

    base = {"proj_dim": 8, "num_clusters": 2, "kmeans_runs": 1}
    kw: dict[str, Any] = {
        "method": "sgcl", "arch": "test_vit", "img_size": 32, "steps": 1,
        "data": str(sample_shards), "views": "sgcl-mcrop",
    }  # fmt: skip
    ignored = build_method(
        TrainConfig(**kw, options={**base, "local_weight": 0.0}).resolve(), CPU
    ).state_dict()
    method = build_method(TrainConfig(**kw, options=base).resolve(), CPU)
    hint = re.escape("--sgcl.local-weight 0 --allow-changed sgcl.local_weight")
    with pytest.raises(ConfigError, match=hint):
        method.load_state_dict(ignored)
    cfg = TrainConfig(
        **kw, options={**base, "local_weight": 0.0}, allow_changed=["sgcl.local_weight"]
    ).resolve()
    build_method(cfg, CPU).load_state_dict(ignored)
    with pytest.raises(ConfigError, match=r"unknown option.*sgcl\.local_weights"):
        TrainConfig(**kw, allow_changed=["sgcl.local_weights"]).resolve()
