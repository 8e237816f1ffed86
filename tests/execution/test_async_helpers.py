"""async_eval_one and async_eval_many (§2.10) with threads, process pools and loky."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import NotPicklableError, WorkerLostError
from chemfit.execution.async_helpers import async_eval_many, async_eval_one
from chemfit.execution.executors import SerialExecutor
from tests.helpers import executor_task_functions as h


def _thread_objective(params, ctx):
    ctx.loss = params["x"] * 2
    ctx.meta["thread"] = threading.get_ident()
    return ctx.loss


@pytest.fixture
def process_pool(executors):  # tests/conftest.py: one pool shared by this module's tests
    return executors["process-pool"]


def test_async_eval_one_runs_in_another_thread():
    ctx = EvaluateContext()
    assert asyncio.run(async_eval_one(_thread_objective, {"x": 2}, ctx)) == 4
    assert ctx.loss == 4
    assert ctx.meta["thread"] != threading.get_ident()


def test_async_eval_many_without_executor_keeps_order_and_accepts_generators():
    ctxs = [EvaluateContext() for _ in range(4)]
    results = asyncio.run(
        async_eval_many(_thread_objective, ({"x": x} for x in range(4)), iter(ctxs))
    )
    assert results == [0, 2, 4, 6]
    assert [c.loss for c in ctxs] == [0, 2, 4, 6]


@pytest.mark.parametrize("n_params, n_ctxs", [(2, 3), (3, 2)])
def test_async_eval_many_length_mismatch(n_params, n_ctxs):
    params = [{"x": x} for x in range(n_params)]
    ctxs = [EvaluateContext() for _ in range(n_ctxs)]
    with pytest.raises(ValueError, match=f"has {n_params} items but ctxs has {n_ctxs}"):
        asyncio.run(async_eval_many(_thread_objective, params, ctxs))
    with pytest.raises(ValueError, match="pass exactly one context per call"):
        asyncio.run(async_eval_many(_thread_objective, params, ctxs, executor=SerialExecutor()))


def test_async_eval_many_without_executor_raises_first_failure_in_input_order():
    ctxs = [EvaluateContext() for _ in range(4)]
    with pytest.raises(ValueError, match=r"^odd input 1$"):
        asyncio.run(async_eval_many(h.fail_on_odd, [0, 1, 2, 3], ctxs))
    assert [c.loss for c in ctxs] == [0, None, 4, None]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("executor", ["process-pool", "loky"], indirect=True)
def test_async_eval_many_on_worker_processes_propagates_state(executor):
    shared = SimpleNamespace(tag="caller")
    ctxs = [EvaluateContext(shared=shared) for _ in range(5)]
    for ctx in ctxs:
        ctx.temp.local = "caller"
    results = asyncio.run(async_eval_many(h.record_square, range(5), ctxs, executor=executor))
    assert results == [0, 1, 4, 9, 16]
    assert [c.loss for c in ctxs] == [0, 1, 4, 9, 16]
    assert [c.parameters for c in ctxs] == [{"x": x} for x in range(5)]
    assert all(c.meta["pid"] != os.getpid() for c in ctxs)
    assert vars(shared) == {"tag": "caller"}
    assert all(vars(c.temp) == {"local": "caller"} for c in ctxs)


@pytest.mark.timeout(60)
def test_async_eval_many_failure_on_processes_applies_successful_states(process_pool):
    ctxs = [EvaluateContext() for _ in range(4)]
    with pytest.raises(ValueError, match="odd input 1"):
        asyncio.run(async_eval_many(h.fail_on_odd, range(4), ctxs, executor=process_pool))
    assert [c.loss for c in ctxs] == [0, None, 4, None]


@pytest.mark.timeout(30)
def test_async_eval_many_lambda_on_process_pool_runs_by_value(process_pool):
    ctxs = [EvaluateContext()]
    assert asyncio.run(async_eval_many(lambda p, c: p + 1, [1], ctxs, executor=process_pool)) == [2]


@pytest.mark.timeout(30)
def test_async_eval_many_lambda_without_cloudpickle_is_not_picklable(process_pool, monkeypatch):
    monkeypatch.setitem(sys.modules, "cloudpickle", None)  # `import cloudpickle` fails
    with pytest.raises(NotPicklableError, match="loky"):
        asyncio.run(
            async_eval_many(lambda p, c: p, [1], [EvaluateContext()], executor=process_pool)
        )


@pytest.mark.timeout(60)
def test_async_eval_many_dead_worker():
    pool = ProcessPoolExecutor(max_workers=2)
    try:
        ctxs = [EvaluateContext() for _ in range(5)]
        with pytest.raises(WorkerLostError) as info:
            asyncio.run(async_eval_many(h.die_on_three, range(5), ctxs, executor=pool))
        assert info.value.index == 3
        assert [c.loss for c in ctxs[:3]] == [0, 1, 4]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def test_async_eval_many_marks_thread_pool_tasks():
    with ThreadPoolExecutor(2) as pool:
        marks = asyncio.run(
            async_eval_many(h.task_executor, [1, 2], [EvaluateContext()] * 2, executor=pool)
        )
    assert marks == [pool, pool]


def test_async_eval_many_with_foreign_futures():
    with ThreadPoolExecutor(2) as pool:
        executor = h.ForeignExecutor(pool)
        ctxs = [EvaluateContext() for _ in range(3)]
        results = asyncio.run(async_eval_many(h.record_square, [1, 2, 3], ctxs, executor=executor))
    assert results == [1, 4, 9]
    assert executor.submitted == 3
    assert [c.loss for c in ctxs] == [1, 4, 9]


def test_async_eval_many_inside_a_running_loop():
    async def main():
        ctxs = [EvaluateContext(), EvaluateContext()]
        other = asyncio.create_task(asyncio.sleep(0.01, result="other"))
        results = await async_eval_many(h.sleep_for, [0.05, 0.01], ctxs, executor=SerialExecutor())
        return results, await other, [c.meta["slept"] for c in ctxs]

    assert asyncio.run(main()) == ([0.05, 0.01], "other", [0.05, 0.01])
