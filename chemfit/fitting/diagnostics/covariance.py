"""Parameter uncertainty from the curvature of the loss at its minimum (Laplace / Gauss-Newton).

The scaling convention
----------------------
The loss is taken to be a weighted sum of squared residuals,
``L(p) = sum_i w_i r_i(p)**2``, each residual Gaussian with variance ``sigma2 / w_i``. Then
``-log(likelihood) = L / (2 sigma2) + const``, and the Laplace approximation of the posterior
around the minimum has the covariance::

    C = (Hessian of L / (2 sigma2))**-1 = 2 * sigma2 * H**-1,      H = d2L / dp dp

Near a good fit ``H ~= 2 J^T W J`` (Gauss-Newton), so ``C ~= sigma2 (J^T W J)**-1``, the textbook
least-squares covariance. ``sigma2`` is estimated as ``L_min / (n - p)`` (``n`` residuals,
``p`` parameters) unless given: pass ``sigma2=1`` when the weights are ``1 / variance`` of
each datum (the loss is a chi-square). Without ``n_residuals``, ``n`` is the number of terms
of a combined objective (one squared residual per term).

The Hessian comes from finite differences: a step ``h_j = step * |p_j|`` per parameter (the
bounds' width, or 1, times ``step`` for a zero value); central differences inside the bounds,
one-sided ones (and a warning) for a parameter within a step of a bound. All points are
evaluated at once on the executor.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from chemfit.fitting.diagnostics.evaluation import (
    FittedPoint,
    combined_objective,
    evaluate_losses,
    fitted_point,
    parameter_scale,
)
from chemfit.fitting.diagnostics.store import keep
from chemfit.fitting.jsonl import float_from_json, json_float

if TYPE_CHECKING:
    import pandas

__all__ = ["Covariance", "covariance", "finite_difference_hessian", "is_positive_definite"]

logger = logging.getLogger(__name__)


@dataclass
class Covariance:
    """The covariance of the fitted parameters (what ``Fitter.covariance()`` returns).

    Attributes
    ----------
    matrix : pandas.DataFrame
        ``2 * sigma2 * H**-1``, indexed by the flat parameter names (see the module docstring).
    correlation : pandas.DataFrame
        ``matrix[i, j] / (se_i * se_j)``.
    standard_errors : pandas.Series
        ``sqrt(diag(matrix))``; NaN where the diagonal is not positive.
    hessian : pandas.DataFrame
        The finite-difference Hessian of the loss.
    parameters : pandas.Series
        The best parameters.
    loss : float
        The loss at the best parameters (evaluated again here).
    sigma2 : float
        The variance of a residual of unit weight (given or estimated).
    n_residuals : int or None
        The ``n`` of the estimate ``sigma2 = loss / (n - p)``; ``None`` when ``sigma2`` was given.
    steps : pandas.Series
        The finite-difference step of each parameter.
    at_bound : list[str]
        Parameters within a step of a bound (one-sided differences; their errors assume an
        interior minimum and are not meaningful).
    positive_definite : bool
        Whether the Hessian is positive definite (a minimum).
    warnings : list[str]
        What was logged as a WARNING.
    """

    matrix: pandas.DataFrame
    correlation: pandas.DataFrame
    standard_errors: pandas.Series
    hessian: pandas.DataFrame
    parameters: pandas.Series
    loss: float
    sigma2: float
    n_residuals: int | None
    steps: pandas.Series
    at_bound: list[str] = field(default_factory=list)
    positive_definite: bool = True
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> pandas.DataFrame:
        """``value``, ``standard_error`` and ``relative_error`` (``se / |value|``) per parameter."""
        import pandas

        return pandas.DataFrame(
            {
                "value": self.parameters,
                "standard_error": self.standard_errors,
                "relative_error": self.standard_errors / self.parameters.abs(),
            }
        )

    def to_dict(self) -> dict:
        """JSON-safe data (non-finite numbers spelled as in the fit history files)."""

        def matrix(frame: pandas.DataFrame) -> list[list]:
            return [[json_float(v) for v in row] for row in frame.to_numpy()]

        return {
            "names": list(self.parameters.index),
            "parameters": [json_float(v) for v in self.parameters],
            "matrix": matrix(self.matrix),
            "hessian": matrix(self.hessian),
            "steps": [json_float(v) for v in self.steps],
            "loss": json_float(self.loss),
            "sigma2": json_float(self.sigma2),
            "n_residuals": self.n_residuals,
            "at_bound": list(self.at_bound),
            "positive_definite": bool(self.positive_definite),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Covariance:
        """Rebuild from :meth:`to_dict` output.

        Examples
        --------
        >>> import json
        >>> cov = Covariance.build(["a"], [2.0], np.array([[4.0]]), [1e-3], 0.5, 1.0, None)
        >>> again = Covariance.from_dict(json.loads(json.dumps(cov.to_dict())))
        >>> float(again.standard_errors["a"]), float(again.matrix.loc["a", "a"])
        (0.7071067811865476, 0.5)
        """

        def array(rows: list[list]) -> np.ndarray:
            return np.array([[float_from_json(v) for v in row] for row in rows], dtype=float)

        return cls.build(
            data["names"],
            [float_from_json(v) for v in data["parameters"]],
            array(data["hessian"]),
            [float_from_json(v) for v in data["steps"]],
            float_from_json(data["loss"]),
            float_from_json(data["sigma2"]),
            data["n_residuals"],
            at_bound=data.get("at_bound", []),
            warnings=data.get("warnings", []),
            matrix=array(data["matrix"]),
        )

    @classmethod
    def build(
        cls,
        names: list[str],
        values: list[float] | np.ndarray,
        hessian: np.ndarray,
        steps: list[float] | np.ndarray,
        loss: float,
        sigma2: float,
        n_residuals: int | None,
        *,
        at_bound: list[str] | None = None,
        warnings: list[str] | None = None,
        matrix: np.ndarray | None = None,
    ) -> Covariance:
        """The covariance ``2 * sigma2 * inv(hessian)`` and what follows from it.

        Examples
        --------
        >>> cov = Covariance.build(["a", "b"], [1.0, 2.0], np.diag([2.0, 8.0]), [1e-3] * 2,
        ...                        loss=0.0, sigma2=1.0, n_residuals=None)
        >>> cov.standard_errors.tolist(), cov.positive_definite
        ([1.0, 0.5], True)
        """
        import pandas

        hessian = np.asarray(hessian, dtype=float)
        finite = bool(np.all(np.isfinite(hessian)))
        positive = finite and is_positive_definite(hessian)
        if matrix is None:
            if not finite:
                matrix = np.full_like(hessian, np.nan)
            else:
                try:
                    inverse = np.linalg.inv(hessian)
                except np.linalg.LinAlgError:
                    inverse = np.linalg.pinv(hessian)
                matrix = 2.0 * sigma2 * inverse
        diagonal = np.diag(matrix)
        errors = np.where(diagonal >= 0, np.sqrt(np.abs(diagonal)), np.nan)
        with np.errstate(invalid="ignore", divide="ignore"):
            correlation = matrix / np.outer(errors, errors)

        def frame(data: np.ndarray) -> pandas.DataFrame:
            return pandas.DataFrame(data, index=list(names), columns=list(names))

        return cls(
            matrix=frame(matrix),
            correlation=frame(correlation),
            standard_errors=pandas.Series(errors, index=list(names), name="standard_error"),
            hessian=frame(hessian),
            parameters=pandas.Series(np.asarray(values, dtype=float), index=list(names)),
            loss=float(loss),
            sigma2=float(sigma2),
            n_residuals=n_residuals,
            steps=pandas.Series(np.asarray(steps, dtype=float), index=list(names), name="step"),
            at_bound=list(at_bound or []),
            positive_definite=positive,
            warnings=list(warnings or []),
        )

    def __repr__(self) -> str:
        errors = ", ".join(
            f"{name}={value:.6g}+-{error:.2g}"
            for name, value, error in zip(
                self.parameters.index, self.parameters, self.standard_errors
            )
        )
        flags = "" if self.positive_definite else ", NOT positive definite"
        if self.at_bound:
            flags += f", at bounds: {self.at_bound}"
        return f"Covariance({errors}{flags})"


# -- the finite-difference Hessian ------------------------------------------------------------

#: Eigenvalues below this fraction of the largest count as zero (finite differences of a flat
#: direction leave ~1e-13 of it).
_RELATIVE_EIGENVALUE_TOLERANCE = 1e-9


def is_positive_definite(hessian: np.ndarray) -> bool:
    """Whether every eigenvalue exceeds ``1e-9`` times the largest one (a clear minimum).

    Examples
    --------
    >>> is_positive_definite(np.diag([2.0, 1.0])), is_positive_definite(np.ones((2, 2)))
    (True, False)
    """
    eigenvalues = np.linalg.eigvalsh(np.asarray(hessian, dtype=float))
    largest = float(np.max(np.abs(eigenvalues))) if eigenvalues.size else 0.0
    return largest > 0 and bool(np.all(eigenvalues > _RELATIVE_EIGENVALUE_TOLERANCE * largest))


def _stencil(
    value: float, lower: float | None, upper: float | None, h: float
) -> tuple[float, float, bool]:
    """``(centre offset, step, one_sided)``: central differences when ``value +- h`` is inside
    the bounds, else forward or backward ones (centre ``+h`` or ``-h``, points up to ``2h``)."""
    room_down = math.inf if lower is None else value - lower
    room_up = math.inf if upper is None else upper - value
    if room_down >= h and room_up >= h:
        return 0.0, h, False
    if room_up >= room_down:
        h = min(h, room_up / 2)
        return h, h, True
    h = min(h, room_down / 2)
    return -h, h, True


def finite_difference_hessian(
    function: Any,
    x: np.ndarray,
    steps: np.ndarray,
    centres: np.ndarray | None = None,
) -> np.ndarray:
    """The Hessian of ``function`` at ``x`` by finite differences, from one batch of points.

    ``function(points)`` gets every point (rows) at once and returns their values, so it can
    evaluate them in parallel. Parameter ``j`` uses the offsets ``centres[j] + (-h, 0, +h)``
    (``h = steps[j]``) for the diagonal and ``centres[j] +- h`` for the mixed derivatives:
    central differences for a zero centre, one-sided ones for a centre of ``+h`` or ``-h``.

    Examples
    --------
    >>> f = lambda pts: np.array([3 * a * a + a * b + 2 * b * b for a, b in pts])
    >>> finite_difference_hessian(f, np.array([1.0, 2.0]), np.array([1e-3, 1e-3])).round(6)
    array([[6., 1.],
           [1., 4.]])
    >>> finite_difference_hessian(f, np.array([1.0, 2.0]), np.array([1e-3, 1e-3]),
    ...                           centres=np.array([1e-3, -1e-3])).round(6)
    array([[6., 1.],
           [1., 4.]])
    """
    n = len(x)
    centres = np.zeros(n) if centres is None else np.asarray(centres, dtype=float)
    index: dict[tuple, int] = {}
    offsets: list[np.ndarray] = []

    def point(changes: dict[int, float]) -> int:
        offset = np.zeros(n)
        for j, delta in changes.items():
            offset[j] = delta
        key = tuple(np.round(offset / steps, 6))
        if key not in index:
            index[key] = len(offsets)
            offsets.append(offset)
        return index[key]

    diagonal = [[point({j: centres[j] + k * steps[j]}) for k in (-1, 0, 1)] for j in range(n)]
    mixed = {}
    for i in range(n):
        for j in range(i + 1, n):
            a_i, b_i = centres[i] + steps[i], centres[i] - steps[i]
            a_j, b_j = centres[j] + steps[j], centres[j] - steps[j]
            mixed[i, j] = [
                point({i: a_i, j: a_j}),
                point({i: a_i, j: b_j}),
                point({i: b_i, j: a_j}),
                point({i: b_i, j: b_j}),
            ]
    values = np.asarray(function(x + np.array(offsets)), dtype=float)
    hessian = np.zeros((n, n))
    for j, (minus, middle, plus) in enumerate(diagonal):
        hessian[j, j] = (values[plus] - 2 * values[middle] + values[minus]) / steps[j] ** 2
    for (i, j), (pp, pm, mp, mm) in mixed.items():
        hessian[i, j] = hessian[j, i] = (values[pp] - values[pm] - values[mp] + values[mm]) / (
            4 * steps[i] * steps[j]
        )
    return hessian


# -- covariance() -------------------------------------------------------------------------------


def _steps(point: FittedPoint, step: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    steps, centres, at_bound = [], [], []
    for name, value in point.values.items():
        lower, upper = point.bounds[name]
        h = step * parameter_scale(value, lower, upper)
        centre, h, one_sided = _stencil(value, lower, upper, h)
        steps.append(h)
        centres.append(centre)
        if one_sided:
            at_bound.append(name)
    return np.array(steps), np.array(centres), at_bound


def _residual_count(point: FittedPoint, n_residuals: int | None) -> int:
    if n_residuals is not None:
        return int(n_residuals)
    cob = combined_objective(point.objective)
    if cob is None:
        raise ValueError(
            "covariance() cannot tell how many squared residuals the loss sums: the objective "
            "is not a CombinedObjectiveFunction (whose terms would count); pass n_residuals=, "
            "or sigma2= when the weights are 1/variance of each datum"
        )
    return cob.n_terms()


def _not_positive_definite(hessian: np.ndarray, names: list[str]) -> str:
    eigenvalues, vectors = np.linalg.eigh(hessian)
    worst = vectors[:, 0]
    involved = [name for name, weight in zip(names, worst) if abs(weight) > 0.3]
    return (
        f"the Hessian of the loss is not positive definite (smallest eigenvalue "
        f"{eigenvalues[0]:.3g}, along {involved}): the best point is not a clear minimum "
        "there (a flat or saddle direction, or a finite-difference step too small for a noisy "
        "loss); the covariance is not meaningful along it. Refine the fit (fit_scipy from "
        "the best point), or pass a larger step="
    )


def covariance(
    fitter: Any,
    executor: Any = None,
    *,
    sigma2: float | None = None,
    n_residuals: int | None = None,
    step: float = 1e-3,
) -> Covariance:
    """The Laplace / Gauss-Newton covariance of the fitted parameters (module docstring).

    Parameters
    ----------
    fitter : Fitter
        After a fit; its best point should be a minimum of a loss that sums squared residuals.
    executor : optional
        Where the ``1 + 2p + 2p(p-1)`` finite-difference evaluations run, all at once
        (``None``: here).
    sigma2 : float, optional
        The variance of a residual of unit weight; default ``loss / (n_residuals - p)``.
    n_residuals : int, optional
        How many squared residuals the loss sums; default the terms of a combined objective.
    step : float
        The relative finite-difference step (times ``|value|``, or the bounds' width, or 1).

    Returns
    -------
    Covariance
        ``matrix``, ``correlation``, ``standard_errors`` and more. A WARNING names a
        parameter within a step of a bound, and a Hessian that is not positive definite.
        Also kept as ``fitter.result.diagnostics["covariance"]``.

    Examples
    --------
    A straight line through the origin, ``y = a x``: the analytic standard error of ``a`` is
    ``s / sqrt(sum x**2)`` with ``s**2 = loss / (n - 1)``.

    >>> from chemfit.core.combined import CombinedObjectiveFunction
    >>> from chemfit.fitting.fitter import Fitter
    >>> x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.1, 1.9, 3.2, 3.9])
    >>> cob = CombinedObjectiveFunction(
    ...     [lambda p, xi=xi, yi=yi: (yi - p["a"] * xi) ** 2 for xi, yi in zip(x, y)])
    >>> fitter = Fitter(cob, {"a": 0.5})
    >>> _ = fitter.fit_scipy()
    >>> cov = covariance(fitter)
    >>> s = np.sqrt(cov.loss / (len(x) - 1))
    >>> round(float(cov.standard_errors["a"]), 5), round(float(s / np.sqrt(np.sum(x * x))), 5)
    (0.02782, 0.02782)
    """
    point = fitted_point(fitter, "covariance()")
    names = point.names
    if not step > 0:
        raise ValueError(f"step must be a positive relative step, got {step!r}; e.g. 1e-3")
    if sigma2 is None:
        n = _residual_count(point, n_residuals)
        dof = n - len(names)
        if dof <= 0:
            raise ValueError(
                f"covariance() estimates sigma2 = loss / (n_residuals - n_parameters), but "
                f"there are {n} residuals for {len(names)} parameters; pass n_residuals= (how "
                "many squared residuals the loss sums) or sigma2="
            )
    steps, centres, at_bound = _steps(point, step)
    x = point.vector()

    def losses(points: np.ndarray) -> np.ndarray:
        return evaluate_losses(point.objective, names, points, executor)

    # the best point is one of the stencil's points only with central differences; add it
    values_at = {}

    def with_best(points: np.ndarray) -> np.ndarray:
        values = losses(np.vstack([x, points]))
        values_at["best"] = values[0]
        return values[1:]

    hessian = finite_difference_hessian(with_best, x, steps, centres)
    loss = float(values_at["best"])
    if sigma2 is None:
        sigma2_value, n_used = loss / dof, n
    else:
        sigma2_value, n_used = float(sigma2), None
    notes = []
    for name in at_bound:
        lower, upper = point.bounds[name]
        notes.append(
            f"parameter {name!r} = {point.values[name]:.6g} sits at a bound ({lower}, {upper}): "
            "its derivatives are one-sided and its standard error assumes an interior minimum; "
            "widen the bound or fix the parameter"
        )
    if not np.all(np.isfinite(hessian)):
        notes.append(
            "some finite-difference evaluations failed (NaN losses): the Hessian is incomplete; "
            "pass a smaller step= or check the objective near the best point"
        )
    elif not is_positive_definite(hessian):
        notes.append(_not_positive_definite(hessian, names))
    for note in notes:
        logger.warning("covariance(): %s", note)
    result = Covariance.build(
        names,
        x,
        hessian,
        steps,
        loss,
        sigma2_value,
        n_used,
        at_bound=at_bound,
        warnings=notes,
    )
    keep(fitter, "covariance", result)
    return result
