"""``pathflow eval knn|linear`` end to end on a small synthetic ImageFolder dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
from pathflow.cli import main
from PIL import Image

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

ARCH = "test_vit"
CLASSES = ("blue", "red", "stripes")


def make_dataset(root: Path, n: int, seed: int, classes: tuple[str, ...] = CLASSES) -> Path:
    """``n`` noisy 64-px images per class (JPEG, PNG and TIFF mixed)."""
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 60, (64, 64, 3)).astype(np.uint8)
            if c == "red":
                img[..., 0] += 190
            elif c == "blue":
                img[..., 2] += 190
            else:
                img[:, ::8] += 190
            Image.fromarray(img).save(root / c / f"{c}{i:03d}.{('jpg', 'png', 'tif')[i % 3]}")
    return root


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def test_knn_on_split_folder_matches_library(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pathflow.evaluate.knn import knn_classify
    from pathflow.evaluate.metrics import classification_metrics
    from pathflow.evaluate.splits import stratified_split

    data = make_dataset(tmp_path / "data", 20, 0)
    (data / "red" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    assert run_cli("eval", "knn", data, "--arch", ARCH, "--out", out, "-q") == 0
    printed = capsys.readouterr().out
    assert "knn (48 train / 12 test)" in printed and "stripes" in printed
    report = json.loads((out / "knn" / "metrics.json").read_text())
    assert report["classes"] == list(CLASSES) and report["skipped_images"] == 1
    assert report["params"] == {"k": 20, "temperature": 0.07}
    assert (report["n_train"], report["n_test"]) == (48, 12)
    # Recompute from the cached features: same split, same KNN, same numbers.
    with h5py.File(out / "features" / "data.h5") as f:
        feats, labels = f["features"][:], f["labels"][:]
        assert feats.shape == (60, 64) and f.attrs["arch"] == ARCH
    tr, te = stratified_split(labels, 0.2, 0)
    res = knn_classify(feats[tr], labels[tr], feats[te], 3, k=20, temperature=0.07)
    m = classification_metrics(labels[te], res.predictions, res.scores, CLASSES)
    assert report["metrics"]["accuracy"] == pytest.approx(m.accuracy)
    assert report["metrics"]["macro_auc"] == pytest.approx(m.macro_auc)
    assert report["metrics"]["confusion"] == m.confusion
    assert m.accuracy == 1.0  # the colours are trivially separable, even for a random ViT
    assert (out / "knn" / "metrics.txt").read_text().startswith("knn on test_vit")
    assert "arch: test_vit" in (out / "knn" / "config.yaml").read_text()
    with Image.open(out / "tsne_test.png") as im:
        assert im.format == "PNG"


def test_linear_with_train_test_reuses_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train = make_dataset(tmp_path / "train", 16, 1)
    test = make_dataset(tmp_path / "test", 6, 2)
    out = tmp_path / "out"
    args = ("eval", "linear", "--train", train, "--test", test, "--arch", ARCH, "--out", out,
            "--weight-decays", "1e-4", "1e-2", "--max-iter", "100", "-q")  # fmt: skip
    assert run_cli(*args, "--no-plot") == 0
    report = json.loads((out / "linear" / "metrics.json").read_text())
    assert (report["n_train"], report["n_test"]) == (48, 18)
    assert report["metrics"]["accuracy"] == 1.0 and report["metrics"]["macro_f1"] == 1.0
    assert [s["weight_decay"] for s in report["params"]["sweep"]] == [1e-2, 1e-4]
    assert not (out / "tsne_test.png").exists()
    stamp = (out / "features" / "train.h5").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="pathflow.eval"):
        assert run_cli(*args) == 0
    assert "reusing cached features" in caplog.text
    assert (out / "features" / "train.h5").stat().st_mtime_ns == stamp
    assert (out / "tsne_test.png").is_file()


def test_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli("eval", "knn", tmp_path / "nope", "--arch", ARCH) == 2
    err = capsys.readouterr().err
    assert "nope: not a folder" in err and err.count("\n") == 1
    train = make_dataset(tmp_path / "train", 2, 0, ("a", "b"))
    test = make_dataset(tmp_path / "test", 2, 0, ("a", "c"))
    assert run_cli("eval", "knn", "--train", train, "--test", test, "--arch", ARCH, "-q",
                   "--out", tmp_path / "o") == 1  # fmt: skip
    assert "test: classes ['c'] are not in the training set" in capsys.readouterr().err
    assert run_cli("eval", "knn", train, "--arch", ARCH, "--k", "0") == 2
    assert run_cli("eval", "knn", train) == 2
    assert "--arch" in capsys.readouterr().err
