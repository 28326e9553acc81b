"""The trainer end to end on the real sample shards (cmu-small, 43 patches) with tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pathflow.data import create_views, make_loader
from pathflow.train import TrainConfig, train
from pathflow.train.checkpoint import load_checkpoint
from pathflow.train.export import load_backbone_state
from pathflow.train.trainer import (
    NonFiniteLossError,
    build_method,
    build_optimizer,
    set_schedules,
)

CPU = torch.device("cpu")

# Tiny, fast settings: ViT-Ti/16 on 32 px global and 16 px local crops, a small DINO head.
DINO_SMALL: dict[str, Any] = {
    "method": "dino",
    "arch": "vit_tiny_patch16_224",
    "img_size": 32,
    "global_size": 32,
    "local_size": 16,
    "num_local": 2,
    "out_dim": 256,
}
SIMCLR_SMALL: dict[str, Any] = {
    "method": "simclr",
    "arch": "resnet18",
    "global_size": 48,
    "proj_hidden_dim": 128,
    "proj_dim": 32,
}


def _cfg(shards: Path, out: Path, base: dict[str, Any], **kw: Any) -> TrainConfig:
    """A CPU config; keys that are not shared fields are the method's options."""
    values = {
        "data": str(shards),
        "out": str(out),
        "device": "cpu",  # exact comparisons: CPU kernels are deterministic
        "loader_backend": "torch",
        "num_workers": 0,
        "batch_size": 8,
        "log_every": 1,
        "tensorboard": False,
        **base,
        **kw,
    }
    shared = set(TrainConfig.field_names())
    options = {k: values.pop(k) for k in list(values) if k not in shared}
    return TrainConfig(**values, options=options)


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _overfit(cfg: TrainConfig, views: Any, shards: Path, lr: float, steps: int = 10) -> list[float]:
    loader = make_loader(
        shards, views=views, batch_size=8, backend="torch", num_workers=0, device="cpu"
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


def test_dino_overfits_a_fixed_batch(sample_shards: Path, tmp_path: Path) -> None:
    # fixed teacher temperature and centre: the student distils a (slowly moving) teacher
    cfg = _cfg(
        sample_shards, tmp_path, DINO_SMALL, steps=10, freeze_last_layer=0, drop_path_rate=0.0,
        warmup_teacher_temp=0.04, teacher_temp=0.04, center_momentum=1.0,
    ).resolve()  # fmt: skip
    views = create_views("dino", global_size=32, local_size=16, num_local=2)
    losses = _overfit(cfg, views, sample_shards, lr=1e-4)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.2, losses
    assert min(losses[-3:]) == min(losses), losses


def test_simclr_overfits_a_fixed_batch(sample_shards: Path, tmp_path: Path) -> None:
    cfg = _cfg(sample_shards, tmp_path, SIMCLR_SMALL, steps=10).resolve()
    losses = _overfit(cfg, create_views("simclr", global_size=48), sample_shards, lr=1e-3)
    # 16 anchors: log(15) = 2.7 for uninformative embeddings; the pairs become separable
    assert losses[0] > 2.0 and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("base", [DINO_SMALL, SIMCLR_SMALL], ids=["dino", "simclr"])
def test_train_writes_the_run(sample_shards: Path, tmp_path: Path, base: dict[str, Any]) -> None:
    out = tmp_path / "run"
    summary = train(_cfg(sample_shards, out, base, steps=3, tensorboard=True), progress=False)
    assert summary.finished and summary.steps == 3 and summary.images == 24
    assert summary.images_per_s > 0 and torch.isfinite(torch.tensor(summary.final_loss))
    for name in ("config.yaml", "checkpoint.pt", "metrics.jsonl", "metrics.csv",
                 "summary.json", "backbone.safetensors"):  # fmt: skip
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert sorted(_losses(out)) == [1, 2, 3]
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("step,epoch,loss,lr,wd") and len(csv_lines) == 4
    saved = (out / "config.yaml").read_text()
    assert "steps_per_epoch: 5" in saved and f"method: {base['method']}" in saved
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 3 and ckpt["epoch"] == 0 and len(ckpt["rank_states"]) == 1
    # the checkpoint's weights read with weights_only unpickling, same as the export
    exported = load_backbone_state(out / "backbone.safetensors")
    from_ckpt = load_backbone_state(out / "checkpoint.pt")
    assert exported.keys() == from_ckpt.keys()
    assert all(torch.equal(exported[k], from_ckpt[k]) for k in exported)
    # an existing run is not overwritten without --resume
    from pathflow.exceptions import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        train(_cfg(sample_shards, out, base, steps=3), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("base", "stop"), [(DINO_SMALL, 2), (SIMCLR_SMALL, 3)], ids=["dino-epoch-end", "simclr-mid"]
)
def test_resume_reproduces_the_uninterrupted_run(
    sample_shards: Path, tmp_path: Path, base: dict[str, Any], stop: int
) -> None:
    """Batch 16: 2 batches per epoch. DINO stops after 2 steps, on an epoch end, so the
    resumed run starts epoch 1; its last layer is frozen for 3 steps (steps 0-2) and
    trains from step 3. SimCLR stops in the middle of epoch 1 (the loader resumes at its
    second batch). Stochastic depth draws from the restored RNG."""
    kw: dict[str, Any] = {
        "steps": 4, "batch_size": 16, "num_workers": 1, "warmup_steps": 1, "lr": 1e-3,
        "drop_path_rate": 0.1,
    }  # fmt: skip
    if base["method"] == "dino":
        kw["freeze_last_layer_steps"] = 3
    full = tmp_path / "full"
    train(_cfg(sample_shards, full, base, **kw), progress=False)

    part = tmp_path / "part"
    first = train(_cfg(sample_shards, part, base, stop_after=stop, **kw), progress=False)
    assert first.steps == stop and not first.finished
    ckpt = load_checkpoint(part / "checkpoint.pt")
    assert ckpt["step"] == stop and ckpt["epoch"] == 1
    second = train(_cfg(sample_shards, part, base, resume=True, **kw), progress=False)
    assert second.start_step == stop and second.steps == 4 and second.finished

    want, got = _losses(full), _losses(part)
    assert sorted(got) == [1, 2, 3, 4]  # rows of the interrupted run kept once
    for step in (1, 2, 3, 4):
        assert got[step] == want[step], (step, got[step], want[step])
    a = load_checkpoint(full / "checkpoint.pt")["method"]
    b = load_checkpoint(part / "checkpoint.pt")["method"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_loss_stops_with_the_checkpoint_intact(
    sample_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "nan"
    # an absurd learning rate: the first update sends the weights to ~1e28, the next
    # forward overflows to NaN
    cfg = _cfg(sample_shards, out, DINO_SMALL, steps=5, save_every=1, lr=1e30, warmup_steps=0)
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "at step 1" in msg and "checkpoint.pt (step 1)" in msg
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())
    assert sorted(_losses(out)) == [1]
    assert not list(out.glob(".checkpoint.pt.*"))  # no temporary left behind


def test_cli_train_runs_and_reports_errors(
    sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathflow.cli import main

    out = tmp_path / "cli"
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("method: simclr\narch: resnet18\nbatch_size: 4\nsteps: 50\n")
    args = [
        "train", "--config", str(yaml_file), "--data", str(sample_shards), "--out", str(out),
        "--steps", "2", "--global-size", "32", "--simclr.proj-hidden-dim", "64",
        "--simclr.proj-dim", "16",
        "--loader-backend", "torch", "--num-workers", "0", "--no-tensorboard", "-q",
        "--device", "cpu",
    ]  # fmt: skip
    assert main(args) == 0
    cfg = (out / "config.yaml").read_text()
    assert "steps: 2\n" in cfg and "batch_size: 4\n" in cfg and "method: simclr" in cfg
    err = capsys.readouterr().err
    assert "pathflow train: simclr/resnet18" in err and "img/s" in err
    # same run again without --resume: a clear one-line error, exit status 2
    assert main(args) == 2
    assert "pathflow train: error:" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0  # already finished: nothing to do
    assert "already finished" in capsys.readouterr().err
    # a bad value in one line naming the option
    assert main([*args, "--resume", "--simclr.temperature", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "temperature must be > 0" in err


def _strict_json(path: Path) -> dict[str, Any]:
    """JSON as other tools read it: NaN/Infinity are not JSON."""

    def reject(token: str) -> None:
        raise ValueError(f"{path}: {token} is not valid JSON")

    data: dict[str, Any] = json.loads(path.read_text(), parse_constant=reject)
    return data


def test_stop_after_counts_from_where_the_job_starts(sample_shards: Path, tmp_path: Path) -> None:
    """A job loop re-submitting ``--resume --stop-after 2`` advances 2 steps each time, then
    says the run is finished and leaves a valid summary.json."""
    out = tmp_path / "jobs"
    kw: dict[str, Any] = {"steps": 5, "stop_after": 2, "save_every": 100}
    done = [train(_cfg(sample_shards, out, DINO_SMALL, resume=True, **kw), progress=False)
            for _ in range(4)]  # fmt: skip
    assert [(s.start_step, s.steps, s.finished) for s in done[:3]] == [
        (0, 2, False), (2, 4, False), (4, 5, True),
    ]  # fmt: skip
    assert done[3] == done[2]  # finished: nothing ran, the run's summary is returned
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5]
    summary = _strict_json(out / "summary.json")
    assert summary["finished"] and summary["steps"] == 5
    assert summary["final_loss"] == pytest.approx(_losses(out)[5])
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5


def test_resume_refuses_changed_settings_and_data(sample_shards: Path, tmp_path: Path) -> None:
    import shutil

    from pathflow.exceptions import ConfigError

    out = tmp_path / "run"
    kw: dict[str, Any] = {"steps": 4}
    train(_cfg(sample_shards, out, DINO_SMALL, stop_after=1, **kw), progress=False)
    config_before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        train(_cfg(sample_shards, out, DINO_SMALL, resume=True, lr=1e-2, **kw), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "lr = 0.01" in msg and "--allow-changed lr" in msg
    with pytest.raises(ConfigError, match=r"dino\.out_dim"):
        train(_cfg(sample_shards, out, {**DINO_SMALL, "out_dim": 128}, resume=True, **kw))
    assert (out / "config.yaml").read_text() == config_before  # not overwritten
    # re-tiled data (another shards.json) under the same path
    data = tmp_path / "data"
    shutil.copytree(sample_shards, data)
    # the same data elsewhere: allowed (run control); run-control options may change too
    s = train(
        _cfg(data, out, DINO_SMALL, resume=True, stop_after=1, log_every=2, **kw), progress=False
    )
    assert s.steps == 2
    manifest = data / "shards.json"
    manifest.write_text(manifest.read_text().replace('"shuffled": false', '"shuffled": true'))
    with pytest.raises(ConfigError, match="training data changed"):
        train(_cfg(data, out, DINO_SMALL, resume=True, **kw), progress=False)
    # explicit override
    s = train(
        _cfg(sample_shards, out, DINO_SMALL, resume=True, lr=1e-2, allow_changed=["lr"], **kw),
        progress=False,
    )
    assert s.steps == 4 and s.finished
    assert "lr: 0.01" in (out / "config.yaml").read_text()


def test_batches_mix_slides_and_data_may_be_the_tile_folder(
    two_slide_shards: Path, tmp_path: Path
) -> None:
    """Shards written one slide after another (43 + 75 patches, one slide per shard): every
    training batch of 16 holds both slides (a uniform batch is single-slide with probability
    < 1e-3), and the run reads the tile output folder given as --data."""
    from pathflow.train.trainer import resolve_data

    tile_out = two_slide_shards.parent
    assert resolve_data(str(tile_out)) == two_slide_shards
    assert resolve_data(str(two_slide_shards)) == two_slide_shards
    out = tmp_path / "mix"
    cfg = _cfg(tile_out, out, SIMCLR_SMALL, steps=4, batch_size=16, global_size=32)
    s = train(cfg, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["slides_per_batch"] for r in rows] == [2, 2, 2, 2]
    assert (s.slides_per_batch_mean, s.slides_per_batch_min) == (2.0, 2)


def test_non_finite_step_leaves_the_dino_centre(sample_shards: Path, tmp_path: Path) -> None:
    """The README's promise: a NaN/inf loss stops the run before any update, the centre
    included."""
    from pathflow.train.distributed import DistInfo
    from pathflow.train.trainer import train_step

    cfg = _cfg(sample_shards, tmp_path, DINO_SMALL, steps=2).resolve()
    method = build_method(cfg, CPU)
    opt = build_optimizer(method, cfg, CPU)
    views = [torch.full((2, 3, 32, 32), float("nan"))] * 2 + [torch.zeros(2, 3, 16, 16)] * 2
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=CPU)
    before = [p.detach().clone() for p in method.parameters()]
    with pytest.raises(NonFiniteLossError):
        train_step(method, method, opt, views, 0, cfg, info, lr=1e-3, wd=0.0)
    assert torch.count_nonzero(method.loss.center) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, method.parameters(), strict=True))
