"""Fitter.bootstrap(): refits on resampled terms, each a task on the executor; resumable."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.fitting.diagnostics.bootstrap import BootstrapResult, RefitTask, resample_counts
from chemfit.fitting.fitter import Fitter
from tests.helpers.diagnostics_objectives import linear_problem


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("executor", ["serial", "process-pool"], indirect=True)
def test_fifty_resamples_match_the_analytic_standard_errors(executor):
    problem = linear_problem()
    # Resampling terms (pairs) estimates the sandwich covariance; for this draw of the noise it
    # is within 5 % of the classical s^2 (X^T X)^-1, so 50 resamples must land within 25 %.
    design = np.column_stack([np.ones_like(problem.x), problem.x])
    residuals = problem.y - design @ problem.estimate
    bread = np.linalg.inv(design.T @ design)
    sandwich = bread @ (design.T * residuals**2) @ design @ bread
    np.testing.assert_allclose(np.sqrt(np.diag(sandwich)), problem.standard_errors, rtol=0.05)
    fitter = problem.fitted()
    result = fitter.bootstrap(50, executor=executor, budget=150, seed=3)
    assert result.parameters.shape == (50, 2) and list(result.parameters) == ["a", "b"]
    np.testing.assert_allclose(result.std(), problem.standard_errors, rtol=0.25)
    analytic_corr = problem.covariance[0, 1] / np.prod(problem.standard_errors)
    assert result.corr().loc["a", "b"] == pytest.approx(analytic_corr, abs=0.15)
    low, high = result.interval("b", level=0.9)
    assert low < problem.estimate[1] < high
    low, high = result.interval(lambda p: p["a"] + 2 * p["b"])
    assert low < problem.estimate[0] + 2 * problem.estimate[1] < high


@pytest.mark.timeout(120)
def test_resamples_are_reproducible_on_any_executor(executors):
    fitter = linear_problem(n=10).fitted()
    serial = fitter.bootstrap(4, budget=40, seed=11)
    pooled = fitter.bootstrap(4, executor=executors["threads"], budget=40, seed=11)
    np.testing.assert_allclose(serial.parameters, pooled.parameters)
    assert serial.counts == [resample_counts(11, i, 10) for i in range(4)]
    options = {"budget": 40, "seed": 11, "optimizer": "OnePlusOne"}
    nevergrad = fitter.bootstrap(4, **options)
    nevergrad_pooled = fitter.bootstrap(4, executor=executors["process-pool"], **options)
    np.testing.assert_array_equal(nevergrad.parameters, nevergrad_pooled.parameters)


@pytest.mark.timeout(120)
def test_an_interrupted_bootstrap_continues_from_its_file(tmp_path, executors):
    fitter = linear_problem(n=10).fitted()
    path = tmp_path / "boot.jsonl"
    first = fitter.bootstrap(3, budget=40, seed=5, path=path)
    with path.open("a") as fh:  # a refit killed while it was written
        fh.write('{"resample": 3, "counts": [1,')
    started = time.perf_counter()
    second = fitter.bootstrap(6, executor=executors["process-pool"], budget=40, path=path)
    assert time.perf_counter() - started < 60
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["format"] == "chemfit-bootstrap" and lines[0]["seed"] == 5
    assert sorted(line["resample"] for line in lines[1:]) == list(range(6))
    assert second.seed == 5 and len(second) == 6
    np.testing.assert_allclose(second.parameters.loc[:2], first.parameters)
    fresh = fitter.bootstrap(6, budget=40, seed=5)
    np.testing.assert_allclose(second.parameters, fresh.parameters)
    with pytest.raises(ValueError, match=r"seed=5.*seed=6"):
        fitter.bootstrap(6, budget=40, seed=6, path=path)


@pytest.mark.timeout(60)
def test_a_bootstrap_continued_after_the_fit_moved_on_says_so(tmp_path, caplog):
    path = tmp_path / "boot.jsonl"
    linear_problem(n=10, seed=2).fitted().bootstrap(2, budget=40, seed=5, path=path)
    moved = linear_problem(n=10, seed=3).fitted()  # same parameters and terms, other best point
    with caplog.at_level("WARNING", logger="chemfit"):
        continued = moved.bootstrap(3, budget=40, path=path)
    assert len(continued) == 3
    assert "the earlier refits started from the best point" in caplog.text
    assert "pass another path=" in caplog.text
    # An interrupted bootstrap held by fitter.result is continued only from the same point.
    best = continued.best.tolist()
    held = BootstrapResult.from_records(
        ["a", "b"], [best[0] + 1.0, best[1]], seed=5, budget=40, optimizer="Nelder-Mead",
        records=[{"resample": 0, "counts": [1] * 10, "parameters": [9.0, 9.0], "loss": 0.0}],
        requested=3,
    )  # fmt: skip
    moved.result.diagnostics["bootstrap"] = held
    again = moved.bootstrap(3, budget=40, seed=5)
    assert again.parameters.loc[0].tolist() != [9.0, 9.0]
    fresh = moved.bootstrap(3, budget=40, seed=5)
    np.testing.assert_allclose(again.parameters, fresh.parameters)


@pytest.mark.timeout(60)
def test_result_is_json_serialisable():
    fitter = linear_problem(n=8).fitted()
    result = fitter.bootstrap(3, budget=30, seed=0)
    again = BootstrapResult.from_dict(json.loads(json.dumps(result.to_dict())))
    np.testing.assert_allclose(again.parameters, result.parameters)
    assert again.counts == result.counts and again.seed == 0
    assert "3 resamples" in repr(again)


@pytest.mark.timeout(60)
def test_refit_weights_follow_the_draws_and_nevergrad_works():
    cob = CombinedObjectiveFunction([lambda p: (p["x"] - 1) ** 2, lambda p: (p["x"] - 4) ** 2])
    task = RefitTask(
        cob, ["x"], [2.0], {"x": (0.0, 5.0)}, budget=100, optimizer="OnePlusOne", seed=3
    )
    resampled = task.resampled([0, 2])
    assert resampled.weights == [2.0] and resampled.n_terms() == 1
    from chemfit.core.context import EvaluateContext

    out = task([1, 2], EvaluateContext())  # minimum of (x-1)^2 + 2 (x-4)^2: x = 3
    assert out["n_evals"] == 100 and abs(out["parameters"][0] - 3.0) < 0.2
    again = task([1, 2], EvaluateContext())
    assert again["parameters"] == out["parameters"]  # the seed makes a refit repeatable


def test_only_combined_objectives_can_be_resampled():
    fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0})
    fitter.fit_scipy()
    with pytest.raises(TypeError, match="resamples the terms of a CombinedObjectiveFunction"):
        fitter.bootstrap(3)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        fitter.bootstrap(0)
