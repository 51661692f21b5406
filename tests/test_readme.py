"""The README's two commands are what CI runs, and the test command is the one CI runs after
installing exactly as the README says."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)[:2]]


def test_readme_opens_with_install_demo_and_test_commands():
    demo, test = readme_commands()
    assert demo == 'pip install -e ".[examples]" && phipsimu demo'
    assert test.startswith('pip install -e ".[dev]" && pytest')


def test_ci_runs_the_readme_test_command():
    """After the README's commands, CI repeats the fast suite in a second environment at the
    floors (pyproject's lowest versions, pinned in .ci/floors.txt)."""
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    # the main environment's fast and slow suites, then the floor environment's (.ci/floors.txt)
    at = lines.index(readme_commands()[1])
    assert lines[at + 1] == "pytest -n 2 -m slow"
    floor = lines[at + 2 :]
    assert 'pip install -e ".[dev,examples,bench]" -c .ci/floors.txt' in floor
    assert "pytest -n 2" in floor


def test_readme_test_command_uses_installed_tools():
    """``pytest -n`` needs pytest-xdist: it must be in the dev extra the command installs."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    dev = re.search(r"^dev = \[(.*?)^\]", pyproject, re.S | re.M).group(1)
    if " -n " in readme_commands()[1] + " ":
        assert "pytest-xdist" in dev
    for tool in ("mypy", "sphinx", "myst-nb", "sphinx-book-theme", "ruff", "nbclient", "chex"):
        assert tool in dev, tool


def test_heavy_table_names_tests_that_exist():
    """Every entry of tests/conftest.py's HEAVY is a test function (or method) in its file,
    so renaming a test cannot silently move it into the fast suite's budget."""
    import ast

    from conftest import HEAVY

    for entry in HEAVY:
        path, *names = entry.split("::")
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        scope = tree.body
        for name in names:
            found = [n for n in scope if getattr(n, "name", None) == name]
            assert found, entry
            scope = getattr(found[0], "body", [])
