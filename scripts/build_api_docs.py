"""Build the API reference from the docstrings with pdoc (HTML, Google-style docstrings,
math rendered).

    python scripts/build_api_docs.py [--out docs/api]

Warnings from pdoc (a docstring it cannot parse, a broken cross-reference) are errors, so the
test that runs this catches a broken docstring.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def build(out: pathlib.Path, module: str = "phipsimu") -> list[pathlib.Path]:
    """Write the HTML reference of ``module`` to ``out``; return the pages written."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="google", math=True, search=False, show_source=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # pdoc cannot resolve postponed annotations in the __init__ that NamedTuple generates
        # (it lives in another module's namespace): a pdoc limitation, not a docstring error.
        warnings.filterwarnings(
            "ignore", message=r"Error parsing type annotation .* for \S+\.__init__\."
        )
        pdoc.pdoc(module, output_directory=out)
    return sorted(out.rglob("*.html"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "api")
    args = parser.parse_args(argv)
    pages = build(args.out)
    print(f"{len(pages)} pages in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
