"""The worker side of a task: run calls ``fn(*args, ctx)`` and hand the contexts' states back.

:class:`ContextTask` is the one task chemfit submits for evaluations (see
:mod:`chemfit.execution.submission` for the caller's side). It runs a batch of calls (a single
call is a batch of one) with the worker thread marked by the executor it came from (R11, see
:mod:`chemfit.execution.worker_marks`; pickling drops that mark) and returns one outcome per
call (a :data:`TaskOutput`: values, states, wall seconds and failures):

* in this process (threads, ``SerialExecutor``) the calls write into the caller's own contexts,
  so no state comes back and a failure is the exception itself;
* in another process the contexts arrive in their wire form
  (:meth:`~chemfit.core.context.EvaluateContext.to_wire`), each state is
  ``ctx.to_result_state()`` and a failure a :class:`~chemfit.execution.task_errors.RemoteFailure`.

A task's function travels as bytes that chemfit makes (:class:`PickledCallable`, built with
:func:`dumps_for_workers`): plain :mod:`pickle` where that refers to nothing in ``__main__``,
else cloudpickle, which sends notebook and script definitions (decorated models, lambdas,
closures, partials, classes and their instances) by value. So they run on every executor,
stdlib process pools included, and the worker rebuilds the function inside the call: a worker
that cannot rebuild it raises :class:`~chemfit.core.exceptions.NotPicklableError` naming it,
instead of failing while unpickling the task (which a process pool reports as a broken pool).
On local process pools the calls travel as bytes too (:func:`run_pickled_task`), pickled once by
chemfit; the pool only copies them.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

from chemfit.core.context import EvaluateContext
from chemfit.core.wrapping import dumps_by_value, functions_inline
from chemfit.execution.executor_info import ExecutorInfo, executor_info, note_ran_in_place
from chemfit.execution.task_errors import (
    RemoteFailure,
    describe_object,
    not_picklable_error,
    rebuild_error,
)
from chemfit.execution.worker_marks import marked_as_task_of

__all__ = [
    "AttachContextAsReturnValue",
    "ContextTask",
    "PickledCallable",
    "SentCalls",
    "TaskNotRun",
    "TaskOutput",
    "cloudpickle_installed",
    "dumps_for_workers",
    "loads_in_worker",
    "run_pickled_task",
]

_PROTOCOL = pickle.HIGHEST_PROTOCOL


# -- sending functions to workers ------------------------------------------------------------------


def _main_reachable(executor: Any) -> bool:
    """Whether the workers of ``executor`` resolve names in this process's ``__main__``
    (``None`` or a description: unknown workers, so no)."""
    if executor is None or isinstance(executor, str):
        return False
    try:
        return executor_info(executor).main_reachable
    except TypeError:
        return False


def cloudpickle_installed() -> bool:
    """Whether cloudpickle can be imported (checked each time: tests hide it).

    Examples
    --------
    >>> isinstance(cloudpickle_installed(), bool)
    True
    """
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        return False
    return True


def dumps_for_workers(obj: Any, executor: Any = None, label: str | None = None) -> bytes:
    """``obj`` as bytes that a worker of ``executor`` rebuilds with ``pickle.loads``.

    Plain :mod:`pickle` when its output refers to nothing in ``__main__`` (cheap, by reference
    to importable modules). Otherwise cloudpickle, which sends ``__main__`` definitions by
    value. Without cloudpickle, or when it fails, references by name are sent only where the
    workers can resolve them (:attr:`~chemfit.execution.executor_info.ExecutorInfo.main_reachable`).
    ``label`` names ``obj`` in the error message (default: :func:`describe_object`).

    Raises
    ------
    NotPicklableError
        When ``obj`` cannot be sent; the message names what and where it was defined.

    Examples
    --------
    >>> pickle.loads(dumps_for_workers(lambda x: 2 * x))(4)
    8
    """
    with functions_inline():  # wrappers leave __main__ functions to be found below
        try:
            data = pickle.dumps(obj, protocol=_PROTOCOL)
        except Exception:
            data = None
    if data is not None and b"__main__" not in data:
        return data
    by_value_error: BaseException | None = None
    if cloudpickle_installed():
        try:
            return dumps_by_value(obj, protocol=_PROTOCOL)
        except Exception as exc:
            by_value_error = exc
    try:  # by name: wrappers fall back to references into __main__
        data = pickle.dumps(obj, protocol=_PROTOCOL)
    except Exception as exc:
        error = by_value_error or exc
        raise not_picklable_error(
            obj, executor, error, tried_by_value=by_value_error is not None, label=label
        ) from error
    if b"__main__" in data and not _main_reachable(executor):
        raise not_picklable_error(obj, executor, by_value_error, by_name=True, label=label)
    return data


def loads_in_worker(data: bytes, label: str) -> Any:
    """``pickle.loads(data)``; a failure raises :func:`rebuild_error` naming ``label``.

    Examples
    --------
    >>> loads_in_worker(pickle.dumps(len), "len")(["a"])
    1
    """
    try:
        return pickle.loads(data)
    except Exception as exc:
        raise rebuild_error(label, exc) from exc


class PickledCallable:
    """A callable that travels to workers as bytes made by :func:`dumps_for_workers` and is
    rebuilt inside the call.

    The bytes are made once (by :meth:`pack`), however many tasks carry them. In the caller's
    process calls go to the original; in a worker the first call rebuilds it.

    Examples
    --------
    >>> packed = PickledCallable.pack(lambda x: x + 1)
    >>> copy = pickle.loads(pickle.dumps(packed))  # what a worker receives: the bytes only
    >>> packed(1), copy(1), packed.label
    (2, 2, 'a lambda (<lambda>) defined in module chemfit.execution.context_tasks')
    """

    __slots__ = ("_data", "_func", "label")

    def __init__(self, func: Callable[..., Any] | None, data: bytes, label: str) -> None:
        self._func = func
        self._data = data
        self.label = label

    @classmethod
    def pack(cls, func: Any, executor: Any = None) -> PickledCallable:
        """``func`` packed for the workers of ``executor`` (returned as is when packed already).

        Raises
        ------
        NotPicklableError
            When it cannot be sent (see :func:`dumps_for_workers`).
        """
        if isinstance(func, cls):
            return func
        return cls(func, dumps_for_workers(func, executor), describe_object(func))

    @property
    def func(self) -> Any:
        """The callable (rebuilt on first use in a worker)."""
        return self.load()

    def load(self) -> Callable[..., Any]:
        func = self._func
        if func is None:
            func = self._func = loads_in_worker(self._data, self.label)
        return func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)

    def __reduce__(self):
        return (PickledCallable, (None, self._data, self.label))

    def __repr__(self) -> str:
        return f"PickledCallable({self.label}, {len(self._data)} bytes)"


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
    >>> from chemfit.core.context import EvaluateContext
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


# -- the task ----------------------------------------------------------------------------------


class SentCalls(list):
    """The calls, in their wire form, of a task for an executor chemfit does not know.

    Any copy of it (pickled, or deep-copied) is a plain ``list``: a task that receives this
    very class received the caller's own object, uncopied.

    Examples
    --------
    >>> import copy
    >>> calls = SentCalls([((1,), None)])
    >>> type(pickle.loads(pickle.dumps(calls))).__name__, type(copy.deepcopy(calls)).__name__
    ('list', 'list')
    """

    __slots__ = ()

    def __reduce__(self):
        return (list, (list(self),))


class TaskNotRun:
    """What a task in another process returns when none of its calls could start.

    ``what`` is ``"arguments"`` (the calls could not be unpickled) or ``"function"`` (the
    function could not be rebuilt); ``failure`` is the :class:`RemoteFailure`.
    """

    __slots__ = ("failure", "what")

    def __init__(self, what: str, failure: RemoteFailure) -> None:
        self.what = what
        self.failure = failure

    def __reduce__(self):
        return (TaskNotRun, (self.what, self.failure))

    def __repr__(self) -> str:
        return f"TaskNotRun({self.what!r}, {self.failure.type_name}: {self.failure.message})"


#: What a :class:`ContextTask` returns, one entry per call that ran, in call order:
#: ``(values, states, seconds, failures)``. ``values`` and ``seconds`` (wall time measured
#: where the call ran) for every call; ``states`` the result states (``None`` in this process,
#: where the calls wrote into the caller's contexts); ``failures`` ``None`` or
#: ``{position: failure}`` (the exception in this process, a :class:`RemoteFailure` from
#: another). Columns in a plain tuple, not an object per call: cheap calls are most of what a
#: task does, and lists pickle fast.
TaskOutput = tuple


class ContextTask:
    """The task chemfit submits: runs calls ``fn(*args, ctx)`` and returns a :data:`TaskOutput`.

    In this process (``in_process``) the calls are ``(*args, ctx)`` with the caller's contexts,
    which they write into. Otherwise the calls are ``(args, wire)`` pairs
    (:meth:`~chemfit.core.context.EvaluateContext.to_wire`) and each call's result state comes
    back, also after a failure. When the function cannot be rebuilt no call runs and a
    :class:`TaskNotRun` is returned.

    The calls run with the thread marked as a task of ``executor`` (R11); pickling drops it.
    A task for another process that runs on the caller's own objects, neither itself nor its
    :class:`SentCalls` copied (an executor chemfit does not know ran it in place), tells
    :func:`~chemfit.execution.executor_info.note_ran_in_place`, so the next submissions to that
    executor skip the wire form. With ``stop_at_first_error`` the calls after a failed one do
    not run.

    Examples
    --------
    >>> def inverse(x, ctx):
    ...     ctx.loss = 1 / x
    ...     return ctx.loss
    >>> task = ContextTask(inverse, "pool", in_process=True)
    >>> values, states, seconds, failures = task([(2, EvaluateContext()), (0, EvaluateContext())])
    >>> values, states, {k: type(v).__name__ for k, v in failures.items()}
    ([0.5, None], None, {1: 'ZeroDivisionError'})
    >>> copy = pickle.loads(pickle.dumps(ContextTask(inverse, "pool")))  # as a worker gets it
    >>> values, states, seconds, failures = copy([((4,), EvaluateContext().to_wire())])
    >>> values, states[0]["loss"], failures
    ([0.25], 0.25, None)
    """

    __slots__ = ("_mark", "executor", "fn", "in_process", "stop_at_first_error")

    def __init__(
        self,
        fn: Callable[..., Any],
        executor: Any = None,
        *,
        in_process: bool = False,
        stop_at_first_error: bool = False,
    ) -> None:
        self.fn = fn
        self.executor = executor.executor if isinstance(executor, ExecutorInfo) else executor
        self.in_process = in_process
        self.stop_at_first_error = stop_at_first_error
        self._mark = marked_as_task_of(self.executor)

    def __call__(self, calls: Sequence[tuple]) -> TaskOutput | TaskNotRun:
        if not self.in_process:
            # neither this task nor its calls were copied on their way: the caller's objects
            if self.executor is not None and calls.__class__ is SentCalls:
                note_ran_in_place(self.executor)
            with self._mark:
                return self._run_sent(calls)
        fn = self.fn
        clock = time.perf_counter
        if len(calls) == 1:  # most tasks: the same as the loop below, with less bookkeeping
            with self._mark:
                start = clock()
                try:
                    value = fn(*calls[0])
                except Exception as exc:
                    return [None], None, [clock() - start], {0: exc}
                return [value], None, [clock() - start], None
        values: list = []
        seconds: list[float] = []
        failures: dict | None = None
        with self._mark:
            start = clock()
            for call in calls:
                try:
                    values.append(fn(*call))
                except Exception as exc:
                    values.append(None)
                    if failures is None:
                        failures = {}
                    failures[len(seconds)] = exc
                end = clock()
                seconds.append(end - start)
                start = end
                if failures is not None and self.stop_at_first_error:
                    break
        return values, None, seconds, failures

    def _run_sent(self, calls: Sequence[tuple]) -> TaskOutput | TaskNotRun:
        fn = self.fn
        if isinstance(fn, PickledCallable):
            try:
                fn = fn.load()
            except Exception as exc:
                return TaskNotRun("function", RemoteFailure.capture(exc))
        from_wire = EvaluateContext.from_wire
        clock = time.perf_counter
        values: list = []
        states: list = []
        seconds: list[float] = []
        failures: dict | None = None
        for args, wire in calls:
            ctx = from_wire(wire)
            start = clock()
            try:
                values.append(fn(*args, ctx))
            except Exception as exc:
                values.append(None)
                if failures is None:
                    failures = {}
                failures[len(seconds)] = RemoteFailure.capture(exc)
            seconds.append(clock() - start)
            states.append(ctx.to_result_state())
            if failures is not None and self.stop_at_first_error:
                break
        return values, states, seconds, failures

    def __reduce__(self):
        # Packed once, on the first pickle; later pickles of this task reuse the bytes.
        self.fn = fn = PickledCallable.pack(self.fn, self.executor)
        return (_rebuild_task, (fn, self.stop_at_first_error))

    def __repr__(self) -> str:
        return f"ContextTask({self.fn!r}, in_process={self.in_process})"


def _rebuild_task(fn: Any, stop_at_first_error: bool) -> ContextTask:
    return ContextTask(fn, None, stop_at_first_error=stop_at_first_error)


def run_pickled_task(task_data: bytes, calls_data: bytes) -> TaskOutput | TaskNotRun:
    """Run a :class:`ContextTask` sent as bytes on the calls sent as bytes (in a worker).

    Calls that cannot be unpickled here (they refer to something this worker cannot import)
    return a :class:`TaskNotRun` instead of breaking the pool.

    Examples
    --------
    >>> def negate(x, ctx):
    ...     ctx.loss = -x
    ...     return ctx.loss
    >>> task = pickle.dumps(ContextTask(negate))
    >>> calls = pickle.dumps([((2,), EvaluateContext().to_wire())])
    >>> values, states, seconds, failures = run_pickled_task(task, calls)
    >>> values, states[0]["loss"]
    ([-2], -2)
    """
    task = pickle.loads(task_data)
    try:
        calls = pickle.loads(calls_data)
    except Exception as exc:
        return TaskNotRun("arguments", RemoteFailure.capture(exc))
    return task(calls)
