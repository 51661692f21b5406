"""The API reference builds from the docstrings (pdoc, warnings are errors) and documents
every public name."""

import inspect
import pathlib
import re
import sys

import pytest

import phipsimu

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from build_api_docs import build  # noqa: E402

pytest.importorskip("pdoc")


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    return out, build(out)


def test_every_public_name_is_documented(pages):
    out, written = pages
    assert out / "phipsimu.html" in written
    html = (out / "phipsimu.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="([\w.]+)"', html))
    for name in phipsimu.__all__:
        obj = getattr(phipsimu, name)
        if inspect.ismodule(obj):
            assert (out / "phipsimu" / f"{name}.html").exists(), name
        elif callable(obj):
            assert inspect.getdoc(obj), f"phipsimu.{name} has no docstring"
            assert name in anchors, f"phipsimu.{name} is missing from the API reference"


def test_an_unresolvable_signature_fails(tmp_path, monkeypatch):
    """The build is strict: what pdoc cannot render (here an annotation naming nothing)
    fails it instead of leaving a silently incomplete page."""
    pkg = tmp_path / "brokendoc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        '"""Broken."""\n\n\ndef f(x: "Undefined") -> int:\n    """F."""\n    return 1\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserWarning, match="Undefined"):
        build(tmp_path / "out", module="brokendoc")
