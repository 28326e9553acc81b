"""Static checks run with the tests: ruff (lint + format) and mypy on the package."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff not installed")
def test_ruff_clean() -> None:
    res = run("ruff", "check", "python", "tests", "benches")
    assert res.returncode == 0, res.stdout + res.stderr
    res = run("ruff", "format", "--check", "python", "tests", "benches")
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_clean() -> None:
    pytest.importorskip("mypy")
    res = run(sys.executable, "-m", "mypy", "python/pathflow")
    assert res.returncode == 0, res.stdout + res.stderr
