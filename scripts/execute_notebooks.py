"""Execute the notebooks in place so that they are committed with their outputs (plots visible
on a code host), at full size.

    python scripts/execute_notebooks.py [notebooks/01_quickstart.ipynb ...]

The test suite executes the same notebooks again with ``PHIPSIMU_QUICK=1`` (shorter runs,
nothing written), so the committed outputs never hide a notebook that no longer runs.
Each notebook records how it was executed in its metadata (``phipsimu``: version, seconds).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


def execute(
    path: pathlib.Path,
    *,
    quick: bool = False,
    timeout: int = 1800,
    cwd: pathlib.Path | None = None,
) -> nbformat.NotebookNode:
    """Run ``path`` top to bottom in a fresh kernel (working directory ``cwd``, by default the
    notebook's folder); return it with outputs."""
    nb = nbformat.read(path, as_version=4)
    env_before = os.environ.get("PHIPSIMU_QUICK")
    os.environ["PHIPSIMU_QUICK"] = "1" if quick else "0"
    try:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(cwd or path.parent)}},
        )
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    finally:
        if env_before is None:
            os.environ.pop("PHIPSIMU_QUICK", None)
        else:
            os.environ["PHIPSIMU_QUICK"] = env_before
    import phipsimu

    nb.metadata["phipsimu"] = {
        "version": phipsimu.__version__,
        "quick": quick,
        "seconds": round(seconds, 1),
    }
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=pathlib.Path)
    args = parser.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        nb = execute(path.resolve())
        nbformat.write(nb, path)
        print(f"{path}: {nb.metadata['phipsimu']['seconds']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
