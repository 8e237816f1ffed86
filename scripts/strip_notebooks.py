"""Strip outputs, execution counts and run-time metadata from notebooks before committing.

Usage::

    python scripts/strip_notebooks.py                 # every notebooks/*.ipynb, in place
    python scripts/strip_notebooks.py a.ipynb b.ipynb # the given notebooks
    python scripts/strip_notebooks.py --check         # list unstripped notebooks, exit 1 if any

Only nbformat is needed (it comes with Jupyter). tests/integration/test_notebooks.py checks that
every committed notebook is stripped, using :func:`problems` from this file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

#: Cell metadata written by Jupyter while running or viewing a notebook.
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")
#: Notebook metadata written while running it (widget state can be megabytes).
VOLATILE_NOTEBOOK_METADATA = ("widgets",)


def problems(nb: nbformat.NotebookNode) -> list[str]:
    """What would be removed from ``nb`` by :func:`strip`, one line per finding."""
    found = []
    for key in VOLATILE_NOTEBOOK_METADATA:
        if key in nb.metadata:
            found.append(f"notebook metadata has {key!r}")
    for index, cell in enumerate(nb.cells):
        where = f"cell {index} ({cell.cell_type})"
        if cell.cell_type == "code":
            if cell.get("outputs"):
                found.append(f"{where} has {len(cell.outputs)} output(s)")
            if cell.get("execution_count") is not None:
                found.append(f"{where} has execution_count {cell.execution_count}")
        for key in VOLATILE_CELL_METADATA:
            if key in cell.get("metadata", {}):
                found.append(f"{where} has metadata {key!r}")
    return found


def strip(nb: nbformat.NotebookNode) -> bool:
    """Strip ``nb`` in place; return whether anything changed."""
    changed = bool(problems(nb))
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        for key in VOLATILE_CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="default: notebooks/*.ipynb")
    parser.add_argument("--check", action="store_true", help="only report; exit 1 if unstripped")
    args = parser.parse_args(argv)
    paths = args.paths or sorted(NOTEBOOKS.glob("*.ipynb"))
    dirty = 0
    for path in paths:
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        if args.check:
            found = problems(nb)
            if found:
                dirty += 1
                print(f"{path}: " + "; ".join(found))
        elif strip(nb):
            nbformat.write(nb, path)
            print(f"stripped {path}")
    return 1 if dirty else 0


if __name__ == "__main__":
    sys.exit(main())
