"""The package type-checks: ``mypy -p phipsimu`` (configured in pyproject.toml) reports no
errors, so the shipped ``py.typed`` marker is honest."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("mypy")


def test_mypy_reports_no_errors():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "-p", "phipsimu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
