"""The live plot (chemfit_widgets.LivePlot): first frame, cadence, thinning, legend, units.

Real fits feed the plot through the fitter's callbacks; the ipympl canvas is answered by a
thread standing in for the browser and the kernel's main thread (it asks for each frame the
plot requests, as the front end does). The bounds on time are generous for a loaded 2-core
machine; the strict figures are in ``benchmarks/bench_live_plot.py``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

import itertools

from chemfit import Fitter
from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.labels import term_label, term_labels
from chemfit.core.wrapping import WrappedObjectiveFunctor, WrappedQuantityComputer
from chemfit_widgets import LivePlot
from chemfit_widgets.headless import HeadlessFrontEnd
from chemfit_widgets.live_plot import thin_indices
from tests.helpers import widget_objectives as h

ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIRST_FRAME_S = 1.0  # the promise: the first frame within 1 s of the first evaluation
MAX_GAP_S = 3.0  # frames every 2 s at most; +1 s for a loaded machine


def _fitter(objective=h.slow_quadratic) -> Fitter:
    return Fitter(objective, {"x": 0.0, "y": 0.0}, bounds={"x": (-3, 3), "y": (-3, 3)})


def _record(i: int, x: float = 0.5, loss: float | None = None, meta=None) -> dict:
    value = 1.0 / (i + 1) + 0.01 * (i % 7) if loss is None else loss
    return {"loss": value, "penalised": False, "parameters": {"x": x}, "meta": meta}


def _gaps_while_fitting(plot: LivePlot, start: float, end: float) -> list[float]:
    """Seconds between frames (from the fit's start) while records arrived."""
    times = [start] + [f.at for f in plot.frames if start <= f.at <= end] + [end]
    return [b - a for a, b in itertools.pairwise(times)]


def _check_live_fit(plot: LivePlot, first_record: list, start: float, end: float) -> None:
    assert plot.first_frame_latency is not None, "no frame showed the fit's evaluations"
    assert plot.first_frame_latency < FIRST_FRAME_S, plot.first_frame_latency
    first_data = next(f for f in plot.frames if f.records)
    assert first_data.at - first_record[0] < FIRST_FRAME_S
    gaps = _gaps_while_fitting(plot, first_data.at, end)
    assert max(gaps) < MAX_GAP_S, f"a {max(gaps):.2f} s gap between frames: {gaps}"
    share = plot.draw_seconds / (end - start)
    assert share < 0.15, f"drawing took {share:.1%} of the fit"


# -- first frame and cadence --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_png_plot_draws_the_first_evaluation_at_once_then_every_two_seconds_at_most():
    fitter = _fitter()
    first_record: list[float] = []
    fitter.register_evaluation_callback(
        lambda record: first_record or first_record.append(time.perf_counter())
    )
    plot = LivePlot(backend="png")
    try:
        plot.reset(expected=500, names=["x", "y"], bounds=fitter.bounds)
        plot.attach(fitter)
        start = time.perf_counter()
        fitter.fit_nevergrad(budget=500, optimizer_str="OnePlusOne", seed=0, progress=False)
        end = time.perf_counter()
        _check_live_fit(plot, first_record, start, end)
        assert plot.draw_count >= 3  # a fit of 5+ s: the first frame and regular refreshes
        plot.finish()
        assert plot.caption.value == "500 evaluations plotted"
        assert bytes(plot._image.value).startswith(PNG_MAGIC)
    finally:
        plot.close()


@pytest.mark.timeout(120)
def test_ipympl_plot_draws_the_first_evaluation_at_once_then_every_two_seconds_at_most():
    pytest.importorskip("ipympl")
    fitter = _fitter()
    first_record: list[float] = []
    fitter.register_evaluation_callback(
        lambda record: first_record or first_record.append(time.perf_counter())
    )
    plot = LivePlot(backend="ipympl")
    front_end = HeadlessFrontEnd(plot._canvas)
    try:
        plot.reset(expected=500, names=["x", "y"], bounds=fitter.bounds)
        plot.attach(fitter)
        times: dict[str, float] = {}

        def fit() -> None:  # in a thread, as the dashboard runs it
            times["start"] = time.perf_counter()
            fitter.fit_nevergrad(budget=500, optimizer_str="OnePlusOne", seed=0, progress=False)
            times["end"] = time.perf_counter()

        thread = threading.Thread(target=fit)
        thread.start()
        thread.join(timeout=100)
        assert not thread.is_alive()
        _check_live_fit(plot, first_record, times["start"], times["end"])
        plot.finish()
        deadline = time.monotonic() + 10
        while plot._drawn != 500 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert plot._drawn == 500 and plot.caption.value == "500 evaluations plotted"
    finally:
        front_end.close()
        plot.close()


@pytest.mark.timeout(60)
def test_the_first_frame_is_not_deferred_by_the_drawing_budget():
    # A tiny budget (0.1 %) paces the later frames, never the first one.
    plot = LivePlot(backend="png", max_cost=0.001)
    try:
        plot.reset(expected=100, names=["x"])
        time.sleep(0.2)
        plot.on_evaluation(_record(0))
        assert plot.first_frame_latency is not None and plot.first_frame_latency < FIRST_FRAME_S
        assert plot._drawn == 1 and plot.frames[-1].records == 1
        plot.on_evaluation(_record(1))
        assert plot._drawn == 1  # the next one waits for its turn (at most max_interval)
        deadline = time.monotonic() + MAX_GAP_S + 2
        while plot._drawn != 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert plot._drawn == 2, "the throttled frame did not come within max_interval"
    finally:
        plot.close()


@pytest.mark.timeout(60)
def test_ipympl_draws_a_first_evaluation_that_came_during_the_empty_frame_right_after_it():
    # The dashboard resets the plot at a fit's first record: the front end may be drawing the
    # empty frame of reset() when the first evaluation arrives.
    pytest.importorskip("ipympl")
    plot = LivePlot(backend="ipympl", max_cost=0.001)
    sync = plot._sync
    arrived: list[float] = []

    def sync_then_a_record_arrives():
        shown = sync()
        if not arrived:
            arrived.append(time.perf_counter())
            plot.on_evaluation(_record(0))  # while this (empty) frame is being drawn
        return shown

    front_end = HeadlessFrontEnd(plot._canvas)
    try:
        plot._sync = sync_then_a_record_arrives
        plot.reset(expected=10, names=["x"])  # asks the front end for the empty frame
        deadline = time.monotonic() + 10
        while plot.first_frame_latency is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [f.records for f in plot.frames][:2] == [0, 1]
        assert plot.first_frame_latency < 0.5, plot.first_frame_latency  # not a 1 s re-ask
    finally:
        front_end.close()
        plot.close()


# -- thinning and frame cost --------------------------------------------------------------------


def test_thin_indices_keeps_every_kth_the_best_and_the_newest():
    best = np.array([0, 5, 17, 9_999, 20_001])
    idx, stride = thin_indices(25_000, 1000, keep=best, tail=50)
    assert stride == 50 and len(idx) <= 1000
    assert set(best) <= set(idx.tolist())
    assert set(range(25_000 - 50, 25_000)) <= set(idx.tolist())
    assert set(range(0, 25_000, 50)) <= set(idx.tolist())
    assert np.all(np.diff(idx) > 0)
    all_idx, one = thin_indices(999, 1000)
    assert one == 1 and all_idx.tolist() == list(range(999))


@pytest.mark.timeout(120)
def test_long_histories_are_thinned_the_caption_says_so_and_frames_stay_cheap():
    plot = LivePlot(backend="png", max_points=1000, min_interval=60.0)
    try:
        plot.reset(names=["x"])
        costs = {}
        for n in (1_000, 25_000, 100_000):
            for i in range(plot.n_records, n):
                plot._append(plot._item(_record(i, x=np.sin(i))))
            plot.redraw()  # the catch-up frame converts the new records
            steady = []
            for _ in range(7):
                plot._append(plot._item(_record(plot.n_records)))
                plot.redraw()
                steady.append(plot.frames[-1].seconds)
            costs[n] = min(steady)  # the least disturbed by other processes
            if n == 25_000:
                caption = plot.caption.value
                assert caption.startswith("showing "), caption
                shown = int(caption.split()[1].replace(",", ""))
                assert 100 < shown <= 1000 and "of 25,007 evaluations" in caption, caption
                assert plot.frames[-1].points == shown
        data = plot.data()
        assert data["loss"].size == 100_007 and data["parameters"]["x"].size == 100_007
        # All improvements of the best loss and the newest evaluation are drawn.
        drawn_x = plot._figure.points.get_xdata()
        assert drawn_x[-1] == 100_007
        assert float(plot._figure.best_line.get_ydata()[-1]) == float(np.nanmin(data["loss"]))
        # A frame costs about the same at 100k records as at 1k (O(points), not O(records)).
        assert costs[100_000] < 2 * costs[1_000] + 0.025, costs
    finally:
        plot.close()


@pytest.mark.timeout(60)
def test_redrawing_only_the_changed_axes_gives_the_same_pixels_as_a_full_redraw():
    plot = LivePlot(
        backend="png", min_interval=0.0, max_cost=1.0, loss_unit="eV", term_labels=["a", "b"]
    )
    try:
        plot.reset(expected=300, names=["x", "y"])
        rng = np.random.default_rng(0)
        for i in range(300):
            x, y = rng.normal(0, 1 / (1 + i / 30)), rng.normal(0, 3 / (1 + i / 50))
            meta = {"children": [{"loss": x * x}, {"loss": y * y}]}
            plot._append((x * x + y * y + 1e-4, False, {"x": x, "y": y}, meta))
            if i % 7 == 0:
                plot.redraw()
        plot.redraw()
        partial = sum(f.axes_redrawn for f in plot.frames)
        assert partial >= 3, "the limits should have changed during this feed"
        pixels = np.asarray(plot.figure.canvas.buffer_rgba()).copy()
        plot._figure.background = None  # force a full redraw
        plot.redraw()
        assert np.array_equal(pixels, np.asarray(plot.figure.canvas.buffer_rgba()))
    finally:
        plot.close()


# -- a fit that goes on -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_records_after_finish_continue_the_plot():
    plot = LivePlot(backend="png", min_interval=0.0, max_cost=1.0)
    try:
        plot.reset(expected=50, names=["x"])
        for i in range(50):
            plot.on_evaluation(_record(i, loss=10.0 - 0.1 * i))
        plot.finish()
        latency = plot.first_frame_latency
        # Start after Stop: the fit goes on and its records keep arriving, with no reset.
        for i in range(50, 120):
            plot.on_evaluation(_record(i, loss=10.0 - 0.1 * i))
        plot.finish()
        data = plot.data()
        assert plot.n_records == 120 and data["index"][-1] == 120
        assert data["best"][-1] == pytest.approx(10.0 - 0.1 * 119)
        assert plot.first_frame_latency == latency
        assert plot._figure.points.get_xdata()[-1] == 120
        assert plot._figure.ax.get_xlim()[1] >= 120  # the axis grew past the first budget
        assert "120 evaluations" in plot._figure.title.get_text()
        plot.expected = 200  # the dashboard may widen the axis for the rest of the fit
        plot.finish()
        assert plot._figure.ax.get_xlim()[1] == 200
    finally:
        plot.close()


# -- legend -------------------------------------------------------------------------------------


def _dimer(parameters: dict, r: float) -> dict:
    return {"energy": parameters["x"] / r}


def _squared(quantities: dict, target: float) -> float:
    return (quantities["energy"] - target) ** 2


def _dimer_cob(n: int) -> CombinedObjectiveFunction:
    computer = WrappedQuantityComputer(_dimer)
    return CombinedObjectiveFunction(
        [computer.bind(r=3.2 + 0.4 * i).with_loss(_squared, target=-1.0) for i in range(n)]
    )


def _legend_texts(plot: LivePlot) -> list[str]:
    return [t.get_text() for t in plot.figure.legends[0].get_texts()]


@pytest.mark.timeout(60)
def test_legend_names_terms_by_their_bound_arguments_and_names():
    fitter = Fitter(_dimer_cob(3), {"x": 0.0}, bounds={"x": (-5.0, 5.0)})
    plot = LivePlot(backend="png", min_interval=0.0, max_cost=1.0)
    try:
        plot.attach(fitter)
        # Before the fit: the panels, their limits (the bounds) and the legend are ready.
        assert [ax.get_title() for ax in plot._figure.param_axes] == ["x"]
        assert plot._figure.param_axes[0].get_ylim() == pytest.approx((-5.8, 5.8))
        assert _legend_texts(plot)[2:] == ["r=3.2", "r=3.6", "r=4"]
        fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", seed=0, progress=False)
        plot.finish()
        assert plot.term_labels == ["r=3.2", "r=3.6", "r=4"]
        assert _legend_texts(plot) == ["evaluation", "best so far", "r=3.2", "r=3.6", "r=4"]
        assert len(plot.data()["terms"]) == 3

        # Names and tags win; the wrappers around a combined objective are looked through.
        named = WrappedObjectiveFunctor(lambda p: p["x"] ** 2)
        named.static_meta_data["tag"] = "bulk fcc"
        cob = CombinedObjectiveFunction([named, lambda p: abs(p["x"])])
        assert plot.label_terms(Fitter(cob, {"x": 1.0})) == ["bulk fcc", "term 1"]
        plot.reset(objective=cob)
        assert _legend_texts(plot)[2:] == ["bulk fcc", "term 1"]  # before any evaluation
    finally:
        plot.close()


@pytest.mark.timeout(60)
def test_legend_takes_term_tags_from_the_records_meta_when_no_objective_is_known():
    plot = LivePlot(backend="png", min_interval=0.0, max_cost=1.0)
    try:
        meta = {"children": [{"loss": 1.0, "meta": {"tag": "fcc"}}, {"loss": 2.0, "meta": {}}]}
        plot.on_evaluation(_record(0, loss=3.0, meta=meta))
        assert _legend_texts(plot) == ["evaluation", "best so far", "fcc", "term 1"]
    finally:
        plot.close()


@pytest.mark.timeout(60)
def test_legend_shows_what_fits_says_how_many_more_and_stays_off_the_data():
    plot = LivePlot(backend="png", min_interval=0.0, max_cost=1.0, max_terms=8)
    try:
        plot.label_terms(_dimer_cob(16))
        for i in range(30):
            meta = {"children_losses": [0.1 * (k + 1) / (i + 1) for k in range(16)]}
            plot.on_evaluation(_record(i, loss=2.0 / (i + 1), meta=meta))
        plot.finish()
        texts = _legend_texts(plot)
        assert texts[:3] == ["evaluation", "best so far", "r=3.2"]
        shown = len(texts) - 3
        assert 1 <= shown <= 8 and texts[-1] == f"+ {16 - shown} more terms", texts
        assert len(plot._figure.term_lines) == shown  # only the named ones are drawn
        renderer = plot.figure.canvas.get_renderer()
        legend_box = plot.figure.legends[0].get_window_extent(renderer)
        axes_box = plot._figure.ax.get_window_extent(renderer)
        assert legend_box.y0 >= axes_box.y1 - 1, "the legend covers the data"
        assert legend_box.x1 <= axes_box.x1 + 1 and legend_box.y1 <= plot.figure.bbox.y1
        title_box = plot._figure.title.get_window_extent(renderer)
        assert legend_box.y1 <= title_box.y0 + 1, "the legend covers the title"

        # Long labels fit fewer terms; one row fits fewer still.
        plot.term_labels = [f"a rather long label for term {i}" for i in range(16)]
        plot.redraw()
        long_texts = _legend_texts(plot)
        assert len(long_texts) < len(texts) and long_texts[-1].endswith("more terms")
        plot.max_legend_rows = 1
        plot.redraw()
        assert len(_legend_texts(plot)) <= len(long_texts)
    finally:
        plot.close()


def test_term_labels_keep_only_what_tells_terms_apart():
    cob = _dimer_cob(2)
    assert term_labels(cob) == ["r=3.2", "r=3.6"]
    assert term_label(cob.objective_functions[0]) == "_dimer(r=3.2, target=-1)"
    assert term_labels([h.Term(0.5), h.Term(1.5)]) == ["target=0.5", "target=1.5"]
    assert term_labels([h.quadratic, h.slow_quadratic]) == ["quadratic", "slow_quadratic"]
    assert term_labels([lambda p: 1.0, lambda p: 2.0]) == ["term 0", "term 1"]
    assert term_labels([h.quadratic, h.quadratic]) == ["quadratic [0]", "quadratic [1]"]


def test_term_labels_name_the_reference_value_only_when_the_model_arguments_do_not_differ():
    computer = WrappedQuantityComputer(_dimer)

    def squared(quantities, e_ref):
        return (quantities["energy"] - e_ref) ** 2

    distinct_r = [computer.bind(r=r).with_loss(squared, e_ref=-r) for r in (3.2, 3.6)]
    assert term_labels(distinct_r) == ["r=3.2", "r=3.6"]
    same_r = [computer.bind(r=3.2).with_loss(squared, e_ref=e) for e in (-1.0, -2.0)]
    assert term_labels(same_r) == ["e_ref=-1", "e_ref=-2"]


# -- units and options --------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_units_show_in_the_axis_labels_and_follow_the_traitlets():
    plot = LivePlot(
        backend="png",
        loss_unit="meV²",
        parameter_units={"lj": {"epsilon": "eV"}, "lj.sigma": "Å"},
    )
    try:
        plot.on_evaluation(
            {"loss": 1.0, "parameters": {"lj": {"epsilon": 0.1, "sigma": 3.0}, "k": 1.0}}
        )
        assert plot._figure.ax.get_ylabel() == "loss [meV²]"
        titles = [ax.get_title() for ax in plot._figure.param_axes]
        assert titles == ["lj.epsilon [eV]", "lj.sigma [Å]", "k"]
        assert "best loss 1 meV²" in plot._figure.title.get_text()
        seen = []
        plot.observe(lambda change: seen.append(change["new"]), names="loss_unit")
        plot.loss_unit = "eV²"
        plot.parameter_units = {"k": "N/m"}
        plot.sync()
        assert seen == ["eV²"] and plot._figure.ax.get_ylabel() == "loss [eV²]"
        assert [ax.get_title() for ax in plot._figure.param_axes] == [
            "lj.epsilon",
            "lj.sigma",
            "k [N/m]",
        ]
    finally:
        plot.close()


def test_options_are_traitlets_and_typos_are_named():
    plot = LivePlot(backend="png", max_points=500, max_interval=1.5, title="LJ fit")
    try:
        for name in ("loss_unit", "parameter_units", "term_labels", "expected", "max_points"):
            assert plot.has_trait(name), name
        assert plot.max_points == 500 and plot.max_interval == 1.5
        with pytest.raises(TypeError, match="did you mean 'loss_unit'"):
            LivePlot(backend="png", loss_units="eV")
        with pytest.raises(ValueError, match="max_cost must be a fraction"):
            LivePlot(backend="png", max_cost=2.0)
        plot.on_evaluation({"loss": 1.0, "parameters": {"x": 1.0}})
        assert plot._figure.title.get_text().startswith("LJ fit: 1 evaluation,")
        plot.show_parameters = False  # converted again from the records kept
        plot.sync()
        assert plot._figure.param_axes == [] and plot.data()["parameters"] == {}
    finally:
        plot.close()


# -- as a user runs it: a model defined in __main__ ---------------------------------------------


@pytest.mark.timeout(120)
def test_a_model_defined_in_main_gets_its_legend_units_and_first_frame(tmp_path):
    script = tmp_path / "user_fit.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, time
            from chemfit import Fitter
            from chemfit.core.combined import CombinedObjectiveFunction
            from chemfit.core.wrapping import to_quantity_computer
            from chemfit_widgets import LivePlot

            @to_quantity_computer
            def dimer(parameters, r):
                eps, sigma = parameters["epsilon"], parameters["sigma"]
                return {"energy": 4 * eps * ((sigma / r) ** 12 - (sigma / r) ** 6)}

            def squared(quantities, reference):
                time.sleep(0.002)
                return (quantities["energy"] - reference) ** 2

            cob = CombinedObjectiveFunction(
                [dimer.bind(r=r).with_loss(squared, reference=-0.01) for r in (3.2, 3.6, 4.0)]
            )
            fitter = Fitter(cob, {"epsilon": 0.01, "sigma": 3.0},
                            bounds={"epsilon": (0.001, 0.1), "sigma": (2.5, 4.0)})
            plot = LivePlot(backend="png", loss_unit="eV²",
                            parameter_units={"epsilon": "eV", "sigma": "Å"})
            plot.reset(expected=150, names=["epsilon", "sigma"], bounds=fitter.bounds)
            plot.attach(fitter)
            fitter.fit_nevergrad(budget=150, optimizer_str="OnePlusOne", seed=0, progress=False)
            plot.finish()
            print(json.dumps({
                "legend": [t.get_text() for t in plot.figure.legends[0].get_texts()],
                "ylabel": plot._figure.ax.get_ylabel(),
                "titles": [ax.get_title() for ax in plot._figure.param_axes],
                "latency": plot.first_frame_latency,
                "caption": plot.caption.value,
                "png": plot.to_png()[:8].hex(),
            }))
            plot.close()
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=110, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["legend"] == ["evaluation", "best so far", "r=3.2", "r=3.6", "r=4"]
    assert out["ylabel"] == "loss [eV²]"
    assert out["titles"] == ["epsilon [eV]", "sigma [Å]"]
    assert out["latency"] < FIRST_FRAME_S
    assert out["caption"].startswith("150 evaluations plotted")
    assert bytes.fromhex(out["png"]) == PNG_MAGIC
