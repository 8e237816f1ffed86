"""The Jupyter front ends in widgets/ (chemfit_widgets): picker, live plot, dashboard.

Everything is real: thread pools, loky, a local 2-engine ipyparallel cluster and a 2-engine MPI
cluster started from the picker, and fits whose callbacks feed the plot. No browser here (see
tests/integration/test_browser_dashboard.py); the widgets run without a kernel, so button clicks
call their handlers directly.
"""

from __future__ import annotations

import doctest
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")
psutil = pytest.importorskip("psutil")

import chemfit_widgets  # noqa: E402
from chemfit import Fitter  # noqa: E402
from chemfit.core.combined import CombinedObjectiveFunction  # noqa: E402
from chemfit_widgets import (  # noqa: E402
    ExecutorPicker,
    FitDashboard,
    LivePlot,
    dashboard,
    describe_error,
    executor_picker,
    fit_dashboard,
    live_plot,
    messages,
)
from tests.helpers import widget_objectives as h  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _gone(pids, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and _running(p)]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _quadratic_fitter(objective=h.quadratic) -> Fitter:
    return Fitter(objective, {"x": 0.0, "y": 0.0}, bounds={"x": (-3, 3), "y": (-3, 3)})


# -- conventions ---------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "module", [messages, executor_picker, live_plot, fit_dashboard, chemfit_widgets]
)
def test_docstring_examples_run(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest failures in {module.__name__}"


@pytest.mark.timeout(60)
def test_widgets_follow_ipywidgets_conventions():
    fitter = _quadratic_fitter()
    dash = dashboard(
        fitter, budget=40, optimizer="OnePlusOne", kind="serial", plot_options={"backend": "png"}
    )
    try:
        assert isinstance(dash, FitDashboard)
        bundle = dash._repr_mimebundle_()
        assert "application/vnd.jupyter.widget-view+json" in bundle
        assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == dash.model_id
        assert dash.picker in dash.children
        assert any(dash.plot in getattr(row, "children", ()) for row in dash.children)
        # Rows wrap instead of overflowing a narrow notebook.
        assert all(row.layout.flex_flow == "row wrap" for row in dash.children[2:])
        seen = []
        dash.observe(lambda change: seen.append(change["new"]), names="state")
        dash.budget_input.value = 25
        assert dash.progress.max == 25 and dash.progress_label.value == "0 / 25"
        dash.start()
        dash.wait(timeout=60)
        assert seen == ["starting", "running", "finished"]
        assert dash.result is fitter.result and dash.result.n_evals == 25
        assert "Best loss: <b>" in dash.best_label.value
        assert "<td>x</td>" in dash.table.value and "<td>y</td>" in dash.table.value
    finally:
        dash.close()


# -- executor picker -----------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_picker_shows_the_fields_of_the_kind_and_runs_a_thread_pool():
    picker = ExecutorPicker("thread", workers=3)
    states = []
    picker.observe(lambda change: states.append(change["new"]), names="state")
    shown = lambda widget: widget.layout.display != "none"  # noqa: E731
    assert shown(picker.workers_input) and not shown(picker.engines_input)
    picker.kind = "mpi"
    assert shown(picker.engines_input) and shown(picker.timeout_input)
    assert not shown(picker.workers_input) and not shown(picker.profile_input)
    picker.kind = "connect"
    assert shown(picker.profile_input) and shown(picker.cluster_id_input)
    assert picker.engines_input.description == "Min engines"
    with pytest.raises(ValueError, match="kind must be one of"):
        picker.kind = "gpu"
    picker.kind = "thread"

    picker.start_button.click()
    assert picker.state == "running" and "Ready: 3 threads" in picker.message
    assert isinstance(picker.executor, ThreadPoolExecutor)
    assert picker.executor._max_workers == 3 and picker.num_workers == 3
    # A running pool stays editable (a change stops it; the next start builds the new one).
    assert not picker.kind_dropdown.disabled and picker.start_button.disabled
    assert not picker.stop_button.disabled
    executor = picker.executor
    assert list(executor.map(abs, [-1, -2])) == [1, 2]
    picker.stop_button.click()
    assert picker.state == "stopped" and not picker.kind_dropdown.disabled
    with pytest.raises(RuntimeError):
        executor.submit(abs, 1)
    assert states == ["starting", "running", "stopping", "stopped"]
    picker.close()


@pytest.mark.timeout(60)
def test_picker_serial_and_loky_and_close_stops_loky_workers():
    serial = ExecutorPicker("serial")
    assert serial.executor is None and serial.state == "running" and serial.num_workers == 1
    serial.close()

    picker = ExecutorPicker("loky", workers=2)
    executor = picker.executor  # pools start on first use
    assert sorted(executor.map(abs, [-3, -4])) == [3, 4]
    workers = list(executor._processes)
    assert workers
    picker.close()
    assert picker.state == "stopped"
    assert _gone(workers), "closing the picker left loky workers running"


@pytest.mark.timeout(60)
def test_picker_errors_are_plain_words(monkeypatch, tmp_path):
    picker = ExecutorPicker("connect", timeout=0.5)
    picker.start()
    assert picker.state == "error"
    assert "give its profile" in picker.message and "Traceback" not in picker.status.value
    with pytest.raises(RuntimeError, match="no executor"):
        _ = picker.executor

    picker.cluster_id_input.value = "no-such-cluster"
    picker.profile_dir_input.value = str(tmp_path)
    picker.start()
    assert picker.state == "error" and isinstance(picker.error, ValueError)
    assert picker.message.startswith("Connecting the cluster failed:")
    assert "Traceback" not in picker.message and "\n" not in picker.message
    picker.close()

    # MPI engines without MPI: said in the widget before anything is started.
    monkeypatch.setitem(__import__("sys").modules, "mpi4py", None)
    before = _children()
    picker = ExecutorPicker("mpi", engines=2)
    picker.start_button.click()
    assert picker.wait_ready(30) is False
    assert "MPI is not installed" in picker.message and "chemfit[mpi]" in picker.message
    assert "Traceback" not in picker.status.value
    assert _children() == before
    picker.close()


@pytest.mark.timeout(120)
def test_a_cluster_that_does_not_start_in_time_is_reported_and_cleaned_up():
    before = _children()
    picker = ExecutorPicker("ipyparallel", engines=2, timeout=0.2)
    picker.start(block=True)
    assert picker.state == "error" and isinstance(picker.error, TimeoutError)
    assert "did not come up within 0.2 s" in picker.message
    assert "Raise the timeout" in picker.message and "Traceback" not in picker.message
    assert _gone(_children() - before), "a cluster that failed to start left processes"
    picker.close()


@pytest.mark.timeout(240)
def test_picker_runs_a_real_two_engine_mpi_cluster_for_a_fit_and_a_streamed_fit():
    """One cluster (it takes seconds to start): 2 MPI engines started and stopped from the
    picker, a dashboard fit on them, then an MPI-engine fit streaming into a live plot."""
    pytest.importorskip("mpi4py")
    from chemfit.fitting.mpi_engine_fit import MPIEngineFit

    before = _children()
    picker = ExecutorPicker("mpi", engines=2, timeout=120)
    t0 = time.monotonic()
    picker.start_button.click()  # returns at once: the kernel stays free
    assert time.monotonic() - t0 < 2.0
    assert picker.state == "starting" and picker.start_button.disabled
    assert "Starting 2 MPI engines" in picker.message
    assert picker.wait_ready(150), picker.message
    assert picker.message.startswith("Running: 2 engines up, MPI world size 2"), picker.message
    executor = picker.executor
    assert executor.n_engines == 2 and executor.mpi_size == 2 and picker.num_workers == 2
    engine_pids = executor.engine_pids
    assert all(_running(pid) for pid in engine_pids)

    # A dashboard fit on the picker's engines; the picker is locked while it runs.
    fitter = _quadratic_fitter()
    dash = FitDashboard(
        fitter,
        picker=picker,
        budget=16,
        optimizer="OnePlusOne",
        mode="async",
        plot_options={"backend": "png"},
    )
    locked = []
    picker.observe(lambda change: locked.append(change["new"]), names="locked")
    dash.start()
    result = dash.wait(timeout=120)
    assert dash.state == "finished", dash.message
    assert result.n_evals == 16 and len(result.history) == 16
    assert dash.plot.n_records == 16
    assert locked == [True, False] and not picker.stop_button.disabled
    dash.close()  # not its picker: the cluster keeps running
    assert picker.state == "running" and executor.submit(abs, -5).result(timeout=60) == 5

    # The same engines as one MPI world: records streamed from rank 0 feed a live plot.
    plot = LivePlot(backend="png", min_interval=0.0, max_cost=1.0)
    fit = MPIEngineFit(
        h.build_cob,
        {"x": 0.0},
        {"x": (-1.0, 3.0)},
        executor=picker.executor,
        fit_kwargs={"budget": 15, "optimizer_str": "OnePlusOne", "seed": 0},
        on_record=plot.on_evaluation,
    )
    with fit:
        streamed = fit.wait(timeout=150)
    data = plot.data()
    assert plot.n_records == 15 == streamed.n_evals
    assert float(data["best"][-1]) == pytest.approx(streamed.best_loss)
    # The streamed meta summary carries the per-term losses of the combined objective.
    assert len(data["terms"]) == 3
    x = data["parameters"]["x"]
    for series, target in zip(data["terms"], (0.5, 1.0, 1.5)):
        assert series == pytest.approx((x - target) ** 2)
    plot.close()

    # A second picker connects to the same cluster by its id; disconnecting keeps it running.
    other = ExecutorPicker(
        "connect",
        cluster_id=executor.cluster_id,
        profile_dir=executor.profile_dir,
        engines=2,
        timeout=60,
    )
    other.start(block=True)
    assert other.state == "running", other.message
    assert other.message.startswith("Running: 2 engines up, MPI world size 2")
    assert other.executor.submit(abs, -6).result(timeout=60) == 6
    other.close()
    assert other.message == "Disconnected; the cluster keeps running"
    assert all(_running(pid) for pid in engine_pids)

    # The status stays live: an engine that dies shows up in the widget, in plain words.
    psutil.Process(engine_pids[0]).kill()
    h.wait_until(lambda: picker.state == "error", 60, "the status to show the dead engine")
    # (mpiexec ends the other rank too, so usually every engine is gone.)
    assert "stopped or died" in picker.message, picker.message
    assert "Start fit (or Launch) starts new engines" in picker.message
    assert "Traceback" not in picker.status.value
    assert not picker.stop_button.disabled

    picker.stop_button.click()  # stops in the background
    h.wait_until(lambda: picker.state == "stopped", 60, "the cluster to stop")
    assert picker.message == "Stopped"
    assert _gone(engine_pids), "engines still running after Shut down"
    assert _gone(_children() - before), "processes left after Shut down"
    picker.close()


# -- live plot -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_live_plot_fed_by_the_contexts_of_map_with_context():
    fitter = Fitter(
        CombinedObjectiveFunction([h.Term(t) for t in (0.5, 1.0, 1.5)]),
        {"x": 0.0},
        bounds={"x": (-2.0, 3.0)},
    )
    plot = LivePlot(backend="png", min_interval=0.0, max_cost=1.0)
    plot.attach(fitter, source="contexts")
    with ThreadPoolExecutor(2) as pool:
        fitter.fit_nevergrad(budget=30, optimizer_str="OnePlusOne", num_workers=2, executor=pool)
    plot.detach(fitter)
    assert fitter.callbacks == []
    data = plot.data()
    history = fitter.result.history
    assert plot.n_records == 30 == len(history)  # batch mode: every context, every step
    assert sorted(data["loss"]) == pytest.approx(sorted(r.loss for r in history))
    assert float(data["best"][-1]) == fitter.result.best_loss
    assert all(b2 <= b1 for b1, b2 in zip(data["best"], data["best"][1:]))
    assert list(data["parameters"]) == ["x"] and len(data["terms"]) == 3
    x = data["parameters"]["x"]
    assert data["terms"][2] == pytest.approx((x - 1.5) ** 2)
    assert plot.draw_count >= 1 and bytes(plot._image.value).startswith(PNG_MAGIC)
    plot.close()


@pytest.mark.timeout(60)
def test_live_plot_fed_by_records_shows_history_and_saves_png(tmp_path):
    fitter = _quadratic_fitter(h.nan_for_negative_x)
    plot = LivePlot(backend="png", min_interval=0.0, max_cost=1.0)
    fitter.register_evaluation_callback(plot)
    fitter.fit_nevergrad(budget=60, optimizer_str="OnePlusOne", seed=1)
    plot.finish()
    history = fitter.result.history
    data = plot.data()
    penalised = [r.penalised for r in history]
    assert any(penalised), "the test objective should have produced penalised evaluations"
    assert data["n_penalised"] == sum(penalised)
    for value, record in zip(data["loss"], history):
        if record.penalised:
            assert value != value  # NaN: not drawn
        else:
            assert value == record.loss
    assert float(data["best"][-1]) == fitter.result.best_loss

    again = LivePlot(backend="png")
    again.show_history(fitter.result)
    replay = again.data()
    assert replay["loss"].tolist() == pytest.approx(data["loss"].tolist(), nan_ok=True)
    assert "60 evaluations" in again._figure.title.get_text()
    path = tmp_path / "fit.png"
    again.save_png(path)
    assert path.read_bytes().startswith(PNG_MAGIC) and again.to_png().startswith(PNG_MAGIC)
    plot.close()
    again.close()


@pytest.mark.timeout(60)
def test_live_plot_throttles_and_catches_up_when_records_stop():
    plot = LivePlot(backend="png", min_interval=2.0, max_cost=1.0)
    plot.reset(expected=500, names=["x"], bounds={"x": (-1.0, 1.0)})
    first_image = bytes(plot._image.value)
    t0 = time.perf_counter()
    for i in range(500):
        plot.on_evaluation({"loss": 1.0 / (i + 1), "penalised": False, "parameters": {"x": 0.0}})
    elapsed = time.perf_counter() - t0
    # A record is only appended; frames come at most every min_interval seconds.
    assert plot.draw_count <= 1 + elapsed / 2.0, (plot.draw_count, elapsed)
    assert elapsed / 500 < 0.002, f"{1e3 * elapsed / 500:.2f} ms per record"
    # No more records: the throttled frame still comes, with all 500 of them.
    h.wait_until(lambda: plot._drawn == 500, 10, "the catch-up frame")
    with plot._draw_lock:  # held until that frame's PNG is in the widget
        pass
    assert bytes(plot._image.value) != first_image
    assert "500 evaluations" in plot._figure.title.get_text()
    assert plot.caption.value == "500 evaluations plotted"
    plot.close()


@pytest.mark.timeout(60)
def test_ipympl_plot_draws_when_the_front_end_asks():
    pytest.importorskip("ipympl")
    plot = LivePlot(backend="ipympl", min_interval=0.0, max_cost=1.0)
    assert plot.backend == "ipympl" and plot.children[0] is plot._canvas
    requests = []
    original = plot._canvas.send_json
    plot._canvas.send_json = lambda content: (
        requests.append(content["type"]) if content["type"] == "draw" else original(content)
    )
    plot.reset()
    plot.on_evaluation({"loss": 2.0, "penalised": False, "parameters": {"a": 1.0}})
    assert requests, "no frame was requested from the front end"
    assert plot._drawn == -1 and plot._figure.best_line.get_ydata().tolist() == []
    plot._canvas.manager.handle_json({"type": "draw"})  # what the browser sends back
    assert plot._drawn == 1 and plot._figure.best_line.get_ydata().tolist() == [2.0, 2.0]
    plot.on_evaluation({"loss": 1.0, "penalised": False, "parameters": {"a": 0.5}})
    plot._canvas.manager.handle_json({"type": "draw"})
    assert plot.draw_count == 1 and plot._drawn == 2  # the first frame after reset is free
    assert plot._figure.best_line.get_ydata().tolist() == [2.0, 1.0, 1.0]
    plot.close()


# -- dashboard -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_dashboard_stop_ends_the_fit_cleanly_and_keeps_results():
    fitter = _quadratic_fitter(h.slow_quadratic)
    dash = FitDashboard(
        fitter, budget=3000, optimizer="OnePlusOne", workers=2, plot_options={"backend": "png"}
    )
    threads_before = {t.name for t in threading.enumerate()}
    dash.start_button.click()
    assert dash.running and dash.start_button.disabled and not dash.stop_button.disabled
    h.wait_until(lambda: dash.plot.n_records >= 20, 60, "20 evaluations")
    dash.stop_button.click()  # returns at once; the fit ends once the evaluations in flight end
    result = dash.wait(timeout=60)
    assert dash.state == "stopped", dash.message
    assert result.stopped and not result.interrupted and result.error is None
    assert 20 <= result.n_evals < 3000 and len(result.history) == result.n_evals
    assert dash.plot.n_records == result.n_evals == dash.progress.value
    assert f"Stopped after {result.n_evals} evaluations" in dash.message
    assert "kept in fitter.result" in dash.message
    assert f"{result.best_loss:.6g}" in dash.best_label.value
    assert fitter.evaluation_callbacks == [] and fitter.callbacks == []
    assert not dash.start_button.disabled and dash.stop_button.disabled

    # New fit: a new fit runs to its end.
    dash.new_fit(budget=20)
    assert dash.wait(timeout=60).n_evals == 20 and dash.state == "finished"
    dash.close()
    assert dash.picker.state == "stopped"  # its own picker's thread pool is shut down
    leftover = {t.name for t in threading.enumerate() if t.is_alive()} - threads_before
    assert not [name for name in leftover if name.startswith("chemfit")], leftover


@pytest.mark.timeout(120)
def test_dashboard_shows_errors_in_plain_words(monkeypatch):
    fitter = _quadratic_fitter(h.fails_for_large_x)
    dash = FitDashboard(
        fitter, budget=200, optimizer="OnePlusOne", kind="serial", plot_options={"backend": "png"}
    )
    dash.start()
    result = dash.wait(timeout=60)
    assert dash.state == "error"
    assert dash.message.startswith("The fit failed: ValueError: x=")
    assert "outside the model's range" in dash.message and "kept in fitter.result" in dash.message
    assert "Traceback" not in dash.status.value and "Traceback" not in dash.log_view.value
    assert result.error.startswith("ValueError") and isinstance(dash.error, ValueError)
    # The fitter's own ERROR log line is shown as text, without its traceback.
    assert any("the objective raised" in line for line in dash.warnings)

    with pytest.raises(ValueError, match="common choices"):
        dash.start(budget=5, optimizer="NoSuchOptimizer")
    dash.optimizer_input.value = "OnePlusOen"
    dash.start_button.click()
    assert dash.state == "error" and not dash.running
    assert "the optimizer 'OnePlusOen'" in dash.message and "closest names" in dash.message
    dash.optimizer_input.value = "OnePlusOne"

    # An objective that cannot be sent to worker processes: said plainly, with the way out.
    locked = Fitter(h.HoldsALock(), {"x": 1.0}, bounds={"x": (-2, 2)})
    dash_p = FitDashboard(locked, budget=4, kind="loky", plot_options={"backend": "png"})
    dash_p.start()
    dash_p.wait(timeout=60)
    assert dash_p.state == "error" and "NotPicklableError" in dash_p.message
    assert "thread pool" in dash_p.message and "Traceback" not in dash_p.message
    dash_p.close()

    # Where the executor cannot start, the dashboard says why.
    monkeypatch.setitem(__import__("sys").modules, "mpi4py", None)
    dash.picker.kind = "mpi"  # the serial "pool" is not locked: changing it stops it
    assert dash.picker.state == "idle"
    dash.new_fit(budget=5, optimizer="OnePlusOne")
    dash.wait(timeout=60)
    assert dash.state == "error" and "MPI is not installed" in dash.message
    dash.close()


@pytest.mark.timeout(30)
def test_start_click_with_bad_settings_is_reported_in_the_widget():
    dash = FitDashboard(_quadratic_fitter(), kind="serial", plot_options={"backend": "png"})
    dash.optimizer_input.value = "  "
    dash.start_button.click()
    assert dash.state == "error" and not dash.running
    assert dash.message == (
        "Not started: choose an optimizer, e.g. NgIohTuned or OnePlusOne. Nothing was changed"
    )
    with pytest.raises(ValueError):
        dash.start()
    with pytest.raises(TypeError, match="chemfit Fitter"):
        FitDashboard(object())
    assert describe_error(KeyboardInterrupt()) == "interrupted"
    dash.close()
