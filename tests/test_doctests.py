"""Every public name's docstring has an example, and the examples run (stdlib ``doctest``).

Public names: ``phipsimu.__all__`` and the ``__all__`` of the public submodules. A class's
examples include its methods'. A constant or alias (``MAX_DENSE_DIM``, ``Curvature``) has no
docstring of its own: its documentation is the ``#:`` comment above its assignment (what
Sphinx's autodoc reads), and its example is taken from there.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import inspect
import pathlib
import pkgutil

import jax
import pytest

import phipsimu

PUBLIC_MODULES = (
    "phipsimu",
    "phipsimu.curvature",
    "phipsimu.measures",
    "phipsimu.mu",
    "phipsimu.symmetries",
    "phipsimu.landscape",
)

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE

# Examples that cost more than about 1.2 CPU-seconds each (measured one after the other in one
# process on the 2-core test machine; mostly compiling an estimator) run in the slow suite.
# The others (about 25 CPU-seconds together) and the check that every name has an example run
# in the fast one.
SLOW = {
    "phipsimu.Ascent",
    "phipsimu.EigenResult",
    "phipsimu.Estimate",
    "phipsimu.InvarianceReport",
    "phipsimu.SpectralDensity",
    "phipsimu.average_sharpness",
    "phipsimu.check_invariance",
    "phipsimu.curvature",
    "phipsimu.curvature.DataParallel",
    "phipsimu.curvature.GaussNewton",
    "phipsimu.curvature.data_parallel",
    "phipsimu.frobenius_sam",
    "phipsimu.hessian_trace",
    "phipsimu.log_determinant",
    "phipsimu.measures.determinant",
    "phipsimu.measures.eigen_moment",
    "phipsimu.measures.frobenius",
    "phipsimu.measures.invariant_gaussian",
    "phipsimu.measures.trace",
    "phipsimu.mu",
    "phipsimu.mu.Gaussian",
    "phipsimu.mu.Lebesgue",
    "phipsimu.mu.ProductDensity",
    "phipsimu.mu.Rademacher",
    "phipsimu.mu.Sphere",
    "phipsimu.mu.lebesgue",
    "phipsimu.mu.product_density",
    "phipsimu.pac_bayes_sigma",
    "phipsimu.sharpness_aware_loss",
    "phipsimu.top_eigenvalues",
}


def _public() -> dict[str, object]:
    """``{qualified name: object}`` of every public name (the first module that exports it)."""
    names: dict[str, object] = {}
    seen: set[int] = set()
    for modname in PUBLIC_MODULES:
        module = importlib.import_module(modname)
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) not in seen or inspect.ismodule(obj):
                names[f"{modname}.{name}"] = obj
                seen.add(id(obj))
    return names


def _has_own_docstring(obj: object) -> bool:
    return inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)


def _comment_doc(name: str) -> tuple[str, str, int]:
    """The ``#:`` comment block above the one top-level assignment of ``name`` in the
    package: ``(text, file, line of its first comment line, 0-based)``."""
    found = []
    root = pathlib.Path(phipsimu.__file__).parent
    for info in pkgutil.iter_modules([str(root)]):
        path = root / f"{info.name}.py"
        source = path.read_text(encoding="utf-8")
        for node in ast.parse(source).body:
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, ast.AnnAssign)
                else []
            )
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                lines = source.splitlines()
                start = node.lineno - 1
                while start > 0 and lines[start - 1].lstrip().startswith("#:"):
                    start -= 1
                block = [line.lstrip()[2:] for line in lines[start : node.lineno - 1]]
                text = "\n".join(b[1:] if b.startswith(" ") else b for b in block)
                found.append((text, str(path), start))
    assert len(found) == 1, f"{name}: {len(found)} top-level assignments in the package"
    return found[0]


def _doctests(qualname: str, obj: object) -> list[doctest.DocTest]:
    """The doctests of a public name's documentation (fresh globals each)."""
    if _has_own_docstring(obj):
        finder = doctest.DocTestFinder(recurse=not inspect.ismodule(obj), exclude_empty=True)
        tests = finder.find(obj, qualname, globs={})
    else:
        text, path, line = _comment_doc(qualname.rsplit(".", 1)[1])
        tests = [doctest.DocTestParser().get_doctest(text, {}, qualname, path, line)]
    return [t for t in tests if t.examples]


PUBLIC = _public()


def test_public_names_are_found():
    assert "phipsimu.sam" in PUBLIC and "phipsimu.curvature.DEFAULT_CHUNK" in PUBLIC
    assert len(PUBLIC) >= 70


def test_every_public_name_has_an_example():
    """In its own docstring (a class's methods' examples do not count for the class)."""
    missing = [
        name for name, obj in PUBLIC.items() if name not in {t.name for t in _doctests(name, obj)}
    ]
    assert not missing, f"public names without a doctest example: {missing}"


@pytest.mark.parametrize(
    "qualname",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in PUBLIC],
)
def test_examples_run(qualname):
    report: list[str] = []
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    # the printed values are float32 results
    with jax.enable_x64(False):
        for test in _doctests(qualname, PUBLIC[qualname]):
            runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
