"""Errors of tasks run on executors: bringing them back, recognising them, explaining them.

* The one remote-failure convention: a worker, engine or rank captures an exception as a
  :class:`RemoteFailure` (picklable, whatever the exception); the caller raises
  :meth:`RemoteFailure.to_exception`: the original exception caused by a
  :class:`~chemfit.core.exceptions.RemoteEvaluationError` whose text holds where it happened
  and the remote traceback (or that ``RemoteEvaluationError`` alone when the exception cannot
  be rebuilt). Process pools, loky, Dask, ipyparallel and MPI all use it.
* :func:`is_lost_worker` and :func:`is_pickling_error` recognise a dead worker (R19) and a
  pickling failure (R18); :func:`translate_task_error` turns them into
  :class:`~chemfit.core.exceptions.WorkerLostError` and
  :class:`~chemfit.core.exceptions.NotPicklableError` with messages that name the lost work.
* :func:`not_picklable_error` explains what cannot be sent (naming the object and where it was
  defined) and :func:`rebuild_error` what a worker could not rebuild.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import re
import traceback
import types
from dataclasses import dataclass
from typing import Any

from chemfit.core.exceptions import NotPicklableError, RemoteEvaluationError, WorkerLostError
from chemfit.execution.executor_info import ExecutorInfo, executor_info

__all__ = [
    "BY_VALUE_ADVICE",
    "PICKLE_ADVICE",
    "RemoteFailure",
    "call_parameters",
    "describe_object",
    "exception_traceback",
    "find_main_definition",
    "is_lost_worker",
    "is_pickling_error",
    "looks_like_pickling_error",
    "not_picklable_error",
    "pickled_exception",
    "rebuild_error",
    "short_repr",
    "shorten",
    "translate_call_error",
    "translate_task_error",
]

#: The fix suggested whenever a process pool cannot pickle the work.
PICKLE_ADVICE = (
    "Use make_executor('loky') (cloudpickle sends lambdas, closures and locally defined "
    "functions) or a thread pool, or define the function at module level."
)

#: The fix suggested when not even cloudpickle can pickle the work.
BY_VALUE_ADVICE = (
    "Use a thread pool (nothing is pickled), or keep locks, open files and similar resources "
    "out of what is sent (create them lazily in the worker)."
)

#: loky's message for a task that a worker could not unpickle (the pool is broken after it).
_UNSERIALIZE_TEXT = "failed to un-serialize"

_LOST_WORKER_NAMES = frozenset(
    {"BrokenProcessPool", "TerminatedWorkerError", "EngineError", "KilledWorker", "WorkerLostError"}
)


# -- text ----------------------------------------------------------------------------------------


def shorten(text: str, limit: int = 80) -> str:
    """``text`` cut to at most ``limit`` characters, ending in ``"..."`` when cut.

    Examples
    --------
    >>> shorten("abcdefgh", 6)
    'abc...'
    """
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(obj: Any, limit: int = 80) -> str:
    """A ``repr`` for messages: at most ``limit`` characters, and never raising.

    Examples
    --------
    >>> short_repr(list(range(100)), 20)
    '[0, 1, 2, 3, 4, 5...'
    """
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__}>"
    return shorten(text, limit)


def exception_traceback(exc: BaseException) -> str:
    """The formatted traceback of ``exc``, as ``traceback.print_exception`` would print it.

    Examples
    --------
    >>> exception_traceback(ValueError("bad")).strip()
    'ValueError: bad'
    """
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def pickled_exception(exc: BaseException, protocol: int | None = None) -> bytes | None:
    """``pickle.dumps(exc)`` when that also loads again, else ``None``.

    Exceptions with a custom ``__init__`` often pickle but fail to load; they are ``None`` too.

    Examples
    --------
    >>> pickled_exception(ValueError("x")) is not None
    True
    >>> class Custom(Exception):
    ...     def __init__(self, a, b):
    ...         super().__init__(a)
    >>> pickled_exception(Custom(1, 2)) is None
    True
    """
    try:
        data = pickle.dumps(exc, protocol=protocol)
        pickle.loads(data)
    except Exception:
        return None
    return data


# -- naming objects -------------------------------------------------------------------------------


def _location(obj: Any) -> str:
    """``" (file, line N)"`` for a function or a class with methods, else ``""``."""
    code = getattr(obj, "__code__", None)
    if code is None and isinstance(obj, type):
        for value in vars(obj).values():
            code = getattr(value, "__code__", None)
            if code is not None:
                break
    if code is None:
        return ""
    return f" ({code.co_filename}, line {code.co_firstlineno})"


def _where(module: str | None, obj: Any = None) -> str:
    """Where ``obj`` of ``module`` was defined; file and line only for ``__main__``."""
    if module == "__main__":
        return f"__main__ (a notebook cell or the script that was run){_location(obj)}"
    return f"module {module}" if module else "an unknown module"


def describe_object(obj: Any) -> str:
    """What ``obj`` is and where it was defined, for messages.

    Examples
    --------
    >>> describe_object(len)
    'the function len defined in module builtins'
    >>> describe_object(ValueError("x"))
    'a ValueError object (class defined in module builtins)'
    """
    if isinstance(obj, functools.partial):
        return f"a functools.partial of {describe_object(obj.func)}"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", "?")
        owner = getattr(obj, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            return f"the method {name} of {describe_object(owner)}"
        kind = "lambda" if name.endswith("<lambda>") else "function"
        text = f"the {kind} {name}" if kind == "function" else f"a lambda ({name})"
        return f"{text} defined in {_where(getattr(obj, '__module__', None), obj)}"
    if isinstance(obj, type):
        return f"the class {obj.__qualname__} defined in {_where(obj.__module__, obj)}"
    cls = type(obj)
    return f"a {cls.__qualname__} object (class defined in {_where(cls.__module__, cls)})"


class _Found(Exception):
    def __init__(self, obj: Any) -> None:
        super().__init__()
        self.obj = obj


class _MainFinder(pickle.Pickler):
    """Stops at the first function or class from ``__main__`` that pickling reaches."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)) and obj.__module__ == "__main__":
            raise _Found(obj)
        return NotImplemented


def find_main_definition(obj: Any) -> str | None:
    """:func:`describe_object` of the first ``__main__`` function or class inside ``obj``.

    ``None`` when pickling ``obj`` reaches nothing from ``__main__`` (or fails before).

    Examples
    --------
    >>> find_main_definition({"x": [1.0, len]}) is None
    True
    """
    from chemfit.core.wrapping import functions_inline

    try:
        with functions_inline():  # wrappers expose their functions to the finder
            _MainFinder(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    except _Found as found:
        return describe_object(found.obj)
    except Exception:
        return None
    return None


def _executor_name(executor: Any) -> str:
    if isinstance(executor, ExecutorInfo):
        executor = executor.executor
    if isinstance(executor, str):
        return executor
    name = type(executor).__name__
    context = getattr(executor, "_mp_context", None)
    method = getattr(context, "get_start_method", None)
    return f"{name} (start method {method()!r})" if callable(method) else name


def not_picklable_error(
    obj: Any,
    executor: Any,
    error: BaseException | None,
    *,
    by_name: bool = False,
    why: str | None = None,
    tried_by_value: bool = False,
    label: str | None = None,
) -> NotPicklableError:
    """The :class:`NotPicklableError` for ``obj``, which ``executor`` cannot send (R18).

    Parameters
    ----------
    obj
        What had to be sent; the message names the ``__main__`` definition inside it, if any.
    executor
        The executor (named in the message).
    error : BaseException, optional
        Why pickling failed (plain pickle's or cloudpickle's error).
    by_name : bool
        ``obj`` pickles, but only with references by name into ``__main__``, which the
        executor's workers cannot import.
    why : str, optional
        With ``by_name``: why it cannot travel by value (default: cloudpickle's ``error``, or
        that cloudpickle is not installed).
    tried_by_value : bool
        ``error`` is cloudpickle's: advise threads, not loky (which uses cloudpickle too).
    label : str, optional
        What ``obj`` is, for the message (default: :func:`describe_object`), unless it holds a
        ``__main__`` definition, which is named instead.

    Examples
    --------
    >>> error = not_picklable_error(len, None, None, by_name=True)
    >>> "loky" in str(error), "len" in str(error)
    (True, True)
    """
    culprit = find_main_definition(obj) or label or describe_object(obj)
    reason = f"{type(error).__name__}: {error}" if error is not None else ""
    if by_name:
        if why is None:
            why = (
                f"cloudpickle could not pickle it by value ({reason})"
                if error is not None
                else "cloudpickle, which sends such definitions by value, is not installed"
            )
        return NotPicklableError(
            f"{_executor_name(executor)} cannot send {culprit} to its workers: they cannot "
            "import this process's __main__ (a notebook cell or interactive session), so it "
            f"would have to travel by value, and {why}. Use make_executor('loky') (with "
            "cloudpickle installed it sends notebook definitions by value) or a thread pool, "
            "or define it in an importable module."
        )
    advice = BY_VALUE_ADVICE if tried_by_value else PICKLE_ADVICE
    return NotPicklableError(
        f"{_executor_name(executor)} cannot pickle {culprit} to send it to its workers: "
        f"{reason}. {advice}"
    )


_CANT_GET = re.compile(r"Can't get attribute '([^']+)' on <module '([^']+)'")


def rebuild_error(label: str, exc: BaseException) -> NotPicklableError:
    """The error of a worker that could not rebuild ``label`` from the bytes sent to it.

    Examples
    --------
    >>> exc = AttributeError("Can't get attribute 'dimer' on <module '__main__' (built-in)>")
    >>> print(rebuild_error("the function fit_me", exc))  # doctest: +NORMALIZE_WHITESPACE
    a worker could not rebuild the function fit_me, which was sent to it: AttributeError:
    Can't get attribute 'dimer' on <module '__main__' (built-in)>. 'dimer' was sent by name
    from __main__ (a notebook cell or the script that was run), which this worker does not
    have. Install cloudpickle (chemfit then sends such definitions by value) and use
    make_executor('loky'), or define it in a module the workers can import.
    """
    text = f"a worker could not rebuild {label}, which was sent to it: {type(exc).__name__}: {exc}."
    match = _CANT_GET.search(str(exc))
    if match and match.group(2) == "__main__":
        hint = (
            f"'{match.group(1)}' was sent by name from __main__ (a notebook cell or the script "
            "that was run), which this worker does not have. Install cloudpickle (chemfit then "
            "sends such definitions by value) and use make_executor('loky'), or define it in a "
            "module the workers can import."
        )
    elif match:
        hint = (
            f"'{match.group(1)}' is looked up by name in module {match.group(2)} of the worker, "
            "which does not define it: the worker has another version of that module. Install "
            "the same version where the workers run."
        )
    elif isinstance(exc, ImportError):
        module = getattr(exc, "name", None) or "a module"
        hint = (
            f"It was defined in {module}, which the worker cannot import: install it where "
            "the workers run, or put its directory on their PYTHONPATH."
        )
    else:
        hint = "Check that the workers run the same Python packages as this process."
    return NotPicklableError(f"{text} {hint}")


# -- bringing a worker's exception back ----------------------------------------------------------


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # an exception whose __str__ fails
        return f"<unprintable {type(exc).__name__}>"


@dataclass
class RemoteFailure:
    """What a worker, engine or rank sends back for an exception: picklable, whatever it was.

    Attributes
    ----------
    type_name : str
        The exception's type (qualified name).
    message : str
        ``str(exception)``.
    traceback : str
        The formatted remote traceback.
    pickled : bytes or None
        The pickled exception, when it also unpickles again (else ``None``).
    where : str
        Where it happened, e.g. ``"worker process 4242"`` or ``"rank 2"``.

    Examples
    --------
    >>> try:
    ...     int("x")
    ... except ValueError as exc:
    ...     failure = RemoteFailure.capture(exc, "worker process 1")
    >>> error = failure.to_exception()
    >>> type(error).__name__, type(error.__cause__).__name__
    ('ValueError', 'RemoteEvaluationError')
    >>> print(str(error.__cause__).splitlines()[0])
    ValueError on worker process 1: invalid literal for int() with base 10: 'x'
    """

    type_name: str
    message: str
    traceback: str
    pickled: bytes | None
    where: str = ""

    @classmethod
    def capture(cls, exc: BaseException, where: str = "") -> RemoteFailure:
        """Describe ``exc`` where it was raised (default ``where``: this process's pid)."""
        return cls(
            type_name=type(exc).__qualname__,
            message=_message(exc),
            traceback=exception_traceback(exc),
            pickled=pickled_exception(exc),
            where=where or f"worker process {os.getpid()}",
        )

    def to_exception(
        self, where: str | None = None, *, rank: int | None = None, term_index: int | None = None
    ) -> BaseException:
        """The exception to raise in the caller.

        The original exception when it unpickles, with ``__cause__`` set to a
        :class:`~chemfit.core.exceptions.RemoteEvaluationError` that holds ``where``,
        ``rank``, ``term_index``, the type name, the message and the remote traceback (all in
        its text too); otherwise that ``RemoteEvaluationError`` itself.
        """
        where = self.where if where is None else where
        place = where or (f"rank {rank}" if rank is not None else "a remote worker")
        term = f", term {term_index}" if term_index is not None else ""
        remote = RemoteEvaluationError(
            f"{self.type_name} on {place}{term}: {self.message}\n\n"
            f"Remote traceback:\n{self.traceback}",
            rank=rank,
            term_index=term_index,
            type_name=self.type_name,
            remote_message=self.message,
            remote_traceback=self.traceback,
            where=where,
        )
        original = None
        if self.pickled is not None:
            try:
                original = pickle.loads(self.pickled)
            except Exception:
                original = None
        if not isinstance(original, BaseException):
            return remote
        original.__cause__ = remote
        return original


# -- recognising failures ------------------------------------------------------------------------


def is_lost_worker(exc: BaseException) -> bool:
    """Whether ``exc`` says that a worker process or engine died (R19).

    Recognised by name, so no executor library has to be imported: ``BrokenProcessPool``,
    loky's ``TerminatedWorkerError``, ipyparallel's ``EngineError``, Dask's ``KilledWorker``.

    Examples
    --------
    >>> from concurrent.futures.process import BrokenProcessPool
    >>> is_lost_worker(BrokenProcessPool("gone")), is_lost_worker(ValueError())
    (True, False)
    """
    if getattr(exc, "ename", None) == "EngineError":  # ipyparallel RemoteError of a dead engine
        return True
    return any(cls.__name__ in _LOST_WORKER_NAMES for cls in type(exc).__mro__)


def looks_like_pickling_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a ``PicklingError``, or a TypeError/AttributeError about pickling.

    Examples
    --------
    >>> looks_like_pickling_error(TypeError("cannot pickle '_thread.lock' object"))
    True
    """
    if isinstance(exc, pickle.PicklingError):
        return True
    return isinstance(exc, (TypeError, AttributeError)) and "pickl" in str(exc).lower()


def is_pickling_error(exc: BaseException, executor: Any) -> bool:
    """Whether ``exc`` from a task on ``executor`` means the work could not be pickled (R18).

    A TypeError or AttributeError mentioning pickling counts only for executors in other
    processes (in-process, the objective itself raised it); a ``NotPicklableError`` is already
    explained and does not count.

    Examples
    --------
    >>> from chemfit.execution.executors import SerialExecutor
    >>> is_pickling_error(pickle.PicklingError("x"), SerialExecutor())
    True
    >>> is_pickling_error(TypeError("cannot pickle"), SerialExecutor())
    False
    """
    if isinstance(exc, NotPicklableError):
        return False
    if isinstance(exc, pickle.PicklingError):
        return True
    if not looks_like_pickling_error(exc):
        return False
    try:
        info = executor_info(executor)
    except TypeError:  # not an executor: only named in messages
        return True
    return not info.in_process


# -- explaining them -----------------------------------------------------------------------------


def translate_task_error(
    exc: BaseException,
    executor: Any,
    *,
    index: int,
    parameters: Any,
    subject: str,
    lost_detail: str,
    lost_tail: str,
    pickled_what: str,
) -> BaseException:
    """The exception to raise for a task that failed with ``exc``.

    A dead worker becomes a :class:`WorkerLostError`, a pickling failure a
    :class:`NotPicklableError` (each with ``exc`` as ``__cause__``); anything else is ``exc``.

    Parameters
    ----------
    exc : BaseException
        What the task's future raised.
    executor
        The executor the task ran on (named in the message).
    index : int
        The index of the lost work, stored in ``WorkerLostError.index``.
    parameters
        The parameters of the lost work, named in the message and stored on the error.
    subject : str
        The work, e.g. ``"call 3"`` or ``"terms 0..4"``.
    lost_detail : str
        Text after the parameters in the lost-worker message (may be empty).
    lost_tail : str
        The end of the lost-worker message, the advice included.
    pickled_what : str
        What could not be pickled, e.g. ``"the function, the arguments or the result"``.

    Examples
    --------
    >>> from concurrent.futures.process import BrokenProcessPool
    >>> error = translate_task_error(
    ...     BrokenProcessPool("died"), None, index=0, parameters={"x": 1.0}, subject="call 0",
    ...     lost_detail="", lost_tail="; start again", pickled_what="the work")
    >>> type(error).__name__, str(error)
    ('WorkerLostError', "a worker of NoneType died while evaluating call 0 with parameters {'x': 1.0} (BrokenProcessPool: died); start again")
    """
    if isinstance(executor, ExecutorInfo):
        executor = executor.executor
    if _UNSERIALIZE_TEXT in str(exc):  # loky: a worker could not unpickle the task
        error: BaseException = NotPicklableError(
            f"a worker of {type(executor).__name__} could not rebuild the arguments of "
            f"{subject} (parameters {short_repr(parameters, 200)}) from their pickle: "
            f"{type(exc).__name__}: {exc}. They (the parameters, or a context's config, shared "
            "or meta) refer to something the worker cannot import; keep them plain data. "
            "The executor is broken after this: create a new one (make_executor('loky') does)"
        )
    elif is_lost_worker(exc):
        error = WorkerLostError(
            f"a worker of {type(executor).__name__} died while evaluating {subject} with "
            f"parameters {short_repr(parameters, 200)}{lost_detail} ({type(exc).__name__}: "
            f"{exc}){lost_tail}",
            index=index,
            parameters=parameters,
        )
    elif is_pickling_error(exc, executor):
        error = NotPicklableError(
            f"{type(executor).__name__} could not pickle {pickled_what} of {subject}: "
            f"{type(exc).__name__}: {exc}. {PICKLE_ADVICE}"
        )
    else:
        return exc
    error.__cause__ = exc
    return error


def call_parameters(call: tuple) -> Any:
    """The parameters of a call ``(*args, ctx)``: ``ctx.parameters``, else its first argument.

    Examples
    --------
    >>> call_parameters(({"x": 1.0}, None))
    {'x': 1.0}
    """
    parameters = getattr(call[-1], "parameters", None)
    if parameters is None and len(call) > 1:
        parameters = call[0]
    return parameters


def translate_call_error(
    exc: BaseException, index: int, call: tuple, executor: Any, last: int | None = None
) -> BaseException:
    """:func:`translate_task_error` for call ``index`` of a ``*_with_context`` function.

    ``call`` is ``(*args, ctx)``; ``last`` is the last call of the task when ``index`` is the
    first call of a chunk.

    Examples
    --------
    >>> error = ValueError("the objective's own error")
    >>> translate_call_error(error, 0, ({"x": 1.0}, None), None) is error
    True
    """
    in_task = f" (in the task with calls {index}..{last})" if last not in (None, index) else ""
    return translate_task_error(
        exc,
        executor,
        index=index,
        parameters=call_parameters(call),
        subject=f"call {index}",
        lost_detail=in_task,
        lost_tail=(
            ". The states of the calls that completed were applied to their contexts; "
            "create a new executor to continue"
        ),
        pickled_what="the function, the arguments or the result",
    )
