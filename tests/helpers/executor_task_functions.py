"""Module-level functions for the executor tests (picklable by the stdlib process pools)."""

from __future__ import annotations

import os
import time

from chemfit.core.context import EvaluateContext
from chemfit.execution.worker_marks import current_task_executor


def record_square(x, ctx):
    """Write parameters, loss and meta; also touch ``shared`` and ``temp``, which stay local."""
    ctx.parameters = {"x": x}
    ctx.loss = x * x
    ctx.meta["pid"] = os.getpid()
    ctx.meta["x_seen"] = x
    ctx.meta["incoming_keys"] = sorted(k for k in ctx.meta if k not in ("pid", "x_seen"))
    ctx.shared.mutated_by_worker = True
    ctx.temp.scratch = "worker"
    ctx.quantities = {"square": x * x}
    return x * x


def add_with_context(a, b, ctx):
    ctx.loss = a + b
    ctx.meta["sum"] = a + b
    return a + b


def fail_on_odd(x, ctx):
    """Odd inputs raise ``ValueError`` (naming x); even ones record their square."""
    if x % 2:
        raise ValueError(f"odd input {x}")
    return record_square(x, ctx)


def raise_timeout_error(x, ctx):
    raise TimeoutError(f"the objective itself timed out on {x}")


def sleep_for(seconds, ctx):
    time.sleep(seconds)
    ctx.loss = seconds
    ctx.meta["slept"] = seconds
    return seconds


def die_on(x, ctx, target=3):
    """Kill the worker process on ``x == target``; other calls succeed quickly."""
    if x == target:
        time.sleep(0.5)  # let the other calls finish (and their results arrive) first
        os._exit(1)
    return record_square(x, ctx)


def die_on_three(x, ctx):
    return die_on(x, ctx, target=3)


def task_executor_is_set(x, ctx):
    """Whether the running task sees an executor mark (R11)."""
    return current_task_executor() is not None


def task_executor(x, ctx):
    return current_task_executor()


def unpicklable_result(x, ctx):
    import threading

    ctx.meta["lock"] = threading.Lock()
    return x


class ForeignFuture:
    """A future that is not a ``concurrent.futures.Future`` (only ``result`` and ``cancel``)."""

    def __init__(self, inner):
        self._inner = inner

    def result(self, timeout=None):
        return self._inner.result(timeout)

    def cancel(self):
        return self._inner.cancel()


class ForeignExecutor:
    """A minimal ``ExecutorLike`` over a thread pool whose futures ``cf.wait`` cannot handle."""

    def __init__(self, pool):
        self._pool = pool
        self.submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.submitted += 1
        return ForeignFuture(self._pool.submit(fn, *args, **kwargs))

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        return self._pool.map(fn, *iterables, timeout=timeout)


class TaggedContext(EvaluateContext):
    """A context subclass whose pickle carries one more field, ``tag``."""

    def __init__(self, *args, tag=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag

    def __getstate__(self):
        return {**super().__getstate__(), "tag": self.tag}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.tag = state.get("tag")


def report_arrival(x, ctx):
    """Write into ``meta`` what arrived in the worker with the context."""
    ctx.meta["arrived"] = {
        "type": type(ctx).__name__,
        "config": dict(vars(ctx.config)),
        "shared_id": id(ctx.shared),
        "tag": getattr(ctx, "tag", "absent"),
        "parameters": ctx.parameters,
        "loss": ctx.loss,
        "children": len(ctx.children),
    }
    return x


class CountedPickles:
    """Counts how often it is pickled in this process (it travels in a call's arguments)."""

    count = 0

    def __reduce__(self):
        CountedPickles.count += 1
        return (CountedPickles, ())


def first_of(parameters, ctx):
    ctx.loss = parameters["x"]
    return ctx.loss


class CustomError(Exception):
    """An exception that cannot travel: it holds a lock (and its ``__init__`` takes two args, so
    even a pickle that left out the lock could not be loaded)."""

    def __init__(self, a, b):
        super().__init__(f"custom failure {a} {b}")
        import threading

        self.lock = threading.Lock()


def raise_custom_error(x, ctx):
    raise CustomError(x, "b")


def write_then_fail(x, ctx):
    """Write into the context, then raise: the state written comes back with the error."""
    ctx.meta["before_failure"] = x
    raise ValueError(f"failed after writing {x}")
