"""The package type-checks: ``mypy -p phipsimu`` (configured in pyproject.toml) reports no
errors, so the shipped ``py.typed`` marker is honest; and the README's python blocks
type-check against the public annotations, so a user's type checker accepts the code we tell
them to write. One mypy process checks both."""

import pathlib
import subprocess
import sys

import jax
import pytest
from test_readme_code import READER_SUPPLIED, python_blocks

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytest.importorskip("mypy")


def jax_floor() -> str:
    for line in (ROOT / ".ci" / "floors.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("jax=="):
            return line.partition("==")[2].strip()
    raise AssertionError(".ci/floors.txt pins no jax")


# The package is type-checked against the stubs of the newest JAX (CI's main environment).
# An older JAX's stubs lack the newer APIs that phipsimu/_compat.py calls only on the newer
# JAX, and type a few others differently, so the floor environment skips this check.
pytestmark = pytest.mark.skipif(
    jax.__version__ == jax_floor(),
    reason=f"type-checked against the newest JAX's stubs, not the floor's (jax {jax.__version__})",
)


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
