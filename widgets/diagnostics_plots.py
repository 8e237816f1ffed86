"""Plots of how good a fit is: correlation heatmap, loss profiles, parity of computed and
reference quantities.

They draw what ``Fitter.covariance()``, ``Fitter.bootstrap()``, ``Fitter.profile()`` and
``Fitter.contributions()`` return, with matplotlib. Each takes an optional ``ax`` (or ``axes``)
to draw into and returns the figure; without one a new pyplot figure is made (shown inline in a
notebook).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["plot_correlation", "plot_parity", "plot_profiles"]


def _axes(ax: Any, figsize: tuple[float, float]) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=figsize)
    return figure, ax


def _correlation_frame(source: Any) -> Any:
    correlation = getattr(source, "correlation", None)  # a Covariance
    if correlation is not None:
        return correlation
    corr = getattr(source, "corr", None)  # a BootstrapResult (or a DataFrame of samples)
    if callable(corr) and not _is_square_frame(source):
        return corr()
    return source


def _is_square_frame(source: Any) -> bool:
    return hasattr(source, "index") and list(getattr(source, "columns", [])) == list(source.index)


def plot_correlation(source: Any, ax: Any = None, *, title: str = "parameter correlation") -> Any:
    """A heatmap of the parameter correlation matrix, each cell annotated.

    Parameters
    ----------
    source : Covariance, BootstrapResult or pandas.DataFrame
        Its ``correlation``, its ``corr()``, or a correlation matrix.
    ax : matplotlib Axes, optional

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas
    >>> corr = pandas.DataFrame([[1.0, -0.9], [-0.9, 1.0]], index=["a", "b"], columns=["a", "b"])
    >>> figure = plot_correlation(corr)
    >>> [t.get_text() for t in figure.axes[0].texts]
    ['1.00', '-0.90', '-0.90', '1.00']
    >>> import matplotlib.pyplot as plt; plt.close(figure)
    """
    frame = _correlation_frame(source)
    names = [str(name) for name in frame.columns]
    values = np.asarray(frame, dtype=float)
    size = 1.2 + 0.7 * len(names)
    figure, ax = _axes(ax, (size + 1.2, size))
    image = ax.imshow(values, cmap="RdBu_r", vmin=-1.0, vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for (i, j), value in np.ndenumerate(values):
        if math.isfinite(value):
            color = "white" if abs(value) > 0.6 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    return figure


def plot_profiles(
    curves: Mapping[str, Any],
    covariance: Any = None,
    axes: Sequence[Any] | None = None,
    *,
    columns: int = 3,
) -> Any:
    """The loss along each parameter (``Fitter.profile()``), the best point marked.

    With a ``covariance`` (``Fitter.covariance()``) the quadratic model of the loss,
    ``best_loss + H_jj (value - best)**2 / 2``, is drawn dashed and the best value +- one
    standard error shaded.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas
    >>> curve = pandas.DataFrame({"value": [0.0, 1.0, 2.0], "loss": [1.0, 0.0, 1.0]})
    >>> curve.attrs.update(best=1.0, best_loss=0.0)
    >>> figure = plot_profiles({"x": curve})
    >>> figure.axes[0].get_xlabel()
    'x'
    >>> import matplotlib.pyplot as plt; plt.close(figure)
    """
    names = list(curves)
    if axes is None:
        import matplotlib.pyplot as plt

        n_cols = max(1, min(columns, len(names)))
        n_rows = math.ceil(len(names) / n_cols)
        figure, grid = plt.subplots(
            n_rows, n_cols, figsize=(4.0 * n_cols, 3.0 * n_rows), squeeze=False
        )
        axes = list(grid.ravel())
        for extra in axes[len(names) :]:
            extra.set_visible(False)
    else:
        axes = list(axes)
        figure = axes[0].figure
    for name, ax in zip(names, axes):
        curve = curves[name]
        ax.plot(curve["value"], curve["loss"], "o-", ms=3, label="loss")
        best = curve.attrs.get("best")
        best_loss = curve.attrs.get("best_loss")
        if best is not None:
            ax.axvline(best, color="grey", ls=":", lw=1)
        if covariance is not None and best is not None and best_loss is not None:
            curvature = float(covariance.hessian.loc[name, name])
            values = np.asarray(curve["value"], dtype=float)
            ax.plot(values, best_loss + 0.5 * curvature * (values - best) ** 2, "--", lw=1,
                    label="quadratic (Hessian)")  # fmt: skip
            error = float(covariance.standard_errors[name])
            if math.isfinite(error):
                ax.axvspan(best - error, best + error, color="C1", alpha=0.15, label="+-1 s.e.")
        ax.set(xlabel=name, ylabel="loss")
    if covariance is not None and names:
        axes[0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def _pick_reference(arguments: Mapping[str, Any]) -> str:
    candidates = [key for key in arguments if "ref" in key.lower()]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot tell which bound loss argument is the reference (the arguments are "
            f"{sorted(arguments)}); pass reference= (a name, or a function of the row)"
        )
    return candidates[0]


def _values(value: Any) -> np.ndarray:
    return np.atleast_1d(np.asarray(value, dtype=float)).ravel()


def parity_data(
    table: Any,
    computed: str | Callable[[Mapping[str, Any]], Any],
    reference: str | Callable[[Any], Any] | None = None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(term name, computed values, reference values)`` for each term of a contributions
    table that has both (others are left out).

    ``computed`` is a quantity name or a function of the term's quantities; ``reference`` a
    keyword bound to the term's loss (default: the only one whose name contains ``ref``) or a
    function of the table's row.

    Examples
    --------
    >>> import pandas
    >>> table = pandas.DataFrame({"name": ["T=100", "T=200"],
    ...     "quantities": [{"B": -180.0}, {"B": -45.0}],
    ...     "loss_arguments": [{"b_ref": -183.0}, {"b_ref": -47.0}]})
    >>> [(name, c.tolist(), r.tolist()) for name, c, r in parity_data(table, "B")]
    [('T=100', [-180.0], [-183.0]), ('T=200', [-45.0], [-47.0])]
    """
    data = []
    for _, row in table.iterrows():
        quantities = row.get("quantities")
        if not isinstance(quantities, Mapping):
            continue
        try:
            values = computed(quantities) if callable(computed) else quantities[computed]
        except (KeyError, TypeError):
            continue
        if callable(reference):
            expected = reference(row)
        else:
            arguments = row.get("loss_arguments") or {}
            if not arguments:
                continue
            key = reference if reference is not None else _pick_reference(arguments)
            if key not in arguments:
                continue
            expected = arguments[key]
        values, expected = _values(values), _values(expected)
        if values.shape != expected.shape:
            raise ValueError(
                f"term {row['name']!r}: {values.size} computed values but {expected.size} "
                "reference values; pass computed= or reference= functions that match"
            )
        data.append((str(row["name"]), values, expected))
    if not data:
        raise ValueError(
            "no term has both the computed quantity and a reference; check computed= and "
            "reference= against fitter.contributions()[['quantities', 'loss_arguments']]"
        )
    return data


def plot_parity(
    source: Any,
    computed: str | Callable[[Mapping[str, Any]], Any],
    reference: str | Callable[[Any], Any] | None = None,
    ax: Any = None,
    *,
    unit: str = "",
    legend: bool | None = None,
) -> Any:
    """Computed against reference quantities at the best parameters, with the line y = x.

    Parameters
    ----------
    source : Fitter or pandas.DataFrame
        A fitter after a fit (its ``contributions()``) or such a table.
    computed, reference
        See :func:`parity_data`.
    ax : matplotlib Axes, optional
    unit : str
        Appended to the axis labels.
    legend : bool, optional
        One colour per term with a legend; default when there are at most 10 terms.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import pandas
    >>> table = pandas.DataFrame({"name": ["a", "b"], "quantities": [{"E": 1.0}, {"E": 2.1}],
    ...                           "loss_arguments": [{"E_ref": 1.1}, {"E_ref": 2.0}]})
    >>> figure = plot_parity(table, "E", unit="eV")
    >>> figure.axes[0].get_xlabel()
    'reference E (eV)'
    >>> import matplotlib.pyplot as plt; plt.close(figure)
    """
    table = source.contributions() if hasattr(source, "contributions") else source
    data = parity_data(table, computed, reference)
    figure, ax = _axes(ax, (4.5, 4.5))
    legend = len(data) <= 10 if legend is None else legend
    for index, (name, values, expected) in enumerate(data):
        ax.plot(expected, values, "o", ms=4, color=f"C{index % 10}" if legend else "C0",
                label=name if legend else None)  # fmt: skip
    everything = np.concatenate([np.concatenate([v, e]) for _, v, e in data])
    low, high = float(np.nanmin(everything)), float(np.nanmax(everything))
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "k--", lw=1)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_aspect("equal")
    what = computed if isinstance(computed, str) else "quantity"
    suffix = f" ({unit})" if unit else ""
    ax.set(xlabel=f"reference {what}{suffix}", ylabel=f"computed {what}{suffix}")
    if legend:
        ax.legend(fontsize=8)
    return figure
