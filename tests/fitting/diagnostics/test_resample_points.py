"""bootstrap(resample="points"): terms that draw their own data points with replacement."""

from __future__ import annotations

import numpy as np
import pytest

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.labels import term_labels
from chemfit.fitting.diagnostics import ResamplableTerm
from chemfit.fitting.fitter import Fitter
from tests.helpers.diagnostics_objectives import linear_problem


class LinePoints:
    """Arrays of points of ``y = a + b x``: ``sum (y - a - b x)**2``; resamples its points."""

    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x = np.asarray(x, dtype=float)
        self.y = np.asarray(y, dtype=float)

    def __call__(self, parameters: dict) -> float:
        return float(np.sum((self.y - parameters["a"] - parameters["b"] * self.x) ** 2))

    def resample(self, rng: np.random.Generator) -> LinePoints:
        drawn = rng.integers(0, len(self.x), len(self.x))
        return LinePoints(self.x[drawn], self.y[drawn])


def _fitted(cob: CombinedObjectiveFunction) -> Fitter:
    fitter = Fitter(cob, {"a": 0.0, "b": 0.0})
    fitter.fit_scipy(method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-10})
    return fitter


@pytest.mark.timeout(300)
def test_fifty_point_resamples_match_the_analytic_standard_errors():
    problem = linear_problem()
    # two terms, each holding half of the points as arrays
    half = len(problem.x) // 2
    terms = [
        LinePoints(problem.x[:half], problem.y[:half]),
        LinePoints(problem.x[half:], problem.y[half:]),
    ]
    assert all(isinstance(term, ResamplableTerm) for term in terms)
    cob = CombinedObjectiveFunction(terms)  # wraps them: resampled inside the wrappers
    fitter = _fitted(cob)
    np.testing.assert_allclose(
        [fitter.result.best_parameters[k] for k in "ab"], problem.estimate, rtol=1e-5
    )
    result = fitter.bootstrap(50, budget=200, seed=7, resample="points")
    assert result.resample == "points" and result.parameters.shape == (50, 2)
    assert result.counts == [[1, 1]] * 50  # every term kept, points drawn inside each
    assert result.parameters.notna().all().all()
    np.testing.assert_allclose(result.std(), problem.standard_errors, rtol=0.25)
    # reproducible: resample i of a seed is the same draw
    again = fitter.bootstrap(3, budget=200, seed=7, resample="points")
    np.testing.assert_allclose(again.parameters, result.parameters.iloc[:3])


@pytest.mark.timeout(120)
def test_point_resamples_run_on_a_process_pool(executors):
    problem = linear_problem(n=12)
    fitter = _fitted(CombinedObjectiveFunction([LinePoints(problem.x, problem.y)]))
    serial = fitter.bootstrap(4, budget=80, seed=2, resample="points")
    pooled = fitter.bootstrap(
        4, executor=executors["process-pool"], budget=80, seed=2, resample="points"
    )
    np.testing.assert_allclose(pooled.parameters, serial.parameters)
    assert serial.parameters.std().gt(0).all()  # the draws differ between resamples


@pytest.mark.timeout(60)
def test_points_need_every_term_to_define_resample():
    problem = linear_problem(n=6)

    def residual(parameters, x, y):
        return (y - parameters["a"] - parameters["b"] * x) ** 2

    from chemfit.core.wrapping import WrappedObjectiveFunctor

    terms = [LinePoints(problem.x[:3], problem.y[:3])] + [
        WrappedObjectiveFunctor(residual).bind(x=x, y=y)
        for x, y in zip(problem.x[3:5], problem.y[3:5])
    ]
    cob = CombinedObjectiveFunction(terms)
    fitter = _fitted(cob)
    labels = term_labels(cob)
    with pytest.raises(TypeError, match=r"2 of 3 terms do not define it") as raised:
        fitter.bootstrap(3, resample="points")
    assert str([labels[1], labels[2]]) in str(raised.value) and labels[0] not in str(raised.value)
    with pytest.raises(TypeError, match="resample='terms'"):
        fitter.bootstrap(3, resample="points")
    with pytest.raises(ValueError, match="resample must be one of"):
        fitter.bootstrap(3, resample="data")
    assert "bootstrap" not in fitter.result.diagnostics  # nothing ran, nothing kept
    terms_result = fitter.bootstrap(2, budget=30, seed=0)  # resampling terms still works
    assert terms_result.resample == "terms" and len(terms_result) == 2
