"""``--executor dask``: a LocalCluster on 127.0.0.1 and a ``dask scheduler`` + ``dask worker``
pair started here (loopback, random free port) give the outputs of a local run, for
``pathflow tile`` (one task per slide, :func:`run_slide_tasks` with ``process_slide``) and
``pathflow extract`` (chunks of slides per task, one model per worker); a task that kills its
worker (``os._exit``) becomes one failed row and the other slides finish."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from pathflow.cli import main  # noqa: E402
from pathflow.jobs.dask_executor import run_slide_tasks  # noqa: E402
from pathflow.tiling.config import TileConfig  # noqa: E402
from pathflow.tiling.slide_task import process_slide  # noqa: E402

# Tasks name ``_tile_or_abort`` by module and name: the workers import this file (the local
# cluster's spawned workers inherit sys.path, the pair below gets it in PYTHONPATH).
HERE = str(Path(__file__).resolve().parent)

ARCH = "test_vit"  # timm's 0.3M-parameter ViT (64-d features)
BOOM = "boom"  # the slide id whose task kills its worker
SID = "cmu_small_region"


def _tile_or_abort(path: Path, sid: str, cfg: TileConfig) -> dict[str, Any]:
    """``process_slide``, except that the slide ``boom`` kills the worker process outright
    (no exception, no cleanup: what a segfault in a reader does)."""
    if sid == BOOM:
        os._exit(13)
    return process_slide(path, sid, cfg)


def _failed_row(path: Path, sid: str, error: str) -> dict[str, Any]:
    return {"slide": sid, "path": str(path), "status": "failed", "error": error}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory, cmu_path: Path) -> Path:
    """A folder with the cmu-small sample (43 patches)."""
    d = tmp_path_factory.mktemp("dask_slides")
    (d / cmu_path.name).symlink_to(cmu_path)
    return d


@pytest.fixture(scope="module")
def local_tile(slides: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pathflow tile`` run locally (a child process: cuCIM must not follow a CUDA torch)."""
    out = tmp_path_factory.mktemp("tile_local")
    cmd = [sys.executable, "-m", "pathflow", "tile", str(slides), "--out", str(out),
           "--workers", "1", "-q"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(scope="module")
def scheduler_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``dask scheduler`` + ``dask worker`` (one nanny-managed worker, one thread) on
    127.0.0.1 at a free port; the scheduler fails a task at its first worker death."""
    tmp = tmp_path_factory.mktemp("dask_pair")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    path = os.pathsep.join([HERE, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
           "PYTHONPATH": path}  # fmt: skip
    sched = ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
    worker = ["worker", address, "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
              "--local-directory", str(tmp)]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for args in (sched, worker):
            with open(tmp / f"{args[0]}.log", "wb") as log:
                cmd = [sys.executable, "-m", "dask", *args]
                procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip
        with distributed.Client(address, timeout=60) as client:
            client.wait_for_workers(1, timeout=60)
        yield address
    finally:
        for p in reversed(procs):  # the worker's group holds its nanny's worker process
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _tile_on_dask(slides: Path, out: Path, **where: Any) -> dict[str, dict[str, Any]]:
    cfg = TileConfig.build({}, {"inputs": [str(slides)], "out": str(out)})
    paths = sorted(slides.iterdir())
    jobs = [(i, p, p.stem) for i, p in enumerate(paths)]
    jobs.insert(1, (len(jobs), slides / "boom.svs", BOOM))
    rows: dict[int, dict[str, Any]] = {}
    order: list[int] = []

    def finish(i: int, row: dict[str, Any]) -> None:
        rows[i] = row
        order.append(i)

    run_slide_tasks(_tile_or_abort, jobs, (cfg,), finish, _failed_row, **where)
    assert sorted(order) == sorted(i for i, _, _ in jobs)  # every task reported once
    return {r["slide"]: r for r in rows.values()}


def _assert_same_tiles(a: Path, b: Path, sids: list[str]) -> None:
    for sid in sids:
        with (
            h5py.File(a / "coords" / f"{sid}.h5") as fa,
            h5py.File(b / "coords" / f"{sid}.h5") as fb,
        ):
            assert len(fa["coords"]) > 0
            np.testing.assert_array_equal(fa["coords"][:], fb["coords"][:])
            np.testing.assert_array_equal(fa["tissue_fraction"][:], fb["tissue_fraction"][:])
            for k in ("patch_size", "patch_level", "target_patch_size", "mpp"):
                assert fa["coords"].attrs[k] == fb["coords"].attrs[k]
        assert (a / "masks" / f"{sid}.png").read_bytes() == (
            b / "masks" / f"{sid}.png"
        ).read_bytes()


@pytest.mark.parametrize("where", ["local_cluster", "scheduler_pair"])
def test_tile_tasks_equal_local_and_a_dead_worker_fails_one_slide(
    where: str, slides: Path, local_tile: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    kwargs = {"workers": 2} if where == "local_cluster" else {
        "scheduler": request.getfixturevalue("scheduler_pair")}  # fmt: skip
    rows = _tile_on_dask(slides, tmp_path / "out", **kwargs)
    assert set(rows) == {SID, BOOM}
    assert rows[SID]["status"] == "ok", rows
    assert rows[SID]["patches"] == 43
    assert rows[BOOM]["status"] == "failed"
    assert "worker died" in rows[BOOM]["error"] and "\n" not in rows[BOOM]["error"]
    _assert_same_tiles(local_tile, tmp_path / "out", [SID])


def _features(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    found = {}
    for f in sorted((out / "features").glob("*.h5")):
        with h5py.File(f) as h:
            found[f.stem] = (h["features"][:], h["coords"][:])
    return found


def _extract(*args: str | Path) -> None:
    assert main(["extract", *map(str, args), "--arch", ARCH, "--batch-size", "16", "-q"]) == 0


def _coords_of_two_slides(local_tile: Path, tmp: Path) -> Path:
    """cmu-small's coordinates twice (``a``, ``b``: two slides, two files)."""
    d = tmp / "coords"
    d.mkdir()
    for sid in ("a", "b"):
        shutil.copy(local_tile / "coords" / f"{SID}.h5", d / f"{sid}.h5")
        with h5py.File(d / f"{sid}.h5", "r+") as h:
            h["coords"].attrs["name"] = sid
    return d


@pytest.fixture(scope="module")
def local_extract(local_tile: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Coordinates of two slides and their features extracted locally (``features/``)."""
    tmp = tmp_path_factory.mktemp("extract_local")
    _extract(_coords_of_two_slides(local_tile, tmp), "--out", tmp / "local")
    return tmp


@pytest.mark.parametrize("where", ["scheduler_pair", "local_cluster"])
def test_extract_on_dask_equals_local(
    where: str, local_extract: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Features from coordinates + slides on the pair (both slides in one task, then resumed
    by the worker's check of its files) or a one-worker LocalCluster (a slide per task)
    equal a local run's exactly."""
    coords = local_extract / "coords"
    if where == "scheduler_pair":
        opts = ["--scheduler", request.getfixturevalue("scheduler_pair"), "--chunk-slides", "2"]
    else:
        opts = ["--dask-workers", "1", "--chunk-slides", "1"]
    _extract(coords, "--out", tmp_path / "dask", "--executor", "dask", *opts)
    local, other = _features(local_extract / "local"), _features(tmp_path / "dask")
    assert sorted(local) == sorted(other) == ["a", "b"]
    for sid, (feats, xy) in local.items():
        assert feats.shape == (43, 64)
        np.testing.assert_array_equal(other[sid][1], xy)
        np.testing.assert_array_equal(other[sid][0], feats)
    manifest = (tmp_path / "dask" / "extract_manifest.csv").read_text()
    assert manifest.count(",ok,") == 2, manifest
    if where == "scheduler_pair":
        _extract(coords, "--out", tmp_path / "dask", "--executor", "dask", *opts)
        manifest = (tmp_path / "dask" / "extract_manifest.csv").read_text()
        assert manifest.count(",resumed,") == 2, manifest
