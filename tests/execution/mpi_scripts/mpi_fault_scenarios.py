"""MPIWrapperCOB fault scenarios, run under ``mpiexec -n 2`` by ``tests/execution/test_mpi_faults.py``.

Usage: ``mpiexec -n 2 python mpi_fault_scenarios.py SCENARIO FOLDER``. The objective is defined
here, in ``__main__``, as a user's script defines it. Rank 1 evaluates terms 2 and 3 of the four;
on its ``FAULT_AT``-th call of term 2 it writes the time to ``FOLDER/fault_time`` and then stops
itself (SIGSTOP) or dies (SIGKILL), as the scenario says. Rank 0 fits with a JSON-lines history
and a checkpoint of the best parameters in ``FOLDER``, and prints ``RESULT {...}`` lines.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path

from mpi4py import MPI

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor
from chemfit.execution.mpi_wrapper_cob import MPIWrapperCOB, RankTimeoutError
from chemfit.fitter_callbacks import CheckpointBestParameters, JSONLinesHistory, load_observations
from chemfit.fitting.fitter import Fitter

RANK = MPI.COMM_WORLD.Get_rank()
FAULT_AT = 6  # the 6th evaluation (record index 5) is the one that never finishes
TIMEOUT = 5.0


class Term(ObjectiveFunctor):
    """A smooth term; term 2 on rank 1 misbehaves on its ``FAULT_AT``-th call if asked to."""

    calls = 0

    def __init__(self, index: int, fault: str | None, folder: Path) -> None:
        self.index, self.fault, self.folder = index, fault, folder

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        if self.index == 2 and RANK == 1 and self.fault is not None:
            Term.calls += 1
            if Term.calls == FAULT_AT:
                (self.folder / "fault_time").write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGSTOP if self.fault == "stop" else signal.SIGKILL)
        x = parameters["x"]
        return (x - 0.1 * self.index) ** 2 + math.sin(x * (self.index + 1))


def make_cob(fault: str | None, folder: Path) -> CombinedObjectiveFunction:
    return CombinedObjectiveFunction([Term(i, fault, folder) for i in range(4)])


def report(**data) -> None:
    # no flush: a stopped rank makes MPI_Abort end this process, and the wrapper flushes first
    print("RESULT " + json.dumps(data))


def fit(mpi: MPIWrapperCOB, folder: Path, budget: int, observations=None, **options) -> Fitter:
    fitter = Fitter(mpi, {"x": 0.4}, bounds={"x": (-2.0, 2.0)})
    fitter.register_evaluation_callback(JSONLinesHistory(folder / "fit.jsonl"))
    fitter.register_callback(CheckpointBestParameters(folder / "best.json"), 1)
    fitter.fit_nevergrad(
        budget=budget,
        optimizer_str="OnePlusOne",
        seed=3,
        initial_observations=observations,
        **options,
    )
    return fitter


def scenario_fit(folder: Path, fault: str, **options) -> None:
    """A fit whose 6th evaluation never finishes: rank 1 stops (or dies) on it."""
    with MPIWrapperCOB(make_cob(fault, folder), timeout=TIMEOUT) as mpi:
        if RANK != 0:
            mpi.worker_loop()
            return
        report(started=time.time())
        fit(mpi, folder, budget=20, **options)
        report(finished=True)  # never reached


def scenario_resume(folder: Path) -> None:
    """Continue the fit from its history file, appending to it."""
    with MPIWrapperCOB(make_cob(None, folder), timeout=TIMEOUT) as mpi:
        if RANK != 0:
            mpi.worker_loop()
            return
        fitter = fit(mpi, folder, budget=5, observations=load_observations(folder / "fit.jsonl"))
        result = fitter.result
        report(
            n_evals=result.n_evals,
            n_observations=result.n_observations,
            indices=[record.index for record in result.history],
            best_loss=result.best_loss,
        )


def scenario_retry(folder: Path) -> None:
    """No ``with`` block: rank 0 catches the error, then calls again (as a retry would)."""
    mpi = MPIWrapperCOB(make_cob("stop", folder), timeout=TIMEOUT)
    if RANK != 0:
        mpi.worker_loop()
        return
    for i in range(FAULT_AT - 1):
        mpi({"x": 0.1 * i})
    t0 = time.time()
    try:
        mpi({"x": 1.0})
    except RankTimeoutError as exc:
        report(
            type=type(exc).__name__,
            ranks={str(k): list(v) for k, v in exc.ranks.items()},
            timeout=exc.timeout,
            parameters=exc.parameters,
            waited=time.time() - t0,
            message=str(exc),
        )
    mpi({"x": 2.0})  # aborts every rank at once
    report(after_abort=True)  # never reached


def scenario_uncaught(folder: Path) -> None:
    """No ``with`` block and nobody catches the error: the program's exit aborts the ranks."""
    mpi = MPIWrapperCOB(make_cob("stop", folder), timeout=TIMEOUT)
    if RANK != 0:
        mpi.worker_loop()
        return
    for i in range(FAULT_AT):
        mpi({"x": 0.1 * i})


if __name__ == "__main__":
    name, out = sys.argv[1], Path(sys.argv[2])
    if name in ("stop", "kill"):
        scenario_fit(out, name)
    elif name == "stop_record":  # the fit records the error and calls again: abort then
        scenario_fit(out, "stop", on_error="record")
    else:
        {"resume": scenario_resume, "retry": scenario_retry, "uncaught": scenario_uncaught}[name](
            out
        )
