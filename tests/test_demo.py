"""``pathflow demo`` (the README's main command), shortened to a few training steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, cmu_path: Path) -> None:
    from pathflow.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "4", "--batch-size", "8",
                 "--device", "cpu"]) == 0  # fmt: skip
    report = (out / "REPORT.md").read_text()
    assert "310 patches" in report and "KNN metrics" in report
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["finished"]
    assert (out / "train" / "backbone.safetensors").is_file()
    assert sorted(p.name for p in (out / "features" / "features").glob("*.h5")) == [
        "cmu_small_region.h5", "slide_with_ink.h5"]  # fmt: skip
    # the report names the folder the features really are in
    extract_row = next(r for r in report.splitlines() if r.startswith("| extract |"))
    named = Path(extract_row.split(" in ", 1)[1].split(" |", 1)[0])
    assert named == out / "features" / "features" and (named / "cmu_small_region.h5").is_file()
    metrics = json.loads((out / "eval" / "knn" / "metrics.json").read_text())
    assert metrics["n_train"] + metrics["n_test"] == 310
    assert metrics["metrics"]["accuracy"] > 0.8  # two very different sources
    assert (out / "eval" / "tsne_test.png").stat().st_size > 10_000
    # the same evaluations on the seeded random initialisation, side by side in the report
    base = json.loads((out / "eval_random_init" / "knn" / "metrics.json").read_text())
    assert base["weights"] is None and base["n_test"] == metrics["n_test"]
    assert "## Trained vs random init" in report
    assert "| metric | trained | random init | chance |" in report
    knn_row = next(r for r in report.splitlines() if r.startswith("| KNN accuracy"))
    acc, acc0 = metrics["metrics"]["accuracy"], base["metrics"]["accuracy"]
    assert f"| {acc:.3f} | {acc0:.3f} |" in knn_row
    # label-free augmentation retrieval, trained and random init, chance 1/310
    for d in ("eval", "eval_random_init"):
        ret = json.loads((out / d / "retrieval" / "metrics.json").read_text())
        assert ret["n_images"] == 310 and 0.0 <= ret["metrics"]["top1"] <= 1.0
    assert ret["weights"] is None
    assert "| retrieval top-1 |" in report and "| retrieval top-5 |" in report
    assert "| 0.0032 |" in report
    # the paired sign test covers every patch (better + worse + tied = 310)
    line = next(r for r in report.splitlines() if r.startswith("Paired over the patches"))
    nums = [int(w.strip(",();")) for w in line.split() if w.strip(",();").isdigit()]
    assert sum(nums[:3]) == 310, line
    assert "sign test p = " in line
