"""``pathflow eval slide-knn``: numbers worked out by hand from the geometry, slide means of
hand-made HDF5 files, the label join and its errors, and the command end to end."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from pathflow.cli import main
from pathflow.evaluate.slide_knn import (
    SlideKnnConfig,
    evaluate_slides,
    load_slide_embeddings,
    read_labels,
    run_slide_knn,
)
from pathflow.exceptions import ConfigError

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


# ------------------------------------------------------------------------ hand computations


def test_binary_outlier_by_hand() -> None:
    # 1-D: class a at 0, 0 and an outlier at 9; class b at 10, 10, 10. Three stratified folds
    # put one a and one b in each test fold, so whatever the shuffle:
    # - the fold testing the outlier trains on a = {0, 0}, b = {10, 10}: the 3 nearest of 9
    #   are 10, 10, 0 -> P(b) = 2/3, predicted b; the test b (10) sees 10, 10, 0 -> 2/3.
    #   The b and the a tie at 2/3 -> AUC 1/2; recall a = 0, b = 1 -> balanced accuracy 1/2.
    # - the two other folds train on a = {0, 9}, b = {10, 10}: the test a (0) sees 0, 9, 10
    #   -> P(b) = 1/3, predicted a; the test b sees 10, 10, 9 -> 2/3. AUC 1, balanced acc 1.
    x = np.array([[0.0], [0.0], [9.0], [10.0], [10.0], [10.0]])
    y = ["a", "a", "a", "b", "b", "b"]
    res = evaluate_slides(x, y, folds=3, k=3, seed=0)
    assert res.classes == ["a", "b"] and res.counts == {"a": 3, "b": 3}
    assert sorted(np.bincount(res.fold_of).tolist()) == [2, 2, 2]
    np.testing.assert_allclose(res.knn.proba[:, 1], [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    outlier_fold = int(res.fold_of[2])
    expected = [0.5 if f == outlier_fold else 1.0 for f in range(3)]
    assert res.knn.auc.folds == pytest.approx(expected)
    assert res.knn.balanced_accuracy.folds == pytest.approx(expected)
    assert res.knn.auc.mean == pytest.approx(5 / 6)
    assert res.knn.auc.std == pytest.approx(math.sqrt(2) / 6)  # population std over folds
    assert res.knn.balanced_accuracy.mean == pytest.approx(5 / 6)
    assert res.auc_kind == "binary, positive class 'b'"


def test_three_classes_outlier_by_hand() -> None:
    # 2-D, k = 1, two folds, one slide of each class per test fold. a at (0,0) twice, b at
    # (10,0) twice, c at (0,10) and (10,0.5). Fold testing c(10,0.5): its nearest is b
    # (distance 0.5) -> votes a:[1,0,0] b:[0,1,0] c:[0,1,0]; one-vs-rest AUC a = 1,
    # b = (1 + 1/2)/2 = 3/4 (b ties with c), c = 1/2 -> macro 3/4; recalls 1, 1, 0 -> 2/3.
    # Fold testing c(0,10): distances to a 10, to b 14.1, to c(10,0.5) 13.8 -> predicted a;
    # AUC a = 3/4, b = 1, c = 1/2 -> macro 3/4; balanced accuracy 2/3 again.
    x = np.array([[0, 0], [0, 0], [10, 0], [10, 0], [0, 10], [10, 0.5]], dtype=float)
    y = ["a", "a", "b", "b", "c", "c"]
    res = evaluate_slides(x, y, folds=2, k=1, seed=3)
    assert res.knn.auc.folds == pytest.approx([0.75, 0.75])
    assert res.knn.balanced_accuracy.folds == pytest.approx([2 / 3, 2 / 3])
    assert res.knn.auc.std == pytest.approx(0.0)
    assert res.knn.proba[:, 2].tolist() == [0.0] * 6  # c is never anyone's nearest
    assert res.knn.proba[5].tolist() == [0.0, 1.0, 0.0]  # c(10,0.5) -> b
    assert res.knn.proba[4].tolist() == [1.0, 0.0, 0.0]  # c(0,10) -> a
    assert res.auc_kind == "macro one-vs-rest"


def test_separable_slides_are_perfect_for_both() -> None:
    # a at 0..3, b at 10..13, 2 folds: each fold trains on two of each; the 3 nearest of any
    # test slide are its two classmates and one other -> P(own class) = 2/3 everywhere.
    x = np.array([[0.0], [1.0], [2.0], [3.0], [10.0], [11.0], [12.0], [13.0]])
    y = np.array(["a"] * 4 + ["b"] * 4)
    res = evaluate_slides(x, y, folds=2, k=3, seed=1)
    np.testing.assert_allclose(res.knn.proba[:, 1], [1 / 3] * 4 + [2 / 3] * 4)
    for c in (res.knn, res.logreg):
        assert c.auc.folds == [1.0, 1.0] and c.balanced_accuracy.folds == [1.0, 1.0]
    assert (res.logreg.proba.argmax(1) == [0, 0, 0, 0, 1, 1, 1, 1]).all()
    np.testing.assert_allclose(res.logreg.proba.sum(1), 1.0)


def test_folds_are_stratified_and_seeded() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = ["x"] * 10 + ["y"] * 10 + ["z"] * 10
    r1 = evaluate_slides(x, y, folds=5, k=3, seed=7)
    r2 = evaluate_slides(x, y, folds=5, k=3, seed=7)
    r3 = evaluate_slides(x, y, folds=5, k=3, seed=8)
    assert r1.fold_of.tolist() == r2.fold_of.tolist() != r3.fold_of.tolist()
    for f in range(5):  # each test fold holds 2 slides of each class
        assert np.bincount(np.arange(30)[r1.fold_of == f] // 10).tolist() == [2, 2, 2]
    assert r1.knn.auc.folds == r2.knn.auc.folds and len(r1.logreg.auc.folds) == 5


def test_evaluate_errors() -> None:
    x = np.zeros((6, 2))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        evaluate_slides(x, ["a"] * 6, folds=2)
    with pytest.raises(ConfigError, match="class 'b' has 2 slides, fewer than --folds 3; use "
                       "--folds 2 or fewer"):  # fmt: skip
        evaluate_slides(x, ["a"] * 4 + ["b"] * 2, folds=3)
    with pytest.raises(ConfigError, match="--k 5 exceeds the 3 training slides"):
        evaluate_slides(x, ["a"] * 3 + ["b"] * 3, folds=2, k=5)


# ---------------------------------------------------------------------------- feature files


def write_hipt(path: Path, m: int, slide: str | None = None, offset: float = 0.0) -> None:
    """A pathflow-hipt-v1 file whose row ``i`` of each descriptor is ``offset + i`` + the
    column index (cls4k) and whose region_features are ``(d % 4) + 2 r + (p % 2)``."""
    rows = np.arange(m, dtype=np.float32)[:, None] + offset
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "pathflow-hipt-v1"
        if slide is not None:
            f.attrs["slide"] = slide
        f["cls4k"] = rows + np.arange(192, dtype=np.float32)
        f["mean256"] = rows + 2 * np.arange(384, dtype=np.float32)
        f["concat"] = np.concatenate([f["cls4k"][:], f["mean256"][:]], axis=1)
        f["coords"] = np.zeros((m, 2), np.int64)
        r = np.arange(m)[:, None, None]
        p = np.arange(256)[None, :, None]
        d = np.arange(384)[None, None, :]
        f["region_features"] = ((d % 4) + 2 * r + (p % 2)).astype(np.float16)


def test_slide_mean_of_each_dataset(tmp_path: Path) -> None:
    write_hipt(tmp_path / "s1.h5", 3, slide="case-1")  # rows 0, 1, 2 -> mean row 1
    d = np.arange(384)
    emb = load_slide_embeddings([tmp_path])
    assert emb.feature == "cls4k" and emb.names == ["case-1"]  # the slide attr wins
    np.testing.assert_allclose(emb.x[0], 1.0 + np.arange(192))
    np.testing.assert_allclose(load_slide_embeddings([tmp_path], "mean256").x[0], 1 + 2 * d)
    assert load_slide_embeddings([tmp_path], "concat").x.shape == (1, 576)
    # regions r = 0, 1, 2 (mean 2 r = 2) and patches p % 2 (mean 1/2) over every column
    rf = load_slide_embeddings([tmp_path], "region_features")
    np.testing.assert_allclose(rf.x[0], (d % 4) + 2.0 + 0.5)

    plain, regions = tmp_path / "plain", tmp_path / "regions"
    plain.mkdir()
    regions.mkdir()
    with h5py.File(plain / "p1.h5", "w") as f:  # features[i, j] = 2 i + j, i = 0..4
        f["features"] = (2 * np.arange(5)[:, None] + np.arange(8)).astype(np.float32)
        f["coords"] = np.zeros((5, 2), np.int64)
    emb = load_slide_embeddings([plain])
    assert (emb.feature, emb.names) == ("features", ["p1"])  # no slide attr: the file stem
    np.testing.assert_allclose(emb.x[0], 4.0 + np.arange(8))
    with h5py.File(regions / "r1.h5", "w") as f:
        f.attrs["format"] = "pathflow-region-features-v1"
        f["region_features"] = np.stack([np.full((256, 384), 1.0), np.full((256, 384), 4.0)])
        f["region_features"][0, :128] = 3.0  # region 0: half 1, half 3 -> 2; region 1: 4
    emb = load_slide_embeddings([regions])
    assert emb.feature == "region_features"
    np.testing.assert_allclose(emb.x[0], np.full(384, 3.0))


def test_feature_errors(tmp_path: Path) -> None:
    write_hipt(tmp_path / "s1.h5", 2)
    with h5py.File(tmp_path / "p1.h5", "w") as f:
        f["features"] = np.ones((3, 192), np.float32)
    with pytest.raises(ConfigError, match=r"different datasets .*choose one with --feature"):
        load_slide_embeddings([tmp_path])
    with pytest.raises(ConfigError, match=r"s1\.h5: no dataset 'features' for --feature"):
        load_slide_embeddings([tmp_path], "features")
    (tmp_path / "p1.h5").unlink()
    write_hipt(tmp_path / "s2.h5", 2, slide="s1.svs")
    with pytest.raises(ConfigError, match=r"slide 's1\.svs' is also in"):
        load_slide_embeddings([tmp_path])
    with pytest.raises(ConfigError, match=r"no \.h5 feature files"):
        load_slide_embeddings([tmp_path / "empty"])


# ------------------------------------------------------------------------- labels and runs


def make_cohort(root: Path, per_class: int = 4, extra: tuple[str, ...] = ()) -> Path:
    """Slides luad0.. (cls4k around 0) and lusc0.. (around 100), plus ``extra`` slides."""
    feats = root / "features"
    feats.mkdir(parents=True)
    for i in range(per_class):
        write_hipt(feats / f"luad{i}.h5", 2, offset=float(i))
        write_hipt(feats / f"lusc{i}.h5", 2, offset=100.0 + i)
    for name in extra:
        write_hipt(feats / f"{name}.h5", 2, offset=50.0)
    return feats


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "slide,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{s},{lab}\n" for s, lab in rows))
    return path


def cohort_rows(per_class: int = 4) -> list[tuple[str, str]]:
    return [(f"luad{i}.svs", "LUAD") for i in range(per_class)] + [
        (f"lusc{i}", "LUSC") for i in range(per_class)
    ]


def test_missing_files_and_labels_are_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    feats = make_cohort(tmp_path, extra=("nolabel1", "nolabel2"))
    csv = write_csv(tmp_path / "slides.csv", [*cohort_rows(), ("ghost", "LUAD"), ("x", "")])
    values = {"inputs": [str(feats)], "labels": str(csv), "folds": 2, "k": 3,
              "out": str(tmp_path / "out"), "plot": False}  # fmt: skip
    cfg = SlideKnnConfig.build({}, values)
    with caplog.at_level(logging.WARNING, logger="pathflow.eval"):
        result = run_slide_knn(cfg)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert warnings[0] == (f"1 slide(s) in {csv} have no features file and were left out: ghost")
    assert warnings[1] == (f"2 features file(s) have no label in {csv} and were left out: "
                           "nolabel1, nolabel2")  # fmt: skip
    assert len(result.slides) == 8 and result.evaluation.counts == {"LUAD": 4, "LUSC": 4}
    assert result.evaluation.knn.auc.mean == 1.0 and result.plot_path is None
    report = json.loads(result.metrics_path.read_text())
    assert report["missing_features"] == ["ghost"]
    assert report["unlabelled"] == ["nolabel1", "nolabel2"]


def test_label_errors_name_the_file(tmp_path: Path) -> None:
    feats = make_cohort(tmp_path, per_class=2)
    out = str(tmp_path / "out")

    def run(csv: Path, **extra: object) -> None:
        values = {"inputs": [str(feats)], "labels": str(csv), "out": out, **extra}
        run_slide_knn(SlideKnnConfig.build({}, values))

    one = write_csv(tmp_path / "one.csv", [(f"luad{i}", "LUAD") for i in range(2)])
    with pytest.raises(ConfigError, match=r"one\.csv: need at least 2 classes"):
        run(one)
    few = write_csv(tmp_path / "few.csv", cohort_rows(2))
    with pytest.raises(ConfigError, match=r"few\.csv: class 'LUAD' has 2 slides, fewer than "
                       r"--folds 10; use --folds 2 or fewer"):  # fmt: skip
        run(few)
    run(few, folds=2, k=1)  # fine with fewer folds
    cols = write_csv(tmp_path / "cols.csv", cohort_rows(2), header="slide_id,label")
    with pytest.raises(ConfigError, match=r"cols\.csv: no column 'slide' .*--slide-column"):
        run(cols)
    run(cols, folds=2, k=1, slide_column="slide_id")
    twice = write_csv(tmp_path / "twice.csv", [("a", "LUAD"), ("a.svs", "LUSC")])
    with pytest.raises(ConfigError, match=r"twice\.csv: slide 'a.svs' has two labels"):
        read_labels(twice)
    with pytest.raises(ConfigError, match=r"nope\.csv: labels file not found"):
        run(tmp_path / "nope.csv")
    tabs = tmp_path / "tabs.tsv"
    tabs.write_text("case\tsubtype\nluad0\tLUAD\n")
    assert read_labels(tabs, "case", "subtype") == {"luad0": "LUAD"}


# ---------------------------------------------------------------------------------- the CLI


def test_cli_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feats = make_cohort(tmp_path, per_class=6)
    csv = write_csv(tmp_path / "slides.csv", cohort_rows(6))
    out = tmp_path / "out"
    argv = ["eval", "slide-knn", str(feats), "--labels", str(csv), "--out", str(out),
            "--folds", "3", "--k", "3", "-q"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "slide-knn on cls4k: 12 slides (LUAD 6, LUSC 6)" in printed
    assert "knn (k=3)" in printed and "logreg (C=1)" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert (report["feature"], report["folds"], report["k"], report["seed"]) == ("cls4k", 3, 3, 0)
    assert report["slides_per_class"] == {"LUAD": 6, "LUSC": 6}
    assert report["embedding_dim"] == 192 and report["inputs"] == [str(feats)]
    for name in ("knn", "logreg"):
        assert report[name]["auc"] == {"mean": 1.0, "std": 0.0, "folds": [1.0, 1.0, 1.0]}
        assert report[name]["balanced_accuracy"]["mean"] == 1.0
    assert sorted(set(report["fold_of_slide"].values())) == [0, 1, 2]
    text = (out / "metrics.txt").read_text()
    assert text.startswith("slide-knn on cls4k") and "1.000 ± 0.000" in text
    config = (out / "config.yaml").read_text()
    assert "folds: 3" in config and "feature: auto" in config
    assert (out / "slide_knn.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_yaml_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feats = make_cohort(tmp_path, per_class=3)
    csv = write_csv(tmp_path / "slides.csv", cohort_rows(3))
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(f"slide_knn:\n  labels: {csv}\n  folds: 3\n  k: 1\n  plot: false\n")
    out = tmp_path / "out"
    argv = ["eval", "slide-knn", str(feats), "--config", str(yaml_file), "--k", "2", "-o",
            str(out), "--feature", "mean256"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert (report["folds"], report["k"], report["feature"]) == (3, 2, "mean256")  # YAML kept
    assert not (out / "slide_knn.png").exists()
    capsys.readouterr()

    bad = write_csv(tmp_path / "bad.csv", cohort_rows(3), header="name,label")
    rc = main(["eval", "slide-knn", str(feats), "--labels", str(bad), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("pathflow eval slide-knn: error: ") and str(bad) in err[0]
    rc = main(["eval", "slide-knn", str(feats), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--labels" in err[0]


def test_imports_stay_light() -> None:
    # Building the CLI parser does not load numpy or the evaluation code (slide-knn's
    # options live in a numpy-free module), and the module itself defers sklearn / matplotlib.
    code = (
        "import sys\nfrom pathflow.cli import build_parser\n"
        "build_parser('tile').parse_args(['tile', 'x.svs'])\n"
        "assert 'numpy' not in sys.modules and 'pathflow.evaluate.slide_knn' not in sys.modules\n"
        "import pathflow.evaluate.slide_knn\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
