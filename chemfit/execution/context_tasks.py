"""The callables that run ``fn(*args, ctx)`` in a worker and hand the context's state back.

A call returns ``(value, ctx.to_result_state())`` when it may run in another process, so the
caller can apply that state to its own context. In-process tasks (thread pools,
``SerialExecutor``) write into the caller's context directly and return the value only. Every
task marks its worker thread with the executor it came from (R11, see
:mod:`chemfit.execution.worker_marks`); pickling drops that mark.

A task's function travels as bytes that chemfit makes (:class:`PickledCallable`, built with
:func:`dumps_for_workers`): plain :mod:`pickle` where that refers to nothing in ``__main__``,
else cloudpickle, which sends notebook and script definitions (decorated models, lambdas,
closures, partials, classes and their instances) by value. So they run on every executor,
stdlib process pools included, and the worker rebuilds the function inside the call: a worker
that cannot rebuild it raises :class:`~chemfit.core.exceptions.NotPicklableError` naming it,
instead of failing while unpickling the task (which a process pool reports as a broken pool).
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Sequence
from typing import Any

from chemfit.core.context import EvaluateContext
from chemfit.core.wrapping import dumps_by_value, functions_inline
from chemfit.execution.task_errors import (
    describe_object,
    not_picklable_error,
    portable_exception,
    rebuild_error,
)
from chemfit.execution.task_submission import is_stdlib_process_pool
from chemfit.execution.worker_marks import _marks

__all__ = [
    "AttachContextAsReturnValue",
    "ContextBatch",
    "ContextTask",
    "InProcessTask",
    "PackedCalls",
    "PickledCallable",
    "dumps_for_workers",
    "loads_in_worker",
    "main_reachable",
    "rebuild_context",
]

_PROTOCOL = pickle.HIGHEST_PROTOCOL


# -- sending functions to workers ------------------------------------------------------------------


def main_reachable(executor: Any) -> bool:
    """Whether the workers of ``executor`` can look names up in this process's ``__main__``.

    True for a stdlib process pool that forks (its workers are copies of this process) and for
    one that spawns when ``__main__`` is a script file (the workers import it again). Not for
    a notebook's ``__main__``, nor for loky, ipyparallel or Dask workers.

    Examples
    --------
    >>> main_reachable(None)
    False
    """
    if not is_stdlib_process_pool(executor):
        return False
    context = getattr(executor, "_mp_context", None)
    if context is None:
        import multiprocessing

        context = multiprocessing.get_context()
    if context.get_start_method() == "fork":
        return True
    main = sys.modules.get("__main__")
    return bool(getattr(main, "__file__", None)) and not sys.flags.interactive


def _cloudpickle_installed() -> bool:
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        return False
    return True


def dumps_for_workers(obj: Any, executor: Any = None) -> bytes:
    """``obj`` as bytes that a worker of ``executor`` rebuilds with ``pickle.loads``.

    Plain :mod:`pickle` when its output refers to nothing in ``__main__`` (cheap, by reference
    to importable modules). Otherwise cloudpickle, which sends ``__main__`` definitions by
    value. Without cloudpickle, or when it fails, references by name are sent only where the
    workers can resolve them (:func:`main_reachable`).

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
    if _cloudpickle_installed():
        try:
            return dumps_by_value(obj, protocol=_PROTOCOL)
        except Exception as exc:
            by_value_error = exc
    try:  # by name: wrappers fall back to references into __main__
        data = pickle.dumps(obj, protocol=_PROTOCOL)
    except Exception as exc:
        error = by_value_error or exc
        raise not_picklable_error(
            obj, executor, error, tried_by_value=by_value_error is not None
        ) from error
    if b"__main__" in data and not main_reachable(executor):
        raise not_picklable_error(obj, executor, by_value_error, by_name=True)
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


class ContextTask(AttachContextAsReturnValue):
    """One call that returns ``(value, state)``, run with the worker thread marked (R11).

    The caller checks that the last argument is a context. Pickling drops the executor: a
    copy in another process runs unmarked.

    Examples
    --------
    >>> from chemfit.core.context import EvaluateContext
    >>> def objective(x, ctx):
    ...     ctx.loss = 2 * x
    ...     return ctx.loss
    >>> value, state = ContextTask(objective, executor="pool")(4, EvaluateContext())
    >>> value, state["loss"]
    (8, 8)
    """

    __slots__ = ("executor",)

    def __init__(self, func: Callable[..., Any], executor: Any = None) -> None:
        self.func = func
        self.executor = executor

    def __call__(self, *args: Any) -> tuple[Any, dict]:
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
        # Packed once, on the first pickle; later pickles of this task reuse the bytes.
        self.func = func = PickledCallable.pack(self.func, self.executor)
        return (ContextTask, (func, None))


class InProcessTask:
    """One call on a thread pool or SerialExecutor: the call writes into the caller's own
    context, so only the value comes back. Never pickled.

    Examples
    --------
    >>> from chemfit.execution.worker_marks import current_task_executor
    >>> InProcessTask(lambda: current_task_executor(), executor="pool")()
    'pool'
    """

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


class ContextBatch:
    """Several calls in one task (``chunksize``); every call runs even if an earlier one fails.

    Returns ``(values, states, errors)``: ``states`` is ``None`` in the caller's process (the
    calls wrote into the caller's contexts), ``errors`` is ``None`` or a list of
    ``(position, exception, traceback_text)``.

    Examples
    --------
    >>> from chemfit.core.context import EvaluateContext
    >>> def inverse(x, ctx):
    ...     return 1 / x
    >>> values, states, errors = ContextBatch(inverse, in_process=True)(
    ...     [(2, EvaluateContext()), (0, EvaluateContext())]
    ... )
    >>> values, states, [(position, type(exc).__name__) for position, exc, _ in errors]
    ([0.5, None], None, [(1, 'ZeroDivisionError')])
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
        if isinstance(func, PickledCallable):
            func = func.load()  # a failure fails the whole task: no call can run
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
                    (position, *portable_exception(exc)) if remote else (position, exc, None)
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
        self.func = func = PickledCallable.pack(self.func, self.executor)
        return (ContextBatch, (func, None, False))


def _pack_call(call: tuple) -> tuple[tuple, tuple | None]:
    ctx = call[-1]
    if type(ctx) is not EvaluateContext:  # a subclass may send more: pickle it as it is
        return call, None
    return call[:-1], (ctx.parameters, ctx.config, ctx.shared, ctx.meta)


def rebuild_context(parameters: Any, config: Any, shared: Any, meta: Any) -> EvaluateContext:
    """A plain context from the four fields its pickle carries, as unpickling rebuilds it.

    Examples
    --------
    >>> ctx = rebuild_context({"x": 1.0}, None, None, {"a": 1})
    >>> ctx.parameters, ctx.config, ctx.meta, ctx.loss, ctx.executor
    ({'x': 1.0}, None, {'a': 1}, None, None)
    """
    ctx = EvaluateContext.__new__(EvaluateContext)
    ctx.__setstate__({"parameters": parameters, "config": config, "shared": shared, "meta": meta})
    return ctx


def _unpack_calls(packed: list[tuple[tuple, tuple | None]]) -> list[tuple]:
    return [
        args if fields is None else (*args, rebuild_context(*fields)) for args, fields in packed
    ]


class PackedCalls(list):
    """The calls of one :class:`ContextBatch` task: a list that pickles its contexts compactly.

    Pickled, a plain :class:`~chemfit.core.context.EvaluateContext` travels as the four fields
    of its ``__getstate__`` in a tuple and is rebuilt in the worker as ``__setstate__`` would
    (subclasses are pickled as they are). That takes a third less time than pickling the
    objects, which for cheap calls is most of what the caller does per call. Objects shared
    by several contexts (a ``shared`` namespace) stay shared, as pickle keeps them.

    Examples
    --------
    >>> import pickle
    >>> ctx = EvaluateContext()
    >>> ctx.parameters, ctx.meta["note"] = {"x": 1.0}, "sent"
    >>> [(x, copy)] = pickle.loads(pickle.dumps(PackedCalls([(2, ctx)])))
    >>> x, copy.parameters, copy.meta, copy.loss
    (2, {'x': 1.0}, {'note': 'sent'}, None)
    """

    __slots__ = ()

    def __reduce__(self):
        return (_unpack_calls, ([_pack_call(call) for call in self],))
