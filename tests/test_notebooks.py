"""The notebooks: committed with the outputs of a full run (plots visible on a code host, no
errors), each with an "Open in Colab" badge and an install cell without placeholder URLs, and
each still runs top to bottom today (a shorter run, ``PHIPSIMU_QUICK=1``, nothing written)."""

import pathlib
import sys

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "scripts"))
from execute_notebooks import execute  # noqa: E402

COLAB = "https://colab.research.google.com/github/phipsimu/phipsimu/blob/main/notebooks/"


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_with_full_outputs(path):
    nb = nbformat.read(path, as_version=4)
    cells = code_cells(nb)
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), (
        f"{path.name}: run `python scripts/execute_notebooks.py {path.relative_to(ROOT)}`"
    )
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(
        "text/markdown" in o.get("data", {}) or "image/png" in o.get("data", {}) for o in outputs
    )
    if "plt.show()" in "".join(c.source for c in cells):
        assert any("image/png" in o.get("data", {}) for o in outputs), path.name
    assert nb.metadata["phipsimu"]["quick"] is False  # full-size numbers, not the test run's


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_badge_and_install_cell(path):
    """Notebooks that use phipsimu open in Colab and install it there."""
    nb = nbformat.read(path, as_version=4)
    if not any("import phipsimu" in c.source for c in code_cells(nb)):
        pytest.skip("does not use phipsimu (reads committed results from the clone)")
    assert COLAB + path.name in nb.cells[0].source
    install = code_cells(nb)[0].source
    assert "your clone URL" not in install and "git+" not in install
    assert '"phipsimu[examples]"' in install and "find_spec" in install


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nb = execute(path, quick=True, timeout=900)  # raises CellExecutionError on a failing cell
    errors = [o for c in code_cells(nb) for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
