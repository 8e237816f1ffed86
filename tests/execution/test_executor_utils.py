"""map_with_context, as_completed_with_context and AttachContextAsReturnValue (§2.4, R2, R11,
R18, R19) on real thread pools, process pools and loky."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import threading
import time
import types
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import NotPicklableError, WorkerLostError
from chemfit.execution.executor_utils import (
    AttachContextAsReturnValue,
    as_completed_with_context,
    map_with_context,
)
from chemfit.execution.executors import SerialExecutor
from chemfit.execution.worker_marks import current_task_executor
from tests.helpers import executor_task_functions as h


# The pools come from tests/conftest.py (one per kind, shared by this module's tests).
@pytest.fixture
def process_pool(executors):
    return executors["process-pool"]


@pytest.fixture
def loky_executor(executors):
    return executors["loky"]


@pytest.fixture
def thread_pool(executors):
    return executors["threads"]


REMOTE = pytest.mark.parametrize("executor", ["process-pool", "loky"], indirect=True)


def _contexts(n, shared=None):
    ctxs = []
    for _ in range(n):
        ctx = EvaluateContext(shared=shared)
        ctx.meta["from_caller"] = True
        ctx.temp.local = "caller"
        ctxs.append(ctx)
    return ctxs


# -- AttachContextAsReturnValue ----------------------------------------------------------------


def test_attach_context_returns_value_and_state_and_pickles():
    wrapped = pickle.loads(pickle.dumps(AttachContextAsReturnValue(h.record_square)))
    ctx = EvaluateContext()
    value, state = wrapped(4, ctx)
    assert value == 16
    assert set(state) == {"parameters", "loss", "quantities", "meta"}
    assert state["loss"] == 16 and state["parameters"] == {"x": 4}
    assert state["meta"] is ctx.meta  # references, no copies


@pytest.mark.parametrize("args", [(), (1,), (1, {"x": 1})])
def test_attach_context_rejects_non_context_last_argument(args):
    with pytest.raises(TypeError, match="last positional argument must be the EvaluateContext"):
        AttachContextAsReturnValue(h.record_square)(*args)


# -- state round trips ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 3])
@REMOTE
def test_state_survives_worker_processes(executor, chunksize):
    shared = SimpleNamespace(tag="caller")
    ctxs = _contexts(7, shared=shared)
    results = map_with_context(executor, h.record_square, range(7), ctxs=ctxs, chunksize=chunksize)

    assert results == [x * x for x in range(7)]
    for x, ctx in enumerate(ctxs):
        assert ctx.loss == x * x
        assert ctx.parameters == {"x": x}
        assert ctx.quantities == {"square": x * x}
        assert ctx.meta["x_seen"] == x
        assert ctx.meta["pid"] != os.getpid()  # it really ran elsewhere
        assert ctx.meta["incoming_keys"] == ["from_caller"]  # meta travelled out ...
        assert ctx.meta["from_caller"] is True  # ... and back
        assert vars(ctx.temp) == {"local": "caller"}  # temp does not travel back
    assert vars(shared) == {"tag": "caller"}  # shared goes out, never back


@pytest.mark.parametrize("chunksize", [1, 3])
def test_threads_write_into_the_callers_contexts_and_mark_the_pool(thread_pool, chunksize):
    ctxs = _contexts(5)
    assert map_with_context(
        thread_pool, h.record_square, range(5), ctxs=ctxs, chunksize=chunksize
    ) == [
        0,
        1,
        4,
        9,
        16,
    ]
    assert [c.loss for c in ctxs] == [0, 1, 4, 9, 16]
    assert all(c.temp.scratch == "worker" for c in ctxs)  # same objects in threads
    marks = map_with_context(
        thread_pool, h.task_executor, range(5), ctxs=_contexts(5), chunksize=chunksize
    )
    assert all(mark is thread_pool for mark in marks)  # R11
    assert current_task_executor() is None


def test_serial_executor_and_none_run_in_the_callers_thread():
    serial = SerialExecutor()
    assert map_with_context(serial, h.task_executor, [1, 2], ctxs=_contexts(2)) == [serial, serial]
    ctxs = _contexts(3)
    assert map_with_context(None, h.record_square, [1, 2, 3], ctxs=ctxs) == [1, 4, 9]
    assert [c.meta["pid"] for c in ctxs] == [os.getpid()] * 3


@pytest.mark.timeout(60)
def test_process_workers_carry_no_mark(process_pool):
    assert (
        map_with_context(process_pool, h.task_executor_is_set, range(4), ctxs=_contexts(4))
        == [False] * 4
    )


def test_several_iterables(thread_pool):
    ctxs = _contexts(3)
    assert map_with_context(
        thread_pool, h.add_with_context, [1, 2, 3], [10, 20, 30], ctxs=ctxs
    ) == [
        11,
        22,
        33,
    ]
    assert [c.meta["sum"] for c in ctxs] == [11, 22, 33]


def test_empty_input_gives_empty_list(thread_pool):
    assert map_with_context(thread_pool, h.record_square, [], ctxs=[]) == []


# -- R2: generators and lengths ------------------------------------------------------------------


@pytest.mark.timeout(60)
@REMOTE
def test_chunked_contexts_arrive_whole_in_worker_processes(executor):
    """Chunks send plain contexts in their wire form: everything __getstate__ carries
    still arrives, a namespace shared by contexts stays one object, subclasses keep theirs."""
    shared = SimpleNamespace(tag="caller")
    ctxs = [EvaluateContext(config=SimpleNamespace(i=i), shared=shared) for i in range(5)]
    ctxs.insert(2, h.TaggedContext(config=SimpleNamespace(i="tagged"), shared=shared, tag=7))
    for i, ctx in enumerate(ctxs):
        ctx.parameters = {"x": i}
        ctx.loss = 99.0  # never travels to the worker
        ctx.meta["sent"] = i
    results = map_with_context(executor, h.report_arrival, range(6), ctxs=ctxs, chunksize=3)

    assert results == list(range(6))
    arrived = [ctx.meta["arrived"] for ctx in ctxs]
    assert [a["type"] for a in arrived] == ["EvaluateContext"] * 2 + ["TaggedContext"] + [
        "EvaluateContext"
    ] * 3
    assert [a["config"]["i"] for a in arrived] == [0, 1, "tagged", 2, 3, 4]
    assert [a["tag"] for a in arrived] == ["absent", "absent", 7, "absent", "absent", "absent"]
    assert [a["parameters"] for a in arrived] == [{"x": i} for i in range(6)]
    assert all(a["loss"] is None and a["children"] == 0 for a in arrived)
    assert [ctx.meta["sent"] for ctx in ctxs] == list(range(6))  # meta went out and back
    # one task per chunk of 3: within it, the shared namespace is one object
    assert len({a["shared_id"] for a in arrived[:3]}) == 1
    assert len({a["shared_id"] for a in arrived[3:]}) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 2])
def test_generators_are_read_once(process_pool, chunksize):
    ctx_list = _contexts(5)
    reads = []

    def numbers():
        for x in range(5):
            reads.append(x)
            yield x

    results = map_with_context(
        process_pool, h.record_square, numbers(), ctxs=(c for c in ctx_list), chunksize=chunksize
    )
    assert results == [0, 1, 4, 9, 16]
    assert reads == [0, 1, 2, 3, 4]
    assert [c.loss for c in ctx_list] == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("n_args, n_ctxs", [(3, 2), (2, 3), (0, 1)])
def test_unequal_lengths_raise_value_error_before_running(thread_pool, n_args, n_ctxs):
    ctxs = _contexts(n_ctxs)
    with pytest.raises(ValueError, match=f"iterable 0 has {n_args} items but ctxs has {n_ctxs}"):
        map_with_context(thread_pool, h.record_square, iter(range(n_args)), ctxs=iter(ctxs))
    assert all(c.loss is None for c in ctxs)
    with pytest.raises(ValueError, match="iterable 1 has 1 items"):
        as_completed_with_context(thread_pool, h.add_with_context, [1, 2], [1], ctxs=_contexts(2))


def test_bad_arguments_are_rejected(thread_pool):
    with pytest.raises(TypeError, match=r"ctxs\[1\] is a dict"):
        map_with_context(thread_pool, h.record_square, [1, 2], ctxs=[EvaluateContext(), {}])
    with pytest.raises(TypeError, match="ctxs must be an iterable"):
        map_with_context(thread_pool, h.record_square, [1], ctxs=None)
    with pytest.raises(ValueError, match="chunksize must be a positive int, got 0"):
        map_with_context(thread_pool, h.record_square, [1], ctxs=_contexts(1), chunksize=0)
    with pytest.raises(ValueError, match="timeout must be None or a non-negative"):
        map_with_context(thread_pool, h.record_square, [1], ctxs=_contexts(1), timeout=-1)
    with pytest.raises(TypeError, match="got str"):
        map_with_context("pool", h.record_square, [1], ctxs=_contexts(1))


# -- timeouts ---------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_timeout_bounds_the_whole_call_and_keeps_finished_states():
    pool = ProcessPoolExecutor(max_workers=2)
    try:
        pool.submit(int).result()  # start the workers outside the measured time
        ctxs = _contexts(4)
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=r"timeout of 0\.5 s"):
            map_with_context(pool, h.sleep_for, [3.0, 0.01, 0.01, 3.0], ctxs=ctxs, timeout=0.5)
        assert time.monotonic() - start < 2.0
        # Calls 1 and 2 finished behind the blocking call 0: their states were still applied.
        assert [c.meta.get("slept") for c in ctxs] == [None, 0.01, 0.01, None]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(30)
def test_timeout_with_chunks_on_threads(thread_pool):
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        map_with_context(
            thread_pool,
            h.sleep_for,
            [0.01, 1.0, 0.01, 0.01],
            ctxs=_contexts(4),
            timeout=0.2,
            chunksize=2,
        )
    assert time.monotonic() - start < 0.9


def test_a_timeout_error_raised_by_the_call_is_not_a_timeout(thread_pool):
    with pytest.raises(TimeoutError, match="the objective itself timed out on 1"):
        map_with_context(thread_pool, h.raise_timeout_error, [1], ctxs=_contexts(1), timeout=10)


# -- failures -----------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("executor", ["threads", "process-pool", "loky"], indirect=True)
@pytest.mark.parametrize("chunksize", [1, 4])
def test_first_failure_is_raised_after_successful_states_are_applied(executor, chunksize):
    ctxs = _contexts(6)
    with pytest.raises(ValueError, match=r"^odd input 1$") as info:
        map_with_context(executor, h.fail_on_odd, range(6), ctxs=ctxs, chunksize=chunksize)
    assert type(info.value) is ValueError  # the original exception
    assert [c.loss for c in ctxs] == [0, None, 4, None, 16, None]
    if not isinstance(executor, ThreadPoolExecutor):
        assert "fail_on_odd" in "".join(_cause_texts(info.value))  # the worker's traceback


def _cause_texts(exc):
    texts = []
    while exc is not None:
        texts.append(str(exc))
        exc = exc.__cause__
    return texts


# -- R18: unpicklable work -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_lambdas_and_closures_run_on_a_process_pool(process_pool):
    offset = 10

    def closure(x, ctx):
        ctx.meta["offset"] = offset
        return x + offset

    ctxs = _contexts(2)
    assert map_with_context(process_pool, lambda x, ctx: x * 2, [1, 2], ctxs=ctxs) == [2, 4]
    assert map_with_context(process_pool, closure, [1, 2], ctxs=ctxs, chunksize=2) == [11, 12]
    assert [ctx.meta["offset"] for ctx in ctxs] == [10, 10]
    assert sorted(as_completed_with_context(process_pool, closure, [1], ctxs=_contexts(1))) == [
        (0, 11)
    ]


@pytest.mark.timeout(30)
def test_lambda_without_cloudpickle_raises_not_picklable_at_once(process_pool, monkeypatch):
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # `import cloudpickle` fails
    with pytest.raises(NotPicklableError, match=r"lambda.*loky") as info:
        map_with_context(process_pool, lambda x, ctx: x, [1, 2], ctxs=_contexts(2))
    assert isinstance(info.value, TypeError)
    with pytest.raises(NotPicklableError, match="lambda"):
        as_completed_with_context(process_pool, lambda x, ctx: x, [1], ctxs=_contexts(1))


@pytest.mark.timeout(30)
@REMOTE
def test_what_not_even_cloudpickle_can_send_raises_at_once(executor):
    lock = threading.Lock()
    with pytest.raises(NotPicklableError, match=r"lock.*thread pool"):
        map_with_context(executor, lambda x, ctx: lock and x, [1], ctxs=_contexts(1))


@pytest.mark.timeout(30)
def test_unpicklable_context_is_named(process_pool):
    shared = SimpleNamespace(lock=threading.Lock())
    with pytest.raises(NotPicklableError, match=r"ctxs\[0\]\.shared"):
        map_with_context(process_pool, h.record_square, [1], ctxs=[EvaluateContext(shared=shared)])


@pytest.mark.timeout(30)
@pytest.mark.parametrize("chunksize", [1, 2])
def test_unpicklable_result_raises_not_picklable(process_pool, chunksize):
    with pytest.raises(NotPicklableError, match="could not pickle"):
        map_with_context(
            process_pool, h.unpicklable_result, [1, 2], ctxs=_contexts(2), chunksize=chunksize
        )


def test_lambdas_work_on_loky(loky_executor):
    ctxs = _contexts(2)
    assert map_with_context(loky_executor, lambda x, ctx: x + 1, [1, 2], ctxs=ctxs) == [2, 3]


# -- definitions from __main__ (a notebook cell) and what workers cannot rebuild --------------------

MAIN_CELL = """
import os

from chemfit.wrap_funcs import to_objective_functor

OFFSET = 0.5

@to_objective_functor(pass_ctx=True)
def notebook_loss(x, ctx):
    ctx.meta["pid"] = os.getpid()
    return x + OFFSET
"""


def _main_cell() -> dict:
    """Definitions as a notebook cell makes them: of ``__main__``, which no worker can import
    (not even this process's ``__main__``, pytest's, has them)."""
    namespace = {"__name__": "__main__"}
    exec(MAIN_CELL, namespace)
    return namespace


def _caller_only_module() -> types.ModuleType:
    """A module only this process has (as one on a path the workers lack)."""
    module = types.ModuleType("only_in_the_caller")
    exec("def f(x, ctx):\n    return x\n\nclass Value:\n    pass\n", module.__dict__)
    return module


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 2])
@REMOTE
def test_main_definitions_run_remotely(executor, chunksize, monkeypatch):
    loss = _main_cell()["notebook_loss"]
    # As in a notebook, __main__.notebook_loss is the wrapper made by the decorator.
    monkeypatch.setattr(sys.modules["__main__"], "notebook_loss", loss, raising=False)
    ctxs = _contexts(2)
    assert map_with_context(executor, loss, [1.0, 2.0], ctxs=ctxs, chunksize=chunksize) == [
        1.5,
        2.5,
    ]
    assert all(ctx.meta["pid"] != os.getpid() for ctx in ctxs)


@pytest.mark.timeout(30)
def test_spawn_pool_of_a_notebook_without_cloudpickle_refuses_before_submitting(monkeypatch):
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # `import cloudpickle` fails
    monkeypatch.delattr(sys.modules["__main__"], "__file__", raising=False)  # a notebook
    ns = _main_cell()
    monkeypatch.setattr(
        sys.modules["__main__"], "notebook_loss", ns["notebook_loss"], raising=False
    )
    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    try:
        with pytest.raises(NotPicklableError) as info:
            map_with_context(pool, ns["notebook_loss"], [1.0], ctxs=_contexts(1))
        assert not pool._processes  # nothing was submitted
    finally:
        pool.shutdown()
    message = str(info.value)
    assert "notebook_loss defined in __main__" in message and "loky" in message, message


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 2])
def test_a_function_a_worker_cannot_rebuild_is_named(loky_executor, monkeypatch, chunksize):
    module = _caller_only_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(NotPicklableError) as info:
        map_with_context(loky_executor, module.f, [1, 2], ctxs=_contexts(2), chunksize=chunksize)
    message = str(info.value)
    assert "could not rebuild the function f defined in module only_in_the_caller" in message
    assert "No module named 'only_in_the_caller'" in message and "died" not in message
    assert map_with_context(loky_executor, h.record_square, [3], ctxs=_contexts(1)) == [9]


@pytest.mark.timeout(60)
def test_arguments_a_worker_cannot_rebuild_are_not_a_lost_worker(loky_executor, monkeypatch):
    module = _caller_only_module()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(NotPicklableError, match="could not rebuild the arguments of call 0"):
        map_with_context(loky_executor, h.record_square, [module.Value()], ctxs=_contexts(1))


# -- R19: lost workers ---------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunksize", [1, 2])
def test_dead_worker_raises_worker_lost_error_naming_the_call(chunksize):
    pool = ProcessPoolExecutor(max_workers=2)
    try:
        ctxs = _contexts(6)
        for x, ctx in enumerate(ctxs):
            ctx.parameters = {"x": x}
        first_of_chunk = 3 - 3 % chunksize
        expected = rf"call {first_of_chunk} with parameters \{{'x': {first_of_chunk}\}}"
        if chunksize > 1:
            expected += r" \(in the task with calls 2\.\.3\)"
        with pytest.raises(WorkerLostError, match=expected) as info:
            map_with_context(pool, h.die_on_three, range(6), ctxs=ctxs, chunksize=chunksize)
        lost = info.value
        assert lost.index == first_of_chunk
        assert lost.parameters == {"x": first_of_chunk}
        assert [c.loss for c in ctxs[:first_of_chunk]] == [x * x for x in range(first_of_chunk)]
        assert ctxs[3].loss is None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(60)
def test_dead_loky_worker_raises_worker_lost_error():
    loky = pytest.importorskip("loky")
    executor = loky.get_reusable_executor(max_workers=2)
    ctxs = _contexts(6)
    with pytest.raises(WorkerLostError, match="call 3 with parameters 3") as info:
        map_with_context(executor, h.die_on_three, range(6), ctxs=ctxs)
    assert info.value.index == 3
    assert [c.loss for c in ctxs[:3]] == [0, 1, 4]


# -- as_completed_with_context ----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_as_completed_yields_in_completion_order_with_states_applied(process_pool):
    process_pool.submit(int).result()
    delays = [0.8, 0.01, 0.3]
    ctxs = _contexts(3)
    order = []
    for index, value in as_completed_with_context(process_pool, h.sleep_for, delays, ctxs=ctxs):
        assert ctxs[index].meta["slept"] == value == delays[index]  # applied before the yield
        order.append(index)
    assert order == [1, 2, 0]


def test_as_completed_return_exceptions(thread_pool):
    ctxs = _contexts(4)
    outcomes = dict(
        as_completed_with_context(
            thread_pool, h.fail_on_odd, range(4), ctxs=ctxs, return_exceptions=True
        )
    )
    assert outcomes[0] == 0 and outcomes[2] == 4
    assert isinstance(outcomes[1], ValueError) and str(outcomes[3]) == "odd input 3"
    with pytest.raises(ValueError, match="odd input"):
        list(as_completed_with_context(thread_pool, h.fail_on_odd, range(4), ctxs=_contexts(4)))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("use_with", [False, True])
def test_closing_the_iterator_cancels_calls_not_started(use_with):
    pool = ThreadPoolExecutor(max_workers=1)
    ctxs = _contexts(5)
    start = time.monotonic()
    iterator = as_completed_with_context(pool, h.sleep_for, [0.2] * 5, ctxs=ctxs)
    if use_with:
        with iterator as it:
            first = next(it)
    else:
        first = next(iterator)
        iterator.close()
    pool.shutdown(wait=True)
    assert first == (0, 0.2)
    slept = [c.meta.get("slept") for c in ctxs]
    assert slept[0] == 0.2 and slept[2:] == [None, None, None]  # 1 was running, 2-4 cancelled
    assert time.monotonic() - start < 0.8


@pytest.mark.timeout(30)
def test_as_completed_timeout(thread_pool):
    with pytest.raises(TimeoutError, match=r"timeout of 0\.2 s"):
        for _ in as_completed_with_context(
            thread_pool, h.sleep_for, [0.01, 1.0], ctxs=_contexts(2), timeout=0.2
        ):
            pass


def test_foreign_futures_are_yielded_in_submission_order(thread_pool):
    executor = h.ForeignExecutor(thread_pool)
    ctxs = _contexts(3)
    order = [
        i for i, _ in as_completed_with_context(executor, h.sleep_for, [0.2, 0.01, 0.1], ctxs=ctxs)
    ]
    assert order == [0, 1, 2]
    assert executor.submitted == 3
    assert [c.meta["slept"] for c in ctxs] == [0.2, 0.01, 0.1]
    assert map_with_context(executor, h.record_square, [2, 3], ctxs=_contexts(2), chunksize=2) == [
        4,
        9,
    ]


def test_as_completed_marks_the_worker_thread(thread_pool):
    marks = [
        m
        for _, m in as_completed_with_context(
            thread_pool, h.task_executor, [1, 2], ctxs=_contexts(2)
        )
    ]
    assert marks == [thread_pool, thread_pool]


@pytest.mark.timeout(60)
def test_as_completed_dead_worker(tmp_path):
    pool = ProcessPoolExecutor(max_workers=2)
    try:
        outcomes = dict(
            as_completed_with_context(
                pool, h.die_on_three, range(5), ctxs=_contexts(5), return_exceptions=True
            )
        )
        assert isinstance(outcomes[3], WorkerLostError)
        assert outcomes[3].index == 3 and outcomes[0] == 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
