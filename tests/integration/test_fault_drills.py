"""Fault drills (issue 15): real workers die, hang or raise in the middle of a fit.

Each drill runs a script as ``__main__`` (the objective is defined there, as in a notebook
cell) in its own process session: ``python drill.py <scenario> <folder>``. The script fits with
``fit_nevergrad`` on a real executor, SIGKILLs a worker from an evaluation callback while
another evaluation runs (the worker whose objective marked itself busy), and prints a
``REPORT`` line; the test checks it. Every process the script starts carries a tag in its
environment, and the test checks that none is left behind.
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

DRILL = r'''
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from chemfit.exceptions import WorkerLostError
from chemfit.executors import make_executor
from chemfit.fitter import Fitter
from chemfit.fitter_callbacks import JSONLinesHistory, load_observations
from chemfit.results import FitHistory

SCENARIO, OUT = sys.argv[1], Path(sys.argv[2])
START = {"x": 0.0, "y": 0.0}
BOUNDS = {"x": (-1.0, 1.0), "y": (-1.0, 1.0)}


def objective(params):
    """Defined in __main__; marks its worker busy while it runs."""
    busy = OUT / f"busy-{os.getpid()}"
    busy.write_text("")
    try:
        x, y = params["x"], params["y"]
        if SCENARIO == "raise" and x > 0.2:
            raise ValueError(f"simulator diverged at x={x:.3f}")
        if SCENARIO.startswith("hang") and x == 0.0 and y == 0.0:
            marker = OUT / "hung"  # the initial point hangs on its first try only
            if not marker.exists():
                marker.write_text(str(os.getpid()))
                time.sleep(300)
        time.sleep(0.08)
        return (x - 0.3) ** 2 + (y + 0.2) ** 2
    finally:
        busy.unlink(missing_ok=True)


class KillAt:
    """An evaluation callback: once record ``at`` is told, a thread SIGKILLs the first worker
    seen busy (in batch mode, one of the next batch)."""

    def __init__(self, at, pids=()):
        self.at, self.killed, self.when, self.thread = at, [], None, None
        self.pids = list(pids)  # kill these all at once (every engine), busy or not

    def __call__(self, record):
        if record.index == self.at and self.thread is None:
            self.thread = threading.Thread(target=self._kill, daemon=True)
            self.thread.start()

    def _kill(self):
        """Kill one busy worker (with ``pids``: those processes, busy or not, at once)."""
        if self.pids:
            for pid in self.pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.when, self.killed = time.monotonic(), list(self.pids)
            return
        deadline = time.monotonic() + 20
        while not self.killed and time.monotonic() < deadline:
            for path in OUT.glob("busy-*"):
                pid = int(path.name.split("-")[1])
                if pid != os.getpid() and pid not in self.killed:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.when = time.monotonic()
                    self.killed.append(pid)
                    break
            time.sleep(0.005)


def fit(executor, budget, *, killer=None, path=None, observations=None, **kwargs):
    fitter = Fitter(objective, START, bounds=BOUNDS, log_exceptions=False)
    path = path or OUT / "fit.jsonl"
    fitter.register_evaluation_callback(JSONLinesHistory(path))
    if killer is not None:
        fitter.register_evaluation_callback(killer)
    error, t_error = None, None
    try:
        fitter.fit_nevergrad(
            budget=budget, optimizer_str="OnePlusOne", num_workers=2, executor=executor,
            seed=3, progress=False, initial_observations=observations, **kwargs,
        )
    except Exception as exc:
        error, t_error = exc, time.monotonic()
    result = fitter.result
    history = result.history
    report = {
        "error_type": type(error).__name__ if error else None,
        "error": str(error) if error else None,
        "error_index": getattr(error, "index", None),
        "error_parameters": getattr(error, "parameters", None),
        "seconds_to_error": t_error - killer.when if error and killer and killer.when else None,
        "indices": [r.index for r in history],
        "statuses": [r.status for r in history],
        "tries": [r.tries for r in history],
        "errors": [r.error for r in history],
        "tracebacks": [r.traceback for r in history],
        "times": [r.time for r in history],
        "parameters": [r.parameters for r in history],
        "n_ok": result.n_ok, "n_failed": result.n_failed, "n_lost": result.n_lost,
        "n_evals": result.n_evals, "best_loss": result.best_loss,
        "best_status": history.best().status if history.best() else None,
        "file": [r.to_dict() for r in FitHistory.from_jsonl(path)],
        "killed": killer.killed if killer else [],
    }
    return report


def main():
    report = {}
    if SCENARIO in ("kill-process", "kill-process-no-retries", "hang", "hang-retry", "raise"):
        pool = make_executor("process", 2)
        kwargs = {
            "kill-process": {"retries": 2, "mode": "async"},
            "kill-process-no-retries": {"mode": "async"},
            "hang": {"evaluation_timeout": 2.0, "mode": "batch"},
            "hang-retry": {"evaluation_timeout": 2.0, "retries": 1, "mode": "async"},
            "raise": {"on_error": "record", "mode": "async"},
        }[SCENARIO]
        killer = KillAt(6) if SCENARIO.startswith("kill") else None
        try:
            report = fit(pool, 20, killer=killer, **kwargs)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    elif SCENARIO == "kill-loky":
        pool = make_executor("loky", 2)
        try:
            report = fit(pool, 20, killer=KillAt(6), retries=2, mode="batch")
        finally:
            make_executor("loky", 2).shutdown(wait=True, kill_workers=True)
    elif SCENARIO == "kill-user-pool":
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(2) as pool:
            report = fit(pool, 20, killer=KillAt(6), retries=2, mode="async")
        observations = load_observations(OUT / "fit.jsonl")
        pool = make_executor("process", 2)
        try:
            again = fit(pool, 10, path=OUT / "resumed.jsonl", observations=observations)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        report["resumed"] = {"n_evals": again["n_evals"], "error": again["error"],
                             "statuses": again["statuses"], "n_observations": len(observations)}
    elif SCENARIO == "kill-engine":
        ex = make_executor("ipyparallel", 2)
        try:
            report = fit(ex, 20, killer=KillAt(6), retries=2, mode="async")
            report["engines_left"] = ex.n_engines
        finally:
            ex.shutdown()
    elif SCENARIO == "kill-all-engines":
        ex = make_executor("ipyparallel", 2)
        try:
            pids = ex.client[:].apply_sync(os.getpid)
            report = fit(ex, 20, killer=KillAt(6, pids=pids), retries=2, mode="async")
        finally:
            ex.shutdown()
        observations = load_observations(OUT / "fit.jsonl")
        pool = make_executor("process", 2)
        try:
            again = fit(pool, 6, path=OUT / "resumed.jsonl", observations=observations)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        report["resumed"] = {"n_evals": again["n_evals"], "error": again["error"],
                             "n_observations": len(observations)}
    elif SCENARIO == "kill-dask":
        ex = make_executor("dask", 2)
        try:
            report = fit(ex, 20, killer=KillAt(6), retries=2, mode="async")
        finally:
            ex.shutdown()
    else:
        raise SystemExit(f"unknown scenario {SCENARIO}")
    print("REPORT " + json.dumps(report, default=str), flush=True)


if __name__ == "__main__":
    main()
'''


def _env(tag: str) -> dict[str, str]:
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), mh.TAG_VARIABLE: tag}


def run_drill(tmp_path: Path, scenario: str, timeout: float = 150) -> dict:
    """Run the drill script for ``scenario``; its report (no process may be left behind)."""
    script = tmp_path / "drill.py"
    script.write_text(DRILL)
    out = tmp_path / "out"
    out.mkdir()
    tag = uuid.uuid4().hex
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, str(script), scenario, str(out)],
        cwd=tmp_path,
        env=_env(tag),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        left = mh.wait_until_gone(tag, seconds=20)
        mh.kill_tagged(tag)
    print(f"{scenario}: {time.perf_counter() - start:.1f} s")
    assert proc.returncode == 0, f"the drill failed:\n{output[-6000:]}"
    assert not left, f"processes left behind: {left}"
    lines = [line for line in output.splitlines() if line.startswith("REPORT ")]
    assert lines, f"no report in the output:\n{output[-4000:]}"
    report = json.loads(lines[-1][len("REPORT ") :])
    report["log"] = output
    return report


def check_complete(report: dict, budget: int) -> None:
    """Every evaluation in the history once, numbered 0..budget-1, and the same in the file."""
    assert report["error"] is None, report["error"]
    assert report["indices"] == list(range(budget)) and report["n_evals"] == budget
    assert [r["index"] for r in report["file"]] == report["indices"]
    assert [r["status"] for r in report["file"]] == report["statuses"]
    assert [r["tries"] for r in report["file"]] == report["tries"]
    assert report["best_status"] == "ok"


@pytest.mark.timeout(200)
@pytest.mark.parametrize("scenario", ["kill-process", "kill-loky"])
def test_a_killed_pool_worker_is_retried_and_the_fit_finishes_its_budget(tmp_path, scenario):
    report = run_drill(tmp_path, scenario)
    assert report["killed"], "no worker was killed"
    check_complete(report, 20)
    assert report["n_lost"] == 0 and report["n_failed"] == 0
    retried = [i for i, tries in enumerate(report["tries"]) if tries > 1]
    assert retried and all(report["tries"][i] == 2 for i in retried), report["tries"]
    assert all(i >= 6 for i in retried)  # the ones in flight when the worker died
    assert "submitted again (try 2 of 3)" in report["log"]


@pytest.mark.timeout(200)
def test_without_retries_a_killed_worker_ends_the_fit_with_a_clear_error(tmp_path):
    report = run_drill(tmp_path, "kill-process-no-retries")
    assert report["error_type"] == "WorkerLostError"
    index, params = report["error_index"], report["error_parameters"]
    assert index is not None and index > 6 - 2 and params is not None
    assert f"call {index}" in report["error"] or f"evaluation {index}" in report["error"]
    assert repr(params["x"])[:6] in report["error"]  # the parameters are named
    kept = report["indices"]
    assert kept == list(range(len(kept))) and len(kept) >= 7  # the history up to the loss
    assert [r["index"] for r in report["file"]] == kept
    assert set(report["statuses"]) == {"ok"}


@pytest.mark.timeout(200)
def test_on_error_record_on_a_process_pool_keeps_the_remote_traceback(tmp_path):
    report = run_drill(tmp_path, "raise")
    check_complete(report, 20)
    failed = [i for i, s in enumerate(report["statuses"]) if s == "failed"]
    assert failed and report["n_failed"] == len(failed)
    assert failed == [i for i, p in enumerate(report["parameters"]) if p["x"] > 0.2]
    for i in failed:
        assert report["errors"][i].startswith("ValueError: simulator diverged at x=")
        trace = report["tracebacks"][i]
        assert "in objective" in trace and "simulator diverged" in trace, trace  # the worker's
        assert report["file"][i]["traceback"] == trace


@pytest.mark.timeout(200)
def test_a_hanging_evaluation_is_killed_recorded_as_lost_and_the_fit_goes_on(tmp_path):
    report = run_drill(tmp_path, "hang")
    check_complete(report, 20)
    assert report["statuses"][0] == "lost" and report["tries"][0] == 1
    assert report["errors"][0].startswith("WorkerLostError:") and "timeout" in report["errors"][0]
    assert report["times"][0] < 4.0, "not recorded within 4 s"
    assert report["n_lost"] == 1 and set(report["statuses"][1:]) == {"ok"}
    assert report["tries"][1:] == [1] * 19  # killed alongside: submitted again, not counted


@pytest.mark.timeout(200)
def test_a_hanging_evaluation_is_retried_after_its_timeout(tmp_path):
    report = run_drill(tmp_path, "hang-retry")
    check_complete(report, 20)
    # async: records in tell order; the initial point (which hung) is told after its retry
    hung = report["parameters"].index({"x": 0.0, "y": 0.0})
    assert report["statuses"][hung] == "ok" and report["tries"][hung] == 2
    assert report["n_lost"] == 0 and report["tries"].count(1) == 19


@pytest.mark.timeout(240)
def test_a_broken_pool_of_the_caller_stops_the_fit_within_5_s_and_it_resumes(tmp_path):
    report = run_drill(tmp_path, "kill-user-pool")
    assert report["error_type"] == "WorkerLostError", report["error"]
    assert "cannot go on" in report["error"] and "created by you" in report["error"]
    assert report["seconds_to_error"] < 5.0
    n = len(report["indices"])
    assert report["indices"] == list(range(n)) and n >= 8  # the lost ones recorded too
    assert "lost" in report["statuses"]
    assert [r["index"] for r in report["file"]] == report["indices"]
    resumed = report["resumed"]
    assert resumed["error"] is None and resumed["n_evals"] == 10
    assert resumed["n_observations"] == n


@pytest.mark.timeout(300)
def test_a_killed_ipyparallel_engine_leaves_the_fit_to_the_other_engine(tmp_path):
    pytest.importorskip("ipyparallel")
    report = run_drill(tmp_path, "kill-engine", timeout=260)
    check_complete(report, 20)
    assert report["engines_left"] == 1
    assert report["n_lost"] == 0 and max(report["tries"]) == 2


@pytest.mark.timeout(300)
def test_when_every_engine_is_killed_the_fit_stops_within_5_s_and_resumes(tmp_path):
    pytest.importorskip("ipyparallel")
    report = run_drill(tmp_path, "kill-all-engines", timeout=260)
    assert len(report["killed"]) == 2
    assert report["error_type"] == "WorkerLostError", report["error"]
    assert "no engine left" in report["error"], report["error"]
    assert report["seconds_to_error"] < 5.0
    n = len(report["indices"])
    assert report["indices"] == list(range(n)) and "lost" in report["statuses"]
    assert [r["index"] for r in report["file"]] == report["indices"]
    resumed = report["resumed"]
    assert resumed["error"] is None and resumed["n_evals"] == 6
    assert resumed["n_observations"] == n


@pytest.mark.timeout(300)
def test_a_killed_dask_worker_does_not_end_the_fit(tmp_path):
    pytest.importorskip("distributed")
    report = run_drill(tmp_path, "kill-dask", timeout=260)
    assert report["killed"]
    check_complete(report, 20)
    assert report["n_lost"] == 0 and max(report["tries"]) <= 2
