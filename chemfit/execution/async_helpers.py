"""Evaluating objectives from ``asyncio`` code (and Jupyter, which runs an event loop).

``await async_eval_many(objective, params_list, ctxs)`` evaluates concurrently in threads; with
``executor=`` the calls run on that executor and each context receives its call's state, as with
:func:`~chemfit.execution.executor_utils.map_with_context`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent import futures as cf
from typing import Any

from chemfit.core.context import EvaluateContext, ExecutorLike
from chemfit.execution.submission import ContextFuture, ContextSubmitter, collect_calls

__all__ = ["async_eval_many", "async_eval_one"]

logger = logging.getLogger(__name__)


async def async_eval_one(obj: Callable[..., Any], params: Any, ctx: EvaluateContext | None) -> Any:
    """Evaluate ``obj(params, ctx)`` in a worker thread without blocking the event loop.

    Parameters
    ----------
    obj : callable
        An objective (or any callable taking ``(params, ctx)``).
    params : dict
        The parameters.
    ctx : EvaluateContext or None
        The context, passed as is; the thread writes into it directly.

    Returns
    -------
    Any
        What ``obj`` returned.

    Examples
    --------
    >>> import asyncio
    >>> def objective(params, ctx):
    ...     ctx.loss = params["x"] ** 2
    ...     return ctx.loss
    >>> ctx = EvaluateContext()
    >>> asyncio.run(async_eval_one(objective, {"x": 3}, ctx)), ctx.loss
    (9, 9)
    """
    return await asyncio.to_thread(obj, params, ctx)


async def async_eval_many(
    obj: Callable[..., Any],
    params_list: Iterable[Any],
    ctxs: Iterable[EvaluateContext],
    *,
    executor: ExecutorLike | None = None,
) -> list:
    """Evaluate ``obj(params_i, ctx_i)`` for all ``i`` concurrently and gather the results.

    Parameters
    ----------
    obj : callable
        An objective taking ``(params, ctx)``; picklable when ``executor`` is a process pool.
    params_list : iterable of dict
        The parameters, one per call (read once; generators are fine).
    ctxs : iterable of EvaluateContext
        One context per call.
    executor : ExecutorLike, optional
        Anything :func:`~chemfit.execution.executors.as_executor` accepts. Without it each
        call runs in its own thread (``asyncio.to_thread``). With it the calls are submitted
        to the executor (``loop.run_in_executor`` for ``concurrent.futures`` executors) and
        each call's result state is applied to its context.

    Returns
    -------
    list
        The results, in input order.

    Raises
    ------
    ValueError
        When ``params_list`` and ``ctxs`` have different lengths.
    Exception
        The first failure in input order, after every successful call's state was applied
        (``WorkerLostError`` and ``NotPicklableError`` as in ``map_with_context``).

    Examples
    --------
    >>> import asyncio
    >>> from chemfit.execution.executors import SerialExecutor
    >>> def objective(params, ctx):
    ...     ctx.loss = params["x"] + 1
    ...     return ctx.loss
    >>> ctxs = [EvaluateContext(), EvaluateContext()]
    >>> asyncio.run(async_eval_many(objective, [{"x": 1}, {"x": 2}], ctxs))
    [2, 3]
    >>> asyncio.run(
    ...     async_eval_many(objective, [{"x": 5}], [EvaluateContext()], executor=SerialExecutor())
    ... )
    [6]
    """
    calls, _ = collect_calls((params_list,), ctxs)
    if executor is None:
        outcomes = await asyncio.gather(
            *(asyncio.to_thread(obj, params, ctx) for params, ctx in calls),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return list(outcomes)

    submitter = ContextSubmitter(executor, obj)
    futures = submitter.submit_all(
        [([call], index) for index, call in enumerate(calls)], single=True
    )
    loop = asyncio.get_running_loop()
    await asyncio.gather(*(_finished(loop, future) for future in futures))
    results: list[Any] = []
    first_failure: BaseException | None = None
    for future in futures:  # in input order: every successful state is applied
        try:
            results.append(future.result(0))
        except Exception as exc:
            results.append(None)
            if first_failure is None:
                first_failure = exc
    if first_failure is not None:
        raise first_failure
    return results


async def _finished(loop: asyncio.AbstractEventLoop, future: ContextFuture) -> None:
    """Wait for ``future`` without blocking the event loop (its outcome is read later)."""
    inner = future.future
    if isinstance(inner, cf.Future):
        wrapped = asyncio.wrap_future(inner, loop=loop)
        await asyncio.wait([wrapped])
        if not wrapped.cancelled():
            wrapped.exception()  # retrieved here, so asyncio does not log it; raised later
        return
    # A future that asyncio cannot wrap: wait for it in a thread.
    await asyncio.to_thread(_wait_quietly, future)


def _wait_quietly(future: ContextFuture) -> None:
    try:
        future.settle()
    except Exception:  # read again, and raised, by the caller
        logger.debug("call %d failed", future.index, exc_info=True)
