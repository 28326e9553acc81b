"""Published files get ``0o666 & ~umask`` (a colleague sharing the job folder can read them);
``mkstemp``'s private 0600 never leaks into an output. Real processes, real umasks."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PATHFLOW_THREADS": "2"}


def _run(umask: int, *args: str | Path) -> None:
    cmd = [sys.executable, "-m", "pathflow", *map(str, args)]
    res = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        preexec_fn=lambda: os.umask(umask),  # the child's own umask
    )
    assert res.returncode == 0, res.stderr


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_published_files_follow_the_umask(tmp_path: Path, cmu_path: Path, umask: int) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "run"
    _run(umask, "tile", cmu_path, "--out", out, "--shards", "-q")
    _run(umask, "extract", out, "--arch", "resnet18", "--image-size", "32", "--batch-size", "16",
         "--device", "cpu", "--out", out, "-q")  # fmt: skip
    train = tmp_path / "train"
    _run(umask, "train", "--method", "simclr", "--arch", "resnet18", "--data", out / "shards",
         "--out", train, "--steps", "2", "--batch-size", "8", "--global-size", "32",
         "--device", "cpu", "--num-workers", "0", "--loader-backend", "torch")  # fmt: skip
    modes = {**_modes(out), **{f"train/{k}": v for k, v in _modes(train).items()}}
    want = 0o666 & ~umask
    # every kind of output a colleague needs: coords, masks, shards + index, manifests,
    # configs, features, checkpoint, exported weights, metrics
    for name in ("coords/cmu_small_region.h5", "masks/cmu_small_region.png",
                 "shards/shards.json", "manifest.csv", "config.yaml",
                 "features/cmu_small_region.h5", "train/checkpoint.pt",
                 "train/backbone.safetensors", "train/summary.json", "train/metrics.jsonl",
                 "train/config.yaml"):  # fmt: skip
        assert name in modes, sorted(modes)
    assert any(k.startswith("shards/") and k.endswith(".tar") for k in modes)
    wrong = {k: oct(v) for k, v in modes.items() if v != want}
    assert not wrong, f"want {oct(want)}: {wrong}"
