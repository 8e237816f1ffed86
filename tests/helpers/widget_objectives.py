"""Module-level objectives for the widget tests (picklable, so engines can run them)."""

from __future__ import annotations

import math
import threading
import time

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor, ensure_context


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll ``condition()`` every 50 ms; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def quadratic(parameters: dict) -> float:
    """A 2-D quadratic with its minimum 0 at (1, -0.5)."""
    return (parameters["x"] - 1.0) ** 2 + (parameters["y"] + 0.5) ** 2


def slow_quadratic(parameters: dict) -> float:
    """:func:`quadratic` after 10 ms, so that a fit lasts long enough to be stopped."""
    time.sleep(0.01)
    return quadratic(parameters)


def nan_for_negative_x(parameters: dict) -> float:
    """NaN (penalised by the fitter) when x < 0, else :func:`quadratic`."""
    return math.nan if parameters["x"] < 0 else quadratic(parameters)


def fails_for_large_x(parameters: dict) -> float:
    """Raises ValueError once x > 0.5: an objective that breaks during a fit."""
    if parameters["x"] > 0.5:
        raise ValueError(f"x={parameters['x']:.3f} is outside the model's range")
    return quadratic(parameters)


class Term(ObjectiveFunctor):
    """``(x - target)**2``."""

    def __init__(self, target: float) -> None:
        self.target = target

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        ctx.parameters = parameters
        ctx.loss = (parameters["x"] - self.target) ** 2
        return ctx.loss


def build_cob() -> CombinedObjectiveFunction:
    """Three terms with minima at 0.5, 1.0 and 1.5 (the sum is smallest at x = 1)."""
    return CombinedObjectiveFunction([Term(t) for t in (0.5, 1.0, 1.5)])


class HoldsALock:
    """``(x - 1)**2`` in an object that holds a lock, so no process pool can be sent it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __call__(self, parameters: dict) -> float:
        return (parameters["x"] - 1.0) ** 2


class Switchable:
    """:func:`slow_quadratic` (2 ms) that a test can make unpicklable (``hold_lock``)."""

    def __init__(self) -> None:
        self.lock: threading.Lock | None = None

    def hold_lock(self, hold: bool = True) -> None:
        self.lock = threading.Lock() if hold else None

    def __call__(self, parameters: dict) -> float:
        time.sleep(0.002)
        return quadratic(parameters)
