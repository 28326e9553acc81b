"""Every image method through ``pathflow train`` on the real sample shards: a run stopped
after 2 steps and resumed for the third ends with the same method state (weights, EMA
targets, queues, prototypes, centres), tensor for tensor, and the same logged metrics per
step, as an uninterrupted 3-step run.

Each method runs with tiny heads (its own ``--METHOD.NAME`` flags) and settings that make its
state change across the interruption: MoCo's queue of 8 keys wraps (4 keys a step), SwAV's
queue of 8 rows fills at steps 0-1 and is read at step 2 with prototypes training from step 1,
DINO's last layer trains from step 1 and its teacher temperature warms up over 2 steps,
and the EMA targets (BYOL, CluBYOL, MoCo, DINO) move every step. Batch 4 of 43 patches: the
run stops in the middle of its first epoch, so the loader resumes mid-epoch too.

``hipt4k`` trains on region features, not images; tests/train/test_train_hipt4k.py covers it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pathflow.cli import main
from pathflow.train.checkpoint import load_checkpoint
from pathflow.train.methods import list_methods, method_class

IMAGE_METHODS = [m for m in list_methods() if method_class(m).data_kind != "region_features"]

# Tiny heads; state that changes across the interruption at step 2 of 3.
OPTIONS: dict[str, dict[str, Any]] = {
    "barlowtwins": {"proj-dims": "32-32-32"},
    "byol": {"proj-hidden-dim": 32, "proj-dim": 16, "pred-hidden-dim": 32},
    "clubyol": {
        "proj-hidden-dim": 32, "proj-dim": 16, "pred-hidden-dim": 32,
        "cluster-hidden-dim": 8, "num-clusters": 6,
    },
    "clusiam": {
        "proj-hidden-dim": 32, "proj-dim": 16, "pred-hidden-dim": 8,
        "cluster-hidden-dim": 8, "num-clusters": 6,
    },
    "dino": {
        "out-dim": 64, "freeze-last-layer-steps": 1, "warmup-teacher-temp-steps": 2,
    },
    "mocov2": {"proj-hidden-dim": 32, "proj-dim": 16, "queue-size": 8},
    "mocov3": {"proj-hidden-dim": 32, "proj-dim": 16},
    "sgcl": {"proj-dim": 16, "num-negatives": 4, "num-clusters": 4, "kmeans-runs": 2},
    "simclr": {"proj-hidden-dim": 32, "proj-dim": 16},
    "simsiam": {"proj-hidden-dim": 32, "proj-dim": 32, "pred-hidden-dim": 16},
    "swav": {
        "proj-hidden-dim": 32, "proj-dim": 16, "n-prototypes": 16, "queue-length": 8,
        "queue-start-steps": 0, "freeze-prototypes-steps": 1,
    },
}  # fmt: skip

# Logged per step but not a function of the training state.
TIMING = {"img_per_s", "mem_gb", "time"}


def _args(method: str, shards: Path, out: Path) -> list[str]:
    args = [
        "train", "--method", method, "--data", str(shards), "--out", str(out),
        "--arch", "test_vit", "--img-size", "32", "--global-size", "32", "--local-size", "16",
        "--num-local", "2", "--batch-size", "4", "--steps", "3", "--warmup-steps", "1",
        "--device", "cpu", "--precision", "fp32", "--loader-backend", "torch",
        "--num-workers", "0", "--log-every", "1", "--no-tensorboard", "-q",
    ]  # fmt: skip
    for name, value in OPTIONS[method].items():
        args += [f"--{method}.{name}", str(value)]
    return args


def _rows(out: Path) -> dict[int, dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {
        r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in map(json.loads, lines)
    }


def test_every_image_method_has_small_options() -> None:
    assert "hipt4k" not in IMAGE_METHODS
    assert sorted(OPTIONS) == sorted(IMAGE_METHODS)


@pytest.mark.parametrize("method", IMAGE_METHODS)
def test_cli_resume_equals_the_uninterrupted_run(
    method: str, sample_shards: Path, tmp_path: Path
) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(_args(method, sample_shards, full)) == 0
    assert main([*_args(method, sample_shards, part), "--stop-after", "2"]) == 0
    stopped = load_checkpoint(part / "checkpoint.pt")
    assert stopped["step"] == 2
    assert main([*_args(method, sample_shards, part), "--resume"]) == 0

    want, got = _rows(full), _rows(part)
    assert sorted(want) == sorted(got) == [1, 2, 3]  # the interrupted run's rows kept once
    for step in (1, 2, 3):
        assert got[step] == want[step], (step, got[step], want[step])
    a = load_checkpoint(full / "checkpoint.pt")
    b = load_checkpoint(part / "checkpoint.pt")
    assert a["step"] == b["step"] == 3
    assert a["method"].keys() == b["method"].keys()
    for k, v in a["method"].items():
        assert torch.equal(v, b["method"][k]), k
    # the state moved at the resumed step: the comparison is not vacuous
    changed = {k for k, v in stopped["method"].items() if not torch.equal(v, b["method"][k])}
    assert any(k.endswith("weight") for k in changed), changed
    if method == "swav":
        assert [want[s]["queue_in_use"] for s in (1, 2, 3)] == [0.0, 0.0, 1.0]
    if method == "mocov2":
        assert int(stopped["method"]["queue.ptr"]) == 0 and int(a["method"]["queue.ptr"]) == 4
