"""Failed and lost evaluations in the live plot and the dashboard (issue 15): a distinct marker
and counts, never a plausible loss. Real fits feed them through the fitter's callbacks."""

from __future__ import annotations

import math
import time

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from chemfit import Fitter
from chemfit.results import EvaluationRecord
from chemfit_widgets import FitDashboard, LivePlot


def crashes_right_of_zero(params):
    if params["x"] > 0.0:
        raise RuntimeError("the simulator crashed")
    return (params["x"] + 1.0) ** 2 + params["y"] ** 2


def _fitter(**options) -> Fitter:
    return Fitter(
        crashes_right_of_zero,
        {"x": -0.5, "y": 0.0},
        bounds={"x": (-3, 3), "y": (-3, 3)},
        log_exceptions=False,
        **options,
    )


@pytest.mark.timeout(60)
def test_live_plot_marks_failed_and_lost_evaluations_and_never_plots_their_loss():
    fitter = _fitter(value_bad_params=0.5)  # a "good looking" penalty must still not show
    plot = LivePlot(backend="png", min_interval=0.0, max_cost=1.0)
    fitter.register_evaluation_callback(plot)
    try:
        fitter.fit_nevergrad(
            budget=40, optimizer_str="OnePlusOne", seed=2, progress=False, on_error="record"
        )
        plot.on_evaluation(  # a lost one, as a JSON line would bring it
            EvaluationRecord(
                40, 0, 0, {"x": 1.0, "y": 1.0}, 0.5, None, True, "WorkerLostError: x", None,
                0.0, status="lost", tries=3,
            ).to_dict()
        )  # fmt: skip
        plot.finish()
        history = fitter.result.history
        failed = [r.index for r in history if r.status == "failed"]
        assert failed, "the optimizer never went right of zero"
        data = plot.data()
        assert data["faults"].tolist() == [i + 1 for i in failed] + [41]
        assert (data["n_failed"], data["n_lost"]) == (len(failed), 1)
        assert all(math.isnan(data["loss"][i]) for i in [*failed, 40])
        assert float(data["best"][-1]) == fitter.result.best_loss
        assert history.best().status == "ok"
        title = plot._figure.title.get_text()
        assert f"{len(failed)} failed, 1 lost (red x at the top)" in title, title
        crosses = plot._figure.faults
        assert crosses.get_xdata().tolist() == data["faults"].tolist()
        assert set(crosses.get_ydata().tolist()) == {0.97}  # along the top edge
        assert crosses.get_color() == "red" and crosses.get_marker() == "x"
    finally:
        plot.close()


@pytest.mark.timeout(120)
def test_dashboard_counts_failed_evaluations():
    fitter = _fitter(swallow_exceptions=True)  # recorded as failed, as on_error="record" does
    dash = FitDashboard(fitter, optimizer="OnePlusOne", budget=30, plot_options={"backend": "png"})
    try:
        dash.start()
        dash.wait(timeout=90)
        assert dash.state == "finished", dash.message
        n_failed = fitter.result.n_failed
        assert n_failed > 0
        dash._refresh_ui()
        assert f"{n_failed} failed" in dash.best_label.value
    finally:
        dash.close()


def crashes_now_and_then(params):
    """Raises for about a third of the candidates; the first (the initial point) is slow."""
    if params == {"x": -0.5, "y": 0.0}:
        time.sleep(1.0)
    if int(abs(params["x"]) * 1000) % 3 == 0:
        raise RuntimeError("the simulator crashed")
    return (params["x"] + 1.0) ** 2 + params["y"] ** 2


@pytest.mark.timeout(120)
def test_the_dashboards_fault_fields_reach_the_fit():
    fitter = Fitter(crashes_now_and_then, {"x": -0.5, "y": 0.0}, log_exceptions=False)
    dash = FitDashboard(
        fitter,
        optimizer="OnePlusOne",
        budget=40,
        fit_options={"seed": 2, "retries": 1},
        plot_options={"backend": "png"},
    )
    try:
        assert (dash.retries, dash.retries_input.value, dash.on_error) == (1, 1, "raise")
        assert dash.fit_options == {"seed": 2}  # the fields hold the fault settings
        dash.start()
        dash.wait(timeout=90)
        assert dash.state == "error" and "the simulator crashed" in dash.message
        dash.on_error_input.value = "record"  # what a person picks: "record, go on"
        dash.timeout_input.value = 0.3
        assert (dash.on_error, dash.evaluation_timeout) == ("record", 0.3)
        dash.new_fit()
        dash.wait(timeout=90)
        assert dash.state == "finished", dash.message
        assert fitter.result.n_evals == 40 and fitter.result.n_failed > 0
        # Threads cannot be killed: the overdue first evaluation is waited for, with a warning.
        assert any("cannot stop an evaluation on" in w for w in dash.warnings), dash.warnings
        with pytest.raises(ValueError, match="on_error must be 'raise' or 'record'"):
            dash.on_error = "ignore"
    finally:
        dash.close()
