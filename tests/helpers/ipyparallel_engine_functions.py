"""Module-level helpers for tests/execution/test_ipyparallel.py (run on ipyparallel engines)."""

from __future__ import annotations

import os
import time

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor, ensure_context


def engine_square(parameters: dict, ctx: EvaluateContext) -> float:
    """``x**2``, recording where it ran in ``ctx.meta``."""
    ctx.parameters = parameters
    ctx.loss = parameters["x"] ** 2
    ctx.meta["pid"] = os.getpid()
    ctx.meta["label"] = f"x={parameters['x']}"
    return ctx.loss


def die_or_square(parameters: dict, ctx: EvaluateContext) -> float:
    """Kill the engine process for ``x < 0``; otherwise :func:`engine_square`."""
    if parameters["x"] < 0:
        time.sleep(0.2)
        os._exit(3)
    return engine_square(parameters, ctx)


def fit_objective(parameters: dict, ctx: EvaluateContext | None = None) -> float:
    """A 2-D quadratic with its minimum at (1, -0.5); records the engine's pid."""
    ctx = ensure_context(ctx)
    ctx.parameters = parameters
    ctx.loss = (parameters["x"] - 1.0) ** 2 + (parameters["y"] + 0.5) ** 2
    ctx.meta["pid"] = os.getpid()
    return ctx.loss


class UnpicklableError(Exception):
    """An exception whose constructor does not round-trip through pickle."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def raise_unpicklable() -> None:
    raise UnpicklableError("custom failure", 7)


def _mpi_rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


class RankTerm(ObjectiveFunctor):
    """``(x - target)**2`` after an optional delay; records the MPI rank that evaluated it."""

    def __init__(self, target: float, delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        if self.delay:
            time.sleep(self.delay)
        ctx.parameters = parameters
        ctx.loss = (parameters["x"] - self.target) ** 2
        ctx.meta["rank"] = _mpi_rank()
        return ctx.loss


def build_cob(delay: float = 0.0) -> CombinedObjectiveFunction:
    """Four terms; on two ranks each evaluates two of them."""
    return CombinedObjectiveFunction([RankTerm(t, delay) for t in (0.5, 1.0, 1.5, 2.0)])


def build_slow_cob() -> CombinedObjectiveFunction:
    return build_cob(delay=0.02)


def build_fails_on_rank_1() -> CombinedObjectiveFunction:
    if _mpi_rank() == 1:
        raise RuntimeError("cannot build the objective on this rank")
    return build_cob()


def driver_raises(objective, publish) -> None:
    objective({"x": 1.0})
    publish({"step": 0})
    raise ValueError("driver failed on rank 0")


def driver_evaluate_three(objective, publish) -> list[float]:
    losses = []
    for x in (0.0, 1.0, 2.0):
        losses.append(objective({"x": x}))
        publish({"x": x, "loss": losses[-1]})
    return losses


def driver_endless(objective, publish) -> None:
    """Evaluate and publish until interrupted."""
    step = 0
    while True:
        publish({"step": step, "loss": objective({"x": 0.1 * step})})
        step += 1
        time.sleep(0.05)


def driver_dies(objective, publish) -> None:
    """Publish two records, then kill rank 0's engine."""
    for step in range(2):
        publish({"step": step, "loss": objective({"x": float(step)})})
    time.sleep(0.5)  # let the records leave before the process ends
    os._exit(5)


class HangsOnRank1(RankTerm):
    """A :class:`RankTerm` that never answers on rank 1 for ``x >= 1`` (a hung simulator)."""

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        if parameters["x"] >= 1.0 and _mpi_rank() == 1:
            time.sleep(600)
        return super().__call__(parameters, ctx)


def build_hangs_on_rank_1() -> CombinedObjectiveFunction:
    return CombinedObjectiveFunction([HangsOnRank1(t) for t in (0.5, 1.0, 1.5, 2.0)])


def held_out_loss(parameters: dict) -> float:
    """A validation objective: the loss on held-out data (here: another target)."""
    return (parameters["x"] - 1.2) ** 2
