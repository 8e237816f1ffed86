"""ExecutorWrapperCOB: serial results on every executor, grouping, lifecycle, R11, R12, R18, R20."""

from __future__ import annotations

import gc
import itertools
import logging
import math
import os
import pickle
import sys
import threading
import types
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from chemfit.core.combined import (
    CombinedObjectiveFunction,
    nan_exception_handler,
    raising_exception_handler,
    skip_exception_handler,
)
from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import NotPicklableError, WorkerLostError
from chemfit.execution.executor_utils import map_with_context
from chemfit.execution.executor_wrapper_cob import (
    ExecutorWrapperCOB,
    _auto_chunks,
    _InlineChooser,
    _split_balanced,
    _TermTimes,
)
from chemfit.execution.worker_marks import marked_as_task_of
from tests.helpers import executor_wrapper_cob_objectives as h

# `executor` (each kind in turn) and `executors` (kind -> executor, shared by this module's tests)
# come from tests/conftest.py.


def serial_result(cob, parameters=h.PARAMS, config=None):
    ctx = EvaluateContext(config=config, shared=SimpleNamespace(tag="shared!"))
    value = cob(parameters, ctx)
    return value, ctx


def wrapped_result(cob, executor, parameters=h.PARAMS, config=None, **kwargs):
    ctx = EvaluateContext(config=config, shared=SimpleNamespace(tag="shared!"))
    value = ExecutorWrapperCOB(cob, executor, **kwargs)(parameters, ctx)
    return value, ctx


class CopyingForeignExecutor(h.ForeignExecutor):
    """An executor chemfit does not know that pickles each task on its way, as one that runs
    it in another process or on another machine must (its copies run on this process's
    threads, so they share this process's caches)."""

    def submit(self, fn, /, *args, **kwargs):
        self.n_submitted += 1
        self.tasks.append(fn)
        fn, args, kwargs = pickle.loads(pickle.dumps((fn, args, kwargs)))
        return self._pool.submit(fn, *args, **kwargs)


def same_bits(a: float, b: float) -> bool:
    return math.copysign(1.0, a) == math.copysign(1.0, b) and (
        a == b or (math.isnan(a) and math.isnan(b))
    )


# -- same value and meta as serial ---------------------------------------------------------------


@pytest.mark.timeout(15)
def test_the_fixture_is_order_sensitive():
    # Guards the bitwise tests: another summation order gives other bits.
    terms = [w * h.LinearTerm(k)(h.PARAMS) for k, w in zip(h.SLOPES[:7], h.WEIGHTS[:7])]
    assert sum(terms) != sum(reversed(terms))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("terms_per_task", [1, 3, "auto"])
def test_same_value_and_meta_as_serial(executor, terms_per_task):
    cob = h.linear_cob(7, child_context_configurator=h.label_configurator)
    expected, ctx_serial = serial_result(cob)
    wrapper = ExecutorWrapperCOB(cob, executor, terms_per_task=terms_per_task)
    for _ in range(3):  # "auto" regroups from the second call on
        ctx = EvaluateContext(shared=SimpleNamespace(tag="shared!"))
        value = wrapper(h.PARAMS, ctx)
        assert same_bits(value, expected)
        assert ctx.loss == expected
        assert ctx.meta == ctx_serial.meta
        assert list(ctx.meta) == list(ctx_serial.meta)
        assert [c.quantities for c in ctx.children] == [c.quantities for c in ctx_serial.children]
    labels = [child["meta"]["label"] for child in ctx.meta["children"]]
    assert labels == [f"{i}/7" for i in range(7)]
    assert {child["meta"]["shared_tag"] for child in ctx.meta["children"]} == {"shared!"}
    assert ctx.meta["configured"] == list(range(7))


@pytest.mark.timeout(30)
def test_nested_cob_matches_serial(executor):
    cob = h.nested_cob()
    expected, ctx_serial = serial_result(cob)
    value, ctx = wrapped_result(cob, executor, terms_per_task=2)
    assert same_bits(value, expected)
    assert ctx.meta == ctx_serial.meta
    inner = ctx.meta["children"][1]["meta"]
    assert inner["n_terms"] == 3 and len(inner["children"]) == 3
    assert inner["children"][2]["meta"]["label"] == "2/3"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("kind", ["thread", "loky"])
@pytest.mark.parametrize("n_terms", [1, 2])
def test_more_workers_than_terms(kind, n_terms):
    import loky

    cob = h.linear_cob(n_terms)
    expected, ctx_serial = serial_result(cob)
    pool = ThreadPoolExecutor(6) if kind == "thread" else loky.get_reusable_executor(max_workers=2)
    try:
        wrapper = ExecutorWrapperCOB(cob, pool)
        for _ in range(2):  # the second call uses "auto" grouping
            ctx = EvaluateContext(shared=SimpleNamespace(tag="shared!"))
            assert same_bits(wrapper(h.PARAMS, ctx), expected)
            assert ctx.meta == ctx_serial.meta
    finally:
        if kind == "thread":
            pool.shutdown()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("executor", ["process-pool", "loky"], indirect=True)
def test_child_meta_written_in_workers_comes_back(executor):
    cob = CombinedObjectiveFunction([h.PidTerm() for _ in range(6)])
    value, ctx = wrapped_result(cob, executor, terms_per_task=1)
    assert value == 6.0
    pids = {child["meta"]["pid"] for child in ctx.meta["children"]}
    assert os.getpid() not in pids
    assert all(child["loss"] == 1.0 for child in ctx.meta["children"])
    assert ctx.meta["skipped_indices"] == []


@pytest.mark.timeout(20)
def test_thread_pool_terms_run_on_pool_threads(executors):
    cob = CombinedObjectiveFunction([h.PidTerm() for _ in range(4)])
    _, ctx = wrapped_result(cob, executors["threads"], terms_per_task=1)
    threads = {child["meta"]["thread"] for child in ctx.meta["children"]}
    assert threading.get_ident() not in threads


@pytest.mark.timeout(20)
@pytest.mark.parametrize("reduction", ["mean", "aggregator"])
def test_reductions_see_the_serial_inputs(executors, reduction):
    def aggregator(terms, quantities, ctx):
        ctx.meta["n_quantities"] = len(quantities)
        return sum(t * q["k"] for t, q in zip(terms, quantities))

    from chemfit.core.combined import mean_reducer

    cob = h.linear_cob(6, reduction=mean_reducer if reduction == "mean" else aggregator)
    expected, ctx_serial = serial_result(cob)
    value, ctx = wrapped_result(cob, executors["threads"], terms_per_task=4)
    assert same_bits(value, expected)
    assert ctx.meta == ctx_serial.meta


@pytest.mark.timeout(30)
@pytest.mark.parametrize("executor", ["threads", "process-pool"], indirect=True)
def test_concurrent_calls_of_one_wrapper(executor):
    cob = h.linear_cob(7, child_context_configurator=h.label_configurator)
    wrapper = ExecutorWrapperCOB(cob, executor)
    params = [{"x": 0.1 * i, "y": {"z": 0.5}} for i in range(8)]
    expected = [serial_result(cob, p) for p in params]
    ctxs = [EvaluateContext(shared=SimpleNamespace(tag="shared!")) for _ in params]
    with ThreadPoolExecutor(4) as callers:
        values = list(callers.map(wrapper, params, ctxs, timeout=20))
    for value, ctx, (exp_value, exp_ctx) in zip(values, ctxs, expected):
        assert same_bits(value, exp_value)
        assert ctx.meta == exp_ctx.meta


# -- exception policies ----------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_raising_handler_raises_the_first_failing_term(executor):
    cob = h.cob_with_failures(raising_exception_handler)
    with pytest.raises(ValueError, match="term 2 broke"):
        serial_result(cob)
    ctx = EvaluateContext()
    with pytest.raises(ValueError, match="term 2 broke"):
        ExecutorWrapperCOB(cob, executor, terms_per_task=1)(h.PARAMS, ctx)
    # the children were collected even though a term raised
    children = ctx.meta["children"]
    assert children[2]["meta"]["reached"] is True
    assert children[0]["loss"] is not None


@pytest.mark.timeout(30)
@pytest.mark.parametrize("handler", [nan_exception_handler, skip_exception_handler])
def test_nan_and_skip_handlers_match_serial(executor, handler):
    cob = h.cob_with_failures(handler)
    expected, ctx_serial = serial_result(cob)
    value, ctx = wrapped_result(cob, executor, terms_per_task=3)
    assert same_bits(value, expected)
    assert ctx.meta == ctx_serial.meta
    if handler is skip_exception_handler:
        assert ctx.meta["skipped_indices"] == [2, 5]
    else:
        assert math.isnan(value)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["threads", "process-pool", "loky"])
def test_handler_runs_where_the_term_ran(executors, kind):
    cob = h.cob_with_failures(h.recording_handler)
    expected, _ = serial_result(cob)
    value, ctx = wrapped_result(cob, executors[kind], terms_per_task=1)
    assert same_bits(value, expected)
    failed = ctx.meta["children"][5]["meta"]
    assert failed["error"] == "ValueError: term 5 broke"
    assert (failed["handled_in_pid"] != os.getpid()) == (kind != "threads")


@pytest.mark.timeout(20)
@pytest.mark.parametrize("executor", ["threads", "process-pool"], indirect=True)
def test_type_error_in_a_term_propagates_unchanged(executor):
    cob = CombinedObjectiveFunction([h.LinearTerm(1.0), h.TypeErrorTerm()])
    with pytest.raises(TypeError, match="inner type error") as info:
        ExecutorWrapperCOB(cob, executor)(h.PARAMS)
    assert not isinstance(info.value, NotPicklableError)


@pytest.mark.timeout(20)
def test_remote_failure_carries_the_worker_traceback(executors):
    cob = h.cob_with_failures(raising_exception_handler)
    with pytest.raises(ValueError) as info:
        ExecutorWrapperCOB(cob, executors["process-pool"])(h.PARAMS)
    assert "FailingTerm" in str(info.value.__cause__) or "__call__" in str(info.value.__cause__)


@pytest.mark.timeout(20)
def test_empty_cob_raises_value_error(executors):
    with pytest.raises(ValueError, match="no terms"):
        ExecutorWrapperCOB(CombinedObjectiveFunction([]), executors["threads"])({})


# -- executor choice, grouping ---------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_ctx_executor_wins_over_the_wrappers():
    cob = h.linear_cob(4)
    with h.CountingThreadPool(2) as mine, h.CountingThreadPool(2) as ctx_pool:
        wrapper = ExecutorWrapperCOB(cob, mine, terms_per_task=1)
        wrapper(h.PARAMS, EvaluateContext(executor=ctx_pool))
        assert (ctx_pool.n_submitted, mine.n_submitted) == (4, 0)
        wrapper(h.PARAMS, EvaluateContext())
        assert (ctx_pool.n_submitted, mine.n_submitted) == (4, 4)


@pytest.mark.timeout(20)
def test_auto_groups_cheap_terms_into_one_task_per_worker():
    cob = CombinedObjectiveFunction([h.BusyTerm(0.002) for _ in range(8)])
    with h.CountingThreadPool(2) as pool:
        wrapper = ExecutorWrapperCOB(cob, pool)
        wrapper(h.PARAMS)
        assert (pool.n_submitted, wrapper.last_tasks) == (8, 8)  # no timings: one per term
        pool.n_submitted = 0
        wrapper(h.PARAMS)  # one call in this thread, to time it
        assert (pool.n_submitted, wrapper.last_tasks) == (0, 0)
        for _ in range(6):  # sleeping terms overlap on threads: the executor keeps paying
            pool.n_submitted = 0
            wrapper(h.PARAMS)
            assert (pool.n_submitted, wrapper.last_tasks) == (2, 2)


@pytest.mark.timeout(20)
def test_auto_keeps_a_single_task_inline_on_local_pools_only():
    cob = h.linear_cob(12)
    expected, ctx_serial = serial_result(cob)
    with h.CountingThreadPool(3) as pool:
        wrapper = ExecutorWrapperCOB(cob, pool)
        wrapper(h.PARAMS)
        assert pool.n_submitted == 12  # no timings yet: one task per term
        pool.n_submitted = 0
        ctx = EvaluateContext(shared=SimpleNamespace(tag="shared!"))
        # microsecond terms make one group, and one task cannot beat this thread
        assert same_bits(wrapper(h.PARAMS, ctx), expected)
        assert (pool.n_submitted, wrapper.last_tasks) == (0, 0)
        assert ctx.meta == ctx_serial.meta
    foreign = CopyingForeignExecutor(3)  # could run on another machine: always used
    try:
        wrapper = ExecutorWrapperCOB(cob, foreign)
        wrapper(h.PARAMS)
        foreign.n_submitted = 0
        assert same_bits(wrapper(h.PARAMS), expected)
        assert (foreign.n_submitted, wrapper.last_tasks) == (1, 1)
    finally:
        foreign.shutdown()


@pytest.mark.timeout(30)
def test_auto_goes_inline_when_the_executor_does_not_pay_and_retries_later(caplog):
    cob = CombinedObjectiveFunction([h.BusyTerm(1e-4) for _ in range(20)])
    expected = cob(h.PARAMS)
    with h.SlowDispatchThreadPool(2, dispatch_seconds=0.01) as pool:
        wrapper = ExecutorWrapperCOB(cob, pool)
        tasks = []
        with caplog.at_level(logging.INFO, logger="chemfit"):
            for _ in range(1 + 1 + 1 + 4 + 1 + 8 + 1):
                assert same_bits(wrapper(h.PARAMS), expected)
                tasks.append(wrapper.last_tasks)
    # one task per term; one inline call to time it; a grouped call far slower (20 ms of
    # dispatch against about 2 ms of terms); 4 inline; a retry that loses; 8 inline; a retry
    assert tasks == [20, 0, 2] + [0] * 4 + [2] + [0] * 8 + [2]
    inline_lines = [r for r in caplog.records if "evaluating them here from now on" in r.message]
    assert len(inline_lines) == 1 and inline_lines[0].levelno == logging.INFO
    assert "SlowDispatchThreadPool" in inline_lines[0].message


@pytest.mark.timeout(20)
def test_fixed_terms_per_task_never_goes_inline():
    cob = CombinedObjectiveFunction([h.BusyTerm(1e-4) for _ in range(20)])
    with h.SlowDispatchThreadPool(2, dispatch_seconds=0.01) as pool:
        wrapper = ExecutorWrapperCOB(cob, pool, terms_per_task=10)
        assert [(wrapper(h.PARAMS), wrapper.last_tasks)[1] for _ in range(6)] == [2] * 6


@pytest.mark.timeout(20)
def test_inline_auto_raises_the_first_failing_term_like_serial():
    terms = [h.LinearTerm(0.5), h.FailingTerm("first"), h.FailingTerm("second")]
    cob = CombinedObjectiveFunction(terms, exception_handler=raising_exception_handler)
    with h.CountingThreadPool(2) as pool:
        wrapper = ExecutorWrapperCOB(cob, pool)
        for _ in range(3):  # one task per term, then inline (one tiny group)
            ctx = EvaluateContext()
            with pytest.raises(ValueError, match="first"):
                wrapper(h.PARAMS, ctx)
        assert wrapper.last_tasks == 0
        assert ctx.meta["children"][1]["meta"]["reached"] is True


@pytest.mark.timeout(10)
def test_inline_chooser_measures_inline_again_while_the_executor_wins_narrowly():
    chooser = _InlineChooser()
    assert not chooser.use_executor(1)
    chooser.record_inline(9.6)  # a first inline call slowed down by the machine
    for _ in range(4):  # the executor "wins" against it, but by less than 1.5x
        assert chooser.use_executor(1)
        assert not chooser.record(1, 8.0)
    assert not chooser.use_executor(1)  # so the next call measures inline again
    chooser.record_inline(5.4)
    assert chooser.serial_seconds() == 5.4  # of two, the lower
    assert chooser.use_executor(1)
    assert not chooser.record(1, 8.0)
    assert chooser.record(1, 8.0)  # now the executor loses, twice in a row: inline
    assert chooser.inline


def test_inline_chooser_does_not_probe_while_the_executor_wins_clearly():
    chooser = _InlineChooser()
    assert not chooser.use_executor(1)
    chooser.record_inline(10.0)
    for _ in range(100):
        assert chooser.use_executor(1)
        assert not chooser.record(1, 5.0)
    assert chooser.serial_seconds() == 10.0  # no inline call was made


def test_inline_chooser_probes_ever_less_often():
    chooser = _InlineChooser()
    assert not chooser.use_executor(1)
    chooser.record_inline(10.0)
    probes = []
    for call in range(200):
        if chooser.use_executor(1):
            chooser.record(1, 9.0)  # narrow wins only
        else:
            probes.append(call)
            chooser.record_inline(10.0)
    assert probes[:4] == [4, 13, 30, 63]  # after 4, 8, 16, 32 narrow wins, then every 64
    gaps = [later - earlier for earlier, later in itertools.pairwise(probes[4:])]
    assert gaps and set(gaps) == {65}


def test_inline_chooser_backs_off_and_resets():
    chooser = _InlineChooser()
    assert not chooser.use_executor(1)  # first time an inline call
    chooser.record_inline(1.0)
    assert chooser.use_executor(1)
    assert not chooser.record(1, 1.2)  # one slightly slower call is not enough
    assert chooser.record(1, 1.2)  # the second in a row switches to inline
    assert [chooser.use_executor(1) for _ in range(5)] == [False] * 4 + [True]
    assert not chooser.record(1, 2.0)  # the retry lost: wait 8 calls
    assert [chooser.use_executor(1) for _ in range(9)] == [False] * 8 + [True]
    assert not chooser.record(1, 0.5)  # the retry won: back on the executor
    assert chooser.use_executor(1) and not chooser.inline
    assert not chooser.record(1, 1.2)
    assert not chooser.record(1, 0.9)  # a faster call breaks the streak
    assert not chooser.record(1, 1.2)
    assert chooser.record(1, 1.5)  # a clear loss switches at once
    assert chooser.inline
    chooser.record_inline(3.0)
    chooser.record_inline(3.0)
    assert chooser.serial_seconds() == 3.0  # the median of the recent inline calls
    assert chooser.use_executor(2) and not chooser.inline  # another executor starts afresh
    assert not chooser.record(1, 9.0)  # a late record for the old executor is ignored


def test_inline_chooser_takes_a_call_held_up_once_for_noise_not_a_clear_loss():
    chooser = _InlineChooser()
    chooser.record_unjudged(1, 9.0)  # the first call: one task per term, nothing to judge by
    assert not chooser.use_executor(1)
    chooser.record_inline(16.0)
    assert chooser.use_executor(1) and not chooser.record(1, 9.0)
    assert not chooser.record(1, 100.0)  # held up by the machine: the recent calls were fast
    assert not chooser.inline
    assert not chooser.record(1, 9.0) and not chooser.record(1, 9.0)
    assert not chooser.record(1, 30.0)  # held up once more: not yet
    assert chooser.record(1, 30.0)  # two slow calls in a row are a loss all the same
    fresh = _InlineChooser()
    fresh.record_unjudged(1, 200.0)  # slow from the start (20 tasks, 10 ms to submit each)
    fresh.record_inline(2.0)
    assert fresh.record(1, 22.0)  # a clear loss that the recent calls confirm: at once


def test_inline_chooser_on_a_process_pool_uses_the_workers_term_times():
    chooser = _InlineChooser()
    chooser.record_worker_seconds(1, 88.0)  # the terms' times, summed, from the first call
    for _ in range(100):  # no inline call to measure, and no probes while winning narrowly
        assert chooser.use_executor(1)
        assert not chooser.record(1, 70.0)
        chooser.record_worker_seconds(1, 88.0)
    assert chooser.serial_seconds() == 88.0
    chooser.record_inline(80.0)
    assert chooser.serial_seconds() == 80.0  # the lower of the two estimates
    assert chooser.use_executor(2) and chooser.serial_seconds() == 80.0  # another pool:
    chooser.record_worker_seconds(2, 90.0)  # its workers' times only
    assert chooser.serial_seconds() == 80.0


def test_a_term_slowed_down_once_is_not_taken_for_an_expensive_one():
    times = _TermTimes()
    times.record(2, [0, 1], [0.002, 0.002])
    times.record(2, [0, 1], [0.002, 0.120])  # the machine held term 1 up once
    assert times.estimates(2) == [0.002, 0.002]
    times.record(2, [0, 1], [0.002, 0.121])
    assert times.estimates(2) == [0.002, 0.120]  # twice in three calls: it is slow


def test_equal_terms_whose_times_wobble_split_evenly():
    wobbly = [2.0e-3, 2.1e-3, 2.0e-3, 2.2e-3, 2.0e-3, 2.05e-3, 2.1e-3, 2.0e-3]
    assert [len(g) for g in _split_balanced(list(range(8)), wobbly, 2)] == [4, 4]
    assert _split_balanced(list(range(7)), [1.0] * 7, 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert _split_balanced([3, 4, 5], [0.0] * 3 + [1.0, 1.0, 5.0], 2) == [[3, 4], [5]]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["process-pool", "loky"])
def test_auto_on_a_process_pool_needs_no_call_in_this_thread(executors, kind):
    cob = CombinedObjectiveFunction([h.BusyTerm(0.02) for _ in range(4)])
    wrapper = ExecutorWrapperCOB(cob, executors[kind])
    tasks = []
    for _ in range(2):
        assert same_bits(wrapper(h.PARAMS), cob(h.PARAMS))
        tasks.append(wrapper.last_tasks)
    # one task per term before the terms were timed; then the workers' term times tell what
    # the terms cost in this thread: the first planned call is not kept inline to time it
    # (on a thread pool it is)
    assert tasks == [4, 4]
    assert wrapper._chooser.serial_seconds() >= 4 * 0.02


@pytest.mark.timeout(20)
def test_auto_keeps_expensive_terms_apart():
    cob = CombinedObjectiveFunction([h.BusyTerm(0.01) for _ in range(4)] + [h.BusyTerm(0.0)] * 4)
    with h.CountingThreadPool(2) as pool:
        wrapper = ExecutorWrapperCOB(cob, pool)
        for _ in range(3):  # the estimate is the median of the last three times
            wrapper({})
        pool.n_submitted = 0
        wrapper({})
        assert pool.n_submitted == 5  # four expensive terms alone, the cheap ones together


@pytest.mark.timeout(15)
def test_auto_chunk_planning():
    assert _auto_chunks([0.02] * 8, 2) == [[i] for i in range(8)]
    chunks = _auto_chunks([5e-5] * 100, 2)
    assert chunks == [list(range(50)), list(range(50, 100))]
    mixed = _auto_chunks([1e-3, 0.03, 1e-3, 1e-3, 0.01, 1e-3], 4)
    assert mixed[:2] == [[1], [4]]
    assert sorted(i for chunk in mixed for i in chunk) == list(range(6))
    assert len(mixed) <= 2 + 4
    assert _split_balanced([0, 1, 2], [1.0, 1.0, 1.0], 3) == [[0], [1], [2]]
    assert _split_balanced([0, 1, 2, 3], [10.0, 0.0, 0.0, 0.0], 2) == [[0], [1, 2, 3]]


@pytest.mark.timeout(20)
def test_fixed_terms_per_task_counts_tasks():
    with h.CountingThreadPool(2) as pool:
        ExecutorWrapperCOB(h.linear_cob(7), pool, terms_per_task=3)(h.PARAMS)
        assert pool.n_submitted == 3


@pytest.mark.timeout(20)
def test_foreign_executor_takes_the_pickled_path():
    cob = h.nested_cob()
    expected, ctx_serial = serial_result(cob)
    foreign = CopyingForeignExecutor(2)
    try:
        value, ctx = wrapped_result(cob, foreign, terms_per_task=2)
    finally:
        foreign.shutdown()
    assert foreign.n_submitted == 3
    assert same_bits(value, expected)
    assert ctx.meta == ctx_serial.meta


def shipped_data(task) -> bytes | None:
    """The objective's data that a task of the wrapper carries (``None``: only its hash)."""
    return task.fn.func.shipped.data


@pytest.mark.timeout(20)
def test_objective_is_sent_once_then_named_by_its_hash():
    from chemfit.execution import executor_wrapper_cob as module

    cob = h.linear_cob(4)
    # one worker runs the tasks in order, so both miss before a resend refills the shared cache
    foreign = CopyingForeignExecutor(1)
    try:
        wrapper = ExecutorWrapperCOB(cob, foreign, terms_per_task=2)
        first = wrapper(h.PARAMS)
        assert all(shipped_data(task) is not None for task in foreign.tasks)
        foreign.tasks.clear()
        assert same_bits(wrapper(h.PARAMS), first)
        assert [shipped_data(task) for task in foreign.tasks] == [None, None]  # hash only
        # a worker that lost its cache answers with a miss; the task is resent with the data
        module._worker_cache.clear()
        foreign.tasks.clear()
        assert same_bits(wrapper(h.PARAMS), first)
        assert foreign.n_submitted == 2 + 2 + 4
        assert [shipped_data(task) is None for task in foreign.tasks] == [True, True, False, False]
        # a changed objective has another hash: the workers never use a stale copy
        cob.weights[0] = 3.5
        foreign.tasks.clear()
        assert same_bits(wrapper(h.PARAMS), cob(h.PARAMS))
        assert not same_bits(cob(h.PARAMS), first)
        assert all(shipped_data(task) is not None for task in foreign.tasks)
    finally:
        foreign.shutdown()


@pytest.mark.timeout(30)
@pytest.mark.parametrize("executor", ["process-pool", "loky"], indirect=True)
def test_changed_objective_is_resent_to_process_workers(executor):
    cob = h.linear_cob(5)
    wrapper = ExecutorWrapperCOB(cob, executor, terms_per_task=1)
    for weight in (1.0, 2.5, 1.0):
        cob.weights[3] = weight
        assert same_bits(wrapper(h.PARAMS), cob(h.PARAMS))


@pytest.mark.timeout(15)
@pytest.mark.parametrize("bad", [0, -1, "fast", 2.0, True])
def test_bad_terms_per_task(bad):
    with pytest.raises((ValueError, TypeError), match="terms_per_task"):
        ExecutorWrapperCOB(h.linear_cob(2), terms_per_task=bad)


@pytest.mark.timeout(15)
def test_bad_cob_and_executor():
    with pytest.raises(TypeError, match="CombinedObjectiveFunction"):
        ExecutorWrapperCOB(h.LinearTerm(1.0))
    with pytest.raises(TypeError, match="executor"):
        ExecutorWrapperCOB(h.linear_cob(2), "threads")


# -- lifecycle (R12) -------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_own_pool_is_created_once_and_closed_by_the_context_manager():
    cob = h.linear_cob(3)
    expected, _ = serial_result(cob)
    with ExecutorWrapperCOB(cob) as wrapper:
        assert wrapper._own_pool is None  # lazily
        assert same_bits(wrapper(h.PARAMS), expected)
        pool = wrapper._own_pool
        assert isinstance(pool, ThreadPoolExecutor)
        wrapper(h.PARAMS)
        assert wrapper._own_pool is pool
    assert pool._shutdown
    assert wrapper._own_pool is None


@pytest.mark.timeout(20)
def test_users_executor_is_not_shut_down():
    with ThreadPoolExecutor(2) as pool:
        with ExecutorWrapperCOB(h.linear_cob(3), pool) as wrapper:
            wrapper(h.PARAMS)
        assert wrapper._own_pool is None
        assert pool.submit(abs, -1).result(timeout=5) == 1


@pytest.mark.timeout(20)
def test_garbage_collection_shuts_the_own_pool_down():
    wrapper = ExecutorWrapperCOB(h.linear_cob(2))
    wrapper(h.PARAMS)
    pool = wrapper._own_pool
    del wrapper
    gc.collect()
    assert pool._shutdown


@pytest.mark.timeout(20)
def test_close_is_idempotent_and_a_later_call_works():
    wrapper = ExecutorWrapperCOB(h.linear_cob(2))
    wrapper.close()
    wrapper(h.PARAMS)
    wrapper.close()
    wrapper.close()
    assert wrapper(h.PARAMS) == h.linear_cob(2)(h.PARAMS)
    wrapper.close()


# -- R11: a shared pool never deadlocks --------------------------------------------------------


@pytest.mark.timeout(20)
def test_inline_evaluation_inside_a_task_of_the_same_pool(caplog):
    cob = h.linear_cob(5)
    expected, ctx_serial = serial_result(cob)
    with ThreadPoolExecutor(max_workers=1) as pool:
        wrapper = ExecutorWrapperCOB(cob, pool)
        ctxs = [EvaluateContext(shared=SimpleNamespace(tag="shared!")) for _ in range(3)]
        with caplog.at_level(logging.INFO, logger="chemfit.execution.executor_wrapper_cob"):
            values = map_with_context(
                pool, h.call_wrapper_in_task, [wrapper] * 3, [h.PARAMS] * 3, ctxs=ctxs, timeout=10
            )
    assert all(same_bits(v, expected) for v in values)
    assert all(ctx.meta == ctx_serial.meta for ctx in ctxs)
    inline_logs = [r for r in caplog.records if "inline" in r.getMessage()]
    assert len(inline_logs) == 1 and inline_logs[0].levelno == logging.INFO


@pytest.mark.timeout(20)
def test_nested_wrapper_on_the_same_bounded_pool_via_ctx_executor():
    inner = ExecutorWrapperCOB(h.linear_cob(3))
    outer_cob = CombinedObjectiveFunction([h.LinearTerm(0.5), inner, h.LinearTerm(1.5)])
    serial_cob = CombinedObjectiveFunction([h.LinearTerm(0.5), h.linear_cob(3), h.LinearTerm(1.5)])
    expected, ctx_serial = serial_result(serial_cob)
    with ThreadPoolExecutor(max_workers=1) as pool:
        ctx = EvaluateContext(executor=pool, shared=SimpleNamespace(tag="shared!"))

        def task():  # as a task of the Fitter or map_with_context on this pool runs
            with marked_as_task_of(pool):
                return h.call_wrapper_in_task(ExecutorWrapperCOB(outer_cob), h.PARAMS, ctx)

        value = pool.submit(task).result(timeout=10)
    assert same_bits(value, expected)
    assert ctx.meta == ctx_serial.meta
    assert inner._own_pool is None  # the inner wrapper used the shared pool, inline


# -- pickling (R18) --------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_wrapper_pickles_without_its_executor():
    with ThreadPoolExecutor(2) as pool:
        wrapper = ExecutorWrapperCOB(h.linear_cob(4), pool, terms_per_task=2)
        wrapper(h.PARAMS)
        copy = pickle.loads(pickle.dumps(wrapper))
    assert copy.executor is None and copy.terms_per_task == 2
    with copy:
        assert same_bits(copy(h.PARAMS), h.linear_cob(4)(h.PARAMS))


@pytest.mark.timeout(30)
def test_wrapper_as_a_term_inside_a_process_pool(executors):
    inner = ExecutorWrapperCOB(h.linear_cob(3), executors["threads"])
    outer = CombinedObjectiveFunction([h.LinearTerm(0.5), inner])
    serial = CombinedObjectiveFunction([h.LinearTerm(0.5), h.linear_cob(3)])
    expected, ctx_serial = serial_result(serial)
    value, ctx = wrapped_result(outer, executors["process-pool"], terms_per_task=1)
    assert same_bits(value, expected)
    assert ctx.meta == ctx_serial.meta


@pytest.mark.timeout(20)
def test_unpicklable_cob_on_a_process_pool_raises_not_picklable(executors):
    cob = CombinedObjectiveFunction([h.LinearTerm(1.0), h.LockedTerm()])
    with pytest.raises(NotPicklableError, match=r"lock.*thread pool") as info:
        ExecutorWrapperCOB(cob, executors["process-pool"])(h.PARAMS)
    assert isinstance(info.value, TypeError)


@pytest.mark.timeout(20)
def test_unpicklable_cob_on_loky_raises_not_picklable(executors):
    cob = CombinedObjectiveFunction([h.LinearTerm(1.0), h.LockedTerm()])
    with pytest.raises(NotPicklableError, match="thread pool"):
        ExecutorWrapperCOB(cob, executors["loky"])(h.PARAMS)


@pytest.mark.timeout(20)
def test_lambda_cob_runs_on_a_process_pool(executors):
    cob = CombinedObjectiveFunction([lambda p: p["x"] * 2.0, lambda p: 1.0])
    assert ExecutorWrapperCOB(cob, executors["process-pool"], terms_per_task=1)(h.PARAMS) == cob(
        h.PARAMS
    )


@pytest.mark.timeout(20)
def test_lambda_cob_without_cloudpickle_on_a_process_pool_raises(executors, monkeypatch):
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # `import cloudpickle` fails
    cob = CombinedObjectiveFunction([lambda p: 1.0])
    with pytest.raises(NotPicklableError, match=r"lambda.*loky"):
        ExecutorWrapperCOB(cob, executors["process-pool"])(h.PARAMS)


@pytest.mark.timeout(30)
def test_lambda_cob_works_on_loky(executors):
    cob = CombinedObjectiveFunction([lambda p: p["x"] * 2.0, lambda p: 1.0])
    assert ExecutorWrapperCOB(cob, executors["loky"])(h.PARAMS) == cob(h.PARAMS)


NOTEBOOK_TERMS = """
import functools

from chemfit.wrap_funcs import to_objective_functor

@to_objective_functor
def term(params, k):
    return k * params["x"]

square = lambda params: params["x"] ** 2

def scaled(params, k):
    return k * params["y"]["z"]

class Offset:
    def __init__(self, value):
        self.value = value

    def __call__(self, params):
        return params["x"] + self.value

TERMS = [term.bind(k=2.0), square, functools.partial(scaled, k=3.0), Offset(0.25)]
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("executor", ["process-pool", "loky"], indirect=True)
def test_notebook_terms_run_on_worker_processes(executor, monkeypatch):
    namespace = {"__name__": "__main__"}  # a notebook cell: nothing a worker can import
    exec(NOTEBOOK_TERMS, namespace)
    monkeypatch.setattr(sys.modules["__main__"], "term", namespace["term"], raising=False)
    cob = CombinedObjectiveFunction(namespace["TERMS"])
    expected, ctx_serial = serial_result(cob)
    value, ctx = wrapped_result(cob, executor, terms_per_task=1)
    assert same_bits(value, expected) and ctx.meta == ctx_serial.meta


@pytest.mark.timeout(60)
def test_terms_a_worker_cannot_rebuild_are_named(executors, monkeypatch):
    module = types.ModuleType("only_in_the_caller")
    exec("def term(params):\n    return 1.0\n", module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    cob = CombinedObjectiveFunction([h.LinearTerm(1.0), module.term])
    with pytest.raises(NotPicklableError) as info:
        ExecutorWrapperCOB(cob, executors["loky"], terms_per_task=1)(h.PARAMS)
    message = str(info.value)
    assert "could not rebuild the combined objective" in message
    assert "No module named 'only_in_the_caller'" in message and "died" not in message
    assert ExecutorWrapperCOB(h.linear_cob(2), executors["loky"], terms_per_task=1)(h.PARAMS)


@pytest.mark.timeout(20)
def test_unpicklable_parameters_raise_not_picklable(executors):
    with pytest.raises(NotPicklableError, match="pickle"):
        ExecutorWrapperCOB(h.linear_cob(2), executors["process-pool"])(
            {"x": 1.0, "y": {"z": 0.0}, "lock": threading.Lock()}
        )


@pytest.mark.timeout(30)
def test_dead_worker_raises_worker_lost():
    cob = CombinedObjectiveFunction([h.LinearTerm(1.0), h.DyingTerm()])
    with ProcessPoolExecutor(1) as pool, pytest.raises(WorkerLostError) as info:
        ExecutorWrapperCOB(cob, pool, terms_per_task=1)(h.PARAMS)
    assert info.value.parameters == h.PARAMS
