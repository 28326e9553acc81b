"""``pathflow extract`` re-runs: options that change the features are never silently mixed
with (or resumed as) the old features of a folder; weights of another model family are named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pathflow.cli import main
from pathflow.extract.writer import read_features

ARCH = "test_vit"  # timm's 0.3M-parameter ViT, 64-d features
SLIDE = "cmu_small_region"


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def tile(*args: str | Path) -> None:
    """``pathflow tile`` in a child process (cuCIM must not be imported after a CUDA torch)."""
    cmd = [sys.executable, "-m", "pathflow", "tile", *map(str, args), "-q"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr


@pytest.fixture(scope="module")
def tiled(tmp_path_factory: pytest.TempPathFactory, cmu_path: Path) -> Path:
    """cmu-small tiled twice: ``shards/shards`` (43 real patches) and ``coords/coords``."""
    root = tmp_path_factory.mktemp("tiled")
    tile(cmu_path, "--out", root / "shards", "--shards")
    tile(cmu_path, "--out", root / "coords")
    return root


def _one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("pathflow extract: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_changed_feature_options_are_refused(
    tiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards, out = tiled / "shards" / "shards", tmp_path / "out"
    h5 = out / "features" / f"{SLIDE}.h5"
    base = ("extract", shards, "--arch", ARCH, "--out", out, "--device", "cpu", "-q")
    assert run_cli(*base) == 0
    stamp = h5.stat().st_mtime_ns
    # options that do not change the features: resumed
    assert run_cli(*base, "--batch-size", "7", "--workers", "1", "--no-compile",
                   "--quality", "50", "--precision", "fp32") == 0  # fmt: skip
    assert "resumed 1; 0 images embedded" in capsys.readouterr().err
    assert h5.stat().st_mtime_ns == stamp
    # another normalisation / format / precision: one line naming the options and the folder
    for extra, named in ((("--norm", "hipt"), "--norm auto (now hipt)"),
                         (("--format", "pt"), "--format h5 (now pt)"),
                         (("--precision", "bf16", "--image-size", "64"),
                          "--image-size none (now 64), --precision fp32 (now bf16)")):  # fmt: skip
        assert run_cli(*base, *extra) == 2
        line = _one_line_error(capsys.readouterr().err)
        assert f"{out / 'features'}/ holds features of another setup" in line
        assert named in line and "--overwrite" in line
    assert h5.stat().st_mtime_ns == stamp and not list((out / "features").glob("*.pt"))
    assert yaml.safe_load((out / "features" / "extract.yaml").read_text())["norm"] == "auto"
    # --overwrite redoes the folder: the old format's files go, the saved config follows
    assert run_cli(*base, "--format", "pt", "--overwrite") == 0
    assert sorted(p.name for p in (out / "features").iterdir()) == [f"{SLIDE}.pt",
                                                                    "extract.yaml"]  # fmt: skip
    assert read_features(out / "features" / f"{SLIDE}.pt")[0].shape == (43, 64)
    for saved in (out / "extract.yaml", out / "features" / "extract.yaml"):
        assert yaml.safe_load(saved.read_text())["format"] == "pt"
    assert run_cli(*base, "--format", "pt") == 0
    assert "resumed 1" in capsys.readouterr().err


def test_reading_options_count_for_coordinate_inputs(
    tiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """From coordinates + slides the patches are encoded before the model: another
    ``--quality`` gives other pixels, so other features (from shards it changes nothing)."""
    out = tmp_path / "out"
    base = ("extract", tiled / "coords" / "coords", "--arch", ARCH, "--out", out, "-q")
    assert run_cli(*base) == 0
    first = read_features(out / "features" / f"{SLIDE}.h5")[0]
    assert run_cli(*base, "--quality", "40") == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "--quality 90 (now 40)" in line
    assert run_cli(*base, "--quality", "40", "--overwrite") == 0
    second = read_features(out / "features" / f"{SLIDE}.h5")[0]
    assert first.shape == second.shape and abs(first - second).max() > 1e-3


def test_each_features_dir_keeps_its_own_config(
    tiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run into another --features-dir of the same --out does not hide the first folder's
    setup: a later run into the first folder with the second's model is still refused."""
    shards, out = tiled / "shards" / "shards", tmp_path / "out"
    assert run_cli("extract", shards, "--arch", ARCH, "--out", out, "-q") == 0
    assert run_cli("extract", shards, "--arch", "test_resnet", "--out", out, "--features-dir",
                   "resnet", "-q") == 0  # fmt: skip
    assert run_cli("extract", shards, "--arch", "test_resnet", "--out", out, "-q") == 2
    line = _one_line_error(capsys.readouterr().err)
    assert f"--arch {ARCH} (now test_resnet)" in line
    assert read_features(out / "features" / f"{SLIDE}.h5")[2]["arch"] == ARCH
    assert read_features(out / "resnet" / f"{SLIDE}.h5")[2]["arch"] == "test_resnet"


def test_vit_weights_for_a_resnet_name_the_mismatch(
    tiled: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    w = tmp_path / "vit.safetensors"
    save_file(timm.create_model(ARCH, num_classes=0).state_dict(), w)
    assert run_cli("extract", tiled / "shards" / "shards", "--arch", "test_resnet",
                   "--weights", w, "--out", tmp_path / "out", "-q") == 1  # fmt: skip
    line = _one_line_error(capsys.readouterr().err)
    assert f"{w}: the weights file looks like a ViT (keys " in line
    assert "pos_embed" in line and line.endswith("but --arch is test_resnet")
    assert "img_size" not in line
    assert not (tmp_path / "out" / "features").exists()
