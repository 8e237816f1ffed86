"""An executor of the caller's own, for the benchmarks (stdlib only: upstream's venv imports it).

chemfit recognises executors by their libraries' module names; this class lives outside chemfit
and every executor library, so chemfit cannot know it (kind "other") until it learns from a task
that it runs in this process.
"""

from __future__ import annotations

from concurrent.futures import Executor, Future


class CallersOwnExecutor(Executor):
    """Runs each call at once in the caller's thread; ``map`` is the inherited ``Executor.map``.

    Examples
    --------
    >>> CallersOwnExecutor().submit(abs, -2).result()
    2
    """

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future
