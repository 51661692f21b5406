"""The package type-checks: ``mypy -p phipsimu`` (configured in pyproject.toml) reports no
errors, so the shipped ``py.typed`` marker is honest; and the python blocks of the README and
of the documentation pages type-check against the public annotations, so a user's type
checker accepts the code we tell them to write. One mypy process checks them all, each page
as its own module."""

import pathlib
import subprocess
import sys

import jax
import pytest
from test_readme_code import DOC_PAGES, READER_SUPPLIED, code_blocks, python_blocks

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The flax guide's blocks would make mypy analyse flax itself (minutes); they run in the slow
# suite (tests/test_readme_code.py).
NOT_TYPE_CHECKED = {"docs/guides/flax.md"}

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


def page_module(page: str) -> str:
    """The page's blocks as one module. A page whose blocks all run elsewhere (the scaling
    guide) builds on getting started's model, as its text says."""
    blocks = code_blocks(page)
    setup = python_blocks("docs/getting_started.md")[0] if all(s for _, s in blocks) else ""
    return READER_SUPPLIED + setup + "\n".join(code for code, _ in blocks)


def test_mypy_accepts_the_package_and_the_documented_code(tmp_path):
    modules = []
    for page in ["README.md", *DOC_PAGES]:
        if page in NOT_TYPE_CHECKED:
            continue
        module = tmp_path / (page.replace("/", "_").replace(".md", "") + ".py")
        module.write_text(page_module(page), encoding="utf-8")
        modules.append(str(module))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "phipsimu", *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
