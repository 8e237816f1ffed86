"""Which executor is running the current task (R11).

Tasks submitted through :func:`~chemfit.execution.executor_utils.map_with_context`,
:func:`~chemfit.execution.executor_utils.as_completed_with_context` (and the Fitter) mark the
thread that runs them with the executor they were submitted to. A nested parallel objective
(``ExecutorWrapperCOB``) reads the mark with :func:`current_task_executor`: when its chosen
executor is the one already running the task, submitting to it again could deadlock a bounded
pool, so it evaluates inline instead.

The mark holds the executor object only while a task runs **in the caller's process** (thread
pools, :class:`~chemfit.execution.executors.SerialExecutor`). A :class:`MarkedCall` that is
pickled to another process forgets its executor, so the mark there is ``None``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["MarkedCall", "current_task_executor", "marked_as_task_of"]


class _Marks(threading.local):
    executor: object | None = None


_marks = _Marks()


def current_task_executor() -> object | None:
    """The executor whose task is running in this thread, or ``None``.

    Returns
    -------
    object or None
        The executor that the running task was submitted to, when that task runs in this
        process; ``None`` outside such a task or in another process.

    Examples
    --------
    >>> current_task_executor() is None
    True
    >>> token = object()
    >>> with marked_as_task_of(token):
    ...     current_task_executor() is token
    True
    """
    return _marks.executor


@contextmanager
def marked_as_task_of(executor: object) -> Iterator[None]:
    """Mark the current thread as running a task of ``executor`` for the ``with`` block.

    The previous mark is restored on exit, so marks nest.

    Parameters
    ----------
    executor : object
        The executor the task was submitted to.

    Examples
    --------
    >>> outer, inner = object(), object()
    >>> with marked_as_task_of(outer):
    ...     with marked_as_task_of(inner):
    ...         assert current_task_executor() is inner
    ...     current_task_executor() is outer
    True
    """
    previous = _marks.executor
    _marks.executor = executor
    try:
        yield
    finally:
        _marks.executor = previous


class MarkedCall:
    """A picklable callable that runs ``fn`` with the thread marked as a task of ``executor``.

    When pickled (sent to another process) the executor is dropped and the copy runs ``fn``
    unmarked.

    Parameters
    ----------
    fn : callable
        The function to run.
    executor : object or None
        The executor the call is submitted to.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> with ThreadPoolExecutor(1) as pool:
    ...     pool.submit(MarkedCall(current_task_executor, pool)).result() is pool
    True
    """

    __slots__ = ("executor", "fn")

    def __init__(self, fn: Callable[..., Any], executor: object | None) -> None:
        self.fn = fn
        self.executor = executor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.executor is None:
            return self.fn(*args, **kwargs)
        previous = _marks.executor
        _marks.executor = self.executor
        try:
            return self.fn(*args, **kwargs)
        finally:
            _marks.executor = previous

    def __reduce__(self):
        return (MarkedCall, (self.fn, None))
