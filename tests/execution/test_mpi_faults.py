"""MPIWrapperCOB when a rank stops answering or dies: real ``mpiexec -n 2`` runs.

The scenarios live in ``tests/execution/mpi_scripts/mpi_fault_scenarios.py`` (the objective is
defined in its ``__main__``). Every run has a hard timeout that kills its whole session, and each
test checks that no process of the run is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import chemfit
from chemfit.fitter_callbacks import load_observations
from chemfit.fitting.results import FitHistory

MPI = pytest.importorskip("mpi4py.MPI")

MPIEXEC = Path(sys.executable).parent / "mpiexec"
SCRIPT = Path(__file__).parent / "mpi_scripts" / "mpi_fault_scenarios.py"
CHEMFIT_ROOT = Path(chemfit.__file__).parent.parent
TIMEOUT = 5.0  # MPIWrapperCOB(timeout=...) in the script

pytestmark = [
    pytest.mark.mpi,
    pytest.mark.skipif(not MPIEXEC.exists(), reason="the venv has no mpiexec"),
]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    ended: float  # time.time() when mpiexec returned
    results: list[dict]


def session_processes(sid: int) -> list[int]:
    """The pids of the processes still in session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # the fields after the name: state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


def run(name: str, folder: Path, timeout: float = 60.0) -> Run:
    """Run a scenario under ``mpiexec -n 2``; fail if it hangs or leaves a process behind."""
    env = dict(
        os.environ, PYTHONPATH=str(CHEMFIT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    proc = subprocess.Popen(
        [str(MPIEXEC), "-n", "2", sys.executable, str(SCRIPT), name, str(folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # its own session, so a timeout can kill every rank
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpiexec -n 2 {name} hung for {timeout} s\n{stdout}\n{stderr}")
    ended = time.time()
    left: list[int] = []
    for _ in range(50):  # ranks killed by mpiexec may take a moment to be reaped
        left = session_processes(proc.pid)
        if not left:
            break
        time.sleep(0.1)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"processes {left} of mpiexec -n 2 {name} were left behind\n{stderr}")
    results = [
        json.loads(line[len("RESULT ") :])
        for line in stdout.splitlines()
        if line.startswith("RESULT ")
    ]
    return Run(proc.returncode, stdout, stderr, ended, results)


def fault_time(folder: Path) -> float:
    return float((folder / "fault_time").read_text())


def assert_history_up_to_the_fault(folder: Path) -> FitHistory:
    """The history holds the five evaluations before the one that never finished, and the
    checkpoint holds the best of them."""
    history = FitHistory.from_jsonl(folder / "fit.jsonl")
    assert [record.index for record in history] == [0, 1, 2, 3, 4]
    assert all(getattr(record, "status", "ok") == "ok" for record in history)
    best = json.loads((folder / "best.json").read_text())
    assert best["loss"] == min(record.loss for record in history)
    return history


@pytest.mark.timeout(120)
def test_stopped_rank_is_named_and_every_rank_aborted_then_the_fit_resumes(tmp_path):
    stopped = run("stop", tmp_path)
    assert stopped.returncode != 0
    # rank 0 waited the timeout, then the error, the flush and the abort took little time
    assert TIMEOUT <= stopped.ended - fault_time(tmp_path) < TIMEOUT + 5, stopped.stderr
    err = stopped.stderr
    assert "rank 1 (terms 2..3 of 4) did not answer within the timeout of 5 s" in err, err
    assert "MPI_Abort of all 2 ranks now" in err
    assert "load_observations" in err
    assert len(stopped.results) == 1 and "started" in stopped.results[0]  # stdout was flushed
    assert_history_up_to_the_fault(tmp_path)

    resumed = run("resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (result,) = resumed.results
    assert result["n_observations"] == 5 and result["n_evals"] == 5
    assert result["indices"] == [5, 6, 7, 8, 9]  # the numbers go on from the file's
    history = FitHistory.from_jsonl(tmp_path / "fit.jsonl")
    assert [record.index for record in history] == list(range(10))
    assert len(load_observations(tmp_path / "fit.jsonl")) == 10


@pytest.mark.timeout(60)
def test_a_fit_that_records_errors_records_the_timeout_then_aborts(tmp_path):
    recorded = run("stop_record", tmp_path)
    assert recorded.returncode != 0
    assert "MPI_Abort of all 2 ranks now" in recorded.stderr
    history = FitHistory.from_jsonl(tmp_path / "fit.jsonl")
    assert [record.index for record in history] == [0, 1, 2, 3, 4, 5]
    assert [record.status for record in history] == ["ok"] * 5 + ["failed"]
    assert history[5].error.startswith("RankTimeoutError: MPIWrapperCOB: rank 1 (terms 2..3")
    assert [loss is None for _, loss in load_observations(tmp_path / "fit.jsonl")] == [
        False
    ] * 5 + [True]


@pytest.mark.timeout(120)
def test_killed_rank_leaves_the_history_complete_and_the_fit_resumes(tmp_path):
    killed = run("kill", tmp_path)
    assert killed.returncode != 0
    assert killed.ended - fault_time(tmp_path) < 5, killed.stderr  # no timeout needed
    assert_history_up_to_the_fault(tmp_path)

    resumed = run("resume", tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    (result,) = resumed.results
    assert result["indices"] == [5, 6, 7, 8, 9]
    history = FitHistory.from_jsonl(tmp_path / "fit.jsonl")
    assert [record.index for record in history] == list(range(10))


@pytest.mark.timeout(60)
def test_calling_again_after_a_timeout_aborts_at_once(tmp_path):
    retried = run("retry", tmp_path)
    assert retried.returncode != 0
    (caught,) = retried.results  # printed before the abort, without flush=True
    assert caught["type"] == "RankTimeoutError"
    assert caught["ranks"] == {"1": [2, 4]} and caught["timeout"] == TIMEOUT
    assert caught["parameters"] == {"x": 1.0}
    assert TIMEOUT <= caught["waited"] < TIMEOUT + 2
    assert "rank 1 (terms 2..3 of 4) did not answer" in caught["message"]
    assert retried.ended - fault_time(tmp_path) < TIMEOUT + 5
    assert "MPI_Abort of all 2 ranks now" in retried.stderr


@pytest.mark.timeout(60)
def test_uncaught_timeout_aborts_when_the_program_exits(tmp_path):
    uncaught = run("uncaught", tmp_path)
    assert uncaught.returncode != 0
    assert "RankTimeoutError" in uncaught.stderr  # Python's traceback, then the abort
    assert "MPI_Abort of all 2 ranks now" in uncaught.stderr
    assert uncaught.ended - fault_time(tmp_path) < TIMEOUT + 5


# -- in this process ----------------------------------------------------------------------------


def test_timeout_must_be_a_positive_number_or_none():
    from chemfit.core.combined import CombinedObjectiveFunction
    from chemfit.execution.mpi_wrapper_cob import MPIWrapperCOB

    cob = CombinedObjectiveFunction([lambda p: p["x"], lambda p: 2 * p["x"]])
    for bad, error in [
        (0, ValueError),
        (-1.0, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        ("5", TypeError),
        (True, TypeError),
    ]:
        with pytest.raises(error, match="timeout must be"):
            MPIWrapperCOB(cob, comm=MPI.COMM_SELF, timeout=bad)
    with MPIWrapperCOB(cob, comm=MPI.COMM_SELF) as mpi:
        assert mpi.timeout is None
    with MPIWrapperCOB(cob, MPI.COMM_SELF, False, timeout=2) as mpi:  # upstream's positions
        assert mpi.timeout == 2.0 and mpi({"x": 1.5}) == 4.5


def test_rank_timeout_error_is_a_lost_worker_and_a_timeout():
    from chemfit.exceptions import WorkerLostError
    from chemfit.execution.mpi_wrapper_cob import RankTimeoutError

    error = RankTimeoutError("late", ranks={2: (4, 6)}, timeout=1.5, parameters={"x": 1.0})
    assert isinstance(error, WorkerLostError) and isinstance(error, TimeoutError)
    assert error.ranks == {2: (4, 6)} and error.parameters == {"x": 1.0} and error.index is None
