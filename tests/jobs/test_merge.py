"""``pathflow merge`` / ``status`` of a job folder, and the per-part JSONL manifests."""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from jobs_cohort import TILE_ARGS
from pathflow.cli import main
from pathflow.data.shardset import ShardSet
from pathflow.jobs.manifest import ManifestLog, latest_rows, manifest_path, read_manifest
from pathflow.jobs.partition import part_of

SHARDS = ["--shards", "--shard-samples", "40"]


@pytest.fixture(scope="module")
def two_slides(tmp_path_factory: pytest.TempPathFactory, cmu_path: Path, ink_path: Path) -> Path:
    d = tmp_path_factory.mktemp("two")
    shutil.copyfile(cmu_path, d / "cmu_b.svs")
    shutil.copyfile(ink_path, d / "ink_a.jpeg")
    assert (part_of("ink_a", 2), part_of("cmu_b", 2)) == (0, 1)
    return d


def _tile(slides: Path, job: Path, part: str) -> int:
    return main(["tile", str(slides), "--out", str(job), "--part", part, *TILE_ARGS, *SHARDS])


def test_merge_refuses_missing_part_then_merges_idempotently(
    tmp_path: Path, two_slides: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = tmp_path / "job"
    assert _tile(two_slides, job, "0/2") == 0
    capsys.readouterr()

    # Part 1 never ran: refused, naming it, and nothing written.
    assert main(["merge", str(job)]) == 1
    err = capsys.readouterr().err.strip()
    assert "part-0001-of-0002" in err and "--allow-partial" in err and "\n" not in err
    assert not (job / "manifest.csv").exists() and not (job / "shards" / "shards.json").exists()
    assert main(["status", str(job)]) == 0
    out = capsys.readouterr().out
    assert "2 part(s), 1 finished (not finished: 1)" in out
    assert "tile coords: 1 done, 0 failed, 0 running, 0 stale, 1 pending" in out

    # Part 1's slide claimed by a job on another node: running while its heartbeat is fresh,
    # stale once it stops (a job that died).
    lock = job / "claims" / "cmu_b.lock"
    lock.write_text(json.dumps({"host": "node7", "pid": 99, "job": "slurm:5_1", "time": 0}))
    assert main(["status", str(job)]) == 0
    out = capsys.readouterr().out
    assert "tile coords: 1 done, 0 failed, 1 running, 0 stale, 0 pending" in out
    assert "running: cmu_b by slurm:5_1 on node7 pid 99" in out
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    assert main(["status", str(job)]) == 0
    assert "1 done, 0 failed, 0 running, 1 stale, 0 pending" in capsys.readouterr().out
    lock.unlink()

    # --allow-partial merges what is there and says so.
    assert main(["merge", str(job), "--allow-partial"]) == 0
    doc = json.loads((job / "shards" / "shards.json").read_text())
    assert doc["partial"] is True and set(doc["slides"]) == {"ink_a"}

    assert _tile(two_slides, job, "1/2") == 0
    capsys.readouterr()
    assert main(["merge", str(job), "--ranks", "4", "--workers", "4"]) == 0
    err = capsys.readouterr().err
    first = {p: (job / p).read_bytes() for p in ("manifest.csv", "shards/shards.json")}
    assert main(["merge", str(job), "--ranks", "1", "--workers", "1"]) == 0
    assert "warning" not in capsys.readouterr().err  # 1 x 1 streams: enough shards
    assert {p: (job / p).read_bytes() for p in first} == first  # idempotent, byte for byte

    doc = json.loads(first["shards/shards.json"])
    counts = {}
    for i in (0, 1):
        part_doc = json.loads((job / "shards" / f"part-{i:04d}" / "shards.json").read_text())
        counts[i] = part_doc["samples"]
        names = [f"part-{i:04d}/{s['name']}" for s in part_doc["shards"]]
        assert [s["name"] for s in doc["shards"] if s["name"].startswith(f"part-{i:04d}/")] == names
    assert doc["samples"] == counts[0] + counts[1] and doc["partial"] is False
    starts = [s["first_sample"] for s in doc["shards"]]
    sizes = [s["samples"] for s in doc["shards"]]
    assert starts == [sum(sizes[:k]) for k in range(len(sizes))]
    assert not any(os.path.isabs(s["name"]) for s in doc["shards"])
    # 310 patches of 2 slides, 40 a shard, per part: ceil(n0/40) + ceil(n1/40) shards < 16
    n = len(doc["shards"])
    assert n == -(-counts[0] // 40) + -(-counts[1] // 40) and n < 16
    assert f"{n} shards for 4 ranks x 4 loader workers = 16 streams" in err

    # The loader reads the merged job as one dataset, every patch once.
    ss = ShardSet(job / "shards")
    _, metas = ss.read(np.arange(len(ss)))
    points = {(m["slide"], m["x"], m["y"]) for m in metas}
    assert len(ss) == len(points) == doc["samples"]
    with open(job / "manifest.csv", newline="") as f:
        rows = {r["slide"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == ["cmu_b", "ink_a"]
    for sid, r in rows.items():
        assert int(r["shard_samples"]) == sum(1 for p in points if p[0] == sid) > 0

    assert main(["status", str(job)]) == 0
    out = capsys.readouterr().out
    assert "2 part(s), 2 finished" in out
    assert "shards: 2 done" in out and "merged shards.json: yes" in out


def test_torn_last_line_is_skipped_and_the_next_append_is_whole(tmp_path: Path) -> None:
    path = manifest_path(tmp_path, (1, 4))
    assert path == tmp_path / "manifests" / "part-0001-of-0004.jsonl"
    with ManifestLog(path) as log:
        log.append({"slide": "a", "status": "failed", "patches": 0})
        log.append({"slide": "b", "status": "ok", "patches": np.int64(7)})  # numpy scalars
    with open(path, "ab") as f:  # a writer killed mid-line
        f.write(b'{"slide": "c", "stat')
    rows, bad = read_manifest(path)
    assert [r["slide"] for r in rows] == ["a", "b"] and bad == 1
    with ManifestLog(path) as log:  # a re-run appends after the torn line
        log.append({"slide": "a", "status": "ok", "patches": 3})
        log.append({"slide": "c", "status": "ok", "patches": 1})
    rows, bad = read_manifest(path)
    assert bad == 1 and [r["slide"] for r in rows] == ["a", "b", "a", "c"]
    latest = latest_rows(rows)
    assert {k: (v["status"], v["patches"]) for k, v in latest.items()} == {
        "a": ("ok", 3), "b": ("ok", 7), "c": ("ok", 1)
    }  # fmt: skip
    assert read_manifest(tmp_path / "none.jsonl") == ([], 0)


def test_merge_of_a_folder_that_is_no_job_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["merge", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "no config.yaml" in err and "\n" not in err
