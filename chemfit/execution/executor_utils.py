"""Running calls on an executor while keeping each caller's context up to date.

A call ``fn(*args_i, ctx_i)`` may run in a thread, another process, a remote engine or an MPI
rank. Wherever it runs, it returns ``(result, ctx.to_result_state())`` and the caller applies
that state to its own ``ctx_i``, so ``ctx_i.loss``, ``ctx_i.meta`` and friends look the same as
after a local call. ``temp`` and ``shared`` never travel back.

Errors are made explicit:

* a stdlib ``ProcessPoolExecutor`` that cannot pickle the function or its arguments raises
  :class:`~chemfit.core.exceptions.NotPicklableError` before anything is submitted (R18);
* a dead worker process (``BrokenProcessPool``, loky's ``TerminatedWorkerError``, a dead
  ipyparallel engine) raises :class:`~chemfit.core.exceptions.WorkerLostError` naming the lost
  call (R19), after the states of the calls that succeeded have been applied.

Every task marks its worker thread with the executor it came from (see
:mod:`chemfit.execution.worker_marks`, R11).
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures as cf
from typing import Any

from chemfit.core.context import EvaluateContext, ExecutorLike, FutureLike
from chemfit.core.exceptions import NotPicklableError, RemoteEvaluationError, WorkerLostError
from chemfit.execution.executors import SerialExecutor, as_executor
from chemfit.execution.worker_marks import _marks

__all__ = ["AttachContextAsReturnValue", "as_completed_with_context", "map_with_context"]

logger = logging.getLogger(__name__)

# On Python 3.10 concurrent.futures.TimeoutError is not the builtin TimeoutError.
_TIMEOUT_ERRORS = (TimeoutError, cf.TimeoutError)
_LOST_WORKER_NAMES = frozenset(
    {"BrokenProcessPool", "TerminatedWorkerError", "EngineError", "KilledWorker", "WorkerLostError"}
)


# -- the callables that run in the workers ---------------------------------------------------


def _check_context_arg(args: tuple) -> Any:
    ctx = args[-1] if args else None
    if not callable(getattr(ctx, "to_result_state", None)):
        raise TypeError(
            "the last positional argument must be the EvaluateContext of the call, got "
            f"{type(ctx).__name__}; call the function as fn(*args, ctx)"
        )
    return ctx


class AttachContextAsReturnValue:
    """Wrap ``func`` so that a call also returns its context's result state.

    ``AttachContextAsReturnValue(func)(*args)`` returns ``(func(*args), state)`` where
    ``state = args[-1].to_result_state()``. The wrapper is picklable whenever ``func`` is,
    so it can be sent to worker processes; the caller then applies ``state`` to its own
    context with ``ctx.apply_result_state(state)``.

    Parameters
    ----------
    func : callable
        Called as ``func(*args)``; the context is the last positional argument.

    Raises
    ------
    TypeError
        When the last positional argument is not an evaluation context.

    Examples
    --------
    >>> def objective(parameters, ctx):
    ...     ctx.parameters = parameters
    ...     ctx.loss = parameters["x"] ** 2
    ...     return ctx.loss
    >>> value, state = AttachContextAsReturnValue(objective)({"x": 3.0}, EvaluateContext())
    >>> value, state["loss"], state["parameters"]
    (9.0, 9.0, {'x': 3.0})
    """

    __slots__ = ("func",)

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func

    def __call__(self, *args: Any) -> tuple[Any, dict]:
        ctx = _check_context_arg(args)
        return self.func(*args), ctx.to_result_state()

    def __reduce__(self):
        return (type(self), (self.func,))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.func!r})"


class _ContextTask(AttachContextAsReturnValue):
    """One call that returns ``(value, state)``, run with the worker thread marked (R11).

    Pickling drops the executor: a copy in another process runs unmarked.
    """

    __slots__ = ("executor",)

    def __init__(self, func: Callable[..., Any], executor: Any = None) -> None:
        self.func = func
        self.executor = executor

    def __call__(self, *args: Any) -> tuple[Any, dict]:
        # The caller checked that the last argument is a context.
        executor = self.executor
        if executor is None:
            return self.func(*args), args[-1].to_result_state()
        previous = _marks.executor
        _marks.executor = executor
        try:
            return self.func(*args), args[-1].to_result_state()
        finally:
            _marks.executor = previous

    def __reduce__(self):
        return (_ContextTask, (self.func, None))


class _InProcessTask:
    """One call on a thread pool or SerialExecutor: the call writes into the caller's own
    context, so only the value comes back. Never pickled."""

    __slots__ = ("executor", "func")

    def __init__(self, func: Callable[..., Any], executor: Any) -> None:
        self.func = func
        self.executor = executor

    def __call__(self, *args: Any) -> Any:
        previous = _marks.executor
        _marks.executor = self.executor
        try:
            return self.func(*args)
        finally:
            _marks.executor = previous


class _ContextBatch:
    """Several calls in one task (``chunksize``); every call runs even if an earlier one fails.

    Returns ``(values, states, errors)``: ``states`` is ``None`` in the caller's process (the
    calls wrote into the caller's contexts), ``errors`` is ``None`` or a list of
    ``(position, exception, traceback_text)``.
    """

    __slots__ = ("executor", "func", "in_process")

    def __init__(self, func: Callable[..., Any], executor: Any = None, in_process: bool = False):
        self.func = func
        self.executor = executor
        self.in_process = in_process

    def __call__(self, calls: Sequence[tuple]) -> tuple[list, list | None, list | None]:
        executor = self.executor
        if executor is None:
            return self._run(calls, remote=True)
        previous = _marks.executor
        _marks.executor = executor
        try:
            return self._run(calls, remote=False)
        finally:
            _marks.executor = previous

    def _run(self, calls: Sequence[tuple], remote: bool) -> tuple[list, list | None, list | None]:
        func = self.func
        values: list[Any] = []
        states: list[Any] | None = None if self.in_process else []
        errors: list[tuple[int, Exception, str | None]] | None = None
        for position, args in enumerate(calls):
            try:
                value = func(*args)
            except Exception as exc:
                if errors is None:
                    errors = []
                errors.append(
                    (position, *_portable_exception(exc)) if remote else (position, exc, None)
                )
                values.append(None)
                if states is not None:
                    states.append(None)
            else:
                values.append(value)
                if states is not None:
                    states.append(args[-1].to_result_state())
        return values, states, errors

    def __reduce__(self):
        return (_ContextBatch, (self.func, None, False))


def _portable_exception(exc: Exception) -> tuple[Exception, str]:
    """An exception that can travel back from another process, plus its traceback text."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RemoteEvaluationError(
            type_name=type(exc).__name__, remote_message=str(exc), remote_traceback=text
        )
    return exc, text


class _WorkerTraceback(Exception):
    """Carries a worker's traceback text as the ``__cause__`` of a re-raised exception."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


# -- caller side: inputs, executors, error translation ----------------------------------------


def _resolve_executor(executor: Any) -> ExecutorLike:
    resolved = as_executor(executor)
    return SerialExecutor() if resolved is None else resolved


def _collect_calls(iterables: tuple[Iterable, ...], ctxs: Iterable) -> tuple[list[tuple], list]:
    """Read every iterable once (R2) and zip them with the contexts."""
    try:
        ctx_list = list(ctxs)
    except TypeError:
        raise TypeError(
            f"ctxs must be an iterable of EvaluateContext, got {type(ctxs).__name__}; "
            "pass one context per call, e.g. ctxs=[EvaluateContext() for _ in params]"
        ) from None
    n_calls = len(ctx_list)
    arg_lists = []
    for position, iterable in enumerate(iterables):
        items = list(iterable)
        if len(items) != n_calls:
            raise ValueError(
                f"iterable {position} has {len(items)} items but ctxs has {n_calls}; "
                "pass exactly one context per call"
            )
        arg_lists.append(items)
    checked: set[type] = set()
    for index, ctx in enumerate(ctx_list):
        cls = type(ctx)
        if cls in checked:
            continue
        if not (
            callable(getattr(ctx, "to_result_state", None))
            and callable(getattr(ctx, "apply_result_state", None))
        ):
            raise TypeError(
                f"ctxs[{index}] is a {cls.__name__}, not an EvaluateContext; "
                "pass one EvaluateContext per call"
            )
        checked.add(cls)
    return list(zip(*arg_lists, ctx_list)), ctx_list


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


def _is_stdlib_process_pool(executor: Any) -> bool:
    module = sys.modules.get("concurrent.futures.process")
    return module is not None and isinstance(executor, module.ProcessPoolExecutor)


def _runs_in_process(executor: Any) -> bool:
    if isinstance(executor, SerialExecutor):
        return True
    module = sys.modules.get("concurrent.futures.thread")
    return module is not None and isinstance(executor, module.ThreadPoolExecutor)


def _short_repr(obj: Any, limit: int = 80) -> str:
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_PICKLE_ADVICE = (
    "Use make_executor('loky') (cloudpickle sends lambdas, closures and locally defined "
    "functions) or a thread pool, or define the function at module level."
)


def _check_picklable(executor: Any, fn: Callable[..., Any], first_call: tuple) -> None:
    """R18: fail before submitting when a stdlib process pool cannot pickle the work."""
    from multiprocessing.reduction import ForkingPickler

    try:
        ForkingPickler.dumps((fn, first_call))
        return
    except Exception as exc:
        error = exc
    candidates: list[tuple[str, Any]] = [(f"the function {_short_repr(fn)}", fn)]
    for position, arg in enumerate(first_call[:-1]):
        candidates.append((f"argument {position} of call 0 ({_short_repr(arg)})", arg))
    ctx = first_call[-1]
    for key, value in ctx.__getstate__().items():
        candidates.append((f"ctxs[0].{key} ({_short_repr(value)})", value))
    what = "the work of call 0"
    for label, obj in candidates:
        try:
            ForkingPickler.dumps(obj)
        except Exception as exc:
            what, error = label, exc
            break
    raise NotPicklableError(
        f"{type(executor).__name__} cannot pickle {what} to send it to a worker process: "
        f"{type(error).__name__}: {error}. {_PICKLE_ADVICE}"
    ) from error


def _is_lost_worker(exc: BaseException) -> bool:
    if getattr(exc, "ename", None) == "EngineError":  # ipyparallel RemoteError of a dead engine
        return True
    return any(cls.__name__ in _LOST_WORKER_NAMES for cls in type(exc).__mro__)


def _is_pickling_error(exc: BaseException, executor: Any) -> bool:
    if isinstance(exc, NotPicklableError):
        return False
    if isinstance(exc, pickle.PicklingError):
        return True
    return (
        isinstance(exc, (AttributeError, TypeError))
        and "pickl" in str(exc).lower()
        and not _runs_in_process(executor)
    )


def _call_parameters(call: tuple) -> Any:
    parameters = getattr(call[-1], "parameters", None)
    if parameters is None and len(call) > 1:
        parameters = call[0]
    return parameters


def _translate(
    exc: BaseException, index: int, call: tuple, executor: Any, last: int | None = None
) -> BaseException:
    """The exception to raise for call ``index``: WorkerLostError, NotPicklableError or ``exc``.

    ``last`` is the last call of the task when ``index`` is the first call of a chunk.
    """
    if _is_lost_worker(exc):
        parameters = _call_parameters(call)
        in_task = f" (in the task with calls {index}..{last})" if last not in (None, index) else ""
        error: BaseException = WorkerLostError(
            f"a worker of {type(executor).__name__} died while evaluating call {index} with "
            f"parameters {_short_repr(parameters, 200)}{in_task} ({type(exc).__name__}: "
            f"{exc}). The states of the calls that completed were applied to their contexts; "
            "create a new executor to continue",
            index=index,
            parameters=parameters,
        )
    elif _is_pickling_error(exc, executor):
        error = NotPicklableError(
            f"{type(executor).__name__} could not pickle the function, the arguments or the "
            f"result of call {index}: {type(exc).__name__}: {exc}. {_PICKLE_ADVICE}"
        )
    else:
        return exc
    error.__cause__ = exc
    return error


def _submit_all(
    executor: ExecutorLike, task: Callable[..., Any], arg_tuples: Sequence[tuple]
) -> list[FutureLike]:
    """Submit every task.

    When ``submit`` raises, that task and all later ones get failed futures holding the error,
    so the caller still collects the tasks already submitted.
    """
    submit = executor.submit
    futures: list[FutureLike] = []
    try:
        for args in arg_tuples:
            futures.append(submit(task, *args))
    except Exception as exc:
        for _ in range(len(futures), len(arg_tuples)):
            failed: cf.Future = cf.Future()
            failed.set_exception(exc)
            futures.append(failed)
    except BaseException:
        _cancel(futures)
        raise
    return futures


def _cancel(futures: Iterable[FutureLike]) -> None:
    for future in futures:
        try:
            future.cancel()
        except Exception:  # a remote future may fail to cancel; it is abandoned either way
            logger.debug("could not cancel %r", future, exc_info=True)


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


def _attach_worker_traceback(exc: BaseException, text: str | None) -> BaseException:
    if text and exc.__cause__ is None:
        exc.__cause__ = _WorkerTraceback(text)
    return exc


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
    executor = _resolve_executor(executor)
    _check_chunksize(chunksize)
    deadline = _deadline(timeout)
    calls, ctx_list = _collect_calls(iterables, ctxs)
    n_calls = len(calls)
    if n_calls == 0:
        return []
    if _is_stdlib_process_pool(executor):
        _check_picklable(executor, fn, calls[0])
    in_process = _runs_in_process(executor)
    chunked = chunksize > 1 and n_calls > 1
    if chunked:
        task: Callable[..., Any] = _ContextBatch(fn, executor, in_process)
        futures = _submit_all(
            executor, task, [(calls[i : i + chunksize],) for i in range(0, n_calls, chunksize)]
        )
    else:
        task = _InProcessTask(fn, executor) if in_process else _ContextTask(fn, executor)
        futures = _submit_all(executor, task, calls)
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
            _cancel(futures)
    if failures:
        index, exc = min(failures, key=lambda item: item[0])
        raise _translate(exc, index, calls[index], executor, last_of_task.get(index))
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
                failures.append((first + position, _attach_worker_traceback(exc, text)))
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
        _cancel(self._futures)
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
                _cancel(futures)

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
            error = _translate(exc, index, self._calls[index], self._executor)
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
    executor = _resolve_executor(executor)
    deadline = _deadline(timeout)
    calls, ctx_list = _collect_calls(iterables, ctxs)
    if calls and _is_stdlib_process_pool(executor):
        _check_picklable(executor, fn, calls[0])
    futures = _submit_all(executor, _ContextTask(fn, executor), calls)
    return _CompletionIterator(
        futures, calls, ctx_list, executor, deadline, timeout, bool(return_exceptions)
    )
