"""FitResult.diagnostics: covariance, bootstrap and profiles kept with the fit, JSON and resume."""

from __future__ import annotations

import json

import numpy as np
import pandas
import pytest

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.fitting.diagnostics import BootstrapResult, Covariance
from chemfit.fitting.fitter import Fitter
from chemfit.fitting.results import FitResult
from tests.helpers.diagnostics_objectives import SquaredResidual, linear_problem


def _assert_same_diagnostics(again: dict, kept: dict) -> None:
    assert sorted(again) == sorted(kept) == ["bootstrap", "covariance", "profile"]
    cov, cov2 = kept["covariance"], again["covariance"]
    assert isinstance(cov2, Covariance)
    for name in ("matrix", "correlation", "hessian"):
        pandas.testing.assert_frame_equal(getattr(cov2, name), getattr(cov, name))
    for name in ("standard_errors", "parameters", "steps"):
        pandas.testing.assert_series_equal(getattr(cov2, name), getattr(cov, name))
    assert (cov2.loss, cov2.sigma2, cov2.n_residuals) == (cov.loss, cov.sigma2, cov.n_residuals)
    assert (cov2.at_bound, cov2.warnings) == (cov.at_bound, cov.warnings)
    boot, boot2 = kept["bootstrap"], again["bootstrap"]
    assert isinstance(boot2, BootstrapResult)
    pandas.testing.assert_frame_equal(boot2.parameters, boot.parameters)
    pandas.testing.assert_series_equal(boot2.losses, boot.losses)
    assert (boot2.counts, boot2.seed, boot2.budget, boot2.optimizer) == (
        boot.counts,
        boot.seed,
        boot.budget,
        boot.optimizer,
    )
    assert (boot2.resample, boot2.requested) == (boot.resample, boot.requested)
    assert sorted(again["profile"]) == sorted(kept["profile"]) == ["a", "b"]
    for name, curve in kept["profile"].items():
        pandas.testing.assert_frame_equal(again["profile"][name], curve)
        assert again["profile"][name].attrs == curve.attrs


@pytest.mark.timeout(120)
def test_a_result_with_all_three_round_trips_through_json():
    fitter = linear_problem(n=12).fitted()
    cov = fitter.covariance()
    boot = fitter.bootstrap(4, budget=40, seed=1)
    fitter.profile("a", points=5)
    curves = fitter.profile("b", points=4)  # merged with the profile of a
    kept = fitter.result.diagnostics
    assert kept["covariance"] is cov and kept["bootstrap"] is boot
    assert kept["profile"]["b"] is curves["b"] and len(kept["profile"]["a"]) == 5
    text = json.dumps(fitter.result.to_dict(), allow_nan=False)
    again = FitResult.from_dict(json.loads(text))
    _assert_same_diagnostics(again.diagnostics, kept)
    assert again == fitter.result
    # and once more: what was read back writes the same data
    assert json.dumps(again.to_dict(), allow_nan=False) == text


@pytest.mark.timeout(120)
def test_a_resumed_fit_keeps_them_and_a_new_fit_starts_without():
    fitter = linear_problem(n=10).fitted()
    fitter.covariance()
    fitter.bootstrap(3, budget=30, seed=0)
    fitter.profile(points=3)
    kept = dict(fitter.result.diagnostics)
    fitter.fit_nevergrad(budget=8, optimizer_str="OnePlusOne", resume=True)
    assert sorted(fitter.result.diagnostics) == sorted(kept)
    assert all(fitter.result.diagnostics[key] is value for key, value in kept.items())
    # also a resumed fit read back from JSON
    restored = FitResult.from_dict(json.loads(json.dumps(fitter.result.to_dict())))
    fitter.result = restored
    fitter.fit_nevergrad(budget=4, optimizer_str="OnePlusOne", resume=True)
    _assert_same_diagnostics(fitter.result.diagnostics, kept)
    fitter.fit_nevergrad(budget=4, optimizer_str="OnePlusOne")  # not resumed
    assert fitter.result.diagnostics == {}
    assert fitter.result.to_dict()["diagnostics"] == {}


class Tripwire:
    """A :class:`SquaredResidual` that raises ``KeyboardInterrupt`` on call number ``at``."""

    calls = 0
    at: int | None = None

    def __init__(self, x: float, y: float) -> None:
        self.residual = SquaredResidual(x, y)

    def __call__(self, parameters: dict) -> float:
        Tripwire.calls += 1
        if Tripwire.at is not None and Tripwire.calls == Tripwire.at:
            raise KeyboardInterrupt
        return self.residual(parameters)


def _term_calls(records: list[dict]) -> int:
    return sum(r["n_evals"] * sum(count > 0 for count in r["counts"]) for r in records)


@pytest.mark.timeout(120)
def test_an_interrupted_bootstrap_continues_from_the_result_without_a_file():
    problem = linear_problem(n=8)
    cob = CombinedObjectiveFunction([Tripwire(x, y) for x, y in zip(problem.x, problem.y)])
    fitter = Fitter(cob, {"a": 0.0, "b": 0.0})
    fitter.fit_scipy(method="L-BFGS-B")
    reference = fitter.bootstrap(6, budget=40, seed=4)
    assert reference.complete
    # interrupt the fourth refit: each of its evaluations calls the terms drawn
    first_three = _term_calls(reference.records[:3])
    Tripwire.calls, Tripwire.at = 0, first_three + 5
    try:
        with pytest.raises(KeyboardInterrupt):
            fitter.bootstrap(6, budget=40, seed=4)
    finally:
        Tripwire.at = None
    held = fitter.result.diagnostics["bootstrap"]
    assert len(held) == 3 and held.requested == 6 and not held.complete
    np.testing.assert_allclose(held.parameters, reference.parameters.iloc[:3])
    # kept in the JSON of the result too, and continued from there
    fitter.result = FitResult.from_dict(json.loads(json.dumps(fitter.result.to_dict())))
    Tripwire.calls = 0
    continued = fitter.bootstrap(6, budget=40)  # the seed is the interrupted one's
    missing = _term_calls(reference.records[3:])
    assert Tripwire.calls == missing  # only the three refits that were missing ran
    assert continued.seed == 4 and continued.complete and len(continued) == 6
    pandas.testing.assert_frame_equal(continued.parameters, reference.parameters)
    # a finished bootstrap is not continued: the same call runs all refits again
    Tripwire.calls = 0
    fitter.bootstrap(6, budget=40, seed=4)
    assert Tripwire.calls == first_three + missing
