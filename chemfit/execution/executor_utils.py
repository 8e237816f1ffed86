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
:mod:`chemfit.execution.worker_marks`, R11). The tasks themselves are in
:mod:`chemfit.execution.context_tasks`, submitting in :mod:`chemfit.execution.task_submission`
and the error translation in :mod:`chemfit.execution.task_errors`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures as cf
from typing import Any

from chemfit.core.context import EvaluateContext, ExecutorLike, FutureLike
from chemfit.execution.context_tasks import (
    AttachContextAsReturnValue,
    ContextBatch,
    ContextTask,
    InProcessTask,
    PackedCalls,
    PickledCallable,
)
from chemfit.execution.task_errors import (
    attach_worker_traceback,
    check_picklable,
    translate_call_error,
)
from chemfit.execution.task_submission import (
    cancel_all,
    collect_calls,
    is_stdlib_process_pool,
    resolve_executor,
    runs_in_process,
    submit_all,
)

__all__ = ["AttachContextAsReturnValue", "as_completed_with_context", "map_with_context"]

logger = logging.getLogger(__name__)

# On Python 3.10 concurrent.futures.TimeoutError is not the builtin TimeoutError.
_TIMEOUT_ERRORS = (TimeoutError, cf.TimeoutError)


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
    executor = resolve_executor(executor)
    _check_chunksize(chunksize)
    deadline = _deadline(timeout)
    calls, ctx_list = collect_calls(iterables, ctxs)
    n_calls = len(calls)
    if n_calls == 0:
        return []
    in_process = runs_in_process(executor)
    if not in_process:  # pickled once here, not once per task; NotPicklableError before submitting
        fn = PickledCallable.pack(fn, executor)
        if is_stdlib_process_pool(executor):
            check_picklable(executor, fn, calls[0])
    chunked = chunksize > 1 and n_calls > 1
    if chunked:
        task: Callable[..., Any] = ContextBatch(fn, executor, in_process)
        chunks = [PackedCalls(calls[i : i + chunksize]) for i in range(0, n_calls, chunksize)]
        futures = submit_all(executor, task, [(chunk,) for chunk in chunks])
    else:
        task = InProcessTask(fn, executor) if in_process else ContextTask(fn, executor)
        futures = submit_all(executor, task, calls)
        chunksize = 1

    results: list[Any] = [None] * n_calls
    failures: list[tuple[int, BaseException]] = []
    last_of_task: dict[int, int] = {}  # first call of a failed chunk -> its last call
    finished = False
    try:
        for number, future in enumerate(futures):
            try:
                output = (
                    future.result() if deadline is None else future.result(_remaining(deadline))
                )
            except Exception as exc:
                if _timed_out(future, exc, deadline):
                    if not in_process:  # in-process calls wrote into the contexts already
                        for later in range(number + 1, len(futures)):
                            _absorb_done(
                                futures[later], later, chunked, chunksize, ctx_list, results
                            )
                    n_pending = sum(1 for f in futures if not _done(f))
                    raise TimeoutError(
                        f"map_with_context ran out of its timeout of {timeout} s with "
                        f"{n_pending} of {len(futures)} tasks unfinished; the tasks that had "
                        "not started were cancelled"
                    ) from None
                failures.append((number * chunksize, exc))
                if chunked:
                    last_of_task[number * chunksize] = min(n_calls, (number + 1) * chunksize) - 1
            else:
                if chunked:
                    _absorb_batch(output, number * chunksize, ctx_list, results, failures)
                elif in_process:
                    results[number] = output
                else:
                    ctx_list[number].apply_result_state(output[1])
                    results[number] = output[0]
        finished = True
    finally:
        if not finished:
            cancel_all(futures)
    if failures:
        index, exc = min(failures, key=lambda item: item[0])
        raise translate_call_error(exc, index, calls[index], executor, last_of_task.get(index))
    return results


def _absorb_batch(
    output: tuple[list, list | None, list | None],
    first: int,
    ctx_list: list,
    results: list,
    failures: list | None,
) -> None:
    """Store a batch's values and apply its states; record its failures."""
    values, states, errors = output
    results[first : first + len(values)] = values
    if errors:
        for position, exc, text in errors:
            if failures is not None:
                failures.append((first + position, attach_worker_traceback(exc, text)))
    if states is not None:
        for ctx, state in zip(ctx_list[first : first + len(states)], states):
            if state is not None:
                ctx.apply_result_state(state)


def _absorb_done(
    future: FutureLike, number: int, chunked: bool, chunksize: int, ctx_list: list, results: list
) -> None:
    """On a timeout: apply the states of a task that did finish (its failures are dropped)."""
    if not _done(future):
        return
    try:
        output = future.result(0)
    except Exception:
        return
    if chunked:
        _absorb_batch(output, number * chunksize, ctx_list, results, None)
    else:
        ctx_list[number].apply_result_state(output[1])


def _done(future: FutureLike) -> bool:
    done = getattr(future, "done", None)
    return bool(done()) if callable(done) else False


# -- as_completed_with_context -----------------------------------------------------------------


class _CompletionIterator(Iterator[tuple[int, Any]]):
    """Yields ``(index, result)`` as calls finish; ``close()`` cancels calls not yet started."""

    def __init__(
        self,
        futures: list[FutureLike],
        calls: list[tuple],
        ctx_list: list,
        executor: Any,
        deadline: float | None,
        timeout: float | None,
        return_exceptions: bool,
    ) -> None:
        self._futures = futures
        self._calls = calls
        self._ctxs = ctx_list
        self._executor = executor
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
            if all(isinstance(f, cf.Future) for f in futures):
                index_of = {id(f): i for i, f in enumerate(futures)}
                try:
                    for future in cf.as_completed(futures, timeout=_remaining(self._deadline)):
                        yield self._outcome(index_of[id(future)], future)
                except _TIMEOUT_ERRORS as exc:
                    if any(not f.done() for f in futures):
                        raise self._timeout_error() from None
                    raise exc
            else:  # futures that concurrent.futures.wait cannot handle: submission order
                for index, future in enumerate(futures):
                    try:
                        future.result(_remaining(self._deadline))
                    except Exception as exc:
                        if _timed_out(future, exc, self._deadline):
                            raise self._timeout_error() from None
                    yield self._outcome(index, future)
            finished = True
        finally:
            if not finished:
                cancel_all(futures)

    def _timeout_error(self) -> TimeoutError:
        pending = sum(1 for f in self._futures if not _done(f))
        return TimeoutError(
            f"as_completed_with_context ran out of its timeout of {self._timeout} s with "
            f"{pending} calls unfinished; the calls that had not started were cancelled"
        )

    def _outcome(self, index: int, future: FutureLike) -> tuple[int, Any]:
        try:
            value, state = future.result(0)
        except Exception as exc:
            error = translate_call_error(exc, index, self._calls[index], self._executor)
        else:
            self._ctxs[index].apply_result_state(state)
            return index, value
        if self._return_exceptions:
            return index, error
        raise error


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
    executor = resolve_executor(executor)
    deadline = _deadline(timeout)
    calls, ctx_list = collect_calls(iterables, ctxs)
    if calls and not runs_in_process(executor):
        fn = PickledCallable.pack(fn, executor)
        if is_stdlib_process_pool(executor):
            check_picklable(executor, fn, calls[0])
    futures = submit_all(executor, ContextTask(fn, executor), calls)
    return _CompletionIterator(
        futures, calls, ctx_list, executor, deadline, timeout, bool(return_exceptions)
    )
