"""The python blocks of the README and of the documentation pages run as written;
tests/test_typing.py type-checks them all.

Each page's blocks run in order in one namespace, as a reader would paste them. A block right
after the comment ``<!-- doc-test: skip (REASON) -->`` (an HTML comment: the site does not show
it) is not run here; REASON names where it runs instead (the scaling blocks run on 8 devices
and on two processes in tests/parallel_check.py). The README's blocks run in the fast suite;
the pages' blocks compile more and run in the slow suite.
"""

import pathlib
import re

import jax.numpy as jnp
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_PAGES = sorted(
    str(p.relative_to(ROOT))
    for p in [*ROOT.glob("docs/*.md"), *ROOT.glob("docs/guides/*.md")]
    if "```python" in p.read_text(encoding="utf-8")
)
SKIP = re.compile(r"<!-- doc-test: skip \((.+?)\) -->\s*$")

# Names the pages leave to the reader (the multi-host block's launcher values).
READER_SUPPLIED = """\
from typing import Any
coordinator_address: str
num_processes: int
process_id: int
x_local: Any
y_local: Any
"""


def code_blocks(path: str = "README.md") -> list[tuple[str, str | None]]:
    """``(code, skip_reason)`` for every python block of the file, in order."""
    text = (ROOT / path).read_text(encoding="utf-8")
    blocks = []
    for m in re.finditer(r"```python\n(.*?)```", text, flags=re.S):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.match(before)
        blocks.append((m.group(1), skip.group(1) if skip else None))
    return blocks


def python_blocks(path: str = "README.md") -> list[str]:
    return [code for code, _ in code_blocks(path)]


def run_page(path: str) -> dict:
    ns: dict = {}
    for code, skip in code_blocks(path):
        if skip is None:
            exec(compile(code, path, "exec"), ns)
    return ns


def test_readme_has_python_blocks():
    assert len(python_blocks()) == 3


def test_readme_blocks_run():
    """The front page's three snippets: measure, train, curvature."""
    ns = run_page("README.md")
    assert float(ns["est"].stderr) >= 0.0
    assert "logdet" in ns and "diag" in ns and int(ns["top"].status) == 0


def test_skip_marker_is_read():
    """The marker applies to the block right after it, and only to that block."""
    text = (ROOT / "docs/guides/scaling.md").read_text(encoding="utf-8")
    blocks = code_blocks("docs/guides/scaling.md")
    assert blocks and all(skip for _, skip in blocks)
    assert text.count("<!-- doc-test: skip (") == len(blocks)
    assert all(skip is None for _, skip in code_blocks("docs/guides/training.md"))


# What each page's blocks must leave behind, beyond running without an error.
CHECKS = {
    "docs/getting_started.md": lambda ns: float(ns["est"].stderr) >= 0.0,
    "docs/guides/measuring.md": lambda ns: float(ns["est"].stderr) >= 0.0,
    "docs/guides/training.md": lambda ns: bool(jnp.all(jnp.isfinite(ns["params"]["w"]))),
    "docs/guides/curvature.md": lambda ns: (
        int(ns["top"].status) == 0 and float(ns["tr"].stderr) >= 0.0 and "diag" in ns
    ),
    "docs/guides/invariance.md": lambda ns: (
        ns["adaptive"].verdict == "invariant" and ns["plain"].verdict == "not invariant"
    ),
    "docs/guides/precision.md": lambda ns: (
        int(ns["tiny"]) == 1
        and int(ns["resolved"]) == 0
        and ns["new_params16"]["w"].dtype == jnp.bfloat16
    ),
    "docs/guides/finite_radius.md": lambda ns: (
        ns["surf"].shape == (21, 21)
        and bool(np.all(np.isfinite(ns["surf"])))
        and int(ns["worst_est"].status) == 0
        and float(ns["sigma_est"].value) > 0
    ),
    "docs/guides/flax.md": lambda ns: (
        int(ns["state"].step) == 1
        and bool(jnp.isfinite(ns["loss"]))
        and bool(jnp.isfinite(ns["value"]))
        and float(ns["est"].stderr) > 0.0
        and int(ns["optimizer"].step[...]) == 1
    ),
}


def test_every_page_with_code_is_checked():
    runnable = [p for p in DOC_PAGES if any(skip is None for _, skip in code_blocks(p))]
    assert sorted(CHECKS) == runnable


@pytest.mark.slow  # compiles the pages' estimators and training steps (minutes of CPU in all)
@pytest.mark.parametrize("page", sorted(CHECKS))
def test_doc_page_blocks_run(page):
    assert CHECKS[page](run_page(page)), page
