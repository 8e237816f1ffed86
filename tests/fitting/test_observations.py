"""Resuming from a JSON-lines history (issue 15): record numbers go on, failed and lost
evaluations are bad observations, and a history of other parameters is one clear error."""

from __future__ import annotations

import json
import logging
import math

import pytest

from chemfit.fitter import Fitter
from chemfit.fitter_callbacks import JSONLinesHistory, load_observations
from chemfit.fitting.observations import Observations
from chemfit.fitting.results import FitHistory

BOUNDS = {"x": (-4.0, 4.0), "y": (-4.0, 4.0)}
LOGGER = "chemfit"


def quadratic(params):
    return (params["x"] - 1.0) ** 2 + (params["y"] + 0.5) ** 2


def quad_fitter() -> Fitter:
    return Fitter(quadratic, {"x": 0.0, "y": 0.0}, bounds=BOUNDS)


def line(index, params, loss, **extra) -> str:
    return json.dumps({"index": index, "parameters": params, "loss": loss, **extra})


def indices(path) -> list[int]:
    return [record.index for record in FitHistory.from_jsonl(path)]


# -- record numbers go on ---------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("mode", "num_workers"), [("batch", 1), ("batch", 2), ("async", 2)], ids=str
)
def test_a_fit_resumed_from_its_file_numbers_on(tmp_path, mode, num_workers):
    path = tmp_path / "fit.jsonl"
    first = quad_fitter()
    first.register_evaluation_callback(JSONLinesHistory(path))
    first.fit_nevergrad(budget=6, optimizer_str="OnePlusOne", seed=0)

    second = quad_fitter()
    second.register_evaluation_callback(JSONLinesHistory(path))
    observations = load_observations(path)
    assert observations.next_index == 6
    second.fit_nevergrad(
        budget=6,
        optimizer_str="OnePlusOne",
        num_workers=num_workers,
        mode=mode,
        initial_observations=observations,
    )
    assert [r.index for r in second.result.history] == list(range(6, 12))
    assert indices(path) == list(range(12))  # no index twice in the file

    # resume=True on top goes on after both
    second.fit_nevergrad(budget=3, optimizer_str="OnePlusOne", resume=True)
    assert [r.index for r in second.result.history] == list(range(6, 15))
    assert indices(path) == list(range(15))

    # and a third run from the file again
    third = quad_fitter()
    third.register_evaluation_callback(JSONLinesHistory(path))
    third.fit_nevergrad(
        budget=2, optimizer_str="OnePlusOne", initial_observations=load_observations(path)
    )
    assert indices(path) == list(range(17))
    assert third.result.n_observations == 15


@pytest.mark.timeout(60)
def test_resume_true_numbers_on_and_a_plain_list_starts_at_0(tmp_path):
    path = tmp_path / "fit.jsonl"
    fitter = quad_fitter()
    fitter.register_evaluation_callback(JSONLinesHistory(path))
    fitter.fit_nevergrad(budget=4, optimizer_str="OnePlusOne")
    fitter.fit_nevergrad(budget=4, optimizer_str="OnePlusOne", resume=True)
    assert indices(path) == list(range(8))
    # observations that come from no file (a plain list) number the new fit from 0
    fresh = quad_fitter()
    fresh.fit_nevergrad(
        budget=2, optimizer_str="OnePlusOne", initial_observations=list(load_observations(path))
    )
    assert [r.index for r in fresh.result.history] == [0, 1]


def test_next_index_after_gaps_and_lines_without_index(tmp_path):
    path = tmp_path / "fit.jsonl"
    path.write_text(
        line(0, {"x": 1}, 1.0) + "\n" + line(7, {"x": 2}, 2.0) + "\n"
        '{"parameters": {"x": 3}, "loss": 3.0}\n'
    )
    assert load_observations(path).next_index == 8
    path.write_text('{"parameters": {"x": 3}, "loss": 3.0}\n' * 3)
    assert load_observations(path).next_index == 3
    path.write_text("")
    observations = load_observations(path)
    assert observations == [] and observations.next_index == 0
    assert isinstance(observations, Observations) and isinstance(observations, list)


# -- failed and lost evaluations ----------------------------------------------------------------


def test_failed_and_lost_lines_have_no_loss(tmp_path):
    path = tmp_path / "fit.jsonl"
    path.write_text(
        "\n".join(
            [
                line(0, {"x": 1}, 4.0),
                line(1, {"x": 2}, 1e5, status="failed", tries=1, error="ValueError: no"),
                line(2, {"x": 3}, -7.0, status="lost", tries=3),  # even a plausible loss
                line(3, {"x": 4}, 2.0, status="ok"),
            ]
        )
        + "\n"
    )
    assert load_observations(path) == [
        ({"x": 1.0}, 4.0),
        ({"x": 2.0}, None),
        ({"x": 3.0}, None),
        ({"x": 4.0}, 2.0),
    ]


def test_an_unknown_status_names_the_line(tmp_path):
    path = tmp_path / "fit.jsonl"
    path.write_text(line(0, {"x": 1}, 4.0) + "\n" + line(1, {"x": 2}, 1.0, status="odd") + "\n")
    with pytest.raises(ValueError, match=r"line 2: .*status must be one of .*'odd'"):
        load_observations(path)


@pytest.mark.timeout(60)
def test_failed_and_lost_observations_are_told_as_bad_and_never_the_best(tmp_path):
    path = tmp_path / "fit.jsonl"
    path.write_text(
        "\n".join(
            [
                line(0, {"x": 3.0, "y": 3.0}, 11.25),
                line(1, {"x": 1.0, "y": -0.5}, -100.0, status="failed", error="E: boom"),
                line(2, {"x": 1.0, "y": -0.5}, -50.0, status="lost", tries=3),
            ]
        )
        + "\n"
    )
    fitter = quad_fitter()
    fitter.fit_nevergrad(
        budget=1, optimizer_str="OnePlusOne", initial_observations=load_observations(path)
    )
    result = fitter.result
    assert result.n_observations == 3
    assert result.best_loss == pytest.approx(1.25)  # the one evaluation: the start point
    assert result.best_loss >= 0


@pytest.mark.timeout(60)
def test_failed_records_of_a_real_fit_resume_as_bad_observations(tmp_path):
    def sometimes_raises(params):
        if params["x"] > 0.5:
            raise ValueError("the simulator crashed")
        return quadratic(params)

    path = tmp_path / "fit.jsonl"
    fitter = Fitter(sometimes_raises, {"x": 0.0, "y": 0.0}, bounds=BOUNDS)
    fitter.register_evaluation_callback(JSONLinesHistory(path))
    fitter.fit_nevergrad(budget=15, optimizer_str="OnePlusOne", seed=1, on_error="record")
    statuses = [r.status for r in FitHistory.from_jsonl(path)]
    assert "failed" in statuses  # some x > 0.5 were tried
    observations = load_observations(path)
    assert [loss is None for _, loss in observations] == [s != "ok" for s in statuses]

    resumed = Fitter(sometimes_raises, {"x": 0.0, "y": 0.0}, bounds=BOUNDS)
    resumed.register_evaluation_callback(JSONLinesHistory(path))
    resumed.fit_nevergrad(
        budget=5, optimizer_str="OnePlusOne", on_error="record", initial_observations=observations
    )
    assert indices(path) == list(range(20))
    best_ok = min(loss for (params, loss) in observations if loss is not None)
    assert resumed.result.best_loss <= best_ok
    assert resumed.result.best_parameters["x"] <= 0.5


# -- a history of other parameters ------------------------------------------------------------


def write_other_history(path) -> None:
    path.write_text(
        "\n".join(
            [
                line(0, {"x": 0.5, "z": 1.0}, 3.0),
                line(1, {"x": 0.7, "z": 2.0}, 2.0),
                line(2, {"x": 0.9, "y": 0.1}, 1.5),
            ]
        )
        + "\n"
    )


@pytest.mark.timeout(60)
def test_a_fit_given_other_parameters_raises_one_error(tmp_path, caplog):
    path = tmp_path / "fit.jsonl"
    write_other_history(path)
    fitter = quad_fitter()
    with caplog.at_level(logging.WARNING, logger=LOGGER), pytest.raises(ValueError) as info:
        fitter.fit_nevergrad(
            budget=3, optimizer_str="OnePlusOne", initial_observations=load_observations(path)
        )
    message = str(info.value)
    assert "2 of 3 observations were made for other parameters" in message
    assert "missing ['y']" in message and "extra ['z']" in message
    assert "on_mismatch='common'" in message
    assert not [r for r in caplog.records if "initial observation" in r.getMessage()]
    assert fitter.result is None or fitter.result.n_evals == 0


def test_load_observations_checks_the_parameters(tmp_path):
    path = tmp_path / "fit.jsonl"
    write_other_history(path)
    with pytest.raises(ValueError, match=r"fit\.jsonl: 2 of 3 .*missing \['y'\].*extra \['z'\]"):
        load_observations(path, {"x": 0.0, "y": 0.0})
    with pytest.raises(ValueError, match="on_mismatch must be one of"):
        load_observations(path, {"x": 0.0, "y": 0.0}, on_mismatch="skip")
    with pytest.raises(ValueError, match="no parameter in common"):
        load_observations(path, {"a": 0.0}, on_mismatch="common")
    matching = load_observations(path, {"x": 0.0, "y": 0.0}, on_mismatch="common")
    assert matching == [
        ({"x": 0.5, "y": 0.0}, 3.0),
        ({"x": 0.7, "y": 0.0}, 2.0),
        ({"x": 0.9, "y": 0.1}, 1.5),
    ]
    assert matching.next_index == 3


@pytest.mark.timeout(60)
def test_on_mismatch_common_resumes_with_the_common_parameters(tmp_path, caplog):
    path = tmp_path / "fit.jsonl"
    write_other_history(path)
    fitter = quad_fitter()
    fitter.register_evaluation_callback(JSONLinesHistory(path))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        observations = load_observations(
            path, parameters=fitter.initial_parameters, on_mismatch="common"
        )
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1 and "2 of 3 observations kept with the common parameters" in warnings[0]
    )
    fitter.fit_nevergrad(budget=3, optimizer_str="OnePlusOne", initial_observations=observations)
    assert fitter.result.n_observations == 3 and fitter.result.n_evals == 3
    assert indices(path) == list(range(6))
    assert math.isfinite(fitter.result.best_loss)


@pytest.mark.timeout(60)
def test_a_plot_following_a_fit_resumed_from_a_file_sees_each_record_once(tmp_path):
    from chemfit.fitting.results import EvaluationRecord

    pytest.importorskip("ipywidgets")  # the widgets need it (the core-only CI has none)
    from chemfit_widgets import plot_series

    def rec(index, loss):
        return EvaluationRecord(index, 0, 0, {"x": 0.0}, loss, loss, False, None, None, 0.0)

    history = FitHistory([rec(7, 3.0), rec(8, 2.0)])  # numbered on from a file's 7 records
    series = plot_series.PlotSeries(True, 4, False, 8)
    series.convert(history)
    history.append(rec(9, 1.0))
    series.convert(history)
    series.convert(history)
    assert series.loss.values.tolist() == [3.0, 2.0, 1.0]
