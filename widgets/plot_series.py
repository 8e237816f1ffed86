"""The live plot's data: a fit's records turned into growing numpy columns, and their thinning.

:class:`PlotSeries` reads a :class:`~chemfit.fitting.results.FitHistory` incrementally
(``records_since``) into columns of losses, parameter values and per-term losses. The best so
far is the history's: the positions where its ``best()`` changed (``FitHistory.improvements()``).
:func:`thin_indices` picks the points a frame draws of a long history.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .plot_validation import validation_points

__all__ = [
    "Column",
    "PlotSeries",
    "Range",
    "as_float",
    "flat_values",
    "thin_indices",
]

TAIL = 100  # the newest evaluations are always drawn (at most a tenth of the budget)


def as_float(value: Any) -> float:
    """``float(value)``, or NaN when it is not a number.

    Examples
    --------
    >>> as_float("2.5"), as_float(None)
    (2.5, nan)
    """
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def flat_values(parameters: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; not a mapping -> ``{}``.

    Examples
    --------
    >>> flat_values({"lj": {"eps": 0.1}, "k": 2}), flat_values(None)
    ({'lj.eps': 0.1, 'k': 2}, {})
    """
    if not isinstance(parameters, Mapping):
        return {}
    flat: dict[str, Any] = {}
    for key, value in parameters.items():
        if isinstance(value, Mapping):
            flat.update({f"{key}.{k}": v for k, v in flat_values(value).items()})
        else:
            flat[str(key)] = value
    return flat


def term_losses(meta: Any) -> list[float] | None:
    """Per-term losses of a combined objective's meta (full or MPI-summary form).

    Examples
    --------
    >>> term_losses({"children": [{"loss": 1.0}, {}]}), term_losses({"children_losses": [2]})
    ([1.0, nan], [2.0])
    """
    if not isinstance(meta, Mapping):
        return None
    losses = meta.get("children_losses")
    if losses is None:
        children = meta.get("children")
        if not isinstance(children, list) or not children:
            return None
        losses = [child.get("loss") if isinstance(child, Mapping) else None for child in children]
    return [as_float(v) for v in losses]


def meta_term_labels(meta: Any) -> list[str | None] | None:
    """The terms' names or tags from a combined objective's full meta, if any term has one.

    Examples
    --------
    >>> meta_term_labels({"children": [{"meta": {"tag": "fcc"}}, {"meta": {}}]})
    ['fcc', None]
    >>> meta_term_labels({"children_losses": [1.0]}) is None
    True
    """
    children = meta.get("children") if isinstance(meta, Mapping) else None
    if not isinstance(children, list):
        return None
    labels: list[str | None] = []
    for child in children:
        child_meta = child.get("meta") if isinstance(child, Mapping) else None
        label = None
        if isinstance(child_meta, Mapping):
            for key in ("name", "label", "tag"):
                value = child_meta.get(key)
                if isinstance(value, str) and value and value != "tag_None":
                    label = value
                    break
        labels.append(label)
    return labels if any(labels) else None


def nice_ceiling(n: float, smallest: int = 10) -> int:
    """The smallest of ``smallest`` and 1, 2, 5, 10, 20, 50, ... above it that is >= ``n``.

    Examples
    --------
    >>> [nice_ceiling(n) for n in (0, 11, 21, 400, 501)]
    [10, 20, 50, 500, 1000]
    >>> [nice_ceiling(n, smallest=1) for n in (1, 1.5, 3, 7)]
    [1, 2, 5, 10]
    """
    step = 1
    while True:
        for factor in (1, 2, 5):
            value = step * factor
            if value >= smallest and n <= value:
                return value
        step *= 10


def every(count: int, step: int) -> np.ndarray:
    """Positions ``0, step, 2*step, ...`` below ``count``, and always the last one.

    Examples
    --------
    >>> every(10, 4).tolist(), every(0, 3).tolist()
    ([0, 4, 8, 9], [])
    """
    if count <= 0:
        return np.zeros(0, dtype=np.intp)
    picked = np.arange(0, count, max(1, step), dtype=np.intp)
    if picked[-1] != count - 1:
        picked = np.append(picked, count - 1)
    return picked


def thin_indices(
    n: int, budget: int, keep: np.ndarray | None = None, tail: int = TAIL
) -> tuple[np.ndarray, int]:
    """Which of ``n`` points to draw when at most about ``budget`` of them may be drawn.

    Parameters
    ----------
    n : int
        Points available (0-based indices ``0 .. n-1``).
    budget : int
        Points that may be drawn, about.
    keep : array of int, optional
        Indices that are always drawn (e.g. where the best loss improved); thinned too when
        they are more than a quarter of the budget.
    tail : int
        The newest points always drawn (at most a tenth of the budget).

    Returns
    -------
    indices : numpy.ndarray
        Sorted indices to draw.
    stride : int
        Every ``stride``-th point is drawn (1: all of them). Strides are 1-2-5 numbers, so the
        drawn points stay the same from one frame to the next until the stride grows.

    Examples
    --------
    >>> idx, stride = thin_indices(10, 100)
    >>> stride, idx.tolist() == list(range(10))
    (1, True)
    >>> idx, stride = thin_indices(25_000, 1000, keep=np.array([3, 7, 12_345]), tail=20)
    >>> stride, len(idx), idx[:4].tolist(), int(idx[-1])
    (50, 523, [0, 3, 7, 50], 24999)
    """
    if n <= budget:
        return np.arange(n, dtype=np.intp), 1
    tail = max(1, min(tail, budget // 10))
    keep = np.zeros(0, dtype=np.intp) if keep is None else np.asarray(keep, dtype=np.intp)
    if keep.size > budget // 4:
        keep = keep[every(keep.size, math.ceil(keep.size / max(1, budget // 4)))]
    grid = max(1, budget - tail - keep.size)
    stride = nice_ceiling(n / grid, smallest=1)
    parts = [np.arange(0, n, stride, dtype=np.intp), keep, np.arange(n - tail, n, dtype=np.intp)]
    return np.unique(np.concatenate(parts)), stride


class Column:
    """An append-only array (amortised doubling), read as a numpy view.

    Examples
    --------
    >>> column = Column(nan_fill=1)
    >>> column.append(2.0)
    >>> column.values.tolist()
    [nan, 2.0]
    """

    __slots__ = ("array", "size")

    def __init__(self, nan_fill: int = 0, dtype: Any = np.float64) -> None:
        self.array = np.full(max(64, 2 * nan_fill), math.nan if dtype == np.float64 else 0, dtype)
        self.size = nan_fill

    def append(self, value: float) -> None:
        if self.size == self.array.size:
            grown = np.zeros(2 * self.array.size, self.array.dtype)
            grown[: self.size] = self.array
            self.array = grown
        self.array[self.size] = value
        self.size += 1

    @property
    def values(self) -> np.ndarray:
        return self.array[: self.size]


class Range:
    """Running minimum and maximum of the finite values seen.

    Examples
    --------
    >>> span = Range()
    >>> span.empty
    True
    >>> for value in (2.0, -1.0):
    ...     span.add(value)
    >>> span.lo, span.hi
    (-1.0, 2.0)
    """

    __slots__ = ("hi", "lo")

    def __init__(self) -> None:
        self.lo, self.hi = math.inf, -math.inf

    def add(self, value: float) -> None:
        if value < self.lo:
            self.lo = value
        if value > self.hi:
            self.hi = value

    @property
    def empty(self) -> bool:
        return self.lo > self.hi


class PlotSeries:
    """The plot's columns, read incrementally from a fit's ``FitHistory``.

    Parameters
    ----------
    show_parameters : bool or list of str
        ``True``: the first ``max_parameters`` parameters; a list: those flat keys; ``False``.
    max_parameters : int
        Parameter columns kept, at most.
    show_terms : bool
        Keep the per-term losses of a combined objective (from the records' meta).
    max_terms : int
        Term columns kept, at most.

    Examples
    --------
    >>> from chemfit.fitting.results import EvaluationRecord, FitHistory
    >>> def rec(i, loss):
    ...     return EvaluationRecord(i, 0, 0, {"x": float(i)}, loss, loss, False, None, None, 0.0)
    >>> history = FitHistory([rec(0, 3.0), rec(1, 5.0), rec(2, 1.0)])
    >>> series = PlotSeries(True, 4, True, 8)
    >>> series.convert(history)
    >>> series.best_at.values.tolist(), series.loss.values.tolist(), series.best_loss
    ([0, 2], [3.0, 5.0, 1.0], 1.0)
    """

    def __init__(
        self,
        show_parameters: bool | list[str],
        max_parameters: int,
        show_terms: bool,
        max_terms: int,
    ) -> None:
        self.show_parameters, self.max_parameters = show_parameters, max_parameters
        self.show_terms, self.max_terms = show_terms, max_terms
        self.converted = 0  # records of the history turned into columns
        self.loss = Column()
        self.loss_range = Range()
        self.best_at = Column(dtype=np.intp)  # 0-based positions where the best loss improved
        self.param_keys: list[str] | None = None
        self.params: dict[str, Column] = {}
        self.param_ranges: dict[str, Range] = {}
        self.terms: list[Column] = []
        self.n_terms = 0  # the most terms seen in one record (may exceed max_terms)
        self.meta_labels: list[str | None] | None = None
        self.n_penalised = 0  # failed and lost ones included
        self.fault_at = Column(dtype=np.intp)  # 0-based positions of failed or lost evaluations
        self.n_failed = 0
        self.n_lost = 0
        self.validation = validation_points(None)  # (evaluation numbers, validation losses)

    def set_parameter_keys(self, keys: list[str]) -> None:
        """Choose the parameter columns (before or at the first record that has them)."""
        if self.show_parameters is False:
            chosen: list[str] = []
        elif self.show_parameters is True:
            chosen = keys[: self.max_parameters]
        else:
            chosen = [k for k in self.show_parameters if k in keys][: self.max_parameters]
        self.param_keys = chosen
        for key in chosen:
            self.params[key] = Column(nan_fill=self.loss.size)
            self.param_ranges[key] = Range()

    def convert(self, history: Any) -> None:
        """Turn the records ``history`` got since the last call into column data."""
        start = self.converted
        # records_since takes an index; a fit resumed from a file numbers on from its records
        first = history[0].index if start and len(history) else 0
        records = history.records_since(first + start)
        for record in records:
            self._convert_one(record)
        self.converted = start + len(records)
        for position in history.improvements()[self.best_at.size :]:  # where best() changed
            if position >= self.converted:
                break
            self.best_at.append(position)
        self.validation = validation_points(history, self.converted)  # Fitter(validation=...)

    def _convert_one(self, record: Any) -> None:
        status = getattr(record, "status", "ok")
        if status in ("failed", "lost"):  # no loss at all: a marker, never a plausible point
            self.fault_at.append(self.loss.size)
            self.n_failed += status == "failed"
            self.n_lost += status == "lost"
        loss = float(record.loss)
        if record.penalised or not math.isfinite(loss):
            self.n_penalised += bool(record.penalised)
            loss = math.nan
        else:
            self.loss_range.add(loss)
        flat = flat_values(record.parameters)
        if self.param_keys is None and flat:
            self.set_parameter_keys(list(flat))
        self.loss.append(loss)
        for key in self.param_keys or ():
            value = as_float(flat.get(key))
            self.params[key].append(value)
            if math.isfinite(value):
                self.param_ranges[key].add(value)
        if self.show_terms:
            self._convert_terms(record.meta)

    def _convert_terms(self, meta: Any) -> None:
        losses = term_losses(meta)
        if losses is not None:
            if len(losses) > self.n_terms:
                self.n_terms = len(losses)
                self.meta_labels = meta_term_labels(meta) or self.meta_labels
            while len(self.terms) < min(len(losses), self.max_terms):
                self.terms.append(Column(nan_fill=self.loss.size - 1))
        for number, series in enumerate(self.terms):
            value = math.nan
            if losses is not None and number < len(losses):
                value = losses[number]
            series.append(value)

    @property
    def best_loss(self) -> float | None:
        """The best loss of the records converted, or None."""
        return float(self.loss.values[self.best_at.values[-1]]) if self.best_at.size else None

    def best_so_far(self) -> np.ndarray:
        """The best loss so far at each evaluation (NaN before the first finite one)."""
        best = np.full(self.loss.size, math.nan)
        at = self.best_at.values
        if at.size:
            steps = np.searchsorted(at, np.arange(self.loss.size), side="right") - 1
            known = steps >= 0
            best[known] = self.loss.values[at[steps[known]]]
        return best

    def data(self) -> dict:
        """The columns as numpy arrays (copies); see :meth:`LivePlot.data`."""
        loss = self.loss.values.copy()
        return {
            "index": np.arange(1, loss.size + 1),
            "loss": loss,
            "best": self.best_so_far(),
            "parameters": {k: v.values.copy() for k, v in self.params.items()},
            "terms": [t.values.copy() for t in self.terms],
            "n_penalised": self.n_penalised,
            "faults": self.fault_at.values + 1,
            "n_failed": self.n_failed,
            "n_lost": self.n_lost,
            "validation_index": self.validation[0].copy(),
            "validation": self.validation[1].copy(),
        }
