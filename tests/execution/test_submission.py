"""The submission primitive, what an executor is, the wire form and the remote-failure convention
(issue 13, seams 1-5) on real serial executors, thread pools, process pools and loky."""

from __future__ import annotations

import os
import pickle
import threading
import time
from concurrent import futures as cf
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import NotPicklableError, RemoteEvaluationError, WorkerLostError
from chemfit.execution.context_tasks import ContextTask
from chemfit.execution.executor_info import executor_info
from chemfit.execution.executor_utils import map_with_context
from chemfit.execution.executors import SerialExecutor
from chemfit.execution.submission import (
    TIMEOUT_ERRORS,
    CallOutcome,
    ContextSubmitter,
    submit_calls,
    submit_with_context,
)
from chemfit.execution.task_errors import RemoteFailure
from tests.helpers import executor_task_functions as h

IN_PROCESS = ("serial", "threads")
REMOTE = pytest.mark.parametrize("executor", ["process-pool", "loky"], indirect=True)


def _kind(request) -> str:
    return request.node.callspec.params["executor"]


# -- seam 1: what an executor is -----------------------------------------------------------------


def test_executor_info_of_each_kind(executor, request):
    kind = _kind(request)
    info = executor_info(executor)
    assert info.executor is executor
    assert info.kind == kind
    assert info.in_process == (kind in IN_PROCESS)
    assert info.local_pool == (kind in ("process-pool", "loky"))
    assert info.on_this_machine
    assert info.n_workers == (1 if kind == "serial" else 2)
    assert executor_info(info) is info
    assert not info.owned and executor_info(executor, owned=True).owned


def test_executor_info_of_none_is_a_serial_executor():
    info = executor_info(None)
    assert isinstance(info.executor, SerialExecutor) and info.kind == "serial"


def test_main_is_reachable_in_process_and_for_fork_pools_only(executors):
    assert executor_info(executors["threads"]).main_reachable
    assert not executor_info(executors["loky"]).main_reachable
    import multiprocessing

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as fork_pool:
        assert executor_info(fork_pool).main_reachable


def test_remote_kinds_are_recognised_by_module_name():
    def executor_from(module: str, name: str = "Executor"):
        cls = type(name, (), {"submit": lambda *a: None, "map": lambda *a: None})
        cls.__module__ = module
        return cls()

    assert executor_info(executor_from("distributed.client", "ClientExecutor")).kind == "dask"
    assert executor_info(executor_from("ipyparallel.client.view", "ViewExecutor")).kind == (
        "ipyparallel"
    )
    other = executor_info(executor_from("somewhere.else"))
    assert (other.kind, other.in_process, other.local_pool) == ("other", False, False)


# -- seam 2: submit_with_context and submit_calls ---------------------------------------------------


@pytest.mark.timeout(60)
def test_submit_with_context_applies_the_state(executor, request):
    ctx = EvaluateContext()
    ctx.meta["from_caller"] = True
    future = submit_with_context(executor, h.record_square, 3, ctx)
    assert future.result(timeout=30) == 9
    assert ctx.loss == 9 and ctx.parameters == {"x": 3} and ctx.quantities == {"square": 9}
    assert ctx.meta["incoming_keys"] == ["from_caller"]
    assert (ctx.meta["pid"] == os.getpid()) == (_kind(request) in IN_PROCESS)
    assert future.done() and future.result() == 9  # the state is applied once, the value kept


@pytest.mark.timeout(60)
def test_submit_calls_returns_outcomes_with_worker_seconds(executor):
    calls = [(0.05, EvaluateContext()), (0.0, EvaluateContext())]
    outcomes = submit_calls(executor, h.sleep_for, calls).result(timeout=30)
    assert [type(o) for o in outcomes] == [CallOutcome, CallOutcome]
    assert [o.value for o in outcomes] == [0.05, 0.0]
    assert [o.error for o in outcomes] == [None, None]
    assert outcomes[0].seconds >= 0.05 and outcomes[1].seconds < 0.05
    assert [ctx.meta["slept"] for _, ctx in calls] == [0.05, 0.0]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stop", [False, True])
def test_submit_calls_failures_and_stop_at_first_error(executor, stop):
    calls = [(x, EvaluateContext()) for x in (0, 1, 2)]
    outcomes = submit_calls(executor, h.fail_on_odd, calls, stop_at_first_error=stop).result(30)
    assert len(outcomes) == (2 if stop else 3)
    assert outcomes[0].value == 0 and outcomes[0].error is None
    assert type(outcomes[1].error) is ValueError and str(outcomes[1].error) == "odd input 1"
    assert calls[0][1].loss == 0
    assert (calls[2][1].loss is None) == stop


@pytest.mark.timeout(60)
def test_a_failed_call_brings_back_what_it_wrote(executor):
    ctx = EvaluateContext()
    with pytest.raises(ValueError, match="failed after writing 5"):
        submit_with_context(executor, h.write_then_fail, 5, ctx).result(30)
    assert ctx.meta["before_failure"] == 5  # as a serial call leaves it


@pytest.mark.timeout(60)
def test_a_lost_worker_names_the_call_and_keeps_the_pool_error_as_cause():
    pool = ProcessPoolExecutor(1)
    try:
        ctx = EvaluateContext()
        ctx.parameters = {"x": 3}
        with pytest.raises(WorkerLostError, match=r"call 7 with parameters \{'x': 3\}") as info:
            submit_with_context(pool, h.die_on_three, 3, ctx, index=7).result(30)
        assert info.value.index == 7 and info.value.parameters == {"x": 3}
        assert type(info.value.__cause__).__name__ == "BrokenProcessPool"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_the_last_argument_must_be_a_context():
    with pytest.raises(TypeError, match="last positional argument must be the EvaluateContext"):
        submit_with_context(None, h.record_square, 3, {"x": 1})


@pytest.mark.timeout(60)
def test_a_submitter_packs_its_function_once(executors):
    submitter = ContextSubmitter(executors["process-pool"], h.record_square)
    assert submitter.info.kind == "process-pool"
    ctxs = [EvaluateContext() for _ in range(3)]
    futures = [submitter.submit(x, ctx, index=x) for x, ctx in enumerate(ctxs)]
    assert [f.result(30) for f in futures] == [0, 1, 4]
    assert [f.index for f in futures] == [0, 1, 2]
    assert [ctx.loss for ctx in ctxs] == [0, 1, 4]


# -- one pickle per evaluation ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@REMOTE
def test_each_evaluation_is_pickled_once(executor):
    """A fit's evaluation on a process pool is a one-call map: its arguments were pickled twice
    (once to check them, once by the pool); now chemfit pickles them once and the pool copies
    the bytes."""
    n = 5
    ctxs = [EvaluateContext() for _ in range(n)]
    h.CountedPickles.count = 0
    for i, ctx in enumerate(ctxs):
        parameters = {"x": float(i), "counted": h.CountedPickles()}
        assert map_with_context(executor, h.first_of, [parameters], ctxs=[ctx]) == [float(i)]
    assert h.CountedPickles.count == n
    assert [ctx.loss for ctx in ctxs] == [float(i) for i in range(n)]


@pytest.mark.timeout(60)
def test_an_unpicklable_first_call_refuses_before_anything_is_submitted():
    pool = ProcessPoolExecutor(1)
    try:
        ctxs = [EvaluateContext() for _ in range(3)]
        with pytest.raises(NotPicklableError, match=r"argument 0 of call 0 \(<unlocked"):
            map_with_context(pool, h.add_with_context, [threading.Lock(), 2, 3], [0] * 3, ctxs=ctxs)
        assert not pool._processes  # nothing was submitted
    finally:
        pool.shutdown()


@pytest.mark.timeout(60)
@REMOTE
def test_an_unpicklable_later_call_is_named_after_the_others_ran(executor):
    """A later call is packed just before it is submitted (the workers start meanwhile): it
    fails alone, named, and the states of the others are applied."""
    ctxs = [EvaluateContext() for _ in range(5)]
    arguments = [1, 2, 3, threading.Lock(), 5]
    with pytest.raises(NotPicklableError, match=r"argument 0 of call 3 \(<unlocked"):
        map_with_context(executor, h.add_with_context, arguments, [0] * 5, ctxs=ctxs)
    assert [ctx.loss for ctx in ctxs] == [1, 2, 3, None, 5]


@pytest.mark.timeout(90)
def test_arguments_a_loky_worker_cannot_rebuild_leave_the_executor_usable(executors, monkeypatch):
    import types

    loky = pytest.importorskip("loky")
    module = types.ModuleType("only_in_the_caller_h1")
    exec("class Value:\n    pass\n", module.__dict__)
    monkeypatch.setitem(__import__("sys").modules, module.__name__, module)
    executor = executors["loky"]
    with pytest.raises(NotPicklableError, match="could not rebuild the arguments of call 0"):
        map_with_context(executor, h.record_square, [module.Value()], ctxs=[EvaluateContext()])
    # the same executor still works: the arguments were unpickled inside the task
    assert loky.get_reusable_executor(max_workers=2) is executor
    assert map_with_context(executor, h.record_square, [3], ctxs=[EvaluateContext()]) == [9]


# -- seam 3: the wire form -----------------------------------------------------------------------


def test_wire_form_round_trip():
    shared = SimpleNamespace(tag="shared")
    ctx = EvaluateContext(config=SimpleNamespace(a=1), shared=shared, executor="pool")
    ctx.parameters, ctx.loss, ctx.meta["m"] = {"x": 1.0}, 5.0, 1
    ctx.temp.scratch = "local"
    wire = ctx.to_wire()
    assert wire == ({"x": 1.0}, ctx.config, shared, {"m": 1})
    copy = EvaluateContext.from_wire(pickle.loads(pickle.dumps(wire)))
    state = pickle.loads(pickle.dumps(ctx)).__dict__
    assert copy.__dict__.keys() == state.keys()
    assert copy.parameters == {"x": 1.0} and copy.meta == {"m": 1} and copy.config.a == 1
    assert copy.loss is None and copy.executor is None and vars(copy.temp) == {}
    assert copy.children == [] and copy.shared.tag == "shared"


def test_a_context_subclass_travels_as_itself():
    ctx = h.TaggedContext(tag=7)
    assert ctx.to_wire() is ctx
    assert EvaluateContext.from_wire(ctx) is ctx


# -- seam 4: one remote-failure convention ----------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_remote_error_is_the_original_caused_by_remote_evaluation_error(executor, request):
    with pytest.raises(ValueError, match=r"^odd input 1$") as info:
        submit_with_context(executor, h.fail_on_odd, 1, EvaluateContext()).result(30)
    assert type(info.value) is ValueError
    cause = info.value.__cause__
    if _kind(request) in IN_PROCESS:
        assert not isinstance(cause, RemoteEvaluationError)  # raised here, traceback intact
        return
    assert isinstance(cause, RemoteEvaluationError)
    assert cause.type_name == "ValueError" and cause.remote_message == "odd input 1"
    assert (
        cause.where.startswith("worker process ") and cause.where != f"worker process {os.getpid()}"
    )
    assert "fail_on_odd" in cause.remote_traceback and "fail_on_odd" in str(cause)
    assert str(cause).startswith(f"ValueError on {cause.where}: odd input 1")


@pytest.mark.timeout(60)
@REMOTE
def test_an_error_that_cannot_be_rebuilt_arrives_as_remote_evaluation_error(executor):
    with pytest.raises(RemoteEvaluationError, match="custom failure 1 b") as info:
        submit_with_context(executor, h.raise_custom_error, 1, EvaluateContext()).result(30)
    assert info.value.type_name == "CustomError"
    assert "raise_custom_error" in info.value.remote_traceback


def test_remote_failure_pickles_and_names_rank_and_term():
    try:
        raise KeyError("k")
    except KeyError as exc:
        failure = pickle.loads(pickle.dumps(RemoteFailure.capture(exc, "rank 2")))
    error = failure.to_exception(rank=2, term_index=5)
    assert type(error) is KeyError and error.args == ("k",)
    cause = error.__cause__
    assert (cause.rank, cause.term_index, cause.where) == (2, 5, "rank 2")
    assert str(cause).startswith("KeyError on rank 2, term 5: 'k'")
    copy = pickle.loads(pickle.dumps(cause))
    assert (copy.where, copy.rank, copy.remote_traceback) == ("rank 2", 2, cause.remote_traceback)


# -- seam 5: the worker mark ---------------------------------------------------------------------


def test_the_task_marks_its_thread_and_drops_the_mark_when_pickled():
    with ThreadPoolExecutor(1) as pool:
        task = ContextTask(h.task_executor, pool, in_process=True)
        values, states, seconds, failures = pool.submit(task, [(1, EvaluateContext())]).result()
        assert values == [pool] and states is None and failures is None
        assert len(seconds) == 1 and seconds[0] >= 0
        copy = pickle.loads(pickle.dumps(task))
        assert copy.executor is None and not copy.in_process
        values, states, _, failures = copy([((1,), EvaluateContext().to_wire())])
        assert values == [None] and failures is None and states[0]["meta"] == {}
        assert pool.submit(h.task_executor, 1, None).result() is None  # restored


def test_timeouts_can_be_retried():
    with ThreadPoolExecutor(1) as pool:
        ctx = EvaluateContext()
        future = submit_with_context(pool, h.sleep_for, 0.3, ctx)
        with pytest.raises(TIMEOUT_ERRORS):  # the executor's own (distinct before Python 3.11)
            future.result(timeout=0.01)
        start = time.perf_counter()
        assert future.result(timeout=10) == 0.3
        assert ctx.meta["slept"] == 0.3 and time.perf_counter() - start < 5


@pytest.mark.timeout(60)
def test_submit_each_settles_calls_run_one_task_each_by_position():
    with ThreadPoolExecutor(2) as pool:
        submitter = ContextSubmitter(pool, h.fail_on_odd)
        ctxs = [EvaluateContext() for _ in range(4)]
        future = submitter.submit_each([(x, ctx) for x, ctx in zip(range(4), ctxs)], index=10)
        values, errors = future.settle(10)
        assert values == [0, None, 4, None]
        assert sorted(errors) == [1, 3]
        assert isinstance(errors[3], ValueError) and "odd input 3" in str(errors[3])
        assert [ctx.loss for ctx in ctxs[::2]] == [0, 4]
        assert future.done() and future.pending() == 0
        assert [outcome.error is None for outcome in future.outcomes()] == [True, False] * 2


@pytest.mark.timeout(60)
def test_submit_each_times_out_then_settles_and_cancels_what_has_not_started():
    with ThreadPoolExecutor(1) as pool:
        submitter = ContextSubmitter(pool, h.sleep_for)
        ctxs = [EvaluateContext() for _ in range(3)]
        future = submitter.submit_each([(0.3, ctxs[0]), (0.0, ctxs[1]), (0.0, ctxs[2])])
        with pytest.raises(TIMEOUT_ERRORS):
            future.settle(0.01)
        assert future.pending() == 3
        assert future.cancel()  # the two queued calls
        values, errors = future.settle(10)
        assert values[0] == 0.3 and sorted(errors) == [1, 2]
        assert all(isinstance(error, cf.CancelledError) for error in errors.values())


def test_submit_each_is_for_executors_in_this_process(executors):
    with pytest.raises(ValueError, match="in this process"):
        ContextSubmitter(executors["process-pool"], h.sleep_for).submit_each([])
