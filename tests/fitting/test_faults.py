"""Fits that survive (issue 15): the fault policy of ``fit_nevergrad`` in this process.

``retries``, ``evaluation_timeout`` and ``on_error`` are checked here with threads and serial
fits (what needs no dying process); the drills with real dying workers are in
tests/integration/test_fault_drills.py.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from chemfit.fitter import Fitter
from chemfit.fitter_callbacks import JSONLinesHistory
from chemfit.results import EvaluationRecord, FitHistory, FitResult

BAD = 1e5


def raises_above_half(params):
    """A loss that raises for x > 0.5 (as a simulator that crashes on some geometries)."""
    if params["x"] > 0.5:
        raise ValueError(f"no convergence at x={params['x']:.3f}")
    return (params["x"] - 0.2) ** 2


def _fitter(objective=raises_above_half) -> Fitter:
    return Fitter(objective, {"x": 0.0}, bounds={"x": (-1.0, 1.0)}, log_exceptions=False)


# -- arguments --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"retries": -1}, ValueError, "retries must be an int >= 0, got -1"),
        ({"retries": 1.5}, ValueError, "retries must be an int >= 0, got 1.5"),
        ({"retries": True}, ValueError, "retries must be an int >= 0, got True"),
        (
            {"evaluation_timeout": 0},
            ValueError,
            "evaluation_timeout must be a positive number of seconds or None, got 0",
        ),
        (
            {"evaluation_timeout": -1.0},
            ValueError,
            "evaluation_timeout must be a positive number of seconds or None, got -1.0",
        ),
        (
            {"evaluation_timeout": math.nan},
            ValueError,
            "evaluation_timeout must be a positive number of seconds or None, got nan",
        ),
        (
            {"evaluation_timeout": "5"},
            TypeError,
            "evaluation_timeout must be a number of seconds or None, got str: '5'",
        ),
        ({"on_error": "ignore"}, ValueError, "on_error must be 'raise' or 'record', got 'ignore'"),
    ],
)
def test_bad_fault_arguments_raise_before_any_evaluation(kwargs, error, fragment):
    calls = []
    fitter = Fitter(lambda p: calls.append(p) or 0.0, {"x": 0.0})
    with pytest.raises(error, match="^" + fragment.replace("(", r"\(").replace(")", r"\)")):
        fitter.fit_nevergrad(budget=3, optimizer_str="OnePlusOne", progress=False, **kwargs)
    assert calls == []


def test_fault_arguments_are_keyword_only():
    fitter = _fitter()
    with pytest.raises(TypeError):
        fitter.fit_nevergrad(3, "OnePlusOne", 1, None, None, None, "batch", None, False, True, False, 2)  # fmt: skip


# -- on_error="record" ------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("mode", "num_workers", "use_pool"),
    [("batch", 1, False), ("batch", 2, True), ("async", 2, True), ("batch", 1, True)],
    ids=["serial", "batch-threads", "async-threads", "one-worker-threads"],
)
def test_on_error_record_records_failures_and_finishes_the_budget(
    tmp_path, mode, num_workers, use_pool
):
    fitter = _fitter()
    path = tmp_path / "fit.jsonl"
    fitter.register_evaluation_callback(JSONLinesHistory(path))
    told = []
    fitter.register_evaluation_callback(told.append)
    pool = ThreadPoolExecutor(2) if use_pool else None
    try:
        fitter.fit_nevergrad(
            budget=30,
            optimizer_str="OnePlusOne",
            num_workers=num_workers,
            executor=pool,
            mode=mode,
            seed=1,
            progress=False,
            on_error="record",
        )
    finally:
        if pool is not None:
            pool.shutdown()
    result = fitter.result
    history = result.history
    assert result.error is None and result.n_evals == 30 == len(history)
    assert [r.index for r in history] == list(range(30))  # every evaluation once
    failed = [r for r in history if r.status == "failed"]
    assert failed, "the optimizer never tried x > 0.5; the test needs a failing point"
    assert len(failed) == sum(r.parameters["x"] > 0.5 for r in history)
    for record in failed:
        assert record.error.startswith("ValueError: no convergence at x=")
        assert "raises_above_half" in record.traceback and "ValueError" in record.traceback
        assert (record.loss, record.raw_loss, record.penalised, record.tries) == (
            BAD,
            None,
            True,
            1,
        )
    ok = [r for r in history if r.status == "ok"]
    assert all(r.error is None and r.traceback is None and r.tries == 1 for r in ok)
    assert (result.n_ok, result.n_failed, result.n_lost) == (len(ok), len(failed), 0)
    assert result.best_loss < 0.05 and history.best().status == "ok"
    assert result.best_parameters["x"] <= 0.5
    assert told == list(history)
    on_disk = FitHistory.from_jsonl(path)
    assert list(on_disk) == list(history)  # status, tries and traceback survive the file
    line = json.loads(path.read_text().splitlines()[failed[0].index])
    assert line["status"] == "failed" and line["tries"] == 1 and "Traceback" in line["traceback"]


@pytest.mark.timeout(60)
def test_on_error_raise_still_ends_the_fit_with_the_objective_error():
    fitter = _fitter(lambda p: 1 / 0 if p["x"] != 0.0 else 1.0)
    with pytest.raises(ZeroDivisionError):
        fitter.fit_nevergrad(budget=10, optimizer_str="OnePlusOne", progress=False)
    assert fitter.result.error.startswith("ZeroDivisionError")
    assert [r.status for r in fitter.result.history] == ["ok"]


@pytest.mark.timeout(60)
def test_a_failed_evaluation_is_never_the_best():
    # every evaluation but the first fails; the failed ones' loss (-1, "better") must not win
    fitter = Fitter(
        lambda p: 1.0 if p["x"] == 0.0 else math.sqrt(-1),
        {"x": 0.0},
        value_bad_params=-1.0,
        log_exceptions=False,
    )
    fitter.fit_nevergrad(budget=8, optimizer_str="OnePlusOne", progress=False, on_error="record")
    result = fitter.result
    assert result.n_failed == 7 and result.best_loss == 1.0
    assert result.history.best().index == 0


def test_swallowed_exceptions_are_recorded_as_failed():
    fitter = Fitter(
        lambda p: 1 / 0 if p["x"] > 0 else p["x"] ** 2,
        {"x": 0.0},
        swallow_exceptions=True,
        log_exceptions=False,
    )
    fitter.fit_nevergrad(budget=10, optimizer_str="OnePlusOne", seed=0, progress=False)
    failed = [r for r in fitter.result.history if r.error is not None]
    assert failed and all(r.status == "failed" for r in failed)
    assert fitter.result.n_failed == len(failed)


# -- evaluation_timeout where nothing can be killed --------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("use_pool", [False, True], ids=["no-executor", "threads"])
def test_timeout_on_threads_warns_once_and_waits(caplog, use_pool):
    def slow_sometimes(params):
        if params["x"] != 0.0 and not slept.is_set():
            slept.set()
            time.sleep(0.6)
        return params["x"] ** 2

    slept = threading.Event()
    fitter = _fitter(slow_sometimes)
    pool = ThreadPoolExecutor(2) if use_pool else None
    try:
        with caplog.at_level(logging.WARNING, logger="chemfit"):
            fitter.fit_nevergrad(
                budget=6,
                optimizer_str="OnePlusOne",
                num_workers=2 if use_pool else 1,
                executor=pool,
                mode="async",
                progress=False,
                evaluation_timeout=0.2,
            )
    finally:
        if pool is not None:
            pool.shutdown()
    warnings = [r.getMessage() for r in caplog.records if "evaluation_timeout" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "nothing can be killed" in warnings[0] and "waits" in warnings[0]
    assert slept.is_set() and fitter.result.n_evals == 6
    assert [r.status for r in fitter.result.history] == ["ok"] * 6


# -- records and results -------------------------------------------------------------------------


def test_old_records_and_results_load_with_ok_status():
    old = {"index": 0, "step": 0, "worker": 0, "parameters": {"x": 1}, "loss": 2.0, "time": 0}
    record = EvaluationRecord.from_dict(old)
    assert (record.status, record.tries, record.traceback) == ("ok", 1, None)
    with pytest.raises(ValueError, match="status must be one of"):
        EvaluationRecord.from_dict({**old, "status": "crashed"})
    lost = EvaluationRecord(
        1, 0, 1, {"x": 2.0}, BAD, None, True, "WorkerLostError: gone", None, 1.0, "lost", 3
    )
    result = FitResult(
        {"x": 1.0}, {"x": 1.0}, 2.0, {}, n_evals=2, history=FitHistory([record, lost])
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert (data["n_ok"], data["n_failed"], data["n_lost"]) == (1, 0, 1)
    assert data["history"][1]["status"] == "lost" and data["history"][1]["tries"] == 3
    again = FitResult.from_dict(data)
    assert again == result and again.n_lost == 1
    del data["n_ok"], data["n_failed"], data["n_lost"]  # a file written before issue 15
    assert FitResult.from_dict(data).n_lost == 1
    assert "n_lost=1" in repr(result) and "1 lost" in result._repr_html_()
    assert result.history.best() is record
    assert list(result.to_dataframe()["status"]) == ["ok", "lost"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["batch", "async"])
def test_a_stop_request_ends_a_tolerant_fit_as_before(mode):
    fitter = _fitter(lambda p: (p["x"] - 0.2) ** 2)

    def stop_after_step_2(step, contexts):
        if step == 2:
            fitter.request_stop()

    fitter.register_callback(stop_after_step_2)
    with ThreadPoolExecutor(2) as pool:
        fitter.fit_nevergrad(
            budget=100,
            optimizer_str="OnePlusOne",
            num_workers=2,
            executor=pool,
            mode=mode,
            progress=False,
            retries=2,
            evaluation_timeout=30,
            on_error="record",
        )
    result = fitter.result
    assert result.stopped and result.error is None and result.n_evals == len(result.history)
    assert 6 <= result.n_evals <= 8 and result.n_ok == result.n_evals
