"""The executor picker: broken executors shown as broken and rebuilt, controls that say why
they are locked, settings as traitlets. Real thread pools, loky and stdlib process pools, and a
real local ipyparallel cluster whose engine is killed."""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import pytest

pytest.importorskip("ipywidgets")
psutil = pytest.importorskip("psutil")

from chemfit import Fitter  # noqa: E402
from chemfit_widgets import ExecutorPicker, FitDashboard  # noqa: E402
from chemfit_widgets.executor_picker import executor_problem  # noqa: E402
from tests.helpers import widget_objectives as h  # noqa: E402


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _gone(pids, timeout: float = 20.0) -> bool:
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.timeout(60)
def test_executor_problem_reads_broken_and_closed_pools():
    import loky

    assert executor_problem(None) is None
    threads = ThreadPoolExecutor(1)
    assert executor_problem(threads) is None
    threads.shutdown()
    assert executor_problem(threads) == "it was shut down"

    stdlib = ProcessPoolExecutor(1)
    try:
        assert stdlib.submit(abs, -1).result(timeout=30) == 1
        assert executor_problem(stdlib) is None
        psutil.Process(next(iter(stdlib._processes))).kill()
        h.wait_until(lambda: executor_problem(stdlib) is not None, 10, "the pool to break")
        assert "terminated abruptly" in executor_problem(stdlib)
    finally:
        stdlib.shutdown(wait=True)

    pool = loky.get_reusable_executor(max_workers=1)
    try:
        assert pool.submit(abs, -1).result(timeout=30) == 1
        assert executor_problem(pool) is None
        psutil.Process(next(iter(pool._processes))).kill()
        h.wait_until(lambda: executor_problem(pool) is not None, 10, "loky to flag the pool")
        assert "unexpectedly terminated" in executor_problem(pool)
    finally:
        pool.shutdown(wait=True, kill_workers=True)


@pytest.mark.timeout(60)
def test_settings_are_traitlets_linked_to_the_controls():
    picker = ExecutorPicker("loky", workers=3, engines=4, timeout=12.5)
    try:
        assert picker.kind_dropdown.value == "loky" and picker.workers_input.value == 3
        assert picker.engines_input.value == 4 and picker.timeout_input.value == 12.5
        changes = []
        picker.observe(lambda change: changes.append(change["name"]), names=["kind", "workers"])
        picker.workers_input.value = 2  # as a person types it
        picker.kind = "thread"
        assert picker.workers == 2 and picker.kind_dropdown.value == "thread"
        assert changes == ["workers", "kind"]
        with pytest.raises(ValueError, match="kind must be one of"):
            picker.kind = "gpu"
        with pytest.raises(ValueError, match="workers must be >= 1"):
            picker.workers = 0
    finally:
        picker.close()


@pytest.mark.timeout(60)
def test_a_running_pool_stays_editable_and_is_rebuilt_when_changed():
    picker = ExecutorPicker("loky", workers=1)
    try:
        first = picker.executor
        assert first.submit(abs, -2).result(timeout=30) == 2
        workers = list(first._processes)
        assert picker.state == "running" and not picker.kind_dropdown.disabled
        assert picker.hint.value == "" and picker.kind_dropdown.tooltip is None
        assert picker.timeout_input.description == "Start timeout (s)"
        assert "Seconds to wait for the engines" in picker.timeout_input.tooltip
        picker.workers = 2  # the running pool no longer matches: it is stopped
        assert picker.state == "idle" and "created when a fit starts" in picker.message
        assert _gone(workers), "the out-of-date pool's workers are still running"
        second = picker.executor
        assert second is not first and second._max_workers == 2
        picker.kind = "thread"
        assert picker.state == "idle"
        assert isinstance(picker.executor, ThreadPoolExecutor)
    finally:
        picker.close()


@pytest.mark.timeout(60)
def test_locked_controls_say_how_to_unlock_them():
    picker = ExecutorPicker("thread", workers=2)
    try:
        _ = picker.executor
        picker.locked = True  # what the dashboard does while its fit runs
        controls = [picker.kind_dropdown, picker.workers_input, picker.timeout_input]
        assert all(control.disabled for control in controls)
        assert all("click the dashboard's Stop" in control.tooltip for control in controls)
        assert "click the dashboard's Stop to change it" in picker.hint.value
        assert picker.start_button.disabled and picker.stop_button.disabled
        assert "dashboard's Stop" in picker.stop_button.tooltip
        with pytest.raises(RuntimeError, match="cannot change kind now: A fit is running"):
            picker.kind = "loky"
        assert picker.kind == "thread" and picker.state == "running"
        picker.locked = False
        assert not any(control.disabled for control in controls)
        assert picker.hint.value == "" and picker.kind_dropdown.tooltip is None
    finally:
        picker.close()


@pytest.mark.timeout(180)
def test_an_ipyparallel_cluster_whose_engines_died_is_broken_and_restarted_by_start():
    pytest.importorskip("ipyparallel")
    before = _children()
    picker = ExecutorPicker("ipyparallel", engines=1, timeout=90)
    fitter = Fitter(h.quadratic, {"x": 0.0, "y": 0.0}, bounds={"x": (-3, 3), "y": (-3, 3)})
    dash = FitDashboard(
        fitter, picker=picker, budget=8, optimizer="OnePlusOne", plot_options={"backend": "png"}
    )
    try:
        picker.start(block=True)
        assert picker.state == "running", picker.message
        old = picker.executor
        # While the engines run, the settings are locked, and say how to unlock them.
        assert picker.kind_dropdown.disabled
        assert "Shut down" in picker.kind_dropdown.tooltip and "Shut down" in picker.hint.value
        with pytest.raises(RuntimeError, match="cannot change kind now"):
            picker.kind = "thread"
        dash.start()
        assert dash.wait(timeout=90).n_evals == 8

        for pid in old.engine_pids:
            psutil.Process(pid).kill()
        h.wait_until(lambda: picker.state == "error", 60, "the picker to see the dead engine")
        assert picker.message == (
            "Broken: every engine has stopped or died. Start fit (or Launch) starts new engines"
        )
        assert not picker.stop_button.disabled and not picker.start_button.disabled

        dash.budget = 16
        dash.start()  # Continue: new engines, the fit goes on
        result = dash.wait(timeout=150)
        assert dash.state == "finished", dash.message
        assert result.n_evals == 16 and picker.executor is not old
        assert picker.message.startswith("Running: 1 engine up"), picker.message
        assert picker.message.endswith("(new engines: the previous one broke)")
    finally:
        dash.close()
        picker.close()
    assert picker.state == "stopped"
    assert _gone(_children() - before), "processes left after closing the picker"
