"""Declared dependencies match the imports: what phipsimu imports at module level is a runtime
dependency, what it imports lazily (inside a function) is in an extra, and nothing declared
at runtime goes unused."""

import ast
import pathlib
import re
import sys
import tomllib

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
