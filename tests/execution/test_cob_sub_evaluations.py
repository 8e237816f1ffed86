"""Terms with sub-evaluations of their own give the serial ``ctx.meta`` through every wrapper.

A term that spawns children of its own context (the combined objective's grandchildren, and
deeper) has them collected into ``ctx.meta`` serially. ``ExecutorWrapperCOB`` on threads, a
process pool and loky (``terms_per_task`` 1 and ``"auto"``) and ``MPIWrapperCOB`` under a real
``mpiexec -n 2`` must give the same value and ``ctx.meta`` (issue 13: before, a process pool
and loky lost the grandchildren). The terms are in ``tests/helpers/sub_evaluation_objectives.py``;
the script tests run that file as ``__main__``, so the terms are defined there as in a user's
script or notebook.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import chemfit
from chemfit.core.context import EvaluateContext
from tests.helpers import sub_evaluation_objectives as h

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "helpers" / "sub_evaluation_objectives.py"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
# The script imports the same chemfit as this test process.
CHEMFIT_ROOT = Path(chemfit.__file__).resolve().parent.parent
KINDS = ["threads", "process-pool", "loky"]
TERMS_PER_TASK = [1, "auto"]


def run_script(command: list[str], timeout: float) -> dict:
    """Run ``command`` in its own process group (killed whole on a timeout); the RESULT line."""
    paths = [str(CHEMFIT_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"{command} hung for {timeout} s\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"rc={proc.returncode}\n{stdout}\n{stderr[-6000:]}"
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, f"expected one RESULT line\n{stdout}\n{stderr[-6000:]}"
    return json.loads(lines[0][len("RESULT ") :])


def assert_serial(result: dict, terms_per_task) -> None:
    """No mismatch in any call; with ``"auto"``, some call grouped terms into fewer tasks."""
    assert result["mismatches"] == [], json.dumps(result["mismatches"][0], indent=1)
    assert len(result["tasks"]) == result["n_calls"]
    n_terms = result["n_terms"]
    if terms_per_task == 1:
        assert result["tasks"] == [n_terms] * result["n_calls"]
    else:
        assert any(0 < tasks < n_terms for tasks in result["tasks"]), result["tasks"]


def test_the_terms_have_sub_evaluations_at_several_depths():
    ctx = EvaluateContext()
    h.build_cob()(h.PARAMETERS[0], ctx)
    children = ctx.meta["children"]
    assert [len(child["meta"]["children"]) for child in children] == [2, 3, 2, 2, 2, 3, 2, 2]
    depth_two = children[1]["meta"]["children"][2]["meta"]
    assert depth_two["label"] == "2/3" and len(depth_two["children"]) == 3
    nested = children[7]["meta"]["children"][1]["meta"]["children"][0]["meta"]
    assert len(nested["children"]) == 2  # a great-great-grandchild of the outer COB
    assert children[6]["meta"]["children"][1]["meta"] == {"spawned": 1}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("terms_per_task", TERMS_PER_TASK)
@pytest.mark.parametrize("executor", KINDS, indirect=True)
def test_executor_wrapper_gives_the_serial_meta(executor, terms_per_task):
    assert_serial(h.check_executor(executor, terms_per_task), terms_per_task)


@pytest.mark.timeout(180)
def test_terms_defined_in_main_on_threads_a_process_pool_and_loky():
    result = run_script([sys.executable, str(SCRIPT), "executors"], timeout=150)
    assert result.pop("terms_module") == "__main__"
    assert sorted(result) == sorted(f"{k}/{t}" for k in KINDS for t in TERMS_PER_TASK)
    for kind in KINDS:
        for terms_per_task in TERMS_PER_TASK:
            assert_serial(result[f"{kind}/{terms_per_task}"], terms_per_task)


@pytest.mark.mpi
@pytest.mark.timeout(120)
@pytest.mark.skipif(not MPIEXEC.exists(), reason="the venv has no mpiexec")
def test_terms_defined_in_main_over_mpi():
    result = run_script([str(MPIEXEC), "-n", "2", sys.executable, str(SCRIPT), "mpi"], timeout=100)
    assert result["terms_module"] == "__main__"
    assert result["size"] == 2
    assert result["mismatches"] == [], json.dumps(result["mismatches"][0], indent=1)
