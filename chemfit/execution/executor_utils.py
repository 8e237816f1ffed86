"""Running calls on an executor while keeping each caller's context up to date.

A call ``fn(*args_i, ctx_i)`` may run in a thread, another process, a remote engine or an MPI
rank. Wherever it runs, it returns ``(result, ctx.to_result_state())`` and the caller applies
that state to its own ``ctx_i``, so ``ctx_i.loss``, ``ctx_i.meta`` and friends look the same as
after a local call. ``temp`` and ``shared`` never travel back.

Errors are made explicit:

* the function is pickled once per call of :func:`map_with_context`, by chemfit: functions,
  lambdas, closures, partials and classes defined in ``__main__`` (a notebook cell) travel by
  value when cloudpickle is installed, on every executor, stdlib process pools included;
* a function or arguments that cannot be sent raise
  :class:`~chemfit.core.exceptions.NotPicklableError` before anything is submitted (R18), and a
  worker that cannot rebuild the function raises it too, naming the function;
* a dead worker process (``BrokenProcessPool``, loky's ``TerminatedWorkerError``, a dead
  ipyparallel engine) raises :class:`~chemfit.core.exceptions.WorkerLostError` naming the lost
  call (R19), after the states of the calls that succeeded have been applied.

Every task marks its worker thread with the executor it came from (see
:mod:`chemfit.execution.worker_marks`, R11). Both functions submit through
:class:`~chemfit.execution.submission.ContextSubmitter` (the one submission primitive); the
worker side is :class:`~chemfit.execution.context_tasks.ContextTask` and the error translation
is in :mod:`chemfit.execution.task_errors`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures as cf
from typing import Any

from chemfit.core.context import EvaluateContext, ExecutorLike, FutureLike
from chemfit.execution.context_tasks import AttachContextAsReturnValue
from chemfit.execution.executor_info import executor_info
from chemfit.execution.submission import (
    TIMEOUT_ERRORS,
    ContextFuture,
    ContextSubmitter,
    cancel_all,
    collect_calls,
)

__all__ = ["AttachContextAsReturnValue", "as_completed_with_context", "map_with_context"]

logger = logging.getLogger(__name__)

_TIMEOUT_ERRORS = TIMEOUT_ERRORS


# -- caller side: inputs and deadlines --------------------------------------------------------


def _check_chunksize(chunksize: Any) -> None:
    if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError(
            f"chunksize must be a positive int, got {chunksize!r}; use 1 for one call per task"
        )


def _deadline(timeout: Any) -> float | None:
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
        raise ValueError(
            f"timeout must be None or a non-negative number of seconds, got {timeout!r}"
        )
    return time.monotonic() + timeout


def _timed_out(future: FutureLike, exc: BaseException, deadline: float | None) -> bool:
    """Whether ``exc`` from ``future.result(timeout)`` is our timeout, not the call's own error."""
    if not isinstance(exc, _TIMEOUT_ERRORS):
        return False
    done = getattr(future, "done", None)
    if callable(done):
        return not done()
    return deadline is not None and time.monotonic() >= deadline


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


# -- map_with_context ----------------------------------------------------------------------


def map_with_context(
    executor: ExecutorLike,
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    ctxs: Iterable[EvaluateContext],
    timeout: float | None = None,
    chunksize: int = 1,
) -> list:
    """Run ``fn(*args_i, ctx_i)`` on ``executor`` and apply each call's state to ``ctx_i``.

    Parameters
    ----------
    executor : ExecutorLike
        Anything :func:`~chemfit.execution.executors.as_executor` accepts (a
        ``concurrent.futures`` or loky executor, a Dask or ipyparallel client, ...). ``None``
        runs the calls serially in this thread.
    fn : callable
        Called as ``fn(*args_i, ctx_i)``: the context is the last positional argument. For
        process pools it must be picklable.
    *iterables : iterable
        The positional arguments; each is read once (generators are fine).
    ctxs : iterable of EvaluateContext
        One context per call. After the call, each holds the parameters, loss, quantities and
        meta written by its call, wherever the call ran; ``temp`` and ``shared`` are not sent
        back.
    timeout : float, optional
        Seconds for the whole call; when they run out, calls not yet started are cancelled and
        ``TimeoutError`` is raised.
    chunksize : int
        Number of calls packed into one task (fewer round trips for cheap calls).

    Returns
    -------
    list
        The results, in input order.

    Raises
    ------
    ValueError
        When the iterables and ``ctxs`` have different lengths, or for a bad ``chunksize`` or
        ``timeout``.
    TimeoutError
        When ``timeout`` runs out.
    NotPicklableError
        When a process pool cannot pickle the function, the arguments or a result.
    WorkerLostError
        When a worker process died; it names the lost call's index and parameters.
    Exception
        The first failure in input order, as raised by ``fn``, after the states of all
        successful calls have been applied.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> def objective(x, ctx):
    ...     ctx.loss = x * x
    ...     ctx.meta["seen"] = x
    ...     return ctx.loss
    >>> ctxs = [EvaluateContext() for _ in range(4)]
    >>> with ThreadPoolExecutor(2) as pool:
    ...     map_with_context(pool, objective, range(4), ctxs=ctxs, chunksize=2)
    [0, 1, 4, 9]
    >>> [ctx.meta["seen"] for ctx in ctxs]
    [0, 1, 2, 3]
    """
    info = executor_info(executor)
    _check_chunksize(chunksize)
    deadline = _deadline(timeout)
    calls, _ = collect_calls(iterables, ctxs)
    n_calls = len(calls)
    if n_calls == 0:
        return []
    submitter = ContextSubmitter(info, fn)  # fn packed once; NotPicklableError before submitting
    if info.kind == "serial":  # runs each task as it is submitted: one task, same calls, no waits
        chunksize = n_calls
    if info.in_process and chunksize == 1:  # a task per call, one future: a bare map's cost
        futures = [submitter.submit_each(calls)]
        chunksize = n_calls
    else:
        groups = [(calls[i : i + chunksize], i) for i in range(0, n_calls, chunksize)]
        futures = submitter.submit_all(groups, single=chunksize == 1)

    results: list[Any] = [None] * n_calls
    failures: list[tuple[int, BaseException]] = []
    finished = False
    try:
        for future in futures:
            try:
                values, errors = future.settle(None if deadline is None else _remaining(deadline))
            except Exception as exc:
                if _timed_out(future, exc, deadline):
                    for later in futures:  # apply the states of the tasks that did finish
                        if later.done():
                            with contextlib.suppress(Exception):
                                later.settle(0)
                    n_pending = sum(f.pending() for f in futures)
                    raise TimeoutError(
                        f"map_with_context ran out of its timeout of {timeout} s with "
                        f"{n_pending} of {n_calls} calls unfinished; the calls that had "
                        "not started were cancelled"
                    ) from None
                failures.append((future.index, exc))
                continue
            first = future.index
            if chunksize == 1:
                results[first] = values[0]
            else:
                results[first : first + len(values)] = values
            if errors:
                failures.extend((first + position, error) for position, error in errors.items())
        finished = True
    finally:
        if not finished:
            cancel_all(futures)
    if failures:
        raise min(failures, key=lambda item: item[0])[1]
    return results


# -- as_completed_with_context -----------------------------------------------------------------


class _CompletionIterator(Iterator[tuple[int, Any]]):
    """Yields ``(index, result)`` as calls finish; ``close()`` cancels calls not yet started."""

    def __init__(
        self,
        futures: list[ContextFuture],
        deadline: float | None,
        timeout: float | None,
        return_exceptions: bool,
    ) -> None:
        self._futures = futures
        self._deadline = deadline
        self._timeout = timeout
        self._return_exceptions = return_exceptions
        self._generator = self._generate()
        self._closed = False

    def __iter__(self) -> _CompletionIterator:
        return self

    def __next__(self) -> tuple[int, Any]:
        return next(self._generator)

    def close(self) -> None:
        """Stop iterating and cancel the calls that have not started."""
        if self._closed:
            return
        self._closed = True
        cancel_all(self._futures)
        self._generator.close()

    def __enter__(self) -> _CompletionIterator:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # e.g. at interpreter shutdown
            self.close()

    def _generate(self) -> Iterator[tuple[int, Any]]:
        futures = self._futures
        finished = False
        try:
            if all(isinstance(f.future, cf.Future) for f in futures):
                by_future = {id(f.future): f for f in futures}
                inner = [f.future for f in futures]
                try:
                    for done in cf.as_completed(inner, timeout=_remaining(self._deadline)):
                        yield self._outcome(by_future[id(done)])
                except _TIMEOUT_ERRORS as exc:
                    if any(not f.done() for f in futures):
                        raise self._timeout_error() from None
                    raise exc
            else:  # futures that concurrent.futures.wait cannot handle: submission order
                for future in futures:
                    try:
                        future.settle(_remaining(self._deadline))
                    except Exception as exc:
                        if _timed_out(future, exc, self._deadline):
                            raise self._timeout_error() from None
                    yield self._outcome(future)
            finished = True
        finally:
            if not finished:
                cancel_all(futures)

    def _timeout_error(self) -> TimeoutError:
        pending = sum(1 for f in self._futures if not f.done())
        return TimeoutError(
            f"as_completed_with_context ran out of its timeout of {self._timeout} s with "
            f"{pending} calls unfinished; the calls that had not started were cancelled"
        )

    def _outcome(self, future: ContextFuture) -> tuple[int, Any]:
        try:
            return future.index, future.result(0)
        except Exception as error:
            if self._return_exceptions:
                return future.index, error
            raise


def as_completed_with_context(
    executor: ExecutorLike,
    fn: Callable[..., Any],
    *iterables: Iterable[Any],
    ctxs: Iterable[EvaluateContext],
    timeout: float | None = None,
    return_exceptions: bool = False,
) -> Iterator[tuple[int, Any]]:
    """Submit ``fn(*args_i, ctx_i)`` for every ``i`` and yield ``(i, result)`` as calls finish.

    The calls are submitted before this function returns. Each call's state is applied to
    ``ctx_i`` before ``(i, result)`` is yielded.

    Parameters
    ----------
    executor, fn, *iterables, ctxs
        As in :func:`map_with_context`.
    timeout : float, optional
        Seconds, counted from this call, for the whole iteration; ``TimeoutError`` when they
        run out.
    return_exceptions : bool
        Yield ``(i, exception)`` for a failed call instead of raising it.

    Returns
    -------
    Iterator[tuple[int, Any]]
        In completion order. Closing it (``close()``, leaving a ``with`` block, or dropping
        it) cancels the calls that have not started. Futures that ``concurrent.futures.wait``
        cannot handle are yielded in submission order.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> def objective(x, ctx):
    ...     ctx.loss = -x
    ...     return ctx.loss
    >>> ctxs = [EvaluateContext() for _ in range(3)]
    >>> with ThreadPoolExecutor(2) as pool:
    ...     done = sorted(as_completed_with_context(pool, objective, [1, 2, 3], ctxs=ctxs))
    >>> done, [ctx.loss for ctx in ctxs]
    ([(0, -1), (1, -2), (2, -3)], [-1, -2, -3])
    """
    info = executor_info(executor)
    deadline = _deadline(timeout)
    calls, _ = collect_calls(iterables, ctxs)
    futures: list[ContextFuture] = []
    if calls:
        submitter = ContextSubmitter(info, fn)
        futures = submitter.submit_all(
            [([call], index) for index, call in enumerate(calls)], single=True
        )
    return _CompletionIterator(futures, deadline, timeout, bool(return_exceptions))
