"""Terms that resample their own data points, for ``bootstrap(..., resample="points")``.

The default bootstrap draws whole terms of a combined objective with replacement. A term that
holds many data points (arrays of reference data) can say how to draw *its points* instead: it
defines ``resample(rng) -> term``, returning a new term of the same kind whose points are drawn
with replacement using the :class:`numpy.random.Generator` ``rng`` (see
:class:`ResamplableTerm`). With ``resample="points"`` every term of the objective is replaced
by its resample, weights unchanged, in each refit.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.labels import term_labels

__all__ = ["ResamplableTerm", "missing_resample", "resample_terms", "resampled_objective"]


@runtime_checkable
class ResamplableTerm(Protocol):
    """A term of a combined objective that draws its own data points with replacement.

    ``resample(rng)`` returns a new term (the term itself stays unchanged) with as many points
    as it holds, drawn with replacement by ``rng``, a :class:`numpy.random.Generator`. The term
    is called as any term (``term(parameters)`` or ``term(parameters, ctx)``). Resample ``i`` of
    a bootstrap seed always gets the same ``rng`` draws, so a draw is reproducible and an
    interrupted bootstrap continues with the same resamples.

    Examples
    --------
    A straight line ``y = a + b x`` fitted to arrays of points:

    >>> import numpy as np
    >>> class Line:
    ...     def __init__(self, x, y):
    ...         self.x, self.y = np.asarray(x, float), np.asarray(y, float)
    ...     def __call__(self, p):
    ...         return float(np.sum((self.y - p["a"] - p["b"] * self.x) ** 2))
    ...     def resample(self, rng):
    ...         drawn = rng.integers(0, len(self.x), len(self.x))
    ...         return Line(self.x[drawn], self.y[drawn])
    >>> line = Line([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    >>> isinstance(line, ResamplableTerm), len(line.resample(np.random.default_rng(0)).x)
    (True, 3)

    Fitted, and bootstrapped over its points:

    >>> from chemfit.fitting.fitter import Fitter
    >>> rng = np.random.default_rng(1)
    >>> x = np.linspace(0.0, 4.0, 30)
    >>> fitter = Fitter(CombinedObjectiveFunction([Line(x, 1 + 2 * x + rng.normal(0, 0.3, 30))]),
    ...                 {"a": 0.0, "b": 0.0})
    >>> _ = fitter.fit_scipy()
    >>> result = fitter.bootstrap(10, seed=0, budget=150, resample="points")
    >>> result.parameters.shape, result.resample, bool(0.01 < result.std()["b"] < 0.2)
    ((10, 2), 'points', True)
    """

    def resample(self, rng: np.random.Generator) -> Any:
        """A new term with the data points drawn with replacement by ``rng``."""
        ...


def _resampler(term: Any) -> Any:
    """What defines ``resample``: the term, or the function a plain callable was wrapped in."""
    if isinstance(term, ResamplableTerm):
        return term
    inner = getattr(term, "func", None)  # a WrappedObjectiveFunctor around a plain callable
    return inner if isinstance(inner, ResamplableTerm) else None


def missing_resample(cob: CombinedObjectiveFunction) -> list[str]:
    """The labels of the terms that cannot resample their points (no ``resample`` method).

    Examples
    --------
    >>> missing_resample(CombinedObjectiveFunction([lambda p: 1.0, lambda p: 2.0]))
    ['term 0', 'term 1']
    """
    labels = term_labels(cob)
    return [
        f"{label}"
        for label, term in zip(labels, cob.objective_functions)
        if _resampler(term) is None
    ]


def resample_terms(terms: Sequence[Any], rng: np.random.Generator) -> list[Any]:
    """Each term's resample, drawn in term order from ``rng``.

    A wrapped plain callable is resampled inside its wrapper, which keeps its bound arguments
    and static meta.

    Examples
    --------
    >>> class Mean:
    ...     def __init__(self, y):
    ...         self.y = np.asarray(y, float)
    ...     def __call__(self, p):
    ...         return float(np.sum((self.y - p["m"]) ** 2))
    ...     def resample(self, rng):
    ...         return Mean(rng.choice(self.y, len(self.y)))
    >>> cob = CombinedObjectiveFunction([Mean([1.0, 2.0, 3.0])])
    >>> [type(t).__name__ for t in resample_terms(cob.objective_functions, np.random.default_rng(0))]
    ['WrappedObjectiveFunctor']
    """
    resampled = []
    for term in terms:
        if isinstance(term, ResamplableTerm):
            resampled.append(term.resample(rng))
        else:
            wrapper = copy.copy(term)
            wrapper.func = term.func.resample(rng)
            resampled.append(wrapper)
    return resampled


def resampled_objective(
    cob: CombinedObjectiveFunction, seed: int, index: int
) -> CombinedObjectiveFunction:
    """Resample ``index`` of ``seed``: every term replaced by its resample, weights kept.

    Examples
    --------
    >>> class Points:
    ...     def __init__(self, y):
    ...         self.y = list(y)
    ...     def __call__(self, p):
    ...         return sum((v - p["m"]) ** 2 for v in self.y)
    ...     def resample(self, rng):
    ...         return Points(rng.choice(self.y, len(self.y)).tolist())
    >>> cob = CombinedObjectiveFunction([Points([1.0, 2.0, 3.0])], weights=[2.0])
    >>> one = resampled_objective(cob, 0, 4)
    >>> one({"m": 0.0}) == resampled_objective(cob, 0, 4)({"m": 0.0}), one.weights
    (True, [2.0])
    """
    new = cob.select(slice(None))
    new.objective_functions = resample_terms(
        cob.objective_functions, np.random.default_rng([int(seed), int(index)])
    )
    return new
