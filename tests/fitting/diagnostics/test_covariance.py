"""Fitter.covariance(): Laplace / Gauss-Newton covariance from a finite-difference Hessian."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.fitting.diagnostics.covariance import Covariance
from chemfit.fitting.fitter import Fitter
from tests.helpers.diagnostics_objectives import linear_problem


@pytest.mark.timeout(120)
def test_linear_least_squares_matches_the_analytic_covariance(executor):
    problem = linear_problem()
    fitter = problem.fitted()
    cov = fitter.covariance(executor=executor)
    np.testing.assert_allclose(cov.parameters, problem.estimate, rtol=1e-5)
    np.testing.assert_allclose(cov.standard_errors, problem.standard_errors, rtol=0.05)
    # in fact much closer: a quadratic loss has an exact central-difference Hessian
    np.testing.assert_allclose(cov.matrix.to_numpy(), problem.covariance, rtol=1e-3)
    expected_corr = problem.covariance[0, 1] / np.prod(problem.standard_errors)
    assert cov.correlation.loc["a", "b"] == pytest.approx(expected_corr, rel=1e-3)
    assert cov.correlation.loc["a", "a"] == pytest.approx(1.0)
    assert cov.positive_definite and cov.at_bound == [] and cov.warnings == []
    assert cov.n_residuals == 40
    assert cov.sigma2 == pytest.approx(cov.loss / 38)
    assert list(cov.matrix.index) == ["a", "b"] and list(cov.standard_errors.index) == ["a", "b"]


@pytest.mark.timeout(60)
def test_known_sigma2_gives_twice_the_inverse_hessian():
    problem = linear_problem()
    cov = problem.fitted().covariance(sigma2=0.25)
    design = np.column_stack([np.ones_like(problem.x), problem.x])
    np.testing.assert_allclose(cov.matrix, 0.25 * np.linalg.inv(design.T @ design), rtol=1e-3)
    assert cov.n_residuals is None


@pytest.mark.timeout(60)
def test_a_parameter_on_its_bound_is_flagged_by_name(caplog):
    problem = linear_problem()
    fitter = problem.fitted(bounds={"b": (None, 0.5)})  # the unbounded estimate is ~0.8
    assert fitter.result.best_parameters["b"] == pytest.approx(0.5)
    with caplog.at_level(logging.WARNING, logger="chemfit.fitting.diagnostics.covariance"):
        cov = fitter.covariance()
    assert cov.at_bound == ["b"]
    assert "'b'" in caplog.text and "sits at a bound" in caplog.text
    assert cov.steps["b"] > 0
    # one-sided differences of a quadratic are still exact: the Hessian is X^T X * 2
    design = np.column_stack([np.ones_like(problem.x), problem.x])
    np.testing.assert_allclose(cov.hessian, 2 * design.T @ design, rtol=1e-4)
    assert "at bounds: ['b']" in repr(cov)


@pytest.mark.timeout(60)
def test_a_flat_direction_is_not_positive_definite(caplog):
    cob = CombinedObjectiveFunction([lambda p: (p["a"] + p["b"] - 1.0) ** 2] * 3)
    fitter = Fitter(cob, {"a": 0.2, "b": 0.1})
    fitter.fit_scipy()
    with caplog.at_level(logging.WARNING):
        cov = fitter.covariance()
    assert not cov.positive_definite
    assert "not positive definite" in caplog.text and "['a', 'b']" in caplog.text


def test_residual_count_errors_say_what_to_pass():
    fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0})
    fitter.fit_scipy()
    with pytest.raises(ValueError, match="pass n_residuals="):
        fitter.covariance()
    assert fitter.covariance(n_residuals=5).standard_errors["x"] >= 0
    one_term = Fitter(CombinedObjectiveFunction([lambda p: p["x"] ** 2 + 1.0]), {"x": 1.0})
    one_term.fit_scipy()
    with pytest.raises(ValueError, match="1 residuals for 1 parameters"):
        one_term.covariance()
    two_terms = Fitter(CombinedObjectiveFunction([lambda p: p["x"] ** 2 + 1.0] * 2), {"x": 1.0})
    two_terms.fit_scipy()
    assert two_terms.covariance().standard_errors["x"] > 0


@pytest.mark.timeout(60)
def test_round_trip_through_json():
    cov = linear_problem().fitted().covariance()
    again = Covariance.from_dict(json.loads(json.dumps(cov.to_dict())))
    np.testing.assert_allclose(again.matrix, cov.matrix)
    np.testing.assert_allclose(again.standard_errors, cov.standard_errors)
    assert again.at_bound == cov.at_bound and again.sigma2 == cov.sigma2
