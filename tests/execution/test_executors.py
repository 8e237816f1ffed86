"""make_executor, as_executor, SerialExecutor and the worker marks (§3.3, R11)."""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pytest

from chemfit.core.context import EvaluateContext, ExecutorLike
from chemfit.execution.context_tasks import ContextTask
from chemfit.execution.executor_utils import map_with_context
from chemfit.execution.executors import SerialExecutor, as_executor, make_executor
from chemfit.execution.worker_marks import current_task_executor, marked_as_task_of
from tests.helpers import executor_task_functions as h

ROOT = Path(__file__).resolve().parents[2]

# -- as_executor ---------------------------------------------------------------------------------


def test_as_executor_returns_executors_and_none_as_they_are():
    assert as_executor(None) is None
    serial = SerialExecutor()
    assert as_executor(serial) is serial
    with ThreadPoolExecutor(1) as pool:
        assert as_executor(pool) is pool
    foreign = h.ForeignExecutor(None)
    assert as_executor(foreign) is foreign


def test_as_executor_accepts_loky():
    loky = pytest.importorskip("loky")
    executor = loky.get_reusable_executor(max_workers=2)
    assert as_executor(executor) is executor


class _OnlySubmit:
    def submit(self, fn, *args):
        return fn(*args)


@pytest.mark.parametrize("obj", ["threads", 4, object(), _OnlySubmit()])
def test_as_executor_rejects_anything_else(obj):
    with pytest.raises(TypeError) as info:
        as_executor(obj)
    message = str(info.value)
    assert type(obj).__name__ in message
    for accepted in (
        "ExecutorLike",
        "dask distributed.Client",
        "ipyparallel Client or View",
        "None",
    ):
        assert accepted in message


def test_as_executor_rejects_executor_classes():
    with pytest.raises(TypeError, match=r"got the class ThreadPoolExecutor.*ThreadPoolExecutor\("):
        as_executor(ThreadPoolExecutor)


def test_as_executor_dask_client():
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1) as client:
        executor = as_executor(client)
        assert not isinstance(executor, distributed.Client)
        ctxs = [EvaluateContext() for _ in range(3)]
        assert map_with_context(client, h.record_square, [1, 2, 3], ctxs=ctxs) == [1, 4, 9]
        assert [c.loss for c in ctxs] == [1, 4, 9]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_as_executor_ipyparallel_client_and_views():
    ipp = pytest.importorskip("ipyparallel")
    from traitlets.config import Config

    config = Config()
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    config.LocalEngineSetLauncher.environment = {"PYTHONPATH": os.pathsep.join(paths)}
    with ipp.Cluster(
        engines="local",
        n=1,
        profile_dir=tempfile.mkdtemp(prefix="ipp-chemfit-"),
        log_level=40,
        controller_args=["--HeartMonitor.period=500"],
        config=config,
    ) as client:
        client.wait_for_engines(1, timeout=60)
        for obj in (client, client.load_balanced_view(), client[:], client[0]):
            executor = as_executor(obj)
            assert isinstance(executor, ExecutorLike)
            assert type(executor).__name__ == "ViewExecutor"
            ctxs = [EvaluateContext() for _ in range(3)]
            results = map_with_context(obj, h.record_square, [1, 2, 3], ctxs=ctxs, chunksize=2)
            assert results == [1, 4, 9]
            assert [c.loss for c in ctxs] == [1, 4, 9]
            assert all(c.meta["pid"] != os.getpid() for c in ctxs)


# -- make_executor --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["serial", "thread", "process", "loky"])
def test_make_executor_kinds_are_context_managers(kind):
    if kind == "loky":
        pytest.importorskip("loky")
    with make_executor(kind, max_workers=None if kind == "serial" else 2) as executor:
        assert isinstance(executor, ExecutorLike)
        assert list(executor.map(abs, [-1, -2, 3])) == [1, 2, 3]
        assert executor.submit(pow, 2, 5).result(timeout=30) == 32
    with pytest.raises(RuntimeError):
        executor.submit(pow, 2, 5)


def test_make_executor_thread_and_process_types():
    with make_executor("thread", max_workers=3, thread_name_prefix="cf") as pool:
        assert isinstance(pool, ThreadPoolExecutor) and pool._max_workers == 3
    with make_executor("process", max_workers=1) as pool:
        assert isinstance(pool, ProcessPoolExecutor)
    assert isinstance(make_executor(), ThreadPoolExecutor)


def test_make_executor_loky_is_the_reusable_executor():
    loky = pytest.importorskip("loky")
    assert make_executor("loky", max_workers=2) is loky.get_reusable_executor(max_workers=2)


def test_make_executor_unknown_kind_lists_the_kinds():
    with pytest.raises(ValueError, match="unknown executor kind 'gpu'") as info:
        make_executor("gpu")
    for kind in ("serial", "thread", "process", "loky", "ipyparallel"):
        assert repr(kind) in str(info.value)


@pytest.mark.parametrize("max_workers", [0, -1, 1.5, True, "2"])
def test_make_executor_bad_max_workers(max_workers):
    with pytest.raises(ValueError, match="max_workers must be None or a positive int"):
        make_executor("thread", max_workers=max_workers)


def test_make_executor_serial_takes_no_options():
    with pytest.raises(TypeError, match="takes no options"):
        make_executor("serial", mp_context=None)


def test_make_executor_missing_loky_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "loky", None)  # makes `import loky` fail
    with pytest.raises(ImportError, match=r"pip install 'chemfit\[loky\]'"):
        make_executor("loky")


# -- SerialExecutor ---------------------------------------------------------------------------------


def test_serial_executor_runs_in_the_callers_thread():
    executor = SerialExecutor()
    future = executor.submit(threading.get_ident)
    assert isinstance(future, Future) and future.done()
    assert future.result() == threading.get_ident()


def test_serial_executor_stores_exceptions_in_futures():
    future = SerialExecutor().submit(int, "x")
    assert future.done()
    with pytest.raises(ValueError, match="invalid literal"):
        future.result()


def test_serial_executor_map_keeps_order_and_accepts_chunksize():
    executor = SerialExecutor()
    assert list(executor.map(pow, [2, 3, 4], [2, 2, 2], chunksize=5)) == [4, 9, 16]
    results = executor.map(int, ["1", "x", "3"])
    assert next(results) == 1
    with pytest.raises(ValueError):
        next(results)


def test_serial_executor_map_timeout_stops_starting_calls():
    calls = []

    def slow(x):
        calls.append(x)
        time.sleep(0.05)
        return x

    results = SerialExecutor().map(slow, range(10), timeout=0.12)
    got = []
    with pytest.raises(TimeoutError, match=r"timeout of 0\.12 s"):
        for value in results:
            got.append(value)
    assert 1 <= len(calls) <= 4 and got == calls


def test_serial_executor_shutdown_and_context_manager():
    with SerialExecutor() as executor:
        assert executor.submit(abs, -2).result() == 2
    assert repr(executor) == "SerialExecutor(shut down)"
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(abs, -2)
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.map(abs, [1])


# -- worker marks (R11) ---------------------------------------------------------------------------------


def test_marks_nest_and_restore():
    first, second = object(), object()
    assert current_task_executor() is None
    with marked_as_task_of(first):
        with marked_as_task_of(second):
            assert current_task_executor() is second
        assert current_task_executor() is first
    assert current_task_executor() is None


def test_marks_are_per_thread():
    token = object()
    seen = []
    with marked_as_task_of(token):
        thread = threading.Thread(target=lambda: seen.append(current_task_executor()))
        thread.start()
        thread.join()
    assert seen == [None]


def test_the_task_drops_its_executor_when_pickled():
    with ThreadPoolExecutor(1) as pool:
        task = ContextTask(h.task_executor, pool, in_process=True)
        values, *_ = pool.submit(task, [(1, EvaluateContext())]).result()
        assert values == [pool]
        copy = pickle.loads(pickle.dumps(ContextTask(h.task_executor, pool)))
        assert copy.executor is None
        values, *_ = copy([((1,), EvaluateContext().to_wire())])
        assert values == [None]


def test_mark_is_restored_after_a_failing_task():
    with ThreadPoolExecutor(1) as pool:
        with pytest.raises(ValueError):
            map_with_context(pool, h.fail_on_odd, [1], ctxs=[EvaluateContext()])
        assert pool.submit(current_task_executor).result() is None
