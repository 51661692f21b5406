"""Declared dependencies match the imports: what phipsimu imports at module level is a runtime
dependency, what it imports lazily (inside a function) is in an extra, and nothing declared
at runtime goes unused. The package stays publishable: ``python -m build`` makes an sdist and a
wheel whose metadata matches pyproject.toml, and the wheel works without the clone (slow)."""

import ast
import email.parser
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

import phipsimu

ROOT = pathlib.Path(__file__).resolve().parents[1]
# distribution name -> import name, where they differ
IMPORT_NAME = {"scikit-learn": "sklearn"}


def requirement_names(reqs):
    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in reqs}
    return {IMPORT_NAME.get(n, n) for n in names}


def package_imports():
    eager, lazy = set(), set()
    for path in (ROOT / "phipsimu").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set(tree.body)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                if root in sys.stdlib_module_names or root == "phipsimu":
                    continue
                (eager if node in top else lazy).add(root)
    return eager, lazy


def test_dependencies_match_imports():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = requirement_names(project["dependencies"])
    extras = requirement_names(project["optional-dependencies"]["examples"])
    eager, lazy = package_imports()
    assert eager <= runtime, f"imported at module level but not declared: {eager - runtime}"
    assert lazy - runtime <= extras, f"imported lazily, in no extra: {lazy - runtime - extras}"
    # jaxlib is jax's compiled half (jax needs a matching jaxlib); the rest must be imported
    assert runtime - {"jaxlib"} <= eager | lazy, f"declared, never imported: {runtime - eager}"


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """``python -m build``: the sdist and the wheel, built from this tree into a temporary
    folder (without network when hatchling is installed, else in build's isolated env)."""
    out = tmp_path_factory.mktemp("dist")
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-isolation"]
    subprocess.run(
        [sys.executable, "-m", "build", *isolation, "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("phipsimu-*.whl")
    (sdist,) = out.glob("phipsimu-*.tar.gz")
    return wheel, sdist


def check_metadata(text):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    meta = email.parser.Parser().parsestr(text)
    assert meta["Name"] == "phipsimu" and meta["Version"] == phipsimu.__version__
    assert meta["Requires-Python"] == project["requires-python"]
    assert meta["License-Expression"] == project["license"]
    assert meta.get_all("License-File") == ["LICENSE"]
    assert meta["Description-Content-Type"] == "text/markdown"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert meta.get_payload().strip() == readme.strip()  # the README, rendered as Markdown
    requires = {str(Requirement(r)) for r in meta.get_all("Requires-Dist")}
    assert {str(Requirement(r)) for r in project["dependencies"]} <= requires
    for extra, reqs in project["optional-dependencies"].items():
        assert extra in meta.get_all("Provides-Extra")
        for r in reqs:
            assert str(Requirement(f"{r}; extra == '{extra}'")) in requires, (extra, r)


@pytest.mark.slow
def test_build_and_metadata(dist, tmp_path):
    """The package stays publishable: both distributions build, carry the declared metadata,
    and the wheel installs and runs without the clone (the route the README gives until
    phipsimu is on PyPI: `python -m build`, then `pip install dist/*.whl`)."""
    wheel, sdist = dist
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        check_metadata(zf.read(info).decode("utf-8"))
        entry_points = zf.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert "phipsimu/py.typed" in names and "phipsimu/examples.py" in names
    assert "phipsimu = phipsimu._cli:main" in entry_points
    with tarfile.open(sdist) as tf:
        top = sdist.name.removesuffix(".tar.gz")
        members = set(tf.getnames())
        check_metadata(tf.extractfile(f"{top}/PKG-INFO").read().decode("utf-8"))
    for path in ("notebooks/05_generalization.ipynb", "benchmarks/generalization.py"):
        assert f"{top}/{path}" in members, path
    assert f"{top}/benchmarks/results/generalization/generalization.json" in members
    # the wheel alone (its dependencies come from this environment), outside the clone
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), wheel],
        check=True,
    )
    code = "import phipsimu, phipsimu.examples; print(phipsimu.__file__, phipsimu.__version__)"
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(site / "phipsimu" / "__init__.py"), phipsimu.__version__]


def normalized(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def test_floors_file_pins_every_declared_floor():
    """``.ci/floors.txt``, what CI's second environment installs (``pip install -c``), pins
    every dependency of pyproject.toml (runtime and every extra) at the floor declared there,
    so each declared floor is a tested one and the two files cannot drift apart."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    declared = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(?:>=|==)\s*([0-9][^,;\s]*)", req)
        assert m, f"{req!r}: every dependency declares its floor as >=X (or pins ==X)"
        name, floor = normalized(m[1]), m[2]
        assert declared.setdefault(name, floor) == floor, f"{name}: two floors in pyproject"
    pins = {}
    for line in (ROOT / ".ci" / "floors.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalized(name.strip())] = version.strip()
    assert pins == declared
