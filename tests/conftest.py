"""Fixtures shared by the whole suite: the executors that tests run their evaluations on.

``executor`` is THE parametrised executor fixture: a test that takes it runs once per kind in
``EXECUTOR_KINDS`` (ids ``serial``, ``threads``, ``process-pool``, ``loky``; the names of
``ExecutorInfo.kind``). A test meant for some kinds only narrows it with indirect
parametrisation::

    @pytest.mark.parametrize("executor", ["process-pool", "loky"], indirect=True)
    def test_on_worker_processes(executor): ...

``executors`` maps a kind to its executor, for a test that needs one named kind or several at
once (``executors["threads"]``). The pools of a test module are made on first use with 2
workers, shared by the module's tests, and shut down when the module ends; loky's reusable
executor is asked for at each use (a new one after a worker crash) and its workers are killed
when the session ends. A test that breaks or shuts down its pool makes its own instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import pytest

from chemfit.executors import SerialExecutor

EXECUTOR_KINDS = ("serial", "threads", "process-pool", "loky")
WORKERS = 2

# loky executors handed out during the session; their workers are killed when it ends.
_loky_executors: list = []


class SharedExecutors:
    """The executors of one test module, made on first use: ``executors[kind]``."""

    def __init__(self) -> None:
        self._made: dict[str, Executor] = {}

    def __getitem__(self, kind: str) -> Executor:
        if kind == "loky":
            return _reusable_loky_executor()
        if kind not in self._made:
            self._made[kind] = _make_executor(kind)
        return self._made[kind]

    def shutdown(self) -> None:
        for pool in self._made.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self._made.clear()


def _make_executor(kind: str) -> Executor:
    if kind == "serial":
        return SerialExecutor()
    if kind == "threads":
        return ThreadPoolExecutor(WORKERS)
    if kind == "process-pool":
        return ProcessPoolExecutor(WORKERS)
    raise KeyError(f"unknown executor kind {kind!r}; the kinds are {EXECUTOR_KINDS}")


def _reusable_loky_executor() -> Executor:
    loky = pytest.importorskip("loky")
    executor = loky.get_reusable_executor(max_workers=WORKERS)
    if all(executor is not known for known in _loky_executors):
        _loky_executors.append(executor)
    return executor


@pytest.fixture(scope="module")
def executors() -> Iterator[SharedExecutors]:
    """The executors of this module by kind (see the module docstring)."""
    shared = SharedExecutors()
    try:
        yield shared
    finally:
        shared.shutdown()


@pytest.fixture(params=EXECUTOR_KINDS)
def executor(request: pytest.FixtureRequest, executors: SharedExecutors) -> Executor:
    """Each kind of executor in turn (narrow with indirect parametrisation)."""
    return executors[request.param]


@pytest.fixture(scope="session", autouse=True)
def _kill_loky_workers_at_the_end() -> Iterator[None]:
    yield
    for executor in _loky_executors:
        executor.shutdown(wait=True, kill_workers=True)
    _loky_executors.clear()
