"""The package type-checks: ``mypy -p phipsimu`` (configured in pyproject.toml) reports no
errors, so the shipped ``py.typed`` marker is honest; and the README's python blocks
type-check against the public annotations, so a user's type checker accepts the code we tell
them to write. One mypy process checks both."""

import pathlib
import subprocess
import sys

import pytest
from test_readme_code import READER_SUPPLIED, python_blocks

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("mypy")


def test_mypy_accepts_the_package_and_the_readme_blocks(tmp_path):
    module = tmp_path / "readme_blocks.py"
    module.write_text(READER_SUPPLIED + "\n".join(python_blocks()), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "phipsimu", str(module)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
