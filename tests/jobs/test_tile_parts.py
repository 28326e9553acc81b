"""Three cooperating ``pathflow tile --part i/3`` jobs (plus a duplicate of one, and one
killed with SIGKILL and re-run) on one job folder, merged, equal a single-process run."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from jobs_cohort import COHORT_PARTS, TILE_ARGS
from pathflow.cli import main
from pathflow.data.shardset import ShardSet

SHARD_ARGS = ["--shards", "--shard-samples", "60"]


def _coords(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    with h5py.File(path, "r") as f:
        attrs = {k: np.asarray(v).tolist() for k, v in f["coords"].attrs.items()}
        return f["coords"][:], f["tissue_fraction"][:], attrs


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return {r["slide"]: r for r in csv.DictReader(f)}


def _shard_points(shards: Path) -> list[tuple[str, int, int]]:
    ss = ShardSet(shards)
    _, metas = ss.read(np.arange(len(ss)))
    return sorted((m["slide"], m["x"], m["y"]) for m in metas)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, cohort: Path) -> Path:
    out = tmp_path_factory.mktemp("single")
    assert main(["tile", str(cohort), "--out", str(out), *TILE_ARGS, *SHARD_ARGS]) == 0
    return out


def _tile(cohort: Path, job: Path, part: str, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pathflow", "tile", str(cohort), "--out", str(job),
           "--part", part, *TILE_ARGS, *SHARD_ARGS]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def test_concurrent_parts_killed_and_rerun_equal_one_process(
    tmp_path: Path, cohort: Path, reference: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job"
    logs = {k: tmp_path / f"{k}.log" for k in ("p0", "p1", "p1dup", "p2", "p2again")}
    procs = {
        "p2": _tile(cohort, job, "2/3", logs["p2"]),
        "p0": _tile(cohort, job, "0/3", logs["p0"]),
        "p1": _tile(cohort, job, "1/3", logs["p1"]),
        "p1dup": _tile(cohort, job, "1/3", logs["p1dup"]),  # a duplicate job of part 1
    }
    # Kill part 2 as soon as it holds a claim on one of its slides (mid-slide).
    deadline = time.time() + 60
    locks = [job / "claims" / f"{s}.lock" for s, p in COHORT_PARTS.items() if p == 2]
    while not any(lk.exists() for lk in locks) and time.time() < deadline:
        assert procs["p2"].poll() is None, logs["p2"].read_text()
        time.sleep(0.02)
    procs["p2"].send_signal(signal.SIGKILL)
    assert procs["p2"].wait() == -signal.SIGKILL
    for k in ("p0", "p1", "p1dup"):
        assert procs[k].wait(timeout=120) == 0, logs[k].read_text()

    # Part 2 is unfinished: merge refuses it by name; status shows it.
    capsys.readouterr()
    assert main(["merge", str(job)]) == 1
    err = capsys.readouterr().err
    assert "part-0002-of-0003" in err and len(err.strip().splitlines()) == 1
    assert not (job / "manifests" / "part-0002-of-0003.done").exists()

    # Re-run the killed part: it takes over its dead claim and finishes.
    again = _tile(cohort, job, "2/3", logs["p2again"])
    assert again.wait(timeout=120) == 0, logs["p2again"].read_text()
    assert main(["merge", str(job)]) == 0

    # The duplicate input is reported once per job, naming both paths.
    dup_lines = [ln for ln in logs["p0"].read_text().splitlines() if "same file" in ln]
    assert len(dup_lines) == 1
    assert "again.svs" in dup_lines[0] and "cmu_b.svs" in dup_lines[0]

    # Same slides, statuses and patch counts as one process; same coordinate files.
    ref_rows, job_rows = _manifest(reference), _manifest(job)
    assert sorted(job_rows) == sorted(COHORT_PARTS) == sorted(ref_rows)
    for sid, row in ref_rows.items():
        assert (job_rows[sid]["status"], job_rows[sid]["patches"]) == (
            row["status"], row["patches"]
        )  # fmt: skip
    ref_points, job_points = set(), set()
    for sid in COHORT_PARTS:
        c1, f1, a1 = _coords(reference / "coords" / f"{sid}.h5")
        c2, f2, a2 = _coords(job / "coords" / f"{sid}.h5")
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(f1, f2)
        a1.pop("save_path"), a2.pop("save_path")
        assert repr(sorted(a1.items())) == repr(sorted(a2.items()))  # nan-aware
        ref_points |= {(sid, int(x), int(y)) for x, y in c1}
        job_points |= {(sid, int(x), int(y)) for x, y in c2}
    assert job_points == ref_points and len(ref_points) > 100

    # The merged shards.json lists every part's shards in place (relative paths, DALI
    # indexes); they hold exactly the patches of the single run.
    doc = json.loads((job / "shards" / "shards.json").read_text())
    assert {s["name"].split("/")[0] for s in doc["shards"]} <= {"part-0000", "part-0001",
                                                                "part-0002"}  # fmt: skip
    for s in doc["shards"]:
        assert (job / "shards" / s["index_file"]).is_file()
    points = _shard_points(job / "shards")
    assert points == _shard_points(reference / "shards")
    assert set(points) == ref_points and len(points) == len(ref_points)
    assert doc["samples"] == len(points)

    # Claims kept the duplicate job from redoing work: each slide of part 1 was tiled
    # (a row that is not a resume) exactly once across both jobs.
    lines = (job / "manifests" / "part-0001-of-0003.jsonl").read_text().splitlines()
    rows = [json.loads(ln) for ln in lines]
    fresh = [r["slide"] for r in rows if r["stage"] == "tile" and not r["resumed"]]
    assert sorted(set(fresh)) == ["cmu_d", "slide_d"]
    assert sorted(fresh) == sorted(set(fresh))

    # A part with other options is refused in one line; the job folder is untouched.
    capsys.readouterr()
    args = ["tile", str(cohort), "--out", str(job), "--part", "0/3", *TILE_ARGS, *SHARD_ARGS]
    assert main([*args, "--patch", "64"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "config.yaml" in lines[0] and "patch: 128 there, 64 here" in lines[0]

    assert main(["status", str(job)]) == 0
    status = capsys.readouterr().out
    assert "3 part(s), 3 finished" in status
    assert "tile coords: 6 done, 0 failed, 0 running, 0 stale, 0 pending" in status
    assert "shards: 3 done" in status and "merged shards.json: yes" in status


def test_part_auto_from_slurm_array_variables(
    tmp_path: Path, cohort: Path, reference: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k in ("PBS_ARRAY_INDEX", "PBS_ARRAYID", "LSB_JOBINDEX", "JOB_COMPLETION_INDEX",
              "PATHFLOW_PART_COUNT", "PATHFLOW_PART_MIN", "SLURM_ARRAY_TASK_COUNT"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    # sbatch --array=1-3: SLURM_ARRAY_TASK_ID 2 is the second task -> part 1 of 3
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MAX", "3")
    job = tmp_path / "job"
    assert main(["tile", str(cohort), "--out", str(job), "--part", "auto", *TILE_ARGS]) == 0
    done = json.loads((job / "manifests" / "part-0001-of-0003.done").read_text())
    mine = sorted(s for s, p in COHORT_PARTS.items() if p == 1)
    assert sorted(done["slides"]) == mine
    assert sorted(p.stem for p in (job / "coords").iterdir()) == mine
    for sid in mine:
        np.testing.assert_array_equal(
            _coords(job / "coords" / f"{sid}.h5")[0], _coords(reference / "coords" / f"{sid}.h5")[0]
        )
    assert not (job / "manifest.csv").exists()  # written by pathflow merge
    assert main(["merge", str(job)]) == 1  # parts 0 and 2 never ran


def test_single_run_appends_jsonl_and_writes_csv_once(reference: Path) -> None:
    text = (reference / "manifests" / "part-0000-of-0001.jsonl").read_text()
    rows = [json.loads(ln) for ln in text.splitlines()]
    csv_rows = _manifest(reference)
    # one line per slide as it finished, then the final rows after the shards phase
    assert sorted({r["slide"] for r in rows}) == sorted(csv_rows)
    final = {r["slide"]: r for r in rows}
    for sid, r in csv_rows.items():
        assert str(final[sid]["shard_samples"]) == r["shard_samples"]
    assert os.path.isfile(reference / "manifests" / "part-0000-of-0001.done")


def test_dask_executor_part_equals_one_process(
    tmp_path: Path, cohort: Path, reference: Path
) -> None:
    pytest.importorskip("distributed")
    job = tmp_path / "job"
    args = ["tile", str(cohort), "--out", str(job), "--part", "2/3", "--executor", "dask"]
    assert main([*args, *TILE_ARGS]) == 0  # LocalCluster of 1 worker process on 127.0.0.1
    mine = sorted(s for s, p in COHORT_PARTS.items() if p == 2)
    done = json.loads((job / "manifests" / "part-0002-of-0003.done").read_text())
    assert sorted(done["slides"]) == mine and done["status"] == {"ok": 2}
    for sid in mine:
        np.testing.assert_array_equal(
            _coords(job / "coords" / f"{sid}.h5")[0], _coords(reference / "coords" / f"{sid}.h5")[0]
        )
    assert not list((job / "claims").glob("*.lock"))  # every claim released
