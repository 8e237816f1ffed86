"""Every notebook in notebooks/ runs top to bottom and is committed without outputs.

Each notebook is executed with nbclient in a fresh kernel of this environment, with notebooks/
as the working directory (the notebooks import helpers that sit next to them). A notebook must
finish within ``NOTEBOOK_SECONDS`` (the 3-minute budget of a 2-core machine); any cell error
fails the test with the cell's traceback.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
NOTEBOOK_SECONDS = 180
CELL_SECONDS = 150

_spec = importlib.util.spec_from_file_location(
    "strip_notebooks", ROOT / "scripts" / "strip_notebooks.py"
)
strip_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(strip_notebooks)


def test_there_are_notebooks():
    names = {path.name for path in NOTEBOOKS}
    for expected in ("01_quickstart.ipynb", "02_parallel_execution.ipynb", "04_resume_a_fit.ipynb"):
        assert expected in names, f"notebooks/{expected} is missing (found {sorted(names)})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_stripped(path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    found = strip_notebooks.problems(nb)
    assert not found, (
        f"{path.name} is not stripped: {'; '.join(found)}. "
        f"Run: python scripts/strip_notebooks.py {path.relative_to(ROOT)}"
    )


@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_SECONDS)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_SECONDS,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    start = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - start
    print(f"{path.name}: {seconds:.1f} s")
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors, f"{path.name}: error outputs {[(e.ename, e.evalue) for e in errors]}"
    assert any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")
