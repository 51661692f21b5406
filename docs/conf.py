"""Sphinx configuration of the phipsimu documentation site.

    sphinx-build -b html docs docs/_build/html

Sphinx with myst-nb and the book theme, the stack of jax, optax and flax: Markdown pages
(MyST), the API reference from the docstrings (autodoc + napoleon, Google style), and the
notebooks of ``notebooks/`` rendered with their committed outputs. They are not executed
unless ``PHIPSIMU_DOCS_EXECUTE=1`` is set (then every notebook runs, with a 30-minute timeout
per notebook; add ``PHIPSIMU_QUICK=1`` for their short versions).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))

import phipsimu  # noqa: E402

project = "phipsimu"
author = "phipsimu contributors"
copyright = "phipsimu contributors, Apache-2.0"
release = version = phipsimu.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints", "jupyter_execute"]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# The notebooks live in ../notebooks (where they are run and tested); Sphinx reads sources
# under docs/ only, so they are copied to docs/notebooks (ignored by git). A copy, not a link:
# a link inside the tree makes hatch drop notebooks/ from the sdist (it walks the link and
# keeps one path per file). An executed notebook finds the repository by walking up from its
# directory (notebook 05's results), so it runs from the copy as from notebooks/.
NOTEBOOKS = DOCS / "notebooks"
if NOTEBOOKS.is_symlink():  # a link left by an older build
    NOTEBOOKS.unlink()
NOTEBOOKS.mkdir(exist_ok=True)
for source in sorted((ROOT / "notebooks").glob("*.ipynb")):
    target = NOTEBOOKS / source.name
    if not target.exists() or target.read_bytes() != source.read_bytes():
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)

nb_execution_mode = "force" if os.environ.get("PHIPSIMU_DOCS_EXECUTE") == "1" else "off"
nb_execution_timeout = 1800
nb_execution_raise_on_error = True

autodoc_default_options = {"members": True, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # NamedTuple fields: listed in their class, not described twice


def _skip_member(app, what, name, obj, skip, options):
    """A NamedTuple's fields are documented in its "Attributes" section; autodoc would add
    each again as a member whose docstring is "Alias for field number N"."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    return None


def _defining_comment(name: str) -> list[str]:
    """The ``#:`` comment above ``name`` in the private module that defines it."""
    from sphinx.pycode import ModuleAnalyzer

    for modname in sorted(m for m in sys.modules if m.startswith("phipsimu._")):
        try:
            docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
        except Exception:  # a module without source (compiled): nothing to find there
            continue
        if ("", name) in docs:
            return list(docs[("", name)])
    return []


def _constant_docs(app, what, name, obj, options, lines):
    """A constant re-exported by a public module (``autodata`` in api.md) is described by
    its ``#:`` comment where it is defined, not by the docstring of its type (``int``)."""
    if what == "data":
        lines[:] = _defining_comment(name.rsplit(".", 1)[-1])


def setup(app):
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-docstring", _constant_docs)


html_theme = "sphinx_book_theme"
html_title = f"phipsimu {release}"
html_theme_options = {"show_toc_level": 2}
