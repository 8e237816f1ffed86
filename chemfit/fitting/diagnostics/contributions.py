"""Which data the fit trades off: the loss of every term at the best parameters.

:func:`contributions` evaluates the fitter's objective once at its best parameters and returns
one row per term of a :class:`~chemfit.core.combined.CombinedObjectiveFunction` (one row for
any other objective): its name, weight, loss, weighted loss, share of the total and the
quantities it computed.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from chemfit.core.context import EvaluateContext
from chemfit.core.labels import term_label, term_labels
from chemfit.fitting.diagnostics.evaluation import combined_objective, fitted_point

if TYPE_CHECKING:
    import pandas

__all__ = ["contributions", "loss_arguments"]

_FIXED_COLUMNS = (
    "name",
    "weight",
    "loss",
    "weighted_loss",
    "share",
    "quantities",
    "loss_arguments",
)


def loss_arguments(term: Any) -> dict[str, Any]:
    """The keywords bound to a term's loss function (``computer.with_loss(loss, **kwargs)``):
    typically its reference values.

    Examples
    --------
    >>> from chemfit.wrap_funcs import WrappedQuantityComputer
    >>> def squared(q, b_ref):
    ...     return (q["B"] - b_ref) ** 2
    >>> term = WrappedQuantityComputer(lambda p: {"B": p["b"]}).with_loss(squared, b_ref=-5.0)
    >>> loss_arguments(term), loss_arguments(lambda p: 1.0)
    ({'b_ref': -5.0}, {})
    """
    loss = getattr(term, "loss_function", None)
    keywords: dict[str, Any] = {}
    while isinstance(loss, functools.partial):
        keywords = {**loss.keywords, **keywords}
        loss = loss.func
    return keywords


def _names(objective: Any, cob: Any, metas: list[Any]) -> list[str]:
    """The terms' labels (:func:`~chemfit.core.labels.term_labels`); a ``tag`` or ``name`` a
    term wrote into its meta while it ran wins."""
    if cob is not None:
        labels = term_labels(cob)
    else:
        labels = [term_label(objective) or type(objective).__name__]
    for index, meta in enumerate(metas):
        if isinstance(meta, Mapping):
            for key in ("tag", "name", "label"):
                value = meta.get(key)
                if isinstance(value, str) and value.strip():
                    labels[index] = value.strip()
                    break
    return labels


def _number(value: Any) -> float:
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _scalars(quantities: Any) -> dict[str, float]:
    """The quantities that are plain numbers (they become columns)."""
    if not isinstance(quantities, Mapping):
        return {}
    return {
        str(key): float(value)
        for key, value in quantities.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


def _rows(objective: Any, parameters: dict) -> list[dict]:
    ctx = EvaluateContext()
    total = _number(objective(parameters, ctx))
    cob = combined_objective(objective)
    if cob is None:
        return [
            {
                "name": _names(objective, None, [ctx.meta])[0],
                "weight": 1.0,
                "loss": total,
                "weighted_loss": total,
                "quantities": ctx.quantities,
                "loss_arguments": loss_arguments(objective),
            }
        ]
    children = ctx.meta.get("children", [])
    skipped = set(ctx.meta.get("skipped_indices", []))
    rows = []
    metas = [child.get("meta") for child in children]
    names = _names(objective, cob, metas)
    for idx, (term, weight) in enumerate(zip(cob.objective_functions, cob.weights)):
        child = children[idx] if idx < len(children) else {}
        loss = math.nan if idx in skipped else _number(child.get("loss"))
        rows.append(
            {
                "name": names[idx],
                "weight": float(weight),
                "loss": loss,
                "weighted_loss": float(weight) * loss,
                "quantities": child.get("quantities"),
                "loss_arguments": loss_arguments(term),
            }
        )
    return rows


def contributions(fitter: Any) -> pandas.DataFrame:
    """The loss of every term at the fitter's best parameters, as a DataFrame.

    One row per term of a combined objective (index: the term's position), for any other
    objective one row. Columns: ``name`` (a ``tag`` the term wrote in its meta, else
    :func:`~chemfit.core.labels.term_labels`: its name, or its function's bound arguments),
    ``weight``, ``loss`` (the term's own, unweighted), ``weighted_loss``
    (``weight * loss``), ``share`` (``weighted_loss`` over the sum of all weighted losses; with
    the default sum reduction that sum is the total loss), ``quantities`` (what the term
    computed), ``loss_arguments`` (the keywords bound to its loss, typically the reference
    values; see :func:`loss_arguments`) and one column per quantity that is a plain number. A skipped term has NaN
    losses. The objective is evaluated once, here.

    Examples
    --------
    >>> from chemfit.core.combined import CombinedObjectiveFunction
    >>> from chemfit.fitting.fitter import Fitter
    >>> cob = CombinedObjectiveFunction(
    ...     [lambda p: (p["x"] - 1.0) ** 2, lambda p: (p["x"] - 3.0) ** 2], weights=[1.0, 3.0])
    >>> fitter = Fitter(cob, {"x": 0.0})
    >>> _ = fitter.fit_scipy()
    >>> table = contributions(fitter)
    >>> table[["weight", "loss", "weighted_loss", "share"]].round(4)
       weight  loss  weighted_loss  share
    0     1.0  2.25           2.25   0.75
    1     3.0  0.25           0.75   0.25
    """
    import pandas

    point = fitted_point(fitter, "contributions()")
    rows = _rows(point.objective, point.nested())
    total = math.fsum(row["weighted_loss"] for row in rows if math.isfinite(row["weighted_loss"]))
    extra: dict[str, None] = {}
    for row in rows:
        row["share"] = row["weighted_loss"] / total if total else math.nan
        for key, value in _scalars(row["quantities"]).items():
            column = key if key not in _FIXED_COLUMNS else f"quantity_{key}"
            row[column] = value
            extra[column] = None
    return pandas.DataFrame(rows, columns=[*_FIXED_COLUMNS, *extra])
