"""The fit dashboard's runs: Stop then Continue, New fit, failed starts, broken executors.

Real fits on real thread pools and loky workers; the widgets run without a kernel, so button
clicks call their handlers directly (tests/integration/test_browser_dashboard.py clicks them in a
browser).
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")
psutil = pytest.importorskip("psutil")

from chemfit import Fitter  # noqa: E402
from chemfit_widgets import ExecutorPicker, FitDashboard  # noqa: E402
from tests.helpers import widget_objectives as h  # noqa: E402


def _fitter(objective=h.slow_quadratic) -> Fitter:
    return Fitter(objective, {"x": 0.0, "y": 0.0}, bounds={"x": (-3, 3), "y": (-3, 3)})


def _dashboard(fitter: Fitter, **options) -> FitDashboard:
    options.setdefault("optimizer", "OnePlusOne")
    options.setdefault("plot_options", {"backend": "png"})
    return FitDashboard(fitter, **options)


def _shown(dash: FitDashboard) -> dict:
    """What the page shows of the fit: plot data, table, best loss, progress, result."""
    return {
        "records": dash.plot.n_records,
        "image": bytes(dash.plot._image.value),
        "table": dash.table.value,
        "best": dash.best_label.value,
        "progress": (dash.progress.value, dash.progress_label.value),
        "result": dash.fitter.result,
        "n_evals": dash.n_evals,
    }


def _stop_after(dash: FitDashboard, n: int) -> None:
    h.wait_until(lambda: dash.plot.n_records >= n, 60, f"{n} evaluations")
    dash.stop_button.click()
    dash.wait(timeout=60)
    assert dash.state == "stopped", dash.message


@pytest.mark.timeout(120)
def test_start_after_stop_continues_the_fit():
    fitter = _fitter()
    dash = _dashboard(fitter, budget=3000, workers=2)
    try:
        assert dash.start_button.description == "Start fit" and dash.new_button.disabled
        dash.start_button.click()
        _stop_after(dash, 30)
        first = fitter.result
        n1, best1 = first.n_evals, first.best_loss
        earlier = [(r.index, r.step, r.loss) for r in first.history]
        assert f"Stopped after {n1} evaluations" in dash.message
        assert "Continue goes on from here; New fit starts over" in dash.message
        assert dash.can_continue and dash.start_button.description == "Continue"
        assert not dash.new_button.disabled
        assert f"Continue runs {3000 - n1} more, to the budget of 3000" in dash.plan_label.value

        # The budget is the total: Continue runs the other 40.
        dash.budget = n1 + 40
        assert f"Continue runs 40 more, to the budget of {n1 + 40}" in dash.plan_label.value
        dash.start_button.click()
        assert dash.message.startswith("Continuing"), dash.message
        result = dash.wait(timeout=60)
        assert dash.state == "finished", dash.message
        n = n1 + 40
        assert result.n_evals == n == len(result.history) == dash.n_evals
        # The callbacks saw only the new records: the plot holds each evaluation once.
        assert dash.plot.n_records == n and dash.progress.value == n
        assert dash.progress_label.value == f"{n} / {n}"
        assert [(r.index, r.step, r.loss) for r in result.history][:n1] == earlier
        assert [r.index for r in result.history] == list(range(n))
        assert result.history[n1].step > earlier[-1][1]
        assert result.best_loss <= best1
        assert f"{result.best_loss:.6g}" in dash.best_label.value
        assert f" of {n})" in dash.best_label.value
        assert dash.message.startswith(f"Finished: {n} evaluations (40 more in ")
        # Evaluations of the whole fit, in the table too.
        assert f"<td>evaluations</td><td style='text-align:right'>{n}</td>" in dash.table.value

        # All of the budget is used: Continue says how to go on, and changes nothing.
        before = _shown(dash)
        dash.start_button.click()
        assert dash.state == "error" and not dash.running
        assert f"all {n} evaluations of the budget are done" in dash.message
        assert "raise it to continue, or click New fit" in dash.message
        assert _shown(dash) == before
        assert f"All {n} evaluations of the budget are done" in dash.plan_label.value
    finally:
        dash.close()


@pytest.mark.timeout(120)
def test_new_fit_starts_over():
    fitter = _fitter(h.quadratic)
    dash = _dashboard(fitter, budget=40, kind="serial")
    try:
        dash.start()
        first = dash.wait(timeout=60)
        assert first.n_evals == 40 and dash.plot.n_records == 40
        dash.budget = 15
        dash.new_button.click()
        result = dash.wait(timeout=60)
        assert dash.state == "finished", dash.message
        assert result is not first and result.n_evals == 15
        assert [r.index for r in result.history] == list(range(15))
        assert dash.n_evals == dash.plot.n_records == 15
        assert dash.progress_label.value == "15 / 15"
        assert "(evaluation " in dash.best_label.value and " of 15)" in dash.best_label.value
        assert dash.message.startswith("Finished: 15 evaluations (in ")

        # A fit run from code replaces fitter.result: Start then starts a new fit.
        assert dash.can_continue
        fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne")
        dash.budget = 25
        messages = []
        dash.observe(lambda change: messages.append(change["new"]), names="message")
        dash.start()
        result = dash.wait(timeout=60)
        assert "replaced by a fit run outside the dashboard" in messages[0]
        assert result.n_evals == 25 == dash.n_evals == dash.plot.n_records
    finally:
        dash.close()


@pytest.mark.timeout(120)
def test_a_failed_start_leaves_plot_table_and_result_as_they_were():
    objective = h.Switchable()
    fitter = _fitter(objective)
    dash = _dashboard(fitter, budget=40, workers=2)
    try:
        dash.start()
        dash.wait(timeout=60)
        assert dash.state == "finished", dash.message
        dash.budget = 80
        before = _shown(dash)
        assert before["records"] == 40 and "<td>x</td>" in before["table"]

        # A misspelled optimizer: said, with the closest names; nothing else changes.
        dash.optimizer_input.value = "OnePlusOen"
        dash.start_button.click()
        assert dash.state == "error" and not dash.running
        assert dash.message.startswith("Not started: the optimizer 'OnePlusOen'")
        assert "closest names: OnePlusOne" in dash.message
        assert dash.message.endswith("Nothing was changed")
        assert _shown(dash) == before
        with pytest.raises(ValueError, match="closest names"):
            dash.new_fit()
        dash.optimizer_input.value = "OnePlusOne"

        # A bad budget from code.
        with pytest.raises(ValueError, match="budget must be a whole number"):
            dash.start(budget=0)
        assert dash.budget == 80 and _shown(dash) == before

        # An executor that cannot start (connect without a profile or cluster id).
        dash.picker.kind = "connect"
        dash.new_button.click()
        dash.wait(timeout=60)
        assert dash.state == "error", dash.message
        assert dash.message.startswith("The executor could not start: Connecting the cluster")
        assert "give its profile" in dash.message and "Nothing was changed" in dash.message
        assert _shown(dash) == before

        # A new fit that fails before its first evaluation (the objective cannot be sent to
        # loky's workers): the fit shown, and fitter.result, stay.
        objective.hold_lock()
        dash.picker.kind = "loky"
        dash.new_button.click()
        dash.wait(timeout=60)
        assert dash.state == "error", dash.message
        assert "NotPicklableError" in dash.message and "Nothing was changed" in dash.message
        assert _shown(dash) == before
        assert dash.can_continue and dash.start_button.description == "Continue"

        # Back on threads, Continue goes on from the 40 evaluations.
        objective.hold_lock(False)
        dash.picker.kind = "thread"
        dash.start_button.click()
        result = dash.wait(timeout=60)
        assert dash.state == "finished", dash.message
        assert result.n_evals == 80 == dash.plot.n_records
        assert result.history[:40] == before["result"].history[:40]
    finally:
        dash.close()


@pytest.mark.timeout(60)
def test_stop_while_starting_changes_nothing():
    fitter = _fitter(h.quadratic)
    dash = _dashboard(fitter, budget=20, kind="serial")
    try:
        dash.start()
        dash.wait(timeout=60)
        dash.budget = 40
        before = _shown(dash)
        dash.start()
        dash.stop(wait=True)  # Stop at once: while starting, or after the first step
        assert dash.state == "stopped", dash.message
        if dash.n_evals == 20:  # stopped before its first evaluation
            assert dash.message.startswith("Stopped before any new evaluation")
            assert _shown(dash) == before
        assert dash.fitter.result.n_evals == dash.n_evals == dash.plot.n_records
    finally:
        dash.close()


class _GatedPicker(ExecutorPicker):
    """A picker whose executor is ready only once ``release`` is set (a cluster coming up)."""

    def __init__(self, *args, **kwargs):
        self.release = threading.Event()
        super().__init__(*args, **kwargs)

    def ensure_executor(self):
        assert self.release.wait(30), "the test did not release the executor"
        return super().ensure_executor()


@pytest.mark.timeout(60)
def test_a_stop_pressed_while_the_executor_starts_ends_that_fit_and_not_the_next():
    fitter = _fitter(h.quadratic)
    picker = _GatedPicker("serial")
    dash = _dashboard(fitter, budget=20, picker=picker)
    try:
        dash.start()
        assert dash.state == "starting"
        dash.stop_button.click()  # while the executor is still starting
        assert dash.state == "stopping" and fitter.stop_requested  # the fitter's one request
        picker.release.set()
        dash.wait(timeout=60)
        assert dash.state == "stopped", dash.message
        assert dash.message == "Stopped before any evaluation"
        assert dash.n_evals == 0 == dash.plot.n_records and fitter.result is None
        assert not fitter.stop_requested  # that fit consumed it: the next one is not stopped
        dash.start()
        result = dash.wait(timeout=60)
        assert dash.state == "finished" and result.n_evals == 20 == dash.n_evals
        # The count and the best shown are the fit's history's.
        best = fitter.history.best()
        assert len(fitter.history) == 20 and dash.progress_label.value == "20 / 20"
        assert (
            f"<b>{best.loss:.6g}</b> (evaluation {best.index + 1} of 20)" in dash.best_label.value
        )
        assert fitter.evaluation_callbacks == [] and fitter.callbacks == []
    finally:
        picker.release.set()
        dash.close()
        picker.close()


@pytest.mark.timeout(60)
def test_wait_async_lets_the_event_loop_run():
    dash = _dashboard(_fitter(), budget=60, kind="serial")
    ticks = []

    async def ticker() -> None:
        while dash.running:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.02)

    async def main():
        dash.start()
        result, _ = await asyncio.gather(dash.wait_async(timeout=60), ticker())
        return result

    try:
        result = asyncio.run(main())
        assert result.n_evals == 60 and dash.state == "finished"
        assert len(ticks) >= 5, "wait_async blocked the event loop"
        dash.new_fit(budget=100_000)
        with pytest.raises(TimeoutError, match="still running"):
            asyncio.run(dash.wait_async(timeout=0.3))
    finally:
        dash.close()


@pytest.mark.timeout(120)
def test_a_loky_pool_whose_worker_died_is_rebuilt_by_the_next_start():
    fitter = _fitter()
    dash = _dashboard(fitter, budget=30, kind="loky", workers=2)
    picker = dash.picker
    try:
        dash.start()
        dash.wait(timeout=60)
        assert dash.state == "finished", dash.message
        old = picker.executor
        workers = list(old._processes)
        psutil.Process(workers[0]).kill()
        h.wait_until(lambda: picker.state == "error", 10, "the picker to see the dead worker")
        assert picker.message.startswith("Broken: "), picker.message
        assert "builds a new pool" in picker.message
        assert "Ready" not in picker.status.value and "#d32f2f" in picker.status.value
        assert not picker.start_button.disabled and not picker.kind_dropdown.disabled

        dash.budget = 60
        dash.start_button.click()  # Continue: a new pool, the fit goes on
        result = dash.wait(timeout=60)
        assert dash.state == "finished", dash.message
        assert result.n_evals == 60
        assert picker.state == "running" and picker.executor is not old
        assert "a new pool: the previous one broke" in picker.message
        assert all(not psutil.pid_exists(pid) or _zombie(pid) for pid in workers)
    finally:
        dash.close()


def _zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True
