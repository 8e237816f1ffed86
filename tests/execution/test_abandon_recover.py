"""Abandoning evaluations and recovering executors on real local pools (issue 15).

``ContextFuture.abandon`` kills the worker process running the evaluation (stdlib pool, loky)
and its ``result()`` then says the evaluation exceeded its timeout; ``recover_executor``
restarts the pool of ``make_executor("process")`` in place, asks loky for a new reusable
executor, and refuses a broken pool the caller created with a message that says what to do. A
task whose arguments a worker cannot rebuild is an error of the task (``NotPicklableError``),
never a lost worker, and leaves the pool working. One test runs it all from a script's
``__main__``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types
import uuid
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import NotPicklableError, WorkerLostError
from chemfit.execution.executor_info import executor_info
from chemfit.execution.executors import (
    RestartableProcessPoolExecutor,
    SerialExecutor,
    make_executor,
)
from chemfit.execution.recovery import executor_alive, recover_executor
from chemfit.execution.submission import ContextSubmitter, submit_with_context
from chemfit.execution.worker_marks import task_announcements

loky = pytest.importorskip("loky")

ROOT = Path(__file__).resolve().parents[2]


def nap(seconds, ctx):
    if isinstance(seconds, dict):
        seconds = 60 * seconds["x"]
    ctx.meta["slept"] = seconds
    time.sleep(seconds)
    return seconds


def worker_pid(_, ctx):
    return os.getpid()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(") ", 1)[1][0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _wait_started(future, timeout: float = 20.0) -> int:
    """The pid of the worker running ``future``'s task, once it announced itself."""
    board = task_announcements()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = board.pid_of(future.number)
        if pid is not None:
            return pid
        time.sleep(0.01)
    raise AssertionError("the task never started")


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        assert time.monotonic() < deadline, f"worker process {pid} still runs"
        time.sleep(0.02)


def _reusable_loky(workers: int = 2):
    return loky.get_reusable_executor(max_workers=workers)


# -- abandon ------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_abandon_kills_the_worker_of_a_process_pool_and_the_pool_restarts_in_place():
    pool = make_executor("process", 2)
    try:
        assert isinstance(pool, ProcessPoolExecutor)
        assert isinstance(pool, RestartableProcessPoolExecutor)
        info = executor_info(pool)
        submitter = ContextSubmitter(info, nap)
        hanging = submitter.submit({"x": 1.5}, EvaluateContext(), index=7)
        other = submitter.submit(30, EvaluateContext(), index=8)
        pid = _wait_started(hanging)
        start = time.monotonic()
        assert hanging.abandon(timeout=2.0) is True
        assert hanging.done()
        with pytest.raises(WorkerLostError) as caught:
            hanging.result()
        assert time.monotonic() - start < 1.0
        message = str(caught.value)
        assert "evaluation 7" in message and "{'x': 1.5}" in message, message
        assert "exceeded its timeout of 2 s" in message and str(pid) in message, message
        assert caught.value.index == 7 and caught.value.parameters == {"x": 1.5}
        _wait_dead(pid)
        # one dead worker fails the pool's other pending task: a WorkerLostError, never a
        # bare BrokenProcessPool
        with pytest.raises(WorkerLostError) as other_lost:
            other.result(timeout=20)
        assert other_lost.value.index == 8
        assert executor_alive(info) is False
        assert recover_executor(info, other_lost.value) is info
        assert pool.restarts == 1 and executor_alive(info) is True
        again = submitter.submit(0.0, EvaluateContext(), index=8)
        assert again.result(timeout=20) == 0.0
        assert hanging.abandon() is False  # settled already: nothing more happens
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(90)
def test_abandon_kills_the_loky_worker_and_recover_asks_loky_for_a_new_executor():
    pool = _reusable_loky()
    info = executor_info(pool)
    submitter = ContextSubmitter(info, nap)
    hanging = submitter.submit({"x": 2.0}, EvaluateContext(), index=3)
    pid = _wait_started(hanging)
    assert pid in pool._processes
    assert hanging.abandon() is True
    with pytest.raises(WorkerLostError, match=r"evaluation 3 .* exceeded its timeout and"):
        hanging.result()
    _wait_dead(pid)
    with pytest.raises(WorkerLostError) as lost:  # loky's TerminatedWorkerError, translated
        submitter.submit(0.0, EvaluateContext(), index=4).result(timeout=30)
    assert lost.value.index == 4
    recovered = recover_executor(info, lost.value)
    assert recovered.executor is not pool and recovered.kind == "loky"
    assert executor_alive(recovered) is True
    submitter.switch_to(recovered)
    assert submitter.submit(0.5, EvaluateContext(), index=4).result(timeout=30) == 0.5


@pytest.mark.timeout(60)
def test_a_task_of_a_batch_submission_is_abandoned_and_its_neighbours_fail_as_lost():
    pool = make_executor("process", 2)
    try:
        submitter = ContextSubmitter(pool, nap)
        groups = [([(seconds, EvaluateContext())], index) for index, seconds in enumerate([20, 5])]
        hanging, other = submitter.submit_all(groups, single=True)
        assert hanging.number is not None and other.number == hanging.number + 1
        pid = _wait_started(hanging)
        _wait_started(other)
        assert hanging.abandon(timeout=3) is True
        with pytest.raises(WorkerLostError, match=f"evaluation 0 .*process {pid} was killed"):
            hanging.result()
        with pytest.raises(WorkerLostError, match="call 1"):
            other.result(timeout=20)
        with pytest.raises(ValueError, match="same kind"):
            submitter.switch_to(SerialExecutor())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["process", "loky"])
def test_the_retry_right_after_abandon_goes_to_a_working_pool(kind):
    """recover_executor waits for the pool to notice the worker abandon killed: the retry is not
    sent into a pool about to break."""
    pool = make_executor("process", 2) if kind == "process" else _reusable_loky()
    info = executor_info(pool)
    try:
        submitter = ContextSubmitter(info, nap)
        for attempt in range(3):
            hanging = submitter.submit(30.0, EvaluateContext(), index=attempt)
            _wait_started(hanging)
            assert hanging.abandon(timeout=1.0) is True
            info = recover_executor(info, WorkerLostError("abandoned", index=attempt))
            submitter.switch_to(info)
            assert submitter.submit(0.0, EvaluateContext()).result(timeout=30) == 0.0
    finally:
        if kind == "process":
            pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["serial", "threads"])
def test_nothing_can_be_abandoned_in_this_process(kind):
    executor = SerialExecutor() if kind == "serial" else ThreadPoolExecutor(1)
    try:
        ctx = EvaluateContext()
        future = submit_with_context(executor, nap, 0.3, ctx)
        assert future.abandon(timeout=0.1) is False
        assert future.result() == 0.3 and ctx.meta == {"slept": 0.3}
        assert recover_executor(executor_info(executor), RuntimeError("x")).executor is executor
    finally:
        executor.shutdown(wait=True)


@pytest.mark.timeout(60)
def test_a_finished_evaluation_keeps_its_result_and_a_queued_one_is_cancelled():
    pool = make_executor("process", 1)
    try:
        submitter = ContextSubmitter(pool, nap)
        first = submitter.submit(0.0, EvaluateContext(), index=0)
        assert first.result(timeout=20) == 0.0
        assert first.abandon() is False and first.result() == 0.0
        running = submitter.submit(3.0, EvaluateContext(), index=1)
        _wait_started(running)
        # the pool's call queue takes two more (max_workers + 1): they cannot be cancelled
        fillers = [submitter.submit(0.5, EvaluateContext(), index=i) for i in (2, 3)]
        queued = submitter.submit(3.0, EvaluateContext(), index=4)  # still pending
        time.sleep(0.2)
        assert queued.abandon() is True
        with pytest.raises(WorkerLostError, match="cancelled before it started"):
            queued.result()
        assert running.result(timeout=20) == 3.0  # nothing was killed
        assert [filler.result(timeout=20) for filler in fillers] == [0.5, 0.5]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -- recover --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_recover_keeps_a_reusable_loky_executor_someone_asked_for_meanwhile():
    pool = _reusable_loky()
    error = _break(pool)
    replacement = _reusable_loky()  # e.g. another part of the program asked loky again
    assert replacement is not pool
    recovered = recover_executor(executor_info(pool), error)
    assert recovered.executor is replacement and executor_alive(recovered) is True
    assert _reusable_loky() is replacement


def _break(pool) -> BaseException:
    """Kill a worker of ``pool``; the error its next task fails with."""
    os.kill(pool.submit(os.getpid).result(timeout=30), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        try:
            future = submit_with_context(pool, worker_pid, 0, EvaluateContext())
            future.result(timeout=30)
        except WorkerLostError as exc:
            return exc
        except Exception as exc:  # a broken pool may refuse the submission itself
            return exc
        assert time.monotonic() < deadline, "the pool never noticed its dead worker"
        time.sleep(0.05)


@pytest.mark.timeout(60)
def test_a_broken_pool_the_caller_created_cannot_be_recovered_and_the_error_says_what_to_do():
    with ProcessPoolExecutor(1) as pool:
        error = _break(pool)
        with pytest.raises(WorkerLostError) as caught:
            recover_executor(executor_info(pool), error)
    message = str(caught.value)
    assert "created by you and cannot be rebuilt" in message, message
    assert "make_executor('process', n)" in message and "load_observations" in message
    assert caught.value.__cause__ is error


@pytest.mark.timeout(60)
def test_a_broken_loky_executor_the_caller_created_cannot_be_recovered():
    pool = loky.ProcessPoolExecutor(1)
    try:
        error = _break(pool)
        with pytest.raises(WorkerLostError, match="created by you and cannot be rebuilt"):
            recover_executor(executor_info(pool), error)
    finally:
        pool.shutdown(wait=True, kill_workers=True)


@pytest.mark.timeout(60)
def test_a_working_pool_is_kept_and_a_shut_down_one_refused():
    pool = make_executor("process", 1)
    info = executor_info(pool)
    assert recover_executor(info, WorkerLostError("x")) is info
    pool.shutdown(wait=True)
    with pytest.raises(WorkerLostError, match="was shut down"):
        recover_executor(info, WorkerLostError("x"))


# -- tasks a worker cannot start -------------------------------------------------------------------


def _caller_only_thing():
    """An object of a class in a module that exists in this process only."""
    name = f"only_here_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    exec("class Thing:\n    pass\n", module.__dict__)
    module.Thing.__module__ = name
    sys.modules[name] = module
    return name, module.Thing()


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["process", "loky"])
def test_arguments_a_worker_cannot_rebuild_are_an_error_of_the_task(kind):
    pool = make_executor("process", 2) if kind == "process" else _reusable_loky()
    try:
        list(pool.map(abs, [-1, -2]))  # the workers run before the module exists
        name, thing = _caller_only_thing()
        submitter = ContextSubmitter(pool, nap)
        future = submitter.submit({"x": thing}, EvaluateContext(), index=5)
        with pytest.raises(NotPicklableError) as caught:
            future.result(timeout=30)
        message = str(caught.value)
        assert "could not rebuild the arguments of call 5" in message and name in message
        assert not isinstance(caught.value, WorkerLostError)
        assert executor_alive(executor_info(pool)) is True  # not broken
        assert submitter.submit(0.0, EvaluateContext()).result(timeout=30) == 0.0
    finally:
        if kind == "process":
            pool.shutdown(wait=True, cancel_futures=True)


# -- from a script's __main__ ------------------------------------------------------------------

SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    from chemfit.core.context import EvaluateContext
    from chemfit.core.exceptions import WorkerLostError
    from chemfit.execution.executor_info import executor_info
    from chemfit.execution.recovery import recover_executor
    from chemfit.execution.submission import ContextSubmitter
    from chemfit.executors import make_executor

    def objective(params, ctx):  # defined in __main__, as in a notebook
        if params["x"] < 0:
            time.sleep(60)
        ctx.meta["pid"] = os.getpid()
        return params["x"] ** 2

    def run(kind):
        options = {"mp_context": __import__("multiprocessing").get_context("spawn")}
        pool = make_executor(kind, 2, **(options if kind == "process" else {}))
        report = {"pids": []}
        try:
            info = executor_info(pool)
            submitter = ContextSubmitter(info, objective)
            hanging = submitter.submit({"x": -1.0}, EvaluateContext(), index=11)
            fine = submitter.submit({"x": 3.0}, EvaluateContext(), index=12)
            report["fine"] = fine.result(timeout=60)
            time.sleep(0.5)
            report["pids"] += list(pool._processes)
            report["abandoned"] = hanging.abandon(timeout=1.0)
            try:
                hanging.result()
            except WorkerLostError as exc:
                report["message"] = str(exc)
            try:  # the pool is broken: at the submission or at the result
                probe = submitter.submit({"x": 1.0}, EvaluateContext(), index=13)
                report["probe"] = probe.result(timeout=60)
            except WorkerLostError as exc:
                info = recover_executor(info, exc)
                submitter.switch_to(info)
                report["probe"] = submitter.submit(
                    {"x": 2.0}, EvaluateContext(), index=13).result(timeout=60)
            report["pids"] += list(info.executor._processes)
        finally:
            info.executor.shutdown(wait=True)
        return report

    if __name__ == "__main__":
        print(json.dumps({kind: run(kind) for kind in sys.argv[1:]}))
    """
)


@pytest.mark.timeout(180)
def test_abandon_and_recover_with_a_model_defined_in_main(tmp_path):
    script = tmp_path / "fit_me.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), "process", "loky"],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for kind in ("process", "loky"):
        result = report[kind]
        assert result["fine"] == 9.0 and result["abandoned"] is True, result
        assert "evaluation 11" in result["message"], result
        assert "exceeded its timeout of 1 s" in result["message"], result
        assert result["probe"] in (1.0, 4.0), result
        for pid in result["pids"]:  # no worker of the script is left running
            _wait_dead(pid)


@pytest.mark.timeout(30)
def test_the_announcement_files_of_ended_processes_are_removed():
    from chemfit.execution.worker_marks import TaskAnnouncements

    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    board = TaskAnnouncements()
    try:
        base = os.path.dirname(board.directory)
        stale = Path(base) / f"chemfit-tasks-{ended.stdout.strip()}-abc"
        stale.mkdir()
        (stale / "pids").write_bytes(b"\0" * 16)
        mine = Path(board.directory)
        TaskAnnouncements().close()  # a new board sweeps the folder
        assert not stale.exists() and mine.exists()
    finally:
        board.close()
    assert not Path(board.directory).exists()
