"""Submitting calls to an executor: what kind of executor it is, its inputs, submit and cancel.

Shared by :mod:`chemfit.execution.executor_utils`, :mod:`chemfit.execution.async_helpers` and
:mod:`chemfit.execution.executor_wrapper_cob`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures as cf
from typing import Any

from chemfit.core.context import ExecutorLike, FutureLike
from chemfit.execution.executors import SerialExecutor, as_executor

__all__ = [
    "cancel_all",
    "collect_calls",
    "is_local_pool",
    "is_loky_executor",
    "is_stdlib_process_pool",
    "resolve_executor",
    "runs_in_process",
    "submit_all",
]

logger = logging.getLogger(__name__)


def resolve_executor(executor: Any) -> ExecutorLike:
    """``as_executor(executor)``, with ``None`` becoming a :class:`SerialExecutor`.

    Examples
    --------
    >>> type(resolve_executor(None)).__name__
    'SerialExecutor'
    """
    resolved = as_executor(executor)
    return SerialExecutor() if resolved is None else resolved


def is_stdlib_process_pool(executor: Any) -> bool:
    """Whether ``executor`` is a ``concurrent.futures.ProcessPoolExecutor`` (or a subclass).

    Examples
    --------
    >>> is_stdlib_process_pool(SerialExecutor())
    False
    """
    module = sys.modules.get("concurrent.futures.process")
    return module is not None and isinstance(executor, module.ProcessPoolExecutor)


def is_loky_executor(executor: Any) -> bool:
    """Whether ``executor`` is a loky executor (which sends everything with cloudpickle).

    Examples
    --------
    >>> is_loky_executor(SerialExecutor())
    False
    """
    return any(cls.__module__.partition(".")[0] == "loky" for cls in type(executor).__mro__)


def is_local_pool(executor: Any) -> bool:
    """Whether ``executor`` runs its tasks on this machine, in this process or a local pool.

    That is a thread pool, :class:`SerialExecutor`, a ``ProcessPoolExecutor`` or loky: what
    such a task does, the caller's thread could do itself with the same result.

    Examples
    --------
    >>> is_local_pool(SerialExecutor()), is_local_pool(object())
    (True, False)
    """
    return (
        runs_in_process(executor) or is_stdlib_process_pool(executor) or is_loky_executor(executor)
    )


def runs_in_process(executor: Any) -> bool:
    """Whether tasks on ``executor`` run in this process (a thread pool or SerialExecutor).

    Such tasks share the caller's objects, so nothing is pickled and contexts are written in
    place.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> with ThreadPoolExecutor(1) as pool:
    ...     runs_in_process(SerialExecutor()), runs_in_process(pool), runs_in_process(object())
    (True, True, False)
    """
    if isinstance(executor, SerialExecutor):
        return True
    module = sys.modules.get("concurrent.futures.thread")
    return module is not None and isinstance(executor, module.ThreadPoolExecutor)


def collect_calls(iterables: tuple[Iterable, ...], ctxs: Iterable) -> tuple[list[tuple], list]:
    """Read every iterable once (R2) and zip them with the contexts.

    Returns ``(calls, contexts)`` where each call is ``(*args_i, ctx_i)``.

    Raises
    ------
    TypeError
        When ``ctxs`` is not iterable or holds something that is not an evaluation context.
    ValueError
        When an iterable and ``ctxs`` differ in length.

    Examples
    --------
    >>> from chemfit.core.context import EvaluateContext
    >>> ctx = EvaluateContext()
    >>> calls, ctxs = collect_calls((iter([1]),), [ctx])
    >>> calls[0][0], calls[0][1] is ctx
    (1, True)
    """
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


def submit_all(
    executor: ExecutorLike, task: Callable[..., Any], arg_tuples: Sequence[tuple]
) -> list[FutureLike]:
    """Submit ``task(*args)`` for every ``args``; one future per entry, in order.

    When ``submit`` raises, that task and all later ones get failed futures holding the error,
    so the caller still collects the tasks already submitted. A ``KeyboardInterrupt`` cancels
    what was submitted and propagates.

    Examples
    --------
    >>> futures = submit_all(SerialExecutor(), pow, [(2, 3), (3, 2)])
    >>> [f.result() for f in futures]
    [8, 9]
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
        cancel_all(futures)
        raise
    return futures


def cancel_all(futures: Iterable[FutureLike]) -> None:
    """Cancel every future that has not started; a future that fails to cancel is abandoned.

    Examples
    --------
    >>> future = cf.Future()
    >>> cancel_all([future])
    >>> future.cancelled()
    True
    """
    for future in futures:
        try:
            future.cancel()
        except Exception:  # a remote future may fail to cancel; it is abandoned either way
            logger.debug("could not cancel %r", future, exc_info=True)
