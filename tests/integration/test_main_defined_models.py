"""Models defined in ``__main__`` (a notebook cell, a script) run on every executor (issue 11).

Users define their models in notebook cells, so these tests do too: a script run as
``__main__`` in a subprocess, and a notebook built here and executed by nbclient in a kernel of
this environment. Both define the README's decorated model and one term of every other kind
(``tests.helpers.main_defined_models.MODELS``) and fit them; every fit must reproduce the serial
fit to the bit.

* the script: threads, a stdlib process pool that forks, loky, ``ExecutorWrapperCOB`` on loky
  and on the fork pool, and a worker that cannot rebuild a task (a module only the caller has);
* the kernel: loky, two ipyparallel engines, MPI engines (``MPIEngineFit``), a Dask
  ``LocalCluster`` with worker processes (each also with ``ExecutorWrapperCOB``, but the MPI
  engines, which run ``MPIWrapperCOB``), a spawning pool (with cloudpickle it works; without,
  ``NotPicklableError`` before anything is submitted), rebuild failures on engines and Dask
  workers, and a redefined model reaching long-lived workers.

Each run sets a tag in its environment; every process it started inherits it, and the tests
check that none is left afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import main_defined_models as mh

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find processes"),
]


def _env(tag: str) -> dict[str, str]:
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), mh.TAG_VARIABLE: tag}


def _assert_nothing_left(tag: str) -> None:
    left = mh.wait_until_gone(tag, seconds=20)
    mh.kill_tagged(tag)
    assert not left, f"processes left behind: {left}"


def _report(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("REPORT ")]
    assert lines, f"no report in the output:\n{text[-3000:]}"
    return json.loads(lines[-1][len("REPORT ") :])


# -- a script run as __main__ ---------------------------------------------------------------------

SCRIPT_MAIN = """

if __name__ == "__main__":
    import json
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from chemfit.executors import make_executor
    from tests.helpers import main_defined_models as mh

    ns = globals()
    reference = mh.reference_fit(ns)
    report = {"reference": reference}
    with ThreadPoolExecutor(2) as pool:
        mh.section(report, "thread", mh.run_checks, ns, pool, reference, remote=False)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        mh.section(report, "fork", mh.run_checks, ns, pool, reference)
        mh.section(report, "ewcob fork", mh.check_ewcob, ns, pool, reference)
    loky = make_executor("loky", 2)
    try:
        mh.section(report, "loky", mh.run_checks, ns, loky, reference)
        mh.section(report, "ewcob loky", mh.check_ewcob, ns, loky, reference)
        mh.section(report, "rebuild loky", mh.check_rebuild_failure, ns, loky)
    finally:
        loky.shutdown(wait=True, kill_workers=True)
    print("REPORT " + json.dumps(report, default=str), flush=True)
"""


def _check_report(report: dict, sections: tuple[str, ...]) -> None:
    errors = report.get("errors", {})
    assert not errors, "failed: " + "\n\n".join(f"{k}:\n{v}" for k, v in errors.items())
    missing = [name for name in sections if name not in report]
    assert not missing, f"sections that did not run: {missing}"


@pytest.mark.timeout(420)
def test_script_models_run_on_threads_fork_pool_and_loky(tmp_path):
    script = tmp_path / "fit_models.py"
    script.write_text(mh.MODELS + SCRIPT_MAIN)
    tag = uuid.uuid4().hex
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=360)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        _assert_nothing_left(tag)
    print(f"script: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, f"the script failed:\n{output[-6000:]}"
    report = _report(output)
    _check_report(report, ("thread", "fork", "ewcob fork", "loky", "ewcob loky", "rebuild loky"))
    for name in ("thread", "fork", "loky"):
        print(
            f"{name}: fit {report[name]['fit']['seconds']:.1f} s, pids {report[name]['map_pids']}"
        )
    for name in ("ewcob fork", "ewcob loky"):
        print(f"{name}: fit {report[name]['fit']['seconds']:.1f} s, pids {report[name]['pids']}")
    assert "only_here" in report["rebuild loky"]


# -- a notebook kernel ----------------------------------------------------------------------------

KERNEL_CELLS = [
    f"import sys\nsys.path.insert(0, {str(ROOT)!r})",
    mh.MODELS,
    "from tests.helpers import main_defined_models as mh\n"
    "reference = mh.reference_fit(globals())\n"
    "report = {'reference': reference}\n"
    "check = mh.section",
    # Long-lived workers, used again after a cell redefines a model.
    "from chemfit.executors import make_executor\n"
    "loky = make_executor('loky', 2)\n"
    "engines = make_executor('ipyparallel', 2)",
    "check(report, 'loky', mh.run_checks, globals(), loky, reference)\n"
    "check(report, 'ewcob loky', mh.check_ewcob, globals(), loky, reference)",
    "check(report, 'ipyparallel', mh.run_checks, globals(), engines, reference)\n"
    "check(report, 'ewcob ipyparallel', mh.check_ewcob, globals(), engines, reference)\n"
    "check(report, 'rebuild ipyparallel', mh.check_rebuild_failure, globals(), engines)",
    "from chemfit.executors import IPyParallelExecutor\n"
    "mpi_engines = IPyParallelExecutor(2, mpi=True)\n"
    "try:\n"
    "    check(report, 'mpi engines', mh.check_mpi_fit, globals(), mpi_engines, reference)\n"
    "    check(report, 'rebuild mpi engines', mh.check_mpi_rebuild_failure, globals(), mpi_engines)\n"
    "finally:\n"
    "    mpi_engines.shutdown()",
    "from distributed import Client, LocalCluster\n"
    "with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,\n"
    "                  dashboard_address=None, silence_logs=50) as cluster, \\\n"
    "        Client(cluster) as client:\n"
    "    check(report, 'dask', mh.run_checks, globals(), client, reference)\n"
    "    check(report, 'ewcob dask', mh.check_ewcob, globals(), client, reference)\n"
    "    check(report, 'rebuild dask', mh.check_rebuild_failure, globals(), client)",
    "import multiprocessing\n"
    "from concurrent.futures import ProcessPoolExecutor\n"
    "with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:\n"
    "    check(report, 'spawn', mh.map_kinds, globals(), pool)\n"
    "check(report, 'spawn without cloudpickle', mh.check_spawn_refuses_without_cloudpickle,\n"
    "      globals())",
    mh.REDEFINITION,
    "check(report, 'redefined on loky', mh.check_redefinition, globals(), loky)\n"
    "check(report, 'redefined on ipyparallel', mh.check_redefinition, globals(), engines)",
    "engines.shutdown()\nloky.shutdown(wait=True, kill_workers=True)",
    "import json\nprint('REPORT ' + json.dumps(report, default=str))",
]
KERNEL_SECTIONS = (
    "loky",
    "ewcob loky",
    "ipyparallel",
    "ewcob ipyparallel",
    "rebuild ipyparallel",
    "mpi engines",
    "rebuild mpi engines",
    "dask",
    "ewcob dask",
    "rebuild dask",
    "spawn",
    "spawn without cloudpickle",
    "redefined on loky",
    "redefined on ipyparallel",
)


@pytest.mark.timeout(480)
def test_notebook_models_run_on_loky_ipyparallel_mpi_engines_and_dask(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("distributed")
    pytest.importorskip("ipyparallel")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in KERNEL_CELLS]
    client = nbclient.NotebookClient(
        nb, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    tag = uuid.uuid4().hex
    start = time.perf_counter()
    try:
        client.execute(env=_env(tag))
    finally:
        seconds = time.perf_counter() - start
        _assert_nothing_left(tag)
    print(f"notebook: {seconds:.1f} s")
    printed = "".join(
        output.get("text", "")
        for output in nb.cells[-1].outputs
        if output.get("output_type") == "stream"
    )
    report = _report(printed)
    _check_report(report, KERNEL_SECTIONS)
    for name in ("loky", "ipyparallel", "dask"):
        print(
            f"{name}: fit {report[name]['fit']['seconds']:.1f} s, pids {report[name]['map_pids']}"
        )
    print(f"MPI engines: fit {report['mpi engines']['seconds']:.1f} s")
    for name in ("ewcob loky", "ewcob ipyparallel", "ewcob dask"):
        print(f"{name}: fit {report[name]['fit']['seconds']:.1f} s, pids {report[name]['pids']}")
    for key in ("rebuild ipyparallel", "rebuild mpi engines", "rebuild dask"):
        assert "only_here" in report[key], report[key]
    assert "loky" in report["spawn without cloudpickle"]
