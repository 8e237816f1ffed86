"""What the diagnostics share: the fitted point of a fitter and parallel loss evaluations.

:func:`fitted_point` reads the best parameters, their loss, the flat bounds and the user's
objective from a fitter after a fit. :func:`evaluate_losses` evaluates that objective at many
points on an executor through :func:`~chemfit.execution.executor_utils.map_with_context` (the
objective is packed for the workers once, objectives defined in ``__main__`` travel by value),
with a NaN for a point whose evaluation raises.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.flatdict import flatten_dict
from chemfit.execution.executor_utils import map_with_context
from chemfit.fitting.parameter_space import nested_floats, validate_parameters

__all__ = [
    "FittedPoint",
    "LossTask",
    "combined_objective",
    "evaluate_losses",
    "fitted_point",
    "flat_parameters",
    "parameter_scale",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FittedPoint:
    """The best point of a fit, with what a diagnostic needs around it.

    Attributes
    ----------
    values : dict[str, float]
        The best parameters by flat name (``"a.b"``), in the fitter's order.
    bounds : dict[str, tuple]
        ``(lower or None, upper or None)`` for every flat name.
    loss : float
        The loss at ``values``.
    objective : callable
        The user's objective, ``objective(parameters, ctx)``, as the fitter evaluates it
        (without the fitter's loss sanitising).

    Examples
    --------
    >>> point = FittedPoint({"a.b": 1.0}, {"a.b": (0.0, None)}, 0.5, None)
    >>> point.names, point.nested()
    (['a.b'], {'a': {'b': 1.0}})
    """

    values: dict[str, float]
    bounds: dict[str, tuple[float | None, float | None]]
    loss: float
    objective: Callable[..., Any]

    @property
    def names(self) -> list[str]:
        """The flat parameter names."""
        return list(self.values)

    def vector(self) -> np.ndarray:
        """The values as an array, in the order of :attr:`names`."""
        return np.array([self.values[name] for name in self.values], dtype=float)

    def nested(self, values: Sequence[float] | None = None) -> dict:
        """Nested parameters (as the objective takes them) of ``values`` (default: the best)."""
        if values is None:
            values = self.vector()
        return nested_floats(zip(self.values, values))


def parameter_scale(value: float, lower: float | None, upper: float | None) -> float:
    """The size of a parameter: its magnitude, else its bounds' width, else 1.

    Examples
    --------
    >>> parameter_scale(-2.0, None, None), parameter_scale(0.0, 0.0, 5.0), parameter_scale(0.0, 0.0, None)
    (2.0, 5.0, 1.0)
    """
    if value != 0.0:
        return abs(value)
    if lower is not None and upper is not None:
        return upper - lower
    return 1.0


def fitted_point(fitter: Any, what: str) -> FittedPoint:
    """The best point of ``fitter``'s last fit; ``what`` names the diagnostic for messages.

    Raises
    ------
    RuntimeError
        When the fitter has no result yet, or its fit found no finite loss.

    Examples
    --------
    >>> from chemfit.fitting.fitter import Fitter
    >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0}, bounds={"x": (-2, 2)})
    >>> fitted_point(fitter, "covariance()")
    Traceback (most recent call last):
    ...
    RuntimeError: fitter.covariance() needs a finished fit; run fitter.fit_nevergrad() or fitter.fit_scipy() first
    >>> _ = fitter.fit_scipy()
    >>> point = fitted_point(fitter, "covariance()")
    >>> round(point.values["x"], 4), point.bounds
    (1.0, {'x': (-2.0, 2.0)})
    """
    result = getattr(fitter, "result", None)
    if result is None:
        raise RuntimeError(
            f"fitter.{what} needs a finished fit; run fitter.fit_nevergrad() or "
            "fitter.fit_scipy() first"
        )
    if not math.isfinite(result.best_loss):
        raise RuntimeError(
            f"fitter.{what} needs a fit with a finite best loss, but no evaluation of the last "
            "fit gave one; check the objective (fitter.result.history holds the errors)"
        )
    _, flat_bounds = validate_parameters(fitter.initial_parameters, fitter.bounds)
    values = {key: float(value) for key, value in flatten_dict(result.best_parameters).items()}
    bounds = {key: flat_bounds.get(key, (None, None)) for key in values}
    return FittedPoint(values, bounds, float(result.best_loss), fitter.objective_function.wrap_me)


def combined_objective(objective: Any) -> CombinedObjectiveFunction | None:
    """The :class:`CombinedObjectiveFunction` of ``objective``: itself, or the ``cob`` that a
    parallel wrapper (``ExecutorWrapperCOB``, ``MPIWrapperCOB``) evaluates; else ``None``.

    Examples
    --------
    >>> cob = CombinedObjectiveFunction([lambda p: 1.0])
    >>> combined_objective(cob) is cob, combined_objective(lambda p: 1.0)
    (True, None)
    """
    if isinstance(objective, CombinedObjectiveFunction):
        return objective
    inner = getattr(objective, "cob", None)
    return inner if isinstance(inner, CombinedObjectiveFunction) else None


class LossTask:
    """``task(values, ctx)``: the objective's loss at the flat ``values`` (NaN if it raises).

    A picklable callable for the executors: the names and the objective travel once with it.
    A failed evaluation is logged at DEBUG and leaves ``"error"`` in ``ctx.meta``.

    Examples
    --------
    >>> task = LossTask(lambda p, ctx: p["a"]["b"] ** 2, ["a.b"])
    >>> task([3.0], EvaluateContext())
    9.0
    >>> ctx = EvaluateContext()
    >>> task(["x"], ctx), ctx.meta["error"]
    (nan, "ValueError: could not convert string to float: 'x'")
    """

    def __init__(self, objective: Callable[..., Any], names: Sequence[str]) -> None:
        self.objective = objective
        self.names = list(names)

    def __call__(self, values: Sequence[float], ctx: EvaluateContext) -> float:
        try:
            loss = float(self.objective(nested_floats(zip(self.names, values)), ctx))
        except Exception as exc:
            logger.debug("evaluation at %s failed", list(values), exc_info=True)
            ctx.meta["error"] = f"{type(exc).__name__}: {exc}"
            return math.nan
        return loss


def evaluate_losses(
    objective: Callable[..., Any],
    names: Sequence[str],
    points: Sequence[Sequence[float]] | np.ndarray,
    executor: Any = None,
) -> np.ndarray:
    """The objective's loss at each point (a row of flat values), evaluated on ``executor``.

    All points are submitted at once through ``map_with_context``; ``executor=None`` evaluates
    them here, one after the other. A point whose evaluation raises gets NaN (one WARNING
    names how many and the first error).

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> with ThreadPoolExecutor(2) as pool:
    ...     evaluate_losses(lambda p, ctx: p["x"] ** 2, ["x"], [[1.0], [2.0], [3.0]], pool)
    array([1., 4., 9.])
    """
    rows = [tuple(float(v) for v in row) for row in np.asarray(points, dtype=float)]
    if not rows:
        return np.zeros(0)
    ctxs = [EvaluateContext() for _ in rows]
    losses = np.array(
        map_with_context(executor, LossTask(objective, names), rows, ctxs=ctxs), dtype=float
    )
    failed = [ctx.meta["error"] for ctx in ctxs if "error" in ctx.meta]
    if failed:
        logger.warning(
            "%d of %d evaluations raised and count as NaN; the first: %s",
            len(failed),
            len(rows),
            failed[0],
        )
    return losses


def flat_parameters(parameters: Mapping[str, Any], names: Sequence[str]) -> list[float]:
    """The values of nested ``parameters`` in the order of the flat ``names``.

    Examples
    --------
    >>> flat_parameters({"a": {"b": 1, "c": 2}}, ["a.c", "a.b"])
    [2.0, 1.0]
    """
    flat = flatten_dict(parameters)
    return [float(flat[name]) for name in names]
