"""Module-level helpers for the core tests (picklable across process pools)."""

from __future__ import annotations

from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import QuantityComputer
from chemfit.core.wrapping import to_objective_functor, to_quantity_computer


def square(parameters: dict) -> float:
    return parameters["x"] ** 2


def energy(parameters: dict, scale: float = 1.0, *, ctx: EvaluateContext | None = None) -> dict:
    if ctx is not None:
        ctx.meta["had_ctx"] = True
    return {"energy": scale * parameters["x"]}


@to_quantity_computer
def decorated_energy(parameters: dict, offset: float = 0.0) -> dict:
    return {"energy": parameters["x"] + offset}


@to_objective_functor(pass_ctx=True)
def decorated_loss(parameters: dict, *, ctx: EvaluateContext) -> float:
    ctx.meta["decorated"] = True
    return abs(parameters["x"])


class LinearComputer(QuantityComputer):
    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = slope
        self.static_meta_data = {"type": "linear", "tag": "lin"}

    def _compute(self, parameters: dict, ctx: EvaluateContext) -> dict:
        return {"y": self.slope * parameters["x"]}


def squared_error(quantities: dict, target: float) -> float:
    return (quantities["y"] - target) ** 2


def call_in_worker(func, parameters: dict, ctx: EvaluateContext):
    """Run ``func(parameters, ctx)`` in a worker; return the value and the result state."""
    value = func(parameters, ctx)
    return value, ctx.to_result_state()


def inspect_in_worker(ctx: EvaluateContext) -> dict:
    """What a worker sees of a context, after mutating it."""
    seen = {
        "parameters": ctx.parameters,
        "config": vars(ctx.config).copy(),
        "shared": vars(ctx.shared).copy(),
        "meta": dict(ctx.meta),
        "temp": vars(ctx.temp).copy(),
        "loss": ctx.loss,
        "quantities": ctx.quantities,
        "executor": ctx.executor,
        "n_children": len(ctx.children),
    }
    ctx.shared.changed_in_worker = True
    ctx.loss = 42.0
    ctx.quantities = {"q": 1}
    ctx.meta["worker"] = True
    return {"seen": seen, "state": ctx.to_result_state()}
