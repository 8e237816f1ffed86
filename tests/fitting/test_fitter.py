"""Tests of chemfit.fitter: nevergrad, scipy and hand-driven fits, parallel workers and errors."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import pytest

from chemfit.exceptions import UnknownOptimizerError, WorkerLostError
from chemfit.fitter import Fitter, FitterEvaluateContext, FitterObjectiveFunctor
from chemfit.fitter_callbacks import JSONLinesHistory, load_observations
from chemfit.results import EvaluationRecord, FitResult
from tests.helpers import fitter_objectives as h

LOGGER = "chemfit.fitting.fitter"


def quad_fitter(**kwargs) -> Fitter:
    return Fitter(h.quadratic, {"x": 0.0, "y": 0.0}, **kwargs)


def record_steps(fitter: Fitter, n_steps: int = 1) -> list[int]:
    steps: list[int] = []
    fitter.register_callback(lambda step, ctxs: steps.append(step), n_steps=n_steps)
    return steps


# -- recovering known parameters -------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("optimizer", "budget"), [("OnePlusOne", 150), ("NGOpt", 60), ("TwoPointsDE", 200)]
)
def test_nevergrad_recovers_quadratic_minimum(optimizer, budget):
    # NGOpt also guards the numpy<2.4 pin (its metamodel breaks on numpy 2.4).
    fitter = quad_fitter(bounds={"x": (-4.0, 4.0), "y": (-4.0, 4.0)})
    params = fitter.fit_nevergrad(budget=budget, optimizer_str=optimizer, seed=3)
    assert params["x"] == pytest.approx(1.0, abs=0.1)
    assert params["y"] == pytest.approx(-2.0, abs=0.1)
    assert all(type(v) is float for v in params.values())
    assert fitter.result.n_evals == budget
    assert fitter.result.best_loss < 0.01


@pytest.mark.timeout(60)
def test_nevergrad_recovers_lennard_jones_parameters():
    fitter = Fitter(h.lj_loss, h.LJ_START, bounds=h.LJ_BOUNDS)
    params = fitter.fit_nevergrad(budget=150, optimizer_str="OnePlusOne", seed=1)
    assert params["lj"]["eps"] == pytest.approx(h.EPS_TRUE, rel=0.02)
    assert params["lj"]["sigma"] == pytest.approx(h.SIGMA_TRUE, rel=0.01)
    best = fitter.result.best_parameters
    assert best["lj"]["eps"] == pytest.approx(h.EPS_TRUE, rel=0.02)
    assert fitter.result.history[0].parameters == h.LJ_START  # the initial point comes first


@pytest.mark.timeout(30)
def test_scipy_recovers_lennard_jones_parameters_with_bounds():
    fitter = Fitter(h.lj_loss, h.LJ_START, bounds=h.LJ_BOUNDS)
    params = fitter.fit_scipy()
    assert params["lj"]["eps"] == pytest.approx(h.EPS_TRUE, rel=1e-3)
    assert params["lj"]["sigma"] == pytest.approx(h.SIGMA_TRUE, rel=1e-3)
    result = fitter.result
    assert result.backend == "scipy" and result.optimizer == "L-BFGS-B"
    assert result.converged is True
    assert result.n_evals == len(result.history) > 0
    assert result.best_loss == min(r.loss for r in result.history)


@pytest.mark.timeout(30)
def test_scipy_without_bounds():
    fitter = quad_fitter()
    params = fitter.fit_scipy(method="BFGS")
    assert params == pytest.approx(h.QUAD_MIN, abs=1e-4)
    assert all(type(v) is float for v in params.values())


@pytest.mark.timeout(30)
def test_scipy_one_sided_bounds():
    lower_only = Fitter(h.shifted_square, {"x": 3.0}, bounds={"x": (2.0, None)})
    assert lower_only.fit_scipy()["x"] == pytest.approx(2.0, abs=1e-6)
    assert min(r.parameters["x"] for r in lower_only.result.history) >= 2.0
    upper_only = Fitter(h.shifted_square, {"x": -3.0}, bounds={"x": (None, 0.5)})
    assert upper_only.fit_scipy(method="Nelder-Mead")["x"] == pytest.approx(0.5, abs=1e-3)
    assert max(r.parameters["x"] for r in upper_only.result.history) <= 0.5


@pytest.mark.timeout(30)
def test_nevergrad_one_sided_bounds_are_respected():
    fitter = Fitter(h.shifted_square, {"x": 3.0}, bounds={"x": (2.0, None)})
    params = fitter.fit_nevergrad(budget=60, optimizer_str="OnePlusOne", seed=0)
    assert min(r.parameters["x"] for r in fitter.result.history) >= 2.0
    assert params["x"] == pytest.approx(2.0, abs=0.2)


@pytest.mark.timeout(30)
def test_scipy_non_convergence_logs_a_warning(caplog):
    fitter = Fitter(h.lj_loss, h.LJ_START, bounds=h.LJ_BOUNDS)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fitter.fit_scipy(options={"maxiter": 1})
    assert fitter.result.converged is False
    assert any("did not converge" in r.getMessage() for r in caplog.records)


# -- the hand-driven loop ---------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_init_ask_tell_finish_by_hand():
    fitter = quad_fitter()
    steps = record_steps(fitter)
    records: list[EvaluationRecord] = []
    fitter.register_evaluation_callback(records.append)
    fitter.init(num_workers=2)
    assert fitter.ask([]) == []
    assert fitter.ask([{"x": 0.0, "y": 0.0}, {"x": 1.0, "y": -1.0}]) == [5.0, 1.0]
    fitter.tell()
    assert fitter.ask({"x": 1.0, "y": -2.5}, context_index=1) == 0.25
    fitter.tell()
    assert steps == [0, 1]
    assert [(r.index, r.step, r.worker) for r in records] == [(0, 0, 0), (1, 0, 1), (2, 1, 1)]
    assert fitter.finish() == {"x": 1.0, "y": -2.5}
    result = fitter.result
    assert result.backend == "ask-tell" and result.n_evals == 3 and result.best_loss == 0.25
    assert len(result.history) == 3
    with pytest.raises(RuntimeError, match="init"):
        fitter.ask({"x": 0.0, "y": 0.0})  # the session ended


def test_ask_before_init_raises():
    with pytest.raises(RuntimeError, match=r"init\(\)"):
        quad_fitter().ask({"x": 0.0, "y": 0.0})


def test_ask_rejects_more_candidates_than_workers():
    fitter = quad_fitter()
    fitter.init(num_workers=1)
    with pytest.raises(ValueError, match="num_workers=1"):
        fitter.ask([{"x": 0.0, "y": 0.0}, {"x": 1.0, "y": 0.0}])
    fitter.close()


def test_finish_without_evaluation_raises():
    fitter = quad_fitter()
    fitter.init()
    with pytest.raises(RuntimeError, match="no evaluation"):
        fitter.finish()


def test_finish_with_explicit_parameters_returns_floats():
    fitter = quad_fitter()
    fitter.init()
    fitter.ask({"x": 0.0, "y": 0.0})
    assert fitter.finish({"x": np.float32(1), "y": 2}) == {"x": 1.0, "y": 2.0}
    assert fitter.result.parameters == {"x": 1.0, "y": 2.0}
    assert fitter.result.best_parameters == {"x": 0.0, "y": 0.0}


def test_init_validates_workers_and_contexts():
    fitter = quad_fitter()
    with pytest.raises(ValueError, match="num_workers"):
        fitter.init(num_workers=0)
    with pytest.raises(ValueError, match="contexts"):
        fitter.init(num_workers=2, contexts=[FitterEvaluateContext()])


def test_an_unfinished_fitter_releases_its_pool_when_collected():
    fitter = quad_fitter()
    fitter.init(num_workers=2)
    pool = fitter._session.owned_executor
    del fitter
    gc.collect()
    assert pool._shutdown


@pytest.mark.timeout(30)
def test_serialising_objective_is_reported(caplog):
    fitter = Fitter(h.SerialisingObjective(), {"x": 0.0, "y": 0.0})
    with caplog.at_level(logging.INFO, logger=LOGGER):
        fitter.fit_nevergrad(budget=4, optimizer_str="OnePlusOne", num_workers=2)
    assert any("serialised" in r.getMessage() for r in caplog.records)
    assert fitter.result.n_evals == 4


def test_close_shuts_down_the_owned_pool():
    fitter = quad_fitter()
    fitter.init(num_workers=2)
    pool = fitter._session.owned_executor
    fitter.close()
    assert pool._shutdown


# -- parallel workers and R1 ------------------------------------------------------------------


def check_best_from_workers(fitter: Fitter, budget: int, worker_pids: bool) -> None:
    result = fitter.result
    assert result.n_evals == budget == len(result.history)
    assert sum(ctx.n_evals for ctx in fitter.contexts) == budget
    assert all(ctx.opt_loss is not None for ctx in fitter.contexts)
    assert result.best_loss == min(r.loss for r in result.history)
    assert result.best_loss == min(ctx.opt_loss for ctx in fitter.contexts)
    best_ctx = min(fitter.contexts, key=lambda c: c.opt_loss)
    assert best_ctx.opt_meta["x"] == best_ctx.opt_params["x"]
    assert best_ctx.opt_quantities == {"y": best_ctx.opt_params["y"]}
    assert result.best_meta == best_ctx.opt_meta
    if worker_pids:
        assert all(r.meta["pid"] != os.getpid() for r in result.history)
        assert result.best_meta["pid"] != os.getpid()
    assert {r.worker for r in result.history} == {0, 1}


@pytest.mark.timeout(60)
def test_two_workers_with_threads():
    fitter = Fitter(h.MetaObjective(), {"x": 0.0, "y": 0.0})
    fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", num_workers=2, seed=1)
    check_best_from_workers(fitter, 20, worker_pids=False)


@pytest.mark.timeout(60)
def test_two_workers_with_a_process_pool():
    fitter = Fitter(h.MetaObjective(), {"x": 0.0, "y": 0.0})
    with ProcessPoolExecutor(2) as pool:
        fitter.fit_nevergrad(
            budget=12, optimizer_str="OnePlusOne", num_workers=2, executor=pool, seed=1
        )
        assert pool.submit(int, "3").result() == 3  # a user's executor is never shut down
    check_best_from_workers(fitter, 12, worker_pids=True)


@pytest.mark.timeout(60)
def test_two_workers_with_loky_batch_and_async():
    loky = pytest.importorskip("loky")
    pool = loky.get_reusable_executor(max_workers=2)
    for mode in ("batch", "async"):
        fitter = Fitter(h.MetaObjective(), {"x": 0.0, "y": 0.0})
        fitter.fit_nevergrad(
            budget=12, optimizer_str="OnePlusOne", num_workers=2, executor=pool, mode=mode
        )
        check_best_from_workers(fitter, 12, worker_pids=True)


@pytest.mark.timeout(60)
def test_lost_worker_keeps_history_and_sets_error(tmp_path):
    fitter = Fitter(h.crash_after_three, {"x": 0.0, "y": 0.0})
    steps = record_steps(fitter)
    fitter.register_evaluation_callback(JSONLinesHistory(tmp_path / "fit.jsonl"))
    with ProcessPoolExecutor(2) as pool, pytest.raises(WorkerLostError):
        fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", num_workers=2, executor=pool)
    result = fitter.result
    assert result.error.startswith("WorkerLostError")
    assert steps == [0, 1, 2] and len(result.history) == 6
    assert math.isfinite(result.best_loss)
    observations = load_observations(tmp_path / "fit.jsonl")
    assert len(observations) == 6
    resumed = Fitter(h.quadratic, {"x": 0.0, "y": 0.0})
    resumed.fit_nevergrad(budget=4, optimizer_str="OnePlusOne", initial_observations=observations)
    assert resumed.result.n_observations == 6 and resumed.result.n_evals == 4


# -- seeds and async mode ---------------------------------------------------------------------


def history_values(fitter: Fitter) -> list:
    return [(r.step, r.worker, r.parameters, r.loss) for r in fitter.result.history]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("optimizer", ["OnePlusOne", "TwoPointsDE"])
def test_same_seed_reproduces_history(optimizer):
    runs = []
    for seed in (11, 11, 12):
        fitter = quad_fitter(bounds={"x": (-5.0, 5.0)})
        params = fitter.fit_nevergrad(budget=16, optimizer_str=optimizer, num_workers=2, seed=seed)
        runs.append((params, history_values(fitter)))
    assert runs[0] == runs[1]
    assert runs[0][1] != runs[2][1]
    assert fitter.result.seed == 12


@pytest.mark.timeout(30)
def test_async_with_one_worker_is_batch():
    histories = []
    for mode in ("batch", "async"):
        fitter = quad_fitter()
        fitter.fit_nevergrad(budget=15, optimizer_str="OnePlusOne", seed=5, mode=mode)
        histories.append(history_values(fitter))
        assert fitter.result.mode == mode
    assert histories[0] == histories[1]


@pytest.mark.timeout(30)
def test_async_tells_results_as_they_arrive():
    fitter = Fitter(h.slow_initial, {"x": 0.0, "y": 0.0})
    steps = record_steps(fitter)
    fitter.fit_nevergrad(budget=9, optimizer_str="OnePlusOne", num_workers=2, mode="async")
    history = fitter.result.history
    assert len(history) == fitter.result.n_evals == 9
    initial = [r.index for r in history if r.parameters == {"x": 0.0, "y": 0.0}]
    assert initial and initial[0] > 0  # the slow first evaluation was overtaken
    assert [r.step for r in history] == [i // 2 for i in range(9)]
    assert steps == [0, 1, 2, 3, 4]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_error_ends_the_fit_with_every_finished_evaluation_kept(mode):
    """The evaluations that finished beside the failing one are in the history, so the best
    reported is the best recorded (both modes; async once lost them in a race)."""
    for seed in range(5):
        fitter = Fitter(h.fails_for_negative, {"x": 1.0}, bounds={"x": (-3.0, 3.0)})
        with pytest.raises(ValueError, match="negative"):
            fitter.fit_nevergrad(
                budget=200, optimizer_str="OnePlusOne", num_workers=2, mode=mode, seed=seed
            )
        result = fitter.result
        assert result.error.startswith("ValueError: negative")
        assert result.best_loss == min(r.loss for r in result.history)
        assert len(result.history) == result.n_evals  # every counted evaluation is recorded


# -- budget and steps (R17) -------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_budget_is_exact_and_steps_are_consecutive():
    fitter = quad_fitter()
    every_step = record_steps(fitter)
    even_steps = record_steps(fitter, n_steps=2)
    fitter.fit_nevergrad(budget=7, optimizer_str="OnePlusOne", num_workers=3)
    history = fitter.result.history
    assert [r.step for r in history] == [0, 0, 0, 1, 1, 1, 2]
    assert [r.index for r in history] == list(range(7))
    assert every_step == [0, 1, 2] and even_steps == [0, 2]
    assert history[0].parameters == {"x": 0.0, "y": 0.0}


@pytest.mark.timeout(30)
def test_scipy_steps_are_iterations():
    fitter = Fitter(h.lj_loss, h.LJ_START, bounds=h.LJ_BOUNDS)
    steps = record_steps(fitter)
    fitter.fit_scipy()
    assert steps == list(range(len(steps))) and len(steps) > 2
    record_steps_seen = [r.step for r in fitter.result.history]
    assert record_steps_seen == sorted(record_steps_seen)
    assert record_steps_seen[-1] <= len(steps)
    assert fitter.result.n_evals > len(steps)  # steps are iterations, not evaluations


def test_callbacks_run_in_registration_order_with_contexts():
    calls = []
    fitter = quad_fitter()
    fitter.register_callback(lambda step, ctxs: calls.append(("a", step, len(ctxs))))
    fitter.register_callback(lambda step, ctxs: calls.append(("b", step, len(ctxs))))
    fitter.init(num_workers=1)
    fitter.ask({"x": 0.0, "y": 0.0})
    fitter.tell(step=4)
    fitter.tell()
    fitter.finish()
    assert calls == [("a", 4, 1), ("b", 4, 1), ("a", 5, 1), ("b", 5, 1)]


# -- contract errors --------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_unknown_optimizer_lists_closest_names():
    counter = h.CountingObjective()
    fitter = Fitter(counter, {"x": 0.0, "y": 0.0})
    with pytest.raises(UnknownOptimizerError) as info:
        fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOn")
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
    assert "OnePlusOne" in str(info.value) and str(info.value).startswith("optimizer_str")
    assert counter.calls == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget": 0}, "budget"),
        ({"budget": 5, "num_workers": 0}, "num_workers"),
        ({"budget": 5, "num_workers": 2, "contexts": [FitterEvaluateContext()]}, "contexts"),
        ({"budget": 5, "mode": "steady"}, "mode"),
    ],
)
def test_fit_nevergrad_argument_errors(kwargs, match):
    counter = h.CountingObjective()
    with pytest.raises(ValueError, match=match):
        Fitter(counter, {"x": 0.0, "y": 0.0}).fit_nevergrad(optimizer_str="OnePlusOne", **kwargs)
    assert counter.calls == 0


@pytest.mark.parametrize(
    ("params", "bounds", "error", "match"),
    [
        ({"a.b": 1.0}, None, ValueError, "'a.b'"),
        ({"a": 1.0}, {"b": (0.0, 2.0)}, ValueError, "bounds key 'b' is not a parameter"),
        ({"a": 1.0}, {"a": (2.0, 2.0)}, ValueError, "lower >= upper"),
        ({"a": 1.0}, {"a": (0.0,)}, ValueError, r"\(lower, upper\) pair"),
        ({"a": 1.0}, {"a": ("0", 2.0)}, TypeError, "lower bound of 'a'"),
        (
            {"a": {"b": 5.0}},
            {"a": {"b": (0.0, 2.0)}},
            ValueError,
            r"'a\.b' is 5\.0.*\(0\.0, 2\.0\)",
        ),
        ([("a", 1.0)], None, TypeError, "initial_params must be"),
        ({"a": "1.0"}, None, TypeError, r"initial_params\['a'\] must be a real number"),
        ({"a": 1.0}, [("a", (0, 1))], TypeError, "bounds must be"),
    ],
)
def test_parameter_and_bounds_validation(params, bounds, error, match):
    with pytest.raises(error, match=match):
        Fitter(h.quadratic, params, bounds=bounds)


@pytest.mark.timeout(30)
def test_out_of_bounds_initial_value_fails_before_any_evaluation():
    counter = h.CountingObjective()
    fitter = Fitter(counter, {"x": 0.0, "y": 0.0}, bounds={"x": (-1.0, 1.0), "y": (None, 0.0)})
    fitter.initial_parameters["y"] = 0.5
    with pytest.raises(ValueError, match=r"'y' is 0\.5.*\(None, 0\.0\)"):
        fitter.fit_scipy()
    with pytest.raises(ValueError, match="'y'"):
        fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne")
    assert counter.calls == 0
    fitter.initial_parameters["y"] = 0.0  # on the bound is inside (inclusive)
    fitter.fit_nevergrad(budget=3, optimizer_str="OnePlusOne")
    assert counter.calls == 3


def test_fit_scipy_rejects_bounds_and_callback_keywords():
    fitter = quad_fitter()
    with pytest.raises(TypeError, match=r"Fitter\(bounds=\.\.\.\)"):
        fitter.fit_scipy(bounds=[(0, 1), (0, 1)])
    with pytest.raises(TypeError, match="register_callback"):
        fitter.fit_scipy(callback=print)


def test_fit_scipy_rejects_a_method_that_ignores_bounds():
    counter = h.CountingObjective()
    fitter = Fitter(counter, {"x": 0.0, "y": 0.0}, bounds={"x": (-1.0, 1.0)})
    for method in ("BFGS", "CG"):
        with pytest.raises(ValueError, match=f"method '{method}' ignores bounds"):
            fitter.fit_scipy(method=method)
    assert counter.calls == 0
    fitter.fit_scipy(method="Nelder-Mead")  # supports bounds
    assert counter.calls > 0


@pytest.mark.parametrize(
    ("method", "closest"),
    [
        ("L-BFGS", "(closest names: L-BFGS-B, BFGS);"),
        ("lbfgsb", "closest names: L-BFGS-B"),
        ("Nelder Mead", "(closest names: Nelder-Mead);"),
        ("SLSQ", "(closest names: SLSQP);"),
        ("simplex", "is not a scipy.optimize.minimize method; valid methods: Nelder-Mead, "),
    ],
)
def test_fit_scipy_checks_the_method_name_first(method, closest):
    """A misspelt method fails before anything runs (no bounds warning from scipy, no
    evaluation), naming the value, the closest names and the valid ones."""
    import warnings

    counter = h.CountingObjective()
    fitter = Fitter(counter, {"x": 0.0, "y": 0.0}, bounds={"x": (-1.0, 1.0)})
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ValueError) as info:
        warnings.simplefilter("always")
        fitter.fit_scipy(method=method)
    message = str(info.value)
    assert message.startswith(f"method {method!r} is not a scipy.optimize.minimize method")
    assert closest in message and "trust-constr" in message and "a callable" in message
    assert caught == [] and counter.calls == 0 and fitter.result is None


@pytest.mark.timeout(30)
def test_fit_scipy_method_names_ignore_case_and_custom_minimizers_work():
    from scipy.optimize import OptimizeResult

    fitter = quad_fitter(bounds={"x": (-4.0, 4.0), "y": (-4.0, 4.0)})
    fitter.fit_scipy(method="nelder-mead")
    assert fitter.result.best_loss < 1e-3 and fitter.result.optimizer == "nelder-mead"

    def coordinate_grid(fun, x0, args=(), bounds=None, callback=None, **options):
        """A custom minimizer: the best of a coarse grid inside the bounds."""
        grid = np.linspace(-3.0, 3.0, 13)
        best = min((fun(np.array([a, b])), (a, b)) for a in grid for b in grid)
        return OptimizeResult(x=np.array(best[1]), fun=best[0], success=True, nit=1)

    params = fitter.fit_scipy(method=coordinate_grid)
    assert params == {"x": 1.0, "y": -2.0} and fitter.result.optimizer == "coordinate_grid"
    with pytest.raises(TypeError, match="method must be the name of a scipy"):
        fitter.fit_scipy(method=3)


@pytest.mark.parametrize("n_steps", [0, -1, 1.5, True])
def test_register_callback_rejects_bad_n_steps(n_steps):
    with pytest.raises(ValueError, match="n_steps"):
        quad_fitter().register_callback(print, n_steps=n_steps)


# -- losses: R3, R4 ---------------------------------------------------------------------------


def test_losses_are_sanitised_with_warnings(caplog):
    fitter = Fitter(h.value_by_index, {"x": 0.0}, value_bad_params=1e5)
    fitter.init()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        told = [fitter.ask({"x": float(i)}) for i in range(len(h.BAD_VALUES))]
    fitter.tell()
    assert told == [3.0, 2.5, 1.5] + [1e5] * 7
    assert all(type(v) is float for v in told)
    text = "\n".join(r.getMessage() for r in caplog.records)
    for fragment in ("NoneType", "str", "complex", "shape (2,)", "nan", "inf"):
        assert fragment in text
    assert sum(1 for r in caplog.records if r.levelno == logging.WARNING) == 7
    fitter.finish()
    history = fitter.result.history
    assert [r.penalised for r in history] == [False] * 3 + [True] * 7
    assert [r.raw_loss for r in history][:7] == [3.0, 2.5, 1.5, None, None, None, None]
    assert math.isnan(history[7].raw_loss) and history[8].raw_loss == math.inf
    assert fitter.result.best_loss == 1.5 and fitter.contexts[0].opt_loss == 1.5


@pytest.mark.timeout(30)
def test_non_finite_loss_is_never_the_best():
    fitter = Fitter(h.always_nan, {"x": 0.0})
    params = fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne")
    assert fitter.result.best_loss == math.inf
    assert fitter.contexts[0].opt_loss is None and fitter.contexts[0].n_evals == 5
    assert all(r.loss == 1e5 and r.penalised for r in fitter.result.history)
    assert set(params) == {"x"}


def test_post_process_return_value_counts_and_tracks():
    functor = FitterObjectiveFunctor(h.quadratic, value_bad_params=7.0)
    ctx = FitterEvaluateContext()
    assert functor.post_process_return_value({"x": 1}, np.float64(2.0), ctx) == 2.0
    assert functor.post_process_return_value({"x": 2}, "oops", ctx) == 7.0
    assert ctx.n_evals == 2 and ctx.opt_loss == 2.0 and ctx.opt_params == {"x": 1}


@pytest.mark.timeout(30)
def test_swallowed_exceptions_become_penalties():
    fitter = Fitter(h.fails_for_negative, {"x": 1.0}, swallow_exceptions=True, log_exceptions=False)
    fitter.init()
    assert fitter.ask({"x": -1.0}) == 1e5
    assert fitter.ask({"x": 0.5}) == 0.25
    fitter.tell()
    fitter.finish()
    first = fitter.result.history[0]
    assert first.penalised and first.raw_loss is None
    assert first.error == "ValueError: negative x=-1.0"
    assert fitter.result.best_loss == 0.25


@pytest.mark.timeout(30)
def test_objective_exception_propagates_with_result():
    fitter = Fitter(h.fails_for_negative, {"x": 1.0}, log_exceptions=False)
    fitter.init()
    fitter.ask({"x": 2.0})
    with pytest.raises(ValueError, match="negative"):
        fitter.ask({"x": -2.0})
    fitter.close()
    scipy_fitter = Fitter(h.fails_for_negative, {"x": 1.0}, log_exceptions=False)
    with pytest.raises(ValueError, match="negative"):
        scipy_fitter.fit_scipy(method="Nelder-Mead", options={"initial_simplex": [[-1.0], [2.0]]})
    assert scipy_fitter.result.error.startswith("ValueError: negative")
    assert scipy_fitter.result.interrupted is False


# -- contexts: R6, R7, and plain callables ----------------------------------------------------


@pytest.mark.timeout(30)
def test_no_meta_leak_between_evaluations():
    fitter = Fitter(h.leaky_meta, {"x": 1.0})
    fitter.fit_nevergrad(budget=30, optimizer_str="OnePlusOne", seed=2)
    for record in fitter.result.history:
        assert ("positive" in record.meta) == (record.parameters["x"] > 0)
        assert record.meta["x"] == record.parameters["x"]
    ctx = fitter.contexts[0]
    assert ("positive" in ctx.opt_meta) == (ctx.opt_params["x"] > 0)
    assert ctx.opt_params["x"] < 0  # the minimum is at -0.5


def test_opt_fields_and_records_are_deep_copies():
    fitter = Fitter(h.leaky_meta, {"x": 1.0})
    fitter.init()
    fitter.ask({"x": 1.0})
    fitter.tell()
    fitter.finish()
    ctx = fitter.contexts[0]
    ctx.opt_meta["items"].append("mutated")
    ctx.meta["items"].append("mutated too")
    assert fitter.result.best_meta["items"] == [1.0]
    assert fitter.result.history[0].meta["items"] == [1.0]
    assert ctx.opt_meta is not fitter.result.best_meta


def test_context_state_round_trips():
    ctx = FitterEvaluateContext()
    ctx.n_evals, ctx.opt_loss, ctx.opt_params = 4, 0.5, {"x": 1.0}
    ctx.opt_meta, ctx.opt_quantities = {"m": 1}, {"q": 2}
    copy_ = pickle.loads(pickle.dumps(ctx))
    assert (copy_.n_evals, copy_.opt_loss, copy_.opt_quantities) == (4, 0.5, {"q": 2})
    target = FitterEvaluateContext()
    target.apply_result_state(ctx.to_result_state())
    target.meta["stale"] = True
    target.reset()
    assert target.meta == {} and target.n_evals == 4 and target.opt_meta == {"m": 1}


def test_plain_callable_with_ctx_receives_it():
    seen = []

    def objective(params, ctx):
        seen.append(type(ctx).__name__)
        ctx.meta["tag"] = "called"
        return params["x"] ** 2

    fitter = Fitter(objective, {"x": 2.0})
    fitter.init()
    assert fitter.ask({"x": 3.0}) == 9.0
    fitter.tell()
    assert seen == ["FitterEvaluateContext"]
    assert fitter.result is None
    fitter.finish()
    assert fitter.result.history[0].meta == {"tag": "called"}
    assert fitter.value_bad_params == 1e5


def test_record_meta_false_keeps_no_meta():
    fitter = Fitter(h.leaky_meta, {"x": 1.0})
    fitter.fit_nevergrad(budget=3, optimizer_str="OnePlusOne", record_meta=False)
    assert all(r.meta is None for r in fitter.result.history)
    assert "x" in fitter.result.best_meta


# -- R13: clean-up on errors and interrupts ---------------------------------------------------


@pytest.mark.timeout(30)
def test_callback_error_aborts_and_closes_the_owned_pool():
    fitter = quad_fitter()
    pools = []

    def failing(step, ctxs):
        pools.append(fitter._session.owned_executor)
        if step == 1:
            raise RuntimeError("callback failed")

    fitter.register_callback(failing)
    with pytest.raises(RuntimeError, match="callback failed"):
        fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", num_workers=2)
    assert pools[0] is not None and pools[0]._shutdown
    assert fitter.result.error == "RuntimeError: callback failed"
    assert len(fitter.result.history) == 4
    assert fitter.result.best_loss == min(r.loss for r in fitter.result.history)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_evaluation_callback_error_keeps_every_result_of_its_step(mode):
    fitter = quad_fitter()
    seen = []

    def failing(record):
        seen.append(record.index)
        if record.index == 2:  # the first record of the second step (batch)
            raise RuntimeError("evaluation callback failed")

    fitter.register_evaluation_callback(failing)
    with pytest.raises(RuntimeError, match="evaluation callback failed"):
        fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", num_workers=2, mode=mode)
    history = fitter.result.history
    # async: the records that finished beside it still reach the callbacks, after the error
    assert seen == [0, 1, 2] if mode == "batch" else seen[:3] == [0, 1, 2]
    # the record after the failing one, told in the same step, is kept
    assert len(history) >= 4 if mode == "batch" else len(history) >= 3
    assert [r.index for r in history] == list(range(len(history)))
    assert fitter.result.error == "RuntimeError: evaluation callback failed"
    assert fitter.result.best_loss == min(r.loss for r in history if not r.penalised)


@pytest.mark.timeout(30)
def test_user_executor_survives_an_error():
    fitter = quad_fitter()
    fitter.register_callback(lambda step, ctxs: 1 / 0)
    with ThreadPoolExecutor(2) as pool:
        with pytest.raises(ZeroDivisionError):
            fitter.fit_nevergrad(budget=6, optimizer_str="OnePlusOne", num_workers=2, executor=pool)
        assert pool.submit(int, "4").result() == 4
    assert fitter.result.error.startswith("ZeroDivisionError")


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("num_workers", "mode"), [(1, "batch"), (2, "batch"), (2, "async")])
def test_keyboard_interrupt_keeps_best_so_far(num_workers, mode):
    fitter = Fitter(h.interrupt_on_third, {"x": 0.0, "y": 0.0})
    pools = []
    fitter.register_callback(lambda step, ctxs: pools.append(fitter._session.owned_executor))
    with pytest.raises(KeyboardInterrupt):
        fitter.fit_nevergrad(
            budget=20, optimizer_str="OnePlusOne", num_workers=num_workers, mode=mode
        )
    result = fitter.result
    assert result.interrupted is True and result.error is None
    assert len(result.history) >= 2 and math.isfinite(result.best_loss)
    if num_workers > 1:
        assert pools[0]._shutdown


# -- observations, progress, near-bound check -------------------------------------------------


@pytest.mark.timeout(30)
def test_initial_observations_are_told_before_the_budget(caplog):
    counter = h.CountingObjective()
    fitter = Fitter(counter, {"x": 0.0, "y": 0.0}, bounds={"x": (-5.0, None)})
    steps = record_steps(fitter)
    records = []
    fitter.register_evaluation_callback(records.append)
    observations = [
        ({"x": 1.0, "y": -2.0}, 0.0),
        ({"x": -6.0, "y": 0.0}, 1.0),  # outside the one-sided bound: skipped
        ({"x": 3.0, "y": 3.0}, None),  # a failed evaluation: told as value_bad_params
    ]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fitter.fit_nevergrad(
            budget=6, optimizer_str="OnePlusOne", initial_observations=iter(observations)
        )
    assert any("skipping initial observation 1" in r.getMessage() for r in caplog.records)
    result = fitter.result
    assert counter.calls == 6 and result.n_evals == 6 and result.n_observations == 2
    assert fitter.contexts[0].n_evals == 8
    assert len(records) == len(result.history) == 6 and steps == list(range(6))
    assert result.best_loss == 0.0 and result.best_parameters == {"x": 1.0, "y": -2.0}


@pytest.mark.timeout(30)
def test_resume_from_a_jsonl_history(tmp_path):
    path = tmp_path / "fit.jsonl"
    first = quad_fitter()
    first.register_evaluation_callback(JSONLinesHistory(path))
    first.fit_nevergrad(budget=10, optimizer_str="OnePlusOne", seed=4)
    second = quad_fitter()
    second.fit_nevergrad(
        budget=5, optimizer_str="OnePlusOne", initial_observations=load_observations(path)
    )
    assert second.result.n_observations == 10
    assert second.result.best_loss <= first.result.best_loss


@pytest.mark.timeout(30)
def test_progress_bar_on_stderr(capsys):
    fitter = quad_fitter()
    fitter.fit_nevergrad(budget=8, optimizer_str="OnePlusOne", progress=True)
    err = capsys.readouterr().err
    assert "8/8" in err and "best=" in err
    fitter.fit_nevergrad(budget=4, optimizer_str="OnePlusOne")  # stderr is not a terminal
    fitter.fit_scipy(progress=False)
    assert capsys.readouterr().err == ""
    fitter.fit_scipy(progress=True)
    assert "best=" in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_near_bound_parameters_are_reported(caplog):
    fitter = Fitter(h.shifted_square, {"x": 3.0}, bounds={"x": (2.0, 4.0)}, near_bound_tol=0.05)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        fitter.fit_scipy()
    assert fitter.problematic_params == [("x", pytest.approx(2.0), 2.0, 4.0)]
    assert fitter.result.problematic_params == fitter.problematic_params
    assert any("parameter = x" in r.getMessage() for r in caplog.records)


# -- the result object ------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_fit_result_fields_and_exports():
    fitter = Fitter(h.lj_loss, h.LJ_START, bounds=h.LJ_BOUNDS)
    params = fitter.fit_nevergrad(budget=12, optimizer_str="OnePlusOne", seed=9)
    result = fitter.result
    assert isinstance(result, FitResult)
    assert result.parameters == params
    assert (result.backend, result.optimizer, result.mode, result.seed) == (
        "nevergrad",
        "OnePlusOne",
        "batch",
        9,
    )
    assert result.converged is None and not result.interrupted and result.error is None
    assert result.n_evals == 12 and result.n_observations == 0 and result.wall_time > 0
    assert fitter.time_fit_end >= fitter.time_fit_start
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["best_loss"] == result.best_loss and len(data["history"]) == 12
    frame = result.to_dataframe()
    assert {"lj.eps", "lj.sigma", "loss", "step"} <= set(frame.columns)
    assert len(frame) == 12
    html = result._repr_html_()
    assert "lj.eps" in html and "best loss" in html
    assert "nevergrad" in repr(result)


@pytest.mark.timeout(240)
def test_resume_with_a_scipy_based_meta_optimizer_does_not_hang(caplog):
    """NgIohTuned (the default) delegates to a scipy minimiser that hangs in nevergrad 1.0 once
    told foreign points: the observations are counted, not told, and the fit restarts from the
    best of them."""
    rng = np.random.default_rng(0)
    bounds = {"x": (-5.0, 5.0), "y": (-5.0, 5.0)}

    def objective(p):
        return (p["x"] - 1.0) ** 2 + (p["y"] + 0.5) ** 2

    observations = []
    for _ in range(60):
        point = {"x": float(rng.uniform(-5, 5)), "y": float(rng.uniform(-5, 5))}
        observations.append((point, objective(point)))
    best_observed = min(loss for _, loss in observations)
    fitter = Fitter(objective, {"x": 0.0, "y": 0.0}, bounds=bounds)
    with caplog.at_level(logging.WARNING, logger="chemfit"):
        fitter.fit_nevergrad(budget=40, initial_observations=observations, seed=0)
    assert "cannot be told earlier observations" in caplog.text
    result = fitter.result
    assert result.n_observations == 60 and result.n_evals == 40
    assert result.history[0].parameters == min(observations, key=lambda o: o[1])[0]
    assert result.best_loss <= best_observed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("optimizer", ["CMA", "OnePlusOne"])
def test_resume_with_cma_restarts_from_the_best_observation(optimizer, caplog):
    """CMA (cma 4 under nevergrad 1.0) silently drops points told before its first ask: the
    Fitter says so and restarts from the best observation; OnePlusOne is told them."""
    rng = np.random.default_rng(1)
    bounds = {k: (-5.0, 5.0) for k in "abc"}

    def objective(p):
        return (p["a"] - 1.3) ** 2 + 3 * (p["b"] + 0.7) ** 2 + 0.5 * (p["c"] - 0.2) ** 2

    observations = []
    for _ in range(10):
        point = {k: float(rng.uniform(-5, 5)) for k in "abc"}
        observations.append((point, objective(point)))
    best_point = min(observations, key=lambda o: o[1])[0]
    fitter = Fitter(objective, {"a": 0.0, "b": 0.0, "c": 0.0}, bounds=bounds)
    with caplog.at_level(logging.INFO, logger="chemfit"):
        fitter.fit_nevergrad(
            budget=20, optimizer_str=optimizer, initial_observations=observations, seed=0
        )
    result = fitter.result
    assert result.n_observations == 10 and result.n_evals == 20
    if optimizer == "CMA":
        assert "drops points told before its first ask" in caplog.text
        assert result.history[0].parameters == best_point
    else:
        assert "told 10 initial observations" in caplog.text
        assert "counted but not told" not in caplog.text


# -- request_stop ------------------------------------------------------------------------------


def _stop_from_another_thread(fitter: Fitter, after_evals: int) -> threading.Thread:
    """A thread that calls ``fitter.request_stop()`` once ``after_evals`` evaluations were told."""
    told = threading.Event()
    count = []

    def on_record(record):
        count.append(record)
        if len(count) >= after_evals:
            told.set()

    fitter.register_evaluation_callback(on_record)

    def stopper():
        if told.wait(30):
            fitter.request_stop()

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    return thread


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("num_workers", "mode"), [(1, "batch"), (2, "batch"), (2, "async")])
def test_request_stop_from_another_thread_ends_the_fit_cleanly(num_workers, mode):
    fitter = Fitter(h.slow_quadratic, {"x": 0.0, "y": 0.0})
    steps = record_steps(fitter)
    thread = _stop_from_another_thread(fitter, after_evals=6)
    params = fitter.fit_nevergrad(
        budget=500, optimizer_str="OnePlusOne", num_workers=num_workers, mode=mode
    )
    thread.join(5)
    result = fitter.result
    assert result.stopped and not result.interrupted and result.error is None
    assert 6 <= result.n_evals < 6 + 4 * num_workers  # the evaluations in flight finish
    assert len(result.history) == result.n_evals  # every evaluation was told and recorded
    assert result.best_loss == min(r.loss for r in result.history)
    assert steps and steps[-1] == result.history[-1].step  # the last step's callbacks ran
    assert set(params) == {"x", "y"}
    assert "stopped=True" in repr(result) and result.to_dict()["stopped"] is True
    # the next fit starts with the request cleared and runs its whole budget
    fitter.evaluation_callbacks.clear()
    fitter.fit_nevergrad(budget=4, optimizer_str="OnePlusOne", num_workers=num_workers)
    assert not fitter.result.stopped and fitter.result.n_evals == 4


@pytest.mark.timeout(60)
def test_request_stop_ends_fit_scipy_with_the_best_point_so_far():
    fitter = Fitter(h.slow_quadratic, {"x": 3.0, "y": 3.0})
    thread = _stop_from_another_thread(fitter, after_evals=5)
    params = fitter.fit_scipy(method="Nelder-Mead", options={"maxiter": 10_000})
    thread.join(5)
    result = fitter.result
    assert result.stopped and result.converged is False and result.error is None
    assert 5 <= result.n_evals <= 8  # the request arrives from another thread
    assert params == result.best_parameters
    assert result.best_loss == min(r.loss for r in result.history)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("method", ["nevergrad", "scipy"])
def test_request_stop_before_a_fit_stops_it_before_its_first_evaluation(method):
    """One stop request (issue 13): made while no fit runs, it stops the next fit before its
    first evaluation, and that fit consumes it; the fit after runs its whole budget."""
    fitter = quad_fitter()
    records = []
    fitter.register_evaluation_callback(records.append)
    fitter.request_stop()
    assert fitter.stop_requested
    if method == "nevergrad":
        params = fitter.fit_nevergrad(budget=6, optimizer_str="OnePlusOne", num_workers=2)
    else:
        params = fitter.fit_scipy(method="Nelder-Mead")
    assert fitter.result.stopped and fitter.result.n_evals == 0 and records == []
    assert set(params) == {"x", "y"} and not fitter.stop_requested
    fitter.fit_nevergrad(budget=6, optimizer_str="OnePlusOne")
    assert not fitter.result.stopped and fitter.result.n_evals == 6


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_stop_requested_while_a_fit_starts_is_not_lost(mode):
    """A Stop pressed while a fit is being started in another thread (the dashboard's Start,
    then Stop at once) stops that fit, before or after its first evaluation (issue 13)."""
    for _ in range(3):
        fitter = Fitter(h.slow_quadratic, {"x": 0.0, "y": 0.0})
        options = {"budget": 500, "optimizer_str": "OnePlusOne", "num_workers": 2, "mode": mode}
        thread = threading.Thread(target=fitter.fit_nevergrad, kwargs=options, daemon=True)
        thread.start()
        fitter.request_stop()
        thread.join(30)
        assert not thread.is_alive()
        result = fitter.result
        assert result.stopped and result.n_evals < 10 and not fitter.stop_requested
        assert len(fitter.history) == result.n_evals


# -- the fit's history and callback handles (issue 13) ----------------------------------------


@pytest.mark.timeout(30)
def test_history_is_the_one_source_of_progress():
    fitter = Fitter(h.leaky_meta, {"x": 1.0})
    seen = []

    def on_step(step, ctxs):
        history = fitter.history
        seen.append((len(history), history.best().loss, sum(c.n_evals for c in ctxs)))

    fitter.register_callback(on_step)
    fitter.fit_nevergrad(budget=12, optimizer_str="OnePlusOne", num_workers=3, seed=1)
    history = fitter.history
    assert history is fitter.result.history and len(history) == 12
    assert [n for n, _, _ in seen] == [3, 6, 9, 12] and all(n == m for n, _, m in seen)
    best = min(history, key=lambda r: r.loss)
    assert history.best() is best and fitter.result.best_loss == best.loss
    assert fitter.result.best_meta == best.meta and fitter.result.best_meta is not best.meta
    for worker, ctx in enumerate(fitter.contexts):
        own = [r for r in history if r.worker == worker]
        assert ctx.n_evals == len(own) == history.count(worker)
        assert ctx.opt_loss == min(r.loss for r in own)
    with pytest.raises(AttributeError, match=r"fitter\.history"):
        fitter.contexts[0].opt_loss = 0.0
    assert [r.index for r in history.records_since(10)] == [10, 11]


@pytest.mark.timeout(30)
def test_initial_observations_count_for_the_history_best():
    fitter = quad_fitter()
    observations = [({"x": 1.0, "y": -0.5}, 0.0), ({"x": 2.0, "y": 2.0}, None)]
    fitter.fit_nevergrad(budget=4, optimizer_str="OnePlusOne", initial_observations=observations)
    best = fitter.history.best()
    assert (best.index, best.step, best.loss) == (-1, -1, 0.0)
    assert fitter.result.best_loss == 0.0 and fitter.result.n_observations == 2
    assert fitter.history.n_observations == 2 and len(fitter.history) == 4
    assert fitter.contexts[0].n_evals == 6 and fitter.contexts[0].opt_params == best.parameters


@pytest.mark.timeout(30)
def test_callbacks_are_removed_by_handle_or_function():
    fitter = quad_fitter()
    records = []

    def on_record(record):
        records.append(record)
        if len(records) == 3:
            fitter.remove_callback(handle)  # from inside a fit

    handle = fitter.register_evaluation_callback(on_record)
    steps = record_steps(fitter)
    fitter.fit_nevergrad(budget=6, optimizer_str="OnePlusOne")
    assert len(records) == 3 and steps == list(range(6))
    assert fitter.evaluation_callbacks == [] and not fitter.remove_callback(handle)
    both = fitter.register_callback(print)
    fitter.register_evaluation_callback(print)
    assert both.n_steps == 1 and both.func is print
    assert fitter.remove_callback(print) and not fitter.remove_callback(print)
    assert len(fitter.callbacks) == 1 and fitter.evaluation_callbacks == []
    twice = [fitter.register_callback(print, n_steps=2) for _ in range(2)]
    assert fitter.remove_callback(twice[1]) and fitter.callbacks[-1] is twice[0].entry


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_process_pool_fit_pickles_each_evaluation_once(mode, monkeypatch):
    """One pickle per evaluation (its context) and one of the objective per fit; the async
    loop submits on the executor itself (no driver threads)."""
    pickled_contexts = []
    getstate = FitterEvaluateContext.__getstate__

    def counting_getstate(self):
        pickled_contexts.append(1)
        return getstate(self)

    monkeypatch.setattr(FitterEvaluateContext, "__getstate__", counting_getstate)
    h.PickleCountingObjective.pickled = 0
    threads = set()
    fitter = Fitter(h.PickleCountingObjective(), {"x": 0.0, "y": 0.0})
    fitter.register_evaluation_callback(
        lambda record: threads.update(t.name for t in threading.enumerate())
    )
    with ProcessPoolExecutor(2) as pool:
        fitter.fit_nevergrad(
            budget=10, optimizer_str="OnePlusOne", num_workers=2, executor=pool, mode=mode
        )
    assert fitter.result.n_evals == 10 and math.isfinite(fitter.result.best_loss)
    assert len(pickled_contexts) == 10
    assert h.PickleCountingObjective.pickled == 1
    assert not any(name.startswith("chemfit-async") for name in threads)
