"""The live plot's "validation" line: a history's validation losses as points to draw.

``Fitter(validation=...)`` keeps ``(record index, validation loss)`` per improvement of the
training loss in ``FitHistory.validation``; :func:`validation_points` turns them into the
evaluation numbers (1-based, the plot's x axis) and losses of the line.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["validation_points"]

_EMPTY = (np.zeros(0), np.zeros(0))


def validation_points(history: Any, shown: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(evaluation numbers, validation losses)`` of ``history.validation``.

    The evaluation number of a record is its position in the history plus one. With
    ``shown``, only the validations of the first ``shown`` records (those the plot has
    converted) are kept.

    Examples
    --------
    >>> from chemfit.fitting.results import EvaluationRecord, FitHistory
    >>> history = FitHistory(EvaluationRecord(i, 0, 0, {"x": 1.0}, 1.0, 1.0, False, None,
    ...                                       None, 0.0) for i in range(5, 9))
    >>> history.validation = [(5, 2.0), (7, 1.5), (8, 1.75)]
    >>> x, y = validation_points(history, shown=3)
    >>> x.tolist(), y.tolist()
    ([1.0, 3.0], [2.0, 1.5])
    """
    pairs = list(getattr(history, "validation", ()))
    if not pairs or not len(history):
        return _EMPTY
    first = history[0].index
    limit = len(history) if shown is None else shown
    kept = [(index - first + 1.0, loss) for index, loss in pairs if 0 <= index - first < limit]
    if not kept:
        return _EMPTY
    x, y = zip(*kept)
    return np.array(x, dtype=float), np.array(y, dtype=float)
