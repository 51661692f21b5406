"""The README's python blocks run as written (those for one device; the scaling blocks run on
8 devices in tests/parallel_check.py); tests/test_typing.py type-checks them all."""

import pathlib
import re

import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Names the README leaves to the reader (the multi-host block's launcher values).
READER_SUPPLIED = """\
from typing import Any
coordinator_address: str
num_processes: int
process_id: int
x_local: Any
y_local: Any
"""


def python_blocks(path: str = "README.md") -> list[str]:
    text = (ROOT / path).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


def test_single_device_readme_blocks_run():
    """The blocks before "Scaling out" (measure, train, curvature), in one namespace as a
    reader would paste them; the scaling blocks run on 8 devices in tests/parallel_check.py."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    head = text.split("## Scaling out")[0]
    blocks = re.findall(r"```python\n(.*?)```", head, flags=re.S)
    assert len(blocks) >= 4
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), ns)
    assert float(ns["est"].stderr) >= 0.0
    assert "logdet" in ns and "diag" in ns


@pytest.mark.slow  # compiles four small training steps (about 20 CPU-s)
def test_flax_guide_blocks_run():
    """docs/flax.md's nnx and linen recipes, in one namespace, in order."""
    blocks = python_blocks("docs/flax.md")
    assert len(blocks) >= 6
    ns: dict = {}
    for block in blocks:
        exec(compile(block, "docs/flax.md", "exec"), ns)
    assert int(ns["state"].step) == 1 and bool(jnp.isfinite(ns["loss"]))
    assert bool(jnp.isfinite(ns["value"])) and float(ns["est"].stderr) > 0.0
    assert int(ns["optimizer"].step[...]) == 1
