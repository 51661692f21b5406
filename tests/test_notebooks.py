"""The notebooks: committed with the outputs of a full run (plots visible on a code host, no
errors); each opens with the same install cell, which never points at a target that does not
exist (phipsimu is not on PyPI yet: the clone around the working directory, else a wheel or git
URL the user sets), and notebook 05 finds the study's results from any working directory; each
still runs top to bottom today (a shorter run, ``PHIPSIMU_QUICK=1``, nothing written), also
from the repository root and from a folder outside the clone."""

import pathlib
import sys
import types

import nbformat
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(ROOT / "scripts"))
from execute_notebooks import execute  # noqa: E402

STUDY = ROOT / "notebooks" / "05_generalization.ipynb"


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


def install_cell():
    return code_cells(nbformat.read(NOTEBOOKS[0], as_version=4))[0].source


def run_cells(sources, cwd, monkeypatch, namespace=None):
    """Execute notebook cells in this process with the working directory ``cwd``."""
    monkeypatch.chdir(cwd)
    namespace = {} if namespace is None else namespace
    for source in sources:
        exec(compile(source, "<cell>", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_install_cell_and_note(path):
    """Every notebook starts with the same install cell and says phipsimu is not on PyPI; no
    Colab badge (the repository URL does not exist) and no bare `pip install phipsimu`."""
    nb = nbformat.read(path, as_version=4)
    assert code_cells(nb)[0].source == install_cell()
    assert "not yet on PyPI" in nb.cells[0].source and "PHIPSIMU_SOURCE" in nb.cells[0].source
    text = "".join(c.source for c in nb.cells)
    assert "colab.research.google.com" not in text
    assert '"phipsimu[examples]"' not in text and "pip install phipsimu" not in text


def test_install_cell_logic(tmp_path, monkeypatch):
    """The clone is found from its root, from a subfolder and not from elsewhere; with something
    missing the cell installs the clone (editable), else the user's wheel or git URL, else it
    stops with the route to take, never with a PyPI name that does not exist."""
    ns = run_cells([install_cell()], ROOT, monkeypatch)  # everything imports here: no install
    find_clone, install_command = ns["find_clone"], ns["install_command"]
    assert find_clone(ROOT) == find_clone(ROOT / "notebooks") == ROOT
    assert find_clone(tmp_path) is None
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pyproject.toml").write_text('[project]\nname = "other"\n')
    assert find_clone(tmp_path / "other") is None  # a pyproject.toml of another project
    assert install_command(tmp_path) is None  # nothing missing
    missing = ("phipsimu_no_such_module",)
    for cwd in (ROOT, ROOT / "notebooks"):
        assert install_command(cwd, needs=missing)[-2:] == ["-e", f"{ROOT}[examples]"]
    with pytest.raises(RuntimeError, match="not yet on PyPI"):
        install_command(tmp_path, needs=missing)
    url = "git+https://example.org/me/phipsimu@main"
    assert install_command(tmp_path, url, missing)[-1] == f"phipsimu[examples] @ {url}"
    wheel = tmp_path / "phipsimu-0.1.0-py3-none-any.whl"
    assert install_command(tmp_path, str(wheel), missing)[-1] == (
        f"phipsimu[examples] @ {wheel.as_uri()}"
    )


def test_study_results_found_from_anywhere(tmp_path, monkeypatch):
    """Notebook 05 reads the committed results from the root, from notebooks/ and from a folder
    outside the clone (through the imported phipsimu); a clone without them runs the quick
    study; a git URL is cloned; no clone at all stops with the route (no FileNotFoundError)."""
    cells = code_cells(nbformat.read(STUDY, as_version=4))
    committed = ROOT / "benchmarks/results/generalization/generalization.json"
    for cwd in (ROOT, ROOT / "notebooks", tmp_path):
        ns = run_cells([c.source for c in cells[:2]], cwd, monkeypatch)
        assert ns["PATH"].resolve() == committed and ns["result"]["training"]
    calls = []
    fake = types.SimpleNamespace(run=lambda cmd, **kw: calls.append(cmd))
    ns.update(subprocess=fake, find_clone=lambda start: None)
    ns["tempfile"] = types.SimpleNamespace(
        gettempdir=lambda: str(tmp_path), mkdtemp=lambda prefix: str(tmp_path / "quick")
    )
    assert ns["study_root"](tmp_path, "") is None  # no clone and no git URL
    root = ns["study_root"](tmp_path, "git+https://example.org/me/phipsimu@v1")
    assert root == tmp_path / "phipsimu-source"
    assert calls == [
        ["git", "clone", "-q", "https://example.org/me/phipsimu", str(root)],
        ["git", "-C", str(root), "checkout", "-q", "v1"],
    ]
    calls.clear()
    assert ns["results_path"](tmp_path) == tmp_path / "quick" / "generalization.json"
    script = str(tmp_path / "benchmarks" / "generalization.py")
    assert calls == [[sys.executable, script, "--quick", "--out", str(tmp_path / "quick")]]
    with pytest.raises(RuntimeError, match="not with the phipsimu wheel"):
        ns["results_path"](None)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    nb = execute(path, quick=True, timeout=900)  # raises CellExecutionError on a failing cell
    errors = [o for c in code_cells(nb) for o in c.outputs if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "where"),
    [
        ("01_quickstart.ipynb", "root"),
        ("05_generalization.ipynb", "root"),
        ("05_generalization.ipynb", "elsewhere"),
    ],
)
def test_notebook_runs_from_any_directory(name, where, tmp_path):
    """Run from the repository root (as an editor or a runner may) and from a folder outside
    the clone: the install cell (the same in every notebook) and notebook 05's results lookup do
    not depend on the working directory."""
    cwd = ROOT if where == "root" else tmp_path
    nb = execute(ROOT / "notebooks" / name, quick=True, timeout=900, cwd=cwd)
    errors = [o for c in code_cells(nb) for o in c.outputs if o.get("output_type") == "error"]
    assert not errors
