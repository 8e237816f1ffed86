"""Abandoning evaluations, recovering executors and unstartable tasks on a real ipyparallel
cluster and a real Dask ``LocalCluster`` (issue 15).

``ContextFuture.abandon`` kills the engine or Dask worker running the evaluation, the others go
on, and ``recover_executor`` keeps the executor while engines or workers are left (and says so
when none is). A task whose arguments or function a worker cannot rebuild is reported at once
as a ``NotPicklableError``, never as a lost worker; on Dask such a task used to hang. Each
cluster is started once per test and must leave no process behind.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types
import uuid

import pytest

psutil = pytest.importorskip("psutil")

from chemfit.core.context import EvaluateContext  # noqa: E402
from chemfit.core.exceptions import NotPicklableError, WorkerLostError  # noqa: E402
from chemfit.execution.executor_info import executor_info  # noqa: E402
from chemfit.execution.executors import make_executor  # noqa: E402
from chemfit.execution.recovery import executor_alive, recover_executor  # noqa: E402
from chemfit.execution.submission import ContextSubmitter  # noqa: E402


def nap(seconds, ctx):
    ctx.meta["pid"] = os.getpid()
    time.sleep(seconds)
    return seconds


def _caller_only_module():
    """A module that exists in this process only, with a class and an objective."""
    name = f"only_here_{uuid.uuid4().hex[:8]}"
    module = types.ModuleType(name)
    exec(
        "class Thing:\n    pass\n\ndef objective(x, ctx):\n    return x\n",
        module.__dict__,
    )
    module.Thing.__module__ = name
    module.objective.__module__ = name
    sys.modules[name] = module
    return module


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _wait(condition, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, f"{what} within {timeout} s"
        time.sleep(0.05)
    return time.monotonic() - start


@contextlib.contextmanager
def _no_process_left():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield

    def left():
        return {
            p.pid
            for p in psutil.Process().children(recursive=True)
            if _alive(p.pid) and "resource_tracker" not in " ".join(p.cmdline())
        }  # multiprocessing's resource tracker serves this process until it exits

    with contextlib.suppress(AssertionError):
        _wait(lambda: not (left() - before), 20, "the cluster's processes to end")
    assert not (left() - before), [psutil.Process(p).cmdline() for p in left() - before]


def _check_unstartable(executor) -> None:
    """Arguments and a function the workers cannot rebuild: NotPicklableError, at once."""
    module = _caller_only_module()
    for what, fn, argument in (
        ("arguments", nap, {"x": module.Thing()}),
        ("function", module.objective, 1.0),
    ):
        future = ContextSubmitter(executor, fn).submit(argument, EvaluateContext(), index=9)
        start = time.monotonic()
        with pytest.raises(NotPicklableError) as caught:
            future.result(timeout=60)
        assert time.monotonic() - start < 30, what
        message = str(caught.value)
        assert "could not rebuild" in message and module.__name__ in message, message
        assert not isinstance(caught.value, WorkerLostError)
    assert ContextSubmitter(executor, nap).submit(0.0, EvaluateContext()).result(timeout=60) == 0


# -- ipyparallel ---------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_ipyparallel_abandon_kills_one_engine_the_other_goes_on_and_then_none_is_left():
    pytest.importorskip("ipyparallel")
    with _no_process_left():
        executor = make_executor("ipyparallel", 2, timeout=120)
        try:
            info = executor_info(executor)
            _check_unstartable(executor)
            submitter = ContextSubmitter(info, nap)
            hanging = submitter.submit(60.0, EvaluateContext(), index=21)
            _wait(
                lambda: executor._engine_id_of(hanging.future._async_result) is not None,
                30,
                "the call to start on an engine",
            )
            engine_id = executor._engine_id_of(hanging.future._async_result)
            pid = executor.engines[engine_id]["pid"]
            assert hanging.abandon(timeout=1.0) is True
            with pytest.raises(WorkerLostError) as caught:
                hanging.result()
            message = str(caught.value)
            assert "evaluation 21" in message and "exceeded its timeout of 1 s" in message
            assert f"ipyparallel engine {engine_id}" in message, message
            _wait(lambda: not _alive(pid), 10, f"engine process {pid} to die")
            # the other engine takes the retry
            assert recover_executor(info, caught.value) is info
            ctx = EvaluateContext()
            assert submitter.submit(0.2, ctx, index=21).result(timeout=60) == 0.2
            assert ctx.meta["pid"] != pid
            # then the last one: no engine left, said within seconds of it
            last = submitter.submit(60.0, EvaluateContext(), index=22)
            _wait(
                lambda: executor._engine_id_of(last.future._async_result) is not None,
                30,
                "the call to start on an engine",
            )
            assert last.abandon() is True
            start = time.monotonic()
            with pytest.raises(WorkerLostError, match="no engine left") as none_left:
                while time.monotonic() - start < 30:
                    recover_executor(info, WorkerLostError("lost", index=22))
                    time.sleep(0.1)
            assert executor_alive(info) is False
            assert "Start new engines" in str(none_left.value)
            print(f"no engine left said {time.monotonic() - start:.1f} s after the kill")
        finally:
            executor.shutdown(wait=False, cancel_futures=True)


# -- Dask ----------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_dask_unstartable_tasks_are_errors_and_abandon_kills_the_worker_running_it():
    pytest.importorskip("distributed")
    with _no_process_left():
        executor = make_executor("dask", 2, cluster="local")
        try:
            info = executor_info(executor)
            _check_unstartable(executor)
            submitter = ContextSubmitter(info, nap)
            hanging = submitter.submit(60.0, EvaluateContext(), index=31)
            client = executor.client
            _wait(lambda: any(client.processing().values()), 30, "the call to start")
            pids = client.run(os.getpid)  # {worker address: pid}
            running_on = next(a for a, keys in client.processing().items() if keys)
            assert hanging.abandon(timeout=1.0) is True
            with pytest.raises(WorkerLostError) as caught:
                hanging.result()
            message = str(caught.value)
            assert "evaluation 31" in message and "exceeded its timeout of 1 s" in message
            assert running_on in message, message
            _wait(lambda: not _alive(pids[running_on]), 10, "the worker process to die")
            assert recover_executor(info, caught.value) is info
            results = [
                submitter.submit(0.1, EvaluateContext(), index=32 + i).result(timeout=60)
                for i in range(3)
            ]
            assert results == [0.1] * 3
            # Dask did not run the abandoned call again elsewhere
            assert not any(client.processing().values())
        finally:
            executor.shutdown(wait=False, cancel_futures=True)


@pytest.mark.timeout(240)
def test_ipyparallel_client_of_the_user_abandon_kills_the_engine_through_its_nanny():
    """A user's own ``ipp.Cluster`` and ``Client`` (ipyparallel's executor, AsyncResults)."""
    ipp = pytest.importorskip("ipyparallel")
    import shutil
    import tempfile

    profile_dir = tempfile.mkdtemp(prefix="chemfit-test-ipp-")
    with _no_process_left():
        cluster = ipp.Cluster(
            n=2,
            profile_dir=profile_dir,
            cluster_id=f"chemfit-test-{uuid.uuid4().hex[:8]}",
            log_level=40,
        )
        client = cluster.start_and_connect_sync()
        try:
            client.wait_for_engines(2, timeout=120)
            pids = client[:].apply_sync(os.getpid)
            info = executor_info(client)
            assert info.kind == "ipyparallel"
            submitter = ContextSubmitter(info, nap)
            hanging = submitter.submit(60.0, EvaluateContext(), index=41)
            time.sleep(1.0)
            assert hanging.abandon(timeout=1.0) is True
            with pytest.raises(WorkerLostError, match=r"evaluation 41 .* engine \d, which ran"):
                hanging.result()
            _wait(lambda: sum(map(_alive, pids)) == 1, 15, "one engine process to die")
            assert recover_executor(info, WorkerLostError("lost")) is info
            ctx = EvaluateContext()
            assert submitter.submit(0.1, ctx, index=41).result(timeout=60) == 0.1
            assert _alive(ctx.meta["pid"])
        finally:
            client.close()
            cluster.stop_cluster_sync()
            shutil.rmtree(profile_dir, ignore_errors=True)
