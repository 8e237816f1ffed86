"""The loss along each parameter through the best point (a slice of the loss surface).

:func:`profile` lays a grid of values over each chosen parameter, keeping the others at their
best values, and evaluates every point of every grid at once on the executor.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from chemfit.fitting.diagnostics.evaluation import (
    FittedPoint,
    evaluate_losses,
    fitted_point,
    parameter_scale,
)
from chemfit.fitting.diagnostics.store import keep

if TYPE_CHECKING:
    import pandas

__all__ = ["parameter_grid", "profile"]


def parameter_grid(
    value: float,
    bounds: tuple[float | None, float | None],
    points: int,
    span: float = 0.1,
) -> np.ndarray:
    """``points`` values through ``value``: ``value +- span * scale``, clipped to ``bounds``.

    ``scale`` is ``|value|`` (the bounds' width, or 1, for a zero value). The points are
    spread evenly on each side of ``value``, which is always one of them; a side cut short by
    a bound gets fewer points.

    Examples
    --------
    >>> parameter_grid(2.0, (None, None), 5, span=0.5)
    array([1. , 1.5, 2. , 2.5, 3. ])
    >>> parameter_grid(0.0, (0.0, 1.0), 3, span=0.5)
    array([0.  , 0.25, 0.5 ])
    """
    lower, upper = bounds
    half = span * parameter_scale(value, lower, upper)
    low, high = value - half, value + half
    if lower is not None:
        low = max(low, lower)
    if upper is not None:
        high = min(high, upper)
    if points == 1 or high <= low:
        return np.array([value])
    n_left = round((points - 1) * (value - low) / (high - low))
    n_right = points - 1 - n_left
    left = np.linspace(low, value, n_left + 1)[:-1]
    right = np.linspace(value, high, n_right + 1)[1:]
    return np.concatenate([left, [value], right])


def _chosen(point: FittedPoint, parameters: str | Iterable[str] | None) -> list[str]:
    if parameters is None:
        return point.names
    names = [parameters] if isinstance(parameters, str) else list(parameters)
    unknown = [name for name in names if name not in point.values]
    if unknown:
        raise ValueError(
            f"profile() got unknown parameters {unknown}; the fitted parameters are "
            f"{point.names} (flat names, levels joined with '.')"
        )
    return names


def profile(
    fitter: Any,
    parameters: str | Iterable[str] | None = None,
    points: int = 21,
    executor: Any = None,
    *,
    span: float = 0.1,
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, pandas.DataFrame]:
    """The loss along each parameter through the fitter's best point.

    Parameters
    ----------
    fitter : Fitter
        After a fit.
    parameters : str or iterable of str, optional
        Flat parameter names; default all.
    points : int
        Grid points per parameter (the best value is one of them).
    executor : optional
        Where the ``len(parameters) * points`` evaluations run, all submitted at once;
        ``None`` evaluates them here. An evaluation that raises gives a NaN loss.
    span : float
        Each grid covers ``best +- span * |best|`` (the bounds' width, or 1, for a zero best
        value), clipped to the bounds (see :func:`parameter_grid`).
    ranges : dict, optional
        ``{name: (low, high)}``: an evenly spaced grid over this range instead.

    Returns
    -------
    dict[str, pandas.DataFrame]
        Flat name -> DataFrame with the columns ``value`` and ``loss``, sorted by value; its
        ``attrs`` hold ``best`` (the best value) and ``best_loss``. Also kept in
        ``fitter.result.diagnostics["profile"]`` (merged with earlier profiles by name).

    Examples
    --------
    >>> from chemfit.fitting.fitter import Fitter
    >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2 + 2 * p["y"] ** 2, {"x": 0.0, "y": 0.5})
    >>> _ = fitter.fit_scipy()
    >>> curves = profile(fitter, points=5, ranges={"y": (-1.0, 1.0)})
    >>> curves["y"].round(6)
       value  loss
    0   -1.0   2.0
    1   -0.5   0.5
    2    0.0   0.0
    3    0.5   0.5
    4    1.0   2.0
    >>> curves["x"]["value"].round(6).tolist()
    [0.9, 0.95, 1.0, 1.05, 1.1]
    """
    import pandas

    if isinstance(points, bool) or not isinstance(points, numbers.Integral) or points < 1:
        raise ValueError(f"points must be an int >= 1, got {points!r}")
    point = fitted_point(fitter, "profile()")
    names = _chosen(point, parameters)
    ranges = dict(ranges or {})
    unknown = sorted(set(ranges) - set(names))
    if unknown:
        raise ValueError(f"ranges names {unknown}, which are not profiled; profiled: {names}")
    best = point.vector()
    grids, rows = {}, []
    for name in names:
        if name in ranges:
            low, high = ranges[name]
            grid = np.linspace(float(low), float(high), int(points))
        else:
            grid = parameter_grid(point.values[name], point.bounds[name], int(points), span)
        grids[name] = grid
        column = point.names.index(name)
        for value in grid:
            row = best.copy()
            row[column] = value
            rows.append(row)
    losses = evaluate_losses(point.objective, point.names, rows, executor)
    curves, start = {}, 0
    for name, grid in grids.items():
        frame = pandas.DataFrame({"value": grid, "loss": losses[start : start + len(grid)]})
        start += len(grid)
        frame = frame.sort_values("value", kind="stable", ignore_index=True)
        frame.attrs.update(best=point.values[name], best_loss=point.loss)
        curves[name] = frame
    keep(fitter, "profile", curves)
    return curves
