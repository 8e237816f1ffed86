"""fit_nevergrad(resume=True): a fit that was stopped, interrupted, failed or finished goes on.

The evaluations so far are kept and told to the new optimizer, the evaluation count and the
step numbers go on, and ``fitter.result`` covers the whole session (issue 11, point 4).
"""

from __future__ import annotations

import logging
import math
import threading

import pytest

from chemfit.exceptions import FitInterrupted
from chemfit.fitter import Fitter
from chemfit.fitter_callbacks import JSONLinesHistory
from tests.helpers import fitter_objectives as h

BOUNDS = {"x": (-4.0, 4.0), "y": (-4.0, 4.0)}


def quad_fitter(objective=h.quadratic, **kwargs) -> Fitter:
    return Fitter(objective, {"x": 0.0, "y": 0.0}, bounds=BOUNDS, **kwargs)


def best_unpenalised(history) -> float:
    return min((r.loss for r in history if not r.penalised), default=math.inf)


def run_in_thread(func, *args, **kwargs) -> dict:
    """Run ``func`` in a background thread, as the dashboard runs a fit; return its outcome."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["value"] = func(*args, **kwargs)
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="fit", daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the fit thread did not end"
    return outcome


def assert_continues(result, before, new_records) -> None:
    """``result`` is ``before`` plus ``new_records``: one history, counts and times that go on."""
    n_before = len(before.history)
    assert list(result.history[:n_before]) == list(before.history)
    assert list(result.history[n_before:]) == new_records
    assert [r.index for r in result.history] == list(range(len(result.history)))
    steps = [r.step for r in result.history]
    assert steps == sorted(steps)
    assert new_records[0].step == before.history[-1].step + 1
    assert new_records[0].time >= before.history[-1].time
    assert result.n_evals == before.n_evals + len(new_records)
    assert result.best_loss <= before.best_loss
    assert result.best_loss == best_unpenalised(result.history)
    assert result.wall_time >= before.wall_time


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("num_workers", "mode"), [(1, "batch"), (2, "batch"), (2, "async")])
def test_start_after_stop_continues_the_fit(num_workers, mode, caplog):
    """The dashboard's pattern: the fit runs in a background thread, Stop calls request_stop()
    from another thread, and Start runs fit_nevergrad(resume=True) in a new thread."""
    fitter = quad_fitter(h.slow_quadratic)
    steps: list[int] = []
    fitter.register_callback(lambda step, ctxs: steps.append(step))
    options = {"optimizer_str": "OnePlusOne", "num_workers": num_workers, "mode": mode}
    stopper = h.stop_after(fitter, 6)
    outcome = run_in_thread(fitter.fit_nevergrad, budget=500, **options)
    stopper.join(5)
    assert "error" not in outcome, outcome
    before = fitter.result
    assert before.stopped and 6 <= before.n_evals < 500
    steps_before = list(steps)

    fitter.evaluation_callbacks.clear()
    new_records = []
    fitter.register_evaluation_callback(new_records.append)
    with caplog.at_level(logging.INFO, logger="chemfit"):
        outcome = run_in_thread(fitter.fit_nevergrad, budget=12, resume=True, **options)
    assert "error" not in outcome, outcome
    result = fitter.result
    assert len(new_records) == 12  # the callbacks see the new evaluations only
    assert_continues(result, before, new_records)
    assert not result.stopped and result.n_observations == 0
    assert f"told {len(before.history)} initial observations" in caplog.text
    # told, not started again: the initial point is not evaluated a second time
    assert all(r.parameters != {"x": 0.0, "y": 0.0} for r in new_records)
    assert steps[: len(steps_before)] == steps_before
    assert steps == list(range(len(steps)))  # the step callbacks' steps go on too


@pytest.mark.timeout(60)
def test_stop_twice_then_resume_keeps_every_part():
    fitter = quad_fitter(h.slow_quadratic)
    first = h.stop_after(fitter, 4)
    fitter.fit_nevergrad(budget=300, optimizer_str="OnePlusOne")
    first.join(5)
    part1 = fitter.result
    fitter.evaluation_callbacks.clear()
    second = h.stop_after(fitter, 4)
    fitter.fit_nevergrad(budget=300, optimizer_str="OnePlusOne", resume=True)
    second.join(5)
    part2 = fitter.result
    assert part2.stopped and part2.n_evals == len(part2.history) > part1.n_evals
    fitter.evaluation_callbacks.clear()
    fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne", resume=True)
    result = fitter.result
    assert not result.stopped
    assert result.n_evals == len(result.history) == part2.n_evals + 5
    assert list(result.history[: part1.n_evals]) == list(part1.history)
    assert result.wall_time >= part2.wall_time >= part1.wall_time


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_resume_after_an_interrupt(mode):
    objective = h.InterruptOnce(at=9)
    fitter = quad_fitter(objective)
    with pytest.raises(FitInterrupted):
        fitter.fit_nevergrad(budget=40, optimizer_str="OnePlusOne", num_workers=2, mode=mode)
    before = fitter.result
    assert before.interrupted and before.n_evals >= 6
    new_records = []
    fitter.register_evaluation_callback(new_records.append)
    fitter.fit_nevergrad(
        budget=10, optimizer_str="OnePlusOne", num_workers=2, mode=mode, resume=True
    )
    result = fitter.result
    assert not result.interrupted and result.error is None  # describes the last part
    assert len(new_records) == 10
    assert_continues(result, before, new_records)


@pytest.mark.timeout(60)
def test_resume_after_a_failed_fit():
    calls = []

    def fails_once(params):
        calls.append(params)
        if len(calls) == 5:
            raise ZeroDivisionError("boom")
        return h.quadratic(params)

    fitter = quad_fitter(fails_once, log_exceptions=False)
    with pytest.raises(ZeroDivisionError):
        fitter.fit_nevergrad(budget=30, optimizer_str="OnePlusOne")
    before = fitter.result
    assert before.error.startswith("ZeroDivisionError") and before.n_evals == 4
    new_records = []
    fitter.register_evaluation_callback(new_records.append)
    fitter.fit_nevergrad(budget=8, optimizer_str="OnePlusOne", resume=True)
    assert fitter.result.error is None
    assert_continues(fitter.result, before, new_records)


@pytest.mark.timeout(60)
def test_resume_after_fit_scipy_replays_its_evaluations(caplog):
    fitter = quad_fitter()
    fitter.fit_scipy(method="Nelder-Mead", options={"maxiter": 5})
    before = fitter.result
    assert before.backend == "scipy" and before.n_evals > 5
    new_records = []
    fitter.register_evaluation_callback(new_records.append)
    with caplog.at_level(logging.INFO, logger="chemfit"):
        fitter.fit_nevergrad(budget=10, optimizer_str="TwoPointsDE", resume=True, seed=1)
    result = fitter.result
    assert f"told {before.n_evals} initial observations" in caplog.text
    assert (result.backend, result.optimizer, result.converged) == (
        "nevergrad",
        "TwoPointsDE",
        None,
    )
    assert_continues(result, before, new_records)


@pytest.mark.timeout(60)
def test_resume_without_a_previous_result_is_a_fresh_fit():
    fresh, resumed = quad_fitter(), quad_fitter()
    fresh.fit_nevergrad(budget=15, optimizer_str="OnePlusOne", seed=2)
    resumed.fit_nevergrad(budget=15, optimizer_str="OnePlusOne", seed=2, resume=True)

    def untimed(history):
        return [(r.index, r.step, r.parameters, r.loss) for r in history]

    assert untimed(resumed.result.history) == untimed(fresh.result.history)
    assert resumed.result.n_evals == 15


@pytest.mark.timeout(60)
def test_resume_false_starts_a_new_fit():
    fitter = quad_fitter()
    fitter.fit_nevergrad(budget=10, optimizer_str="OnePlusOne", seed=2)
    fitter.fit_nevergrad(budget=6, optimizer_str="OnePlusOne", seed=2)
    assert fitter.result.n_evals == len(fitter.result.history) == 6


@pytest.mark.timeout(90)
@pytest.mark.parametrize("optimizer", ["CMA", "NgIohTuned"])
def test_resume_with_an_optimizer_that_cannot_learn_continues_from_the_best(optimizer, caplog):
    """CMA drops told points and NgIohTuned (the default) may run scipy: the earlier
    evaluations are kept and counted, and the fit goes on from the best point so far, with an
    INFO line (resume asked for nothing else, so no WARNING)."""
    fitter = quad_fitter()
    fitter.fit_nevergrad(budget=12, optimizer_str="OnePlusOne", seed=0)
    before = fitter.result
    new_records = []
    fitter.register_evaluation_callback(new_records.append)
    with caplog.at_level(logging.INFO, logger="chemfit"):
        fitter.fit_nevergrad(budget=10, optimizer_str=optimizer, resume=True, seed=0)
    result = fitter.result
    assert_continues(result, before, new_records)
    if "kept but not told" in caplog.text:
        assert new_records[0].parameters == before.best_parameters
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    else:  # this optimizer choice learns from told points
        assert f"told {before.n_evals} initial observations" in caplog.text
    if optimizer == "CMA":
        assert "kept but not told" in caplog.text


@pytest.mark.timeout(60)
def test_resume_with_initial_observations_tells_both(caplog):
    """Observations given with resume=True are told after the earlier evaluations and counted
    as observations; the previous fit's own observations stay counted and can stay the best."""
    fitter = quad_fitter()
    best_point = {"x": 1.0, "y": -2.0}  # the minimum: better than any evaluation
    fitter.fit_nevergrad(
        budget=8, optimizer_str="OnePlusOne", initial_observations=[(best_point, 0.0)]
    )
    before = fitter.result
    assert before.n_observations == 1 and before.best_loss == 0.0
    more = [({"x": 2.0, "y": 2.0}, h.quadratic({"x": 2.0, "y": 2.0}))]
    new_records = []
    fitter.register_evaluation_callback(new_records.append)
    with caplog.at_level(logging.INFO, logger="chemfit"):
        fitter.fit_nevergrad(
            budget=6, optimizer_str="OnePlusOne", initial_observations=more, resume=True
        )
    result = fitter.result
    assert "told 9 initial observations" in caplog.text  # 8 evaluations + 1 observation
    assert result.n_observations == 2 and result.n_evals == 14
    assert result.best_loss == 0.0 and result.best_parameters == best_point
    assert len(new_records) == 6 and result.history[8:].to_list() == [
        r.to_dict() for r in new_records
    ]


@pytest.mark.timeout(60)
def test_resume_keeps_the_best_meta():
    def with_meta(params, ctx):
        ctx.meta["x"] = params["x"]
        return h.quadratic(params)

    fitter = quad_fitter(with_meta)
    fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", seed=0)
    before = fitter.result
    fitter.objective_function.wrap_me = lambda p, ctx: before.best_loss + 1.0  # all worse
    fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne", resume=True)
    result = fitter.result
    assert result.best_loss == before.best_loss
    assert result.best_parameters == before.best_parameters
    assert result.best_meta == before.best_meta == {"x": before.best_parameters["x"]}


@pytest.mark.timeout(60)
def test_resume_with_other_parameters_raises_and_keeps_the_result():
    fitter = quad_fitter()
    fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne")
    before = fitter.result
    fitter.initial_parameters = {"x": 0.0, "z": 0.0}
    fitter.bounds = {}
    with pytest.raises(ValueError, match=r"fitted the parameters \['x', 'y'\].*resume=False"):
        fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne", resume=True)
    assert fitter.result is before


@pytest.mark.timeout(30)
def test_a_failed_start_leaves_the_result_as_it_was():
    fitter = quad_fitter()
    fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne")
    before = fitter.result
    with pytest.raises(ValueError, match="OnePlusOne"):
        fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOen", resume=True)
    with pytest.raises(TypeError, match="resume must be True or False"):
        fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne", resume="yes")
    assert fitter.result is before


@pytest.mark.timeout(60)
def test_resume_appends_to_a_jsonl_history(tmp_path):
    path = tmp_path / "fit.jsonl"
    fitter = quad_fitter()
    fitter.register_evaluation_callback(JSONLinesHistory(path))
    fitter.fit_nevergrad(budget=7, optimizer_str="OnePlusOne")
    fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne", resume=True)
    lines = path.read_text().splitlines()
    assert len(lines) == 12  # each evaluation once, in order
    from chemfit.results import FitHistory

    assert FitHistory.from_jsonl(path) == fitter.result.history
