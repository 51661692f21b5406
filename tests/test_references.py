"""Every file a source, doc or notebook refers to exists in the project, and every section it
cites from docs/conventions.md is a heading there.

A reference is a token ending in .md, .ipynb or .cff (URLs excluded): with a folder it must
exist at that path from the project root (or from the citing file's folder, as a Markdown link
does); a bare name must exist somewhere in the project. A section citation is
``docs/conventions.md, section "NAME"`` (also ``docs/conventions.md, "NAME"`` and lists such as
``sections "A" and "B"``); NAME must be a ``##`` or ``###`` heading of docs/conventions.md.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONVENTIONS = "docs/conventions.md"
SCANNED = {".py", ".md", ".ipynb", ".toml", ".cff", ".txt", ".cfg", ".yml", ".yaml"}
SKIPPED_DIRS = {
    "build",
    "_build",
    "jupyter_execute",
    "dist",
    "site-packages",
    "node_modules",
    "__pycache__",
}

URL = re.compile(r"\w+://\S+")
FILE_REF = re.compile(r"(?<![\w./-])((?:[\w-]+/)*[\w.-]*\w\.(?:md|ipynb|cff))(?![\w/])")
QUOTE = r"[\"'“]([^\"'”\n]+)[\"'”]"
SECTION_REF = re.compile(
    r"docs/conventions\.md[`)\]]*(?:,\s*(?:#\s*)?(?:sections?\s+)?|\s+sections?\s+)" + QUOTE
)
MORE_SECTIONS = re.compile(r"\s*(?:,\s*and|,|and)\s*(?:#\s*)?" + QUOTE)


def project_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if any(p.startswith(".") or p in SKIPPED_DIRS for p in rel.parts[:-1]):
            continue
        if path.is_file() and path.suffix in SCANNED and not path.name.startswith("."):
            files.append(path)
    # This file's own examples of broken references are not references.
    files = [f for f in files if f != Path(__file__).resolve()]
    return files


def text_of(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".ipynb":
        return text
    cells = json.loads(text)["cells"]
    return "\n".join("".join(c["source"]) for c in cells)


def headings(markdown: str) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#{2,3}\s+(.+)$", markdown, re.M)}


def cited_sections(text: str) -> list[str]:
    names = []
    for m in SECTION_REF.finditer(text):
        names.append(m.group(1))
        pos = m.end()
        while more := MORE_SECTIONS.match(text, pos):
            names.append(more.group(1))
            pos = more.end()
    return names


def problems(text: str, where: Path, names: set[str], sections: set[str]) -> list[str]:
    found = []
    text = URL.sub(" ", text)
    for m in FILE_REF.finditer(text):
        ref = m.group(1)
        if "/" in ref:
            ok = (ROOT / ref).exists() or (where.parent / ref).exists()
        else:
            ok = ref in names
        if not ok:
            found.append(f"{where.relative_to(ROOT)}: missing file {ref!r}")
    for name in cited_sections(text):
        if name not in sections:
            found.append(f"{where.relative_to(ROOT)}: no section {name!r} in {CONVENTIONS}")
    return found


@pytest.fixture(scope="module")
def context():
    files = project_files()
    names = {p.name for p in files} | {p.name for p in ROOT.iterdir()}
    sections = headings((ROOT / CONVENTIONS).read_text(encoding="utf-8"))
    return files, names, sections


def test_conventions_exists_with_core_sections(context):
    _, _, sections = context
    for name in ("Notation", "Definition 1", "Eq. (10)", "Frobenius", "Theorem 1", "Example 1"):
        assert name in sections


def test_every_reference_resolves(context):
    files, names, sections = context
    found = [p for f in files for p in problems(text_of(f), f, names, sections)]
    assert not found, "\n".join(found)


def test_conventions_is_cited(context):
    files, _, sections = context
    cited = {s for f in files for s in cited_sections(text_of(f))}
    assert {"Eq. (10)", "Theorem 1", "Adaptive metric"} <= cited & sections


# The broken references below are assembled from parts so that the repository itself never
# cites a missing file (a repository-wide scan for cited files would otherwise flag them).
MD = ".md"


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("closed forms from MATH" + MD + ".", "MATH" + MD),
        ("see shared/notes/STYLE" + MD, "STYLE" + MD),
        ('Reference: docs/conventions.md, "Theorem 7".', "Theorem 7"),
        ('(docs/conventions.md, sections "Theorem 1" and "Nowhere")', "Nowhere"),
        ("# docs/conventions.md,\n    # section 'Gone'", "Gone"),
        ("[notes](docs/missing" + MD + ")", "docs/missing" + MD),
        ("run notebooks/99_missing.ipynb", "99_missing.ipynb"),
    ],
)
def test_checker_catches(context, text, bad):
    """The checker itself: each broken reference is reported."""
    _, names, sections = context
    found = problems(text, ROOT / "README.md", names, sections)
    assert len(found) == 1 and bad in found[0]


@pytest.mark.parametrize(
    "text",
    [
        'docs/conventions.md, section "Eq. (10)"',
        "(docs/conventions.md, 'Theorem 1': ≈ 3.40)",
        "see https://example.org/MATH" + MD + " and README.md",
        "[`docs/conventions.md`](docs/conventions.md) (the project's conventions)",
    ],
)
def test_checker_accepts(context, text):
    _, names, sections = context
    assert problems(text, ROOT / "README.md", names, sections) == []
