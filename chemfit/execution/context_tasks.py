"""The callables that run ``fn(*args, ctx)`` in a worker and hand the context's state back.

A call returns ``(value, ctx.to_result_state())`` when it may run in another process, so the
caller can apply that state to its own context. In-process tasks (thread pools,
``SerialExecutor``) write into the caller's context directly and return the value only. Every
task marks its worker thread with the executor it came from (R11, see
:mod:`chemfit.execution.worker_marks`); pickling drops that mark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from chemfit.core.context import EvaluateContext
from chemfit.execution.task_errors import portable_exception
from chemfit.execution.worker_marks import _marks

__all__ = [
    "AttachContextAsReturnValue",
    "ContextBatch",
    "ContextTask",
    "InProcessTask",
    "PackedCalls",
    "rebuild_context",
]


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
        return (ContextTask, (self.func, None))


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
        return (ContextBatch, (self.func, None, False))


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
