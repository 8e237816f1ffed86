"""Module-level, picklable objectives for tests/execution/test_executor_wrapper_cob.py.

Process pools pickle functions by reference, so everything a worker runs lives here.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor, ensure_context

# Weights and slopes with many significant bits, so that summing the terms in another order
# changes the last bits of the total (the bitwise tests can fail).
SLOPES = [0.1 * (k + 1) + 1e-3 * k * k for k in range(12)]
# Python 3.12+'s sum() is compensated (Neumaier), so terms of one magnitude sum to the same bits
# in any order there. Terms 4-6 are therefore made (by search) 1.5 and 0.75 units in the last
# place of the total of terms 0-3 and a tiny one: whether that tiny term rounds up a tie depends
# on the order, in plain and compensated summation alike, so reversing the sum of the first 7
# terms changes the result on every Python. Terms 0-3 and 7-11 keep weights of many bits.
WEIGHTS = [
    1.651,
    2.254,
    2.244,
    2.596,
    3.3902445737260397e-15,
    1.9512771673118477e-15,
    1.263861463605077e-31,
    2.245,
    2.267,
    2.788,
    0.83,
    1.106,
]
PARAMS = {"x": 0.7310585786300049, "y": {"z": -1.25}}


class LinearTerm(ObjectiveFunctor):
    """``((k x + z) - 0.3)**2 / 7`` that also writes quantities and meta."""

    def __init__(self, k: float) -> None:
        self.k = k

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        ctx.parameters = parameters
        y = self.k * parameters["x"] + parameters["y"]["z"]
        ctx.quantities = {"y": y, "k": self.k}
        ctx.meta["k"] = self.k
        ctx.meta["label"] = getattr(ctx.config, "label", None)
        ctx.meta["shared_tag"] = getattr(ctx.shared, "tag", None)
        ctx.loss = (y - 0.3) ** 2 / 7.0
        return ctx.loss


class PidTerm(ObjectiveFunctor):
    """Records the process and thread it ran in."""

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        ctx.parameters = parameters
        ctx.meta["pid"] = os.getpid()
        ctx.meta["thread"] = threading.get_ident()
        ctx.loss = 1.0
        return 1.0


class FailingTerm(ObjectiveFunctor):
    """Writes some meta, then raises ``ValueError(message)``."""

    def __init__(self, message: str) -> None:
        self.message = message

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        ctx.parameters = parameters
        ctx.meta["reached"] = True
        raise ValueError(self.message)


class TypeErrorTerm(ObjectiveFunctor):
    """Raises a TypeError from inside the term (R5: must propagate unchanged)."""

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        raise TypeError("inner type error")


class LockedTerm(ObjectiveFunctor):
    """Holds a lock, so neither pickle nor cloudpickle can send it to a process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        return 1.0


class DyingTerm(ObjectiveFunctor):
    """Kills its worker process (only call it in a throwaway process pool)."""

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        os._exit(3)


class BusyTerm(ObjectiveFunctor):
    """Sleeps ``seconds`` (cheap on CPU, for planning tests)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        ctx.parameters = parameters
        time.sleep(self.seconds)
        ctx.loss = self.seconds
        return ctx.loss


def label_configurator(idx_child_ctx, child_ctx, num_children, parent_ctx) -> None:
    """Labels each child with its absolute index and records the calls on the parent."""
    child_ctx.config.label = f"{idx_child_ctx}/{num_children}"
    parent_ctx.meta.setdefault("configured", []).append(idx_child_ctx)


def recording_handler(exception, ctx, idx):
    """Writes the error into the failing child's meta and contributes 0.5."""
    ctx.meta["error"] = f"{type(exception).__name__}: {exception}"
    ctx.meta["handled_in_pid"] = os.getpid()
    return 0.5


def linear_cob(n_terms: int = 7, **kwargs) -> CombinedObjectiveFunction:
    """``n_terms`` LinearTerms with non-trivial weights."""
    return CombinedObjectiveFunction(
        [LinearTerm(k) for k in SLOPES[:n_terms]], weights=WEIGHTS[:n_terms], **kwargs
    )


def nested_cob() -> CombinedObjectiveFunction:
    """A COB with two inner COBs among its terms."""
    inner_a = linear_cob(3, child_context_configurator=label_configurator)
    inner_b = linear_cob(4)
    return CombinedObjectiveFunction(
        [LinearTerm(0.3), inner_a, LinearTerm(1.7), inner_b, LinearTerm(2.9)],
        weights=[0.7, 1.3, 0.11, 2.0, 0.5],
        child_context_configurator=label_configurator,
    )


def cob_with_failures(handler) -> CombinedObjectiveFunction:
    """Terms 2 and 5 fail (term 2 first); the rest are LinearTerms."""
    terms = [LinearTerm(k) for k in SLOPES[:7]]
    terms[2] = FailingTerm("term 2 broke")
    terms[5] = FailingTerm("term 5 broke")
    return CombinedObjectiveFunction(terms, weights=WEIGHTS[:7], exception_handler=handler)


class CountingThreadPool(ThreadPoolExecutor):
    """A real thread pool that counts the tasks submitted to it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.n_submitted = 0

    def submit(self, fn, /, *args, **kwargs):
        self.n_submitted += 1
        return super().submit(fn, *args, **kwargs)


class SlowDispatchThreadPool(CountingThreadPool):
    """A real thread pool whose ``submit`` first sleeps: a local executor that never pays."""

    def __init__(self, *args, dispatch_seconds: float = 0.005, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dispatch_seconds = dispatch_seconds

    def submit(self, fn, /, *args, **kwargs):
        time.sleep(self.dispatch_seconds)
        return super().submit(fn, *args, **kwargs)


class ForeignExecutor:
    """An ExecutorLike that is not a stdlib or chemfit class (wraps a thread pool).

    The wrapper does not know it runs in-process, so it takes the pickled path.
    """

    def __init__(self, max_workers: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers)
        self._max_workers = max_workers
        self.n_submitted = 0
        self.tasks: list = []

    def submit(self, fn, /, *args, **kwargs):
        self.n_submitted += 1
        self.tasks.append(fn)
        return self._pool.submit(fn, *args, **kwargs)

    def map(self, fn, *iterables, timeout=None, chunksize=1):
        return self._pool.map(fn, *iterables, timeout=timeout)

    def shutdown(self, wait=True):
        self._pool.shutdown(wait=wait)


def call_wrapper_in_task(wrapper, parameters, ctx):
    """Used as a task on a pool: evaluates ``wrapper`` from inside that pool."""
    return wrapper(parameters, ctx)
