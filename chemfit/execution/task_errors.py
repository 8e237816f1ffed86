"""Errors of tasks run on executors: bringing them back, recognising them, explaining them.

* A task in another process returns its exception with :func:`portable_exception`; the caller
  re-raises it with the worker's traceback attached (:func:`attach_worker_traceback`).
* :func:`is_lost_worker` and :func:`is_pickling_error` recognise a dead worker (R19) and a
  pickling failure (R18); :func:`translate_task_error` turns them into
  :class:`~chemfit.core.exceptions.WorkerLostError` and
  :class:`~chemfit.core.exceptions.NotPicklableError` with messages that name the lost work.
* :func:`check_picklable` fails before submitting when a stdlib process pool cannot pickle the
  work.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Callable
from typing import Any

from chemfit.core.exceptions import NotPicklableError, RemoteEvaluationError, WorkerLostError
from chemfit.execution.task_submission import runs_in_process

__all__ = [
    "PICKLE_ADVICE",
    "attach_worker_traceback",
    "check_picklable",
    "exception_traceback",
    "is_lost_worker",
    "is_pickling_error",
    "looks_like_pickling_error",
    "pickled_exception",
    "portable_exception",
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


# -- bringing a worker's exception back ----------------------------------------------------------


def portable_exception(exc: Exception) -> tuple[Exception, str]:
    """``(exception, traceback text)`` that can travel back from another process.

    The exception is ``exc`` itself when it survives a pickle round trip, else a
    :class:`~chemfit.core.exceptions.RemoteEvaluationError` with its type name, message and
    traceback.

    Examples
    --------
    >>> exc, text = portable_exception(KeyError("k"))
    >>> type(exc).__name__, text.strip()
    ('KeyError', "KeyError: 'k'")
    """
    text = exception_traceback(exc)
    if pickled_exception(exc) is None:
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


def attach_worker_traceback(exc: BaseException, text: str | None) -> BaseException:
    """Set ``exc.__cause__`` to the worker's traceback ``text`` (unless it has a cause already).

    Returns ``exc``, so that Python prints the worker's traceback above the caller's.

    Examples
    --------
    >>> exc = attach_worker_traceback(ValueError("bad"), "Traceback ...\\nValueError: bad\\n")
    >>> "ValueError: bad" in str(exc.__cause__)
    True
    """
    if text and exc.__cause__ is None:
        exc.__cause__ = _WorkerTraceback(text)
    return exc


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
    return looks_like_pickling_error(exc) and not runs_in_process(executor)


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
    if is_lost_worker(exc):
        error: BaseException = WorkerLostError(
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


def _call_parameters(call: tuple) -> Any:
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
        parameters=_call_parameters(call),
        subject=f"call {index}",
        lost_detail=in_task,
        lost_tail=(
            ". The states of the calls that completed were applied to their contexts; "
            "create a new executor to continue"
        ),
        pickled_what="the function, the arguments or the result",
    )


def check_picklable(executor: Any, fn: Callable[..., Any], first_call: tuple) -> None:
    """R18: raise :class:`NotPicklableError` before submitting when a stdlib process pool
    cannot pickle ``fn`` and the first call ``(*args, ctx)``; the message names the culprit.

    Examples
    --------
    >>> from chemfit.core.context import EvaluateContext
    >>> from chemfit.execution.executors import SerialExecutor
    >>> try:
    ...     check_picklable(SerialExecutor(), lambda p, ctx: 0.0, ({"x": 1.0}, EvaluateContext()))
    ... except NotPicklableError as exc:
    ...     print(str(exc).split(" <")[0])
    SerialExecutor cannot pickle the function
    """
    from multiprocessing.reduction import ForkingPickler

    try:
        ForkingPickler.dumps((fn, first_call))
        return
    except Exception as exc:
        error = exc
    candidates: list[tuple[str, Any]] = [(f"the function {short_repr(fn)}", fn)]
    for position, arg in enumerate(first_call[:-1]):
        candidates.append((f"argument {position} of call 0 ({short_repr(arg)})", arg))
    ctx = first_call[-1]
    for key, value in ctx.__getstate__().items():
        candidates.append((f"ctxs[0].{key} ({short_repr(value)})", value))
    what = "the work of call 0"
    for label, obj in candidates:
        try:
            ForkingPickler.dumps(obj)
        except Exception as exc:
            what, error = label, exc
            break
    raise NotPicklableError(
        f"{type(executor).__name__} cannot pickle {what} to send it to a worker process: "
        f"{type(error).__name__}: {error}. {PICKLE_ADVICE}"
    ) from error
