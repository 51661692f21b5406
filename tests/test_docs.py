"""The documentation site builds with warnings as errors (Sphinx, MyST-NB; docs/conf.py), its
API reference documents every public name, and a docstring that does not render fails the
build. The fast suite builds it without running the notebooks (their committed outputs are
rendered); the slow suite builds it again executing them (``PHIPSIMU_QUICK=1``: short runs)."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import phipsimu

ROOT = Path(__file__).resolve().parents[1]
SUBMODULES = ("curvature", "measures", "mu", "symmetries", "landscape")

pytest.importorskip("sphinx")
pytest.importorskip("myst_nb")


def sphinx_build(
    src: Path, out: Path, *extra: str, pythonpath: tuple[str, ...] = (), **env: str
) -> subprocess.CompletedProcess:
    """``sphinx-build -W --keep-going -b html -q SRC OUT`` in a fresh process."""
    environ = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(ROOT), *pythonpath])}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-b",
            "html",
            "-q",
            *extra,
            src,
            out,
        ],
        cwd=ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=3600,
    )


def test_site_builds(tmp_path):
    """One build (about 20 s), then what it must contain. One test, so that pytest-xdist
    cannot build it twice on two workers."""
    result = sphinx_build(ROOT / "docs", tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    check_every_public_name_is_documented(tmp_path)
    check_guides_and_notebooks_are_pages(tmp_path)


def documented(html: str) -> set[str]:
    return set(re.findall(r'id="([\w.-]+)"', html))


def check_every_public_name_is_documented(site: Path) -> None:
    ids = documented((site / "api.html").read_text(encoding="utf-8"))
    for name in phipsimu.__all__:
        obj = getattr(phipsimu, name)
        if inspect.ismodule(obj):
            assert name in SUBMODULES, f"phipsimu.{name}: add the submodule to docs/api.md"
            assert f"module-phipsimu.{name}" in ids, name
            continue
        if inspect.isroutine(obj) or inspect.isclass(obj):
            assert inspect.getdoc(obj), f"phipsimu.{name} has no docstring"
        assert f"phipsimu.{name}" in ids, f"phipsimu.{name} is missing from the API reference"
    for sub in SUBMODULES:
        module = getattr(phipsimu, sub)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isroutine(obj) or inspect.isclass(obj):
                assert inspect.getdoc(obj), f"phipsimu.{sub}.{name} has no docstring"
            assert f"phipsimu.{sub}.{name}" in ids, f"phipsimu.{sub}.{name} is not documented"


def check_guides_and_notebooks_are_pages(site: Path) -> None:
    for page in ("getting_started", "study", "benchmarks", "conventions", "guides/flax"):
        assert (site / f"{page}.html").exists(), page
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    for nb in notebooks:
        html = (site / "notebooks" / f"{nb.stem}.html").read_text(encoding="utf-8")
        assert "cell_output" in html, f"{nb.name}: rendered without its committed outputs"
    assert (site / "_images" / "training.png").exists()  # the study's figure


def test_a_docstring_that_does_not_render_fails(tmp_path):
    """docs/conf.py's settings on a one-function package whose docstring is broken
    reStructuredText (emphasis never closed): the build fails and names the function."""
    pkg = tmp_path / "pkg"
    (pkg / "brokendoc").mkdir(parents=True)
    (pkg / "brokendoc" / "__init__.py").write_text(
        '"""Broken."""\n\n\ndef f(x):\n    """F.\n\n    Args:\n      x: *unclosed\n    """\n'
        "    return x\n",
        encoding="utf-8",
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "index.md").write_text(
        "# Broken\n\n```{eval-rst}\n.. automodule:: brokendoc\n   :members:\n```\n",
        encoding="utf-8",
    )
    result = sphinx_build(src, tmp_path / "out", "-c", str(ROOT / "docs"), pythonpath=(str(pkg),))
    assert result.returncode != 0
    assert "brokendoc" in result.stderr and "emphasis" in result.stderr, result.stderr[-4000:]


@pytest.mark.slow  # runs every notebook (short versions): minutes of CPU
def test_site_builds_executing_the_notebooks(tmp_path):
    result = sphinx_build(
        ROOT / "docs", tmp_path / "html", PHIPSIMU_DOCS_EXECUTE="1", PHIPSIMU_QUICK="1"
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    html = (tmp_path / "html" / "notebooks" / "01_quickstart.html").read_text(encoding="utf-8")
    assert "cell_output" in html
