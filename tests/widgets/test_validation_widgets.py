"""The widgets' part of "how good is the fit": the live plot's validation line and the
dashboard's contributions table.

Real fits feed a PNG-backend plot headless; the dashboard runs its fit in its own thread on a
serial executor and a thread pool. The validation line is checked in the plot's data, in the
figure's artist and legend, and in the pixels of the rendered frame.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from PIL import Image

from chemfit import CombinedObjectiveFunction, Fitter
from chemfit.fitting.results import EvaluationRecord, FitHistory
from chemfit_widgets import FitDashboard, LivePlot

GREEN = np.array([44, 160, 44])  # matplotlib's C2, the validation line


def _train(p: dict) -> float:
    return (p["x"] - 2.0) ** 2 + (p["y"] + 1.0) ** 2


def _held_out(p: dict) -> float:
    return (p["x"] - 1.5) ** 2 + (p["y"] + 1.0) ** 2 + 0.1


def _fitter(**options) -> Fitter:
    bounds = {"x": (-3.0, 3.0), "y": (-3.0, 3.0)}
    return Fitter(_train, {"x": 0.0, "y": 0.0}, bounds=bounds, **options)


def _green_pixels(png: bytes) -> int:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=int)
    return int((np.abs(pixels - GREEN).sum(axis=-1) < 40).sum())


def _expected_points(history: FitHistory) -> tuple[list[float], list[float]]:
    first = history[0].index
    return (
        [index - first + 1.0 for index, _ in history.validation],
        [loss for _, loss in history.validation],
    )


def _check_line(plot: LivePlot, history: FitHistory) -> None:
    x, y = _expected_points(history)
    data = plot.data()
    assert data["validation_index"].tolist() == x
    assert data["validation"].tolist() == y
    plot.sync()
    line = plot._figure.validation_line
    assert line.get_xdata().tolist() == x and line.get_ydata().tolist() == y
    labels = [text.get_text() for text in plot._figure.legend.get_texts()]
    assert "validation" in labels, labels


@pytest.mark.timeout(120)
def test_live_plot_fed_by_records_draws_the_validation_line():
    fitter = _fitter(validation=_held_out)
    plot = LivePlot(backend="png")
    try:
        plot.attach(fitter)
        fitter.fit_nevergrad(budget=60, optimizer_str="OnePlusOne", seed=0, progress=False)
        plot.finish()
        history = fitter.result.history
        assert len(history.validation) == len(history.improvements()) >= 3
        _check_line(plot, history)
        assert _green_pixels(plot.to_png()) > 50

        without = _fitter()
        plain = LivePlot(backend="png")
        plain.attach(without)
        without.fit_nevergrad(budget=60, optimizer_str="OnePlusOne", seed=0, progress=False)
        plain.finish()
        assert plain.data()["validation"].size == 0
        assert _green_pixels(plain.to_png()) == 0  # the pixels counted above are the line
        labels = [text.get_text() for text in plain._figure.legend.get_texts()]
        assert "validation" not in labels
        plain.close()
    finally:
        plot.close()


@pytest.mark.timeout(120)
def test_live_plot_fed_with_the_lines_of_a_history_file_draws_the_validation_line(tmp_path):
    # What MPIEngineFit(on_record=plot.on_evaluation) streams: records and validation lines.
    from chemfit.fitting.callbacks import JSONLinesHistory

    fitter = _fitter(validation=_held_out)
    path = tmp_path / "fit.jsonl"
    fitter.register_evaluation_callback(JSONLinesHistory(path))
    fitter.fit_nevergrad(budget=60, optimizer_str="OnePlusOne", seed=0, progress=False)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert any("validation" in line for line in lines)
    plot = LivePlot(backend="png")
    try:
        for line in lines:
            plot.on_evaluation(line)
        plot.finish()
        assert plot.n_records == 60
        _check_line(plot, fitter.result.history)
        rebuilt = FitHistory.from_lines(lines)
        assert rebuilt.validation == fitter.result.validation and len(rebuilt) == 60
    finally:
        plot.close()


@pytest.mark.timeout(120)
def test_live_plot_following_a_resumed_fit_and_showing_a_result():
    fitter = _fitter(validation=_held_out)
    fitter.fit_nevergrad(budget=30, optimizer_str="OnePlusOne", seed=0, progress=False)
    fitter.fit_nevergrad(budget=30, optimizer_str="OnePlusOne", resume=True, progress=False)
    history = fitter.result.history
    plot = LivePlot(backend="png")
    try:
        plot.follow(history)
        plot.finish()
        _check_line(plot, history)
        plot.show_history(fitter.result)
        _check_line(plot, history)
    finally:
        plot.close()


@pytest.mark.timeout(60)
def test_validation_of_a_history_numbered_from_a_file_is_placed_by_position():
    records = [
        EvaluationRecord(i, 0, 0, {"x": float(i)}, 10.0 - i, 10.0 - i, False, None, None, 0.0)
        for i in range(40, 46)
    ]
    history = FitHistory(records)
    history.validation = [(40, 3.0), (43, 2.0), (45, 2.5)]
    plot = LivePlot(backend="png")
    try:
        plot.follow(history)
        assert plot.data()["validation_index"].tolist() == [1.0, 4.0, 6.0]
        plot.show_history(history)
        assert plot.data()["validation_index"].tolist() == [1.0, 4.0, 6.0]
    finally:
        plot.close()


# -- the dashboard -----------------------------------------------------------------------------


def _combined(counter: list | None = None, limit: int = 10**9) -> CombinedObjectiveFunction:
    def fcc(p):
        return (p["x"] - 1.0) ** 2

    def bcc(p):
        if counter is not None:
            counter.append(1)
            if len(counter) > limit:
                raise RuntimeError("reference data went away")
        return (p["x"] - 3.0) ** 2

    return CombinedObjectiveFunction([fcc, bcc], weights=[1.0, 3.0])


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("kind", "workers"), [("serial", 1), ("thread", 2)])
def test_dashboard_shows_contributions_and_the_validation_line(kind, workers):
    fitter = Fitter(
        _combined(), {"x": 0.0}, bounds={"x": (-5.0, 5.0)}, validation=lambda p: (p["x"] - 2) ** 2
    )
    dash = FitDashboard(
        fitter,
        budget=40,
        optimizer="OnePlusOne",
        kind=kind,
        workers=workers,
        plot_options={"backend": "png"},
    )
    try:
        assert dash.contributions_panel.value == ""
        dash.start()
        dash.wait(timeout=90)
        assert dash.state == "finished", dash.message
        panel = dash.contributions_panel
        assert any(panel in getattr(row, "children", ()) for row in dash.children)
        expected = fitter.contributions()
        assert panel.table[["weight", "loss", "share"]].equals(
            expected[["weight", "loss", "share"]]
        )
        assert math.isclose(panel.table["share"].sum(), 1.0)
        for name in expected["name"]:
            assert f"<td>{name}</td>" in panel.value
        assert "share" in panel.value and "weight" in panel.value
        _check_line(dash.plot, fitter.result.history)
        dash.new_fit(budget=10)  # a new fit clears the table until it has ended
        dash.wait(timeout=90)
        assert dash.contributions_panel.table is not None
    finally:
        dash.close()


@pytest.mark.timeout(120)
def test_dashboard_without_contributions_shows_nothing_and_does_not_fail(caplog):
    calls: list = []
    fitter = Fitter(_combined(calls, limit=30), {"x": 0.0}, bounds={"x": (-5.0, 5.0)})
    dash = FitDashboard(
        fitter, budget=30, optimizer="OnePlusOne", kind="serial", plot_options={"backend": "png"}
    )
    try:
        with caplog.at_level("DEBUG", logger="chemfit_widgets"):
            dash.start()
            dash.wait(timeout=90)
        assert dash.state == "finished", dash.message
        assert len(calls) == 31  # the fit's 30 evaluations and the one that raised
        assert dash.contributions_panel.value == "" and dash.contributions_panel.table is None
        assert any("shows no contributions" in r.getMessage() for r in caplog.records)
    finally:
        dash.close()

    plain = FitDashboard(
        _fitter(), budget=10, optimizer="OnePlusOne", kind="serial", plot_options={"backend": "png"}
    )
    try:
        plain.start()
        plain.wait(timeout=90)
        assert plain.state == "finished" and plain.contributions_panel.value == ""
    finally:
        plain.close()
