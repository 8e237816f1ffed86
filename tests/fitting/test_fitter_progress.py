"""Progress and interrupts as a user meets them (issue 11, point 6).

* In a Jupyter kernel a fit shows progress by default (a tqdm widget, the best loss as
  postfix); in a background thread it stays silent; elsewhere the terminal rule holds.
* A ``KeyboardInterrupt`` ends a fit with :class:`FitInterrupted`, a ``KeyboardInterrupt``
  whose one line says how many evaluations were kept and where; a notebook shows that line
  instead of a traceback.

The notebook tests run real kernels through nbclient and interrupt them with
``km.interrupt_kernel()``, the way JupyterLab's stop button does; the script test sends SIGINT
to a script run as ``__main__``, like Ctrl-C in a terminal.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from chemfit.exceptions import FitInterrupted
from chemfit.fitter import Fitter
from chemfit.fitter_callbacks import CheckpointBestParameters, JSONLinesHistory
from chemfit.fitting.fit_session import in_jupyter_kernel, progress_bar
from tests.helpers import fitter_objectives as h

ROOT = Path(__file__).resolve().parents[2]
COUNT = re.compile(r"^fit interrupted after (\d+) evaluations; they are kept in fitter\.result")


def quad_fitter(objective=h.quadratic) -> Fitter:
    return Fitter(objective, {"x": 0.0, "y": 0.0}, bounds={"x": (-4, 4), "y": (-4, 4)})


def best_step(result) -> int:
    return next(r.step for r in result.history if r.loss == result.best_loss)


def jsonl_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


# -- FitInterrupted in this process ------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("num_workers", "mode"), [(1, "batch"), (2, "batch"), (2, "async")])
def test_an_interrupt_raises_fit_interrupted_naming_count_and_files(tmp_path, num_workers, mode):
    jsonl, checkpoint = tmp_path / "fit.jsonl", tmp_path / "best.json"
    fitter = quad_fitter(h.InterruptOnce(at=9))
    fitter.register_evaluation_callback(JSONLinesHistory(jsonl))
    fitter.register_callback(CheckpointBestParameters(checkpoint))
    with pytest.raises(KeyboardInterrupt) as info:  # upstream handlers still catch it
        fitter.fit_nevergrad(
            budget=40, optimizer_str="OnePlusOne", num_workers=num_workers, mode=mode
        )
    exc = info.value
    result = fitter.result
    assert isinstance(exc, FitInterrupted) and exc.result is result
    assert type(exc.__cause__) is KeyboardInterrupt
    assert result.interrupted and result.n_evals == len(result.history) == jsonl_lines(jsonl)
    assert str(exc) == (
        f"fit interrupted after {result.n_evals} evaluations; they are kept in fitter.result "
        f"and {jsonl} (best loss {result.best_loss:.6g} at step {best_step(result)}; best "
        f"parameters checkpointed in {checkpoint})"
    )
    assert exc._render_traceback_() == [f"KeyboardInterrupt: {exc}"]


@pytest.mark.timeout(60)
def test_an_interrupt_in_fit_scipy_raises_fit_interrupted():
    fitter = quad_fitter(h.InterruptOnce(at=6))
    with pytest.raises(FitInterrupted) as info:
        fitter.fit_scipy(method="Nelder-Mead")
    result = fitter.result
    assert result.interrupted and result.n_evals == len(result.history) == 5
    assert str(info.value) == (
        "fit interrupted after 5 evaluations; they are kept in fitter.result "
        f"(best loss {result.best_loss:.6g} at step {best_step(result)})"
    )


@pytest.mark.timeout(30)
def test_an_interrupt_before_any_evaluation_says_so():
    fitter = quad_fitter(h.InterruptOnce(at=1))
    with pytest.raises(FitInterrupted, match="before any evaluation finished"):
        fitter.fit_nevergrad(budget=10, optimizer_str="OnePlusOne")
    assert fitter.result.interrupted and fitter.result.n_evals == 0


@pytest.mark.timeout(30)
def test_a_fit_interrupted_from_inside_passes_through_unchanged():
    def nested(params):
        raise FitInterrupted("the inner fit was interrupted")

    fitter = quad_fitter(nested)
    with pytest.raises(FitInterrupted, match=r"^the inner fit was interrupted$"):
        fitter.fit_nevergrad(budget=10, optimizer_str="OnePlusOne")
    assert fitter.result.interrupted


# -- the progress bar --------------------------------------------------------------------------


def test_no_jupyter_kernel_here_and_no_bar_by_default(capsys):
    assert not in_jupyter_kernel()
    assert progress_bar(None, 10, "fit") is None
    quad_fitter().fit_nevergrad(budget=4, optimizer_str="OnePlusOne")
    assert capsys.readouterr().err == ""


@pytest.mark.timeout(30)
def test_the_postfix_changes_only_when_the_best_improves(capsys):
    """Formatting the postfix for every evaluation is overhead: it is set on improvements."""
    fitter = quad_fitter()
    calls: list[str] = []
    spied = []

    def spy(step, contexts):
        bar = fitter._session.bar
        if not spied:
            original = bar.set_postfix

            def counting(*args, **kwargs):
                calls.append(kwargs["best"])
                return original(*args, **kwargs)

            bar.set_postfix = counting
            spied.append(step)

    fitter.register_callback(spy)
    fitter.fit_nevergrad(budget=60, optimizer_str="OnePlusOne", seed=0, progress=True)
    losses = [r.loss for r in fitter.result.history]
    improvements = [i for i in range(1, len(losses)) if losses[i] < min(losses[:i])]
    assert len(calls) == len(improvements) < len(losses) - 1
    assert calls[-1] == f"{fitter.result.best_loss:.6g}"
    err = capsys.readouterr().err
    assert "60/60" in err and f"best={fitter.result.best_loss:.6g}" in err


@pytest.mark.timeout(30)
def test_a_resumed_fit_counts_on_in_its_bar(capsys):
    fitter = quad_fitter()
    fitter.fit_nevergrad(budget=7, optimizer_str="OnePlusOne", progress=False)
    fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne", progress=True, resume=True)
    assert "12/12" in capsys.readouterr().err


# -- a real Jupyter kernel ---------------------------------------------------------------------


def _kernel_cells(jsonl: Path) -> list[str]:
    return [
        # a user's model, defined in a cell (__main__)
        textwrap.dedent(f"""
            import time
            from chemfit import Fitter
            from chemfit.fitter_callbacks import JSONLinesHistory

            def model(p):
                time.sleep(0.02)
                return (p["x"] - 1.0) ** 2 + (p["y"] + 2.0) ** 2

            fitter = Fitter(model, {{"x": 0.0, "y": 0.0}}, bounds={{"x": (-4, 4), "y": (-4, 4)}})
            fitter.register_evaluation_callback(JSONLinesHistory({str(jsonl)!r}))
        """),
        'fitter.fit_nevergrad(budget=5000, optimizer_str="OnePlusOne")',  # interrupted
        "print(fitter.result.n_evals, fitter.result.interrupted)",
        'fitter.fit_nevergrad(budget=20, optimizer_str="OnePlusOne", resume=True)\n'
        "print(fitter.result.n_evals)",
        textwrap.dedent("""
            import threading
            other = Fitter(model, {"x": 0.0, "y": 0.0})
            thread = threading.Thread(
                target=other.fit_nevergrad, kwargs={"budget": 10, "optimizer_str": "OnePlusOne"}
            )
            thread.start(); thread.join()
            print(other.result.n_evals)
        """),
        # without ipywidgets, the bar is text on stderr
        textwrap.dedent("""
            import sys
            sys.modules["ipywidgets"] = None
            other.fit_nevergrad(budget=10, optimizer_str="OnePlusOne")
        """),
    ]


def _interrupt_when(client, jsonl: Path, n_lines: int) -> threading.Thread:
    """Interrupt the kernel (as JupyterLab's stop button does) once the fit wrote n lines."""

    def watch() -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if jsonl_lines(jsonl) >= n_lines:
                asyncio.run(client.km.interrupt_kernel())
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _widget_states(nb) -> list[dict]:
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return [model["state"] | {"_name": model["model_name"]} for model in state["state"].values()]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_in_a_notebook_progress_shows_and_an_interrupt_is_one_line(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from nbformat.v4 import new_code_cell, new_notebook

    jsonl = tmp_path / "fit.jsonl"
    nb = new_notebook(cells=[new_code_cell(source) for source in _kernel_cells(jsonl)])
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", allow_errors=True, resources={"metadata": {}}
    )
    with client.setup_kernel(cwd=str(tmp_path)):
        client.execute_cell(nb.cells[0], 0)
        watcher = _interrupt_when(client, jsonl, n_lines=10)
        started = time.perf_counter()
        client.execute_cell(nb.cells[1], 1)
        print(f"\ninterrupted cell ended {time.perf_counter() - started:.1f} s after it started")
        watcher.join(5)
        for index in range(2, len(nb.cells)):
            client.execute_cell(nb.cells[index], index)
        client.set_widgets_metadata()
    nbformat.validate(nb)
    outputs = [cell.outputs for cell in nb.cells]

    # the interrupted cell: a progress widget, then one line instead of a traceback
    display, error = outputs[1]
    assert "application/vnd.jupyter.widget-view+json" in display["data"], display
    assert error["output_type"] == "error" and error["ename"] == "FitInterrupted"
    assert len(error["traceback"]) == 1, error["traceback"]
    line = error["traceback"][0]
    match = COUNT.match(line.removeprefix("KeyboardInterrupt: "))
    assert match and f"and {jsonl} (best loss " in line, line
    n_evals = int(match.group(1))
    assert 10 <= n_evals <= jsonl_lines(jsonl) + 1
    assert outputs[2][0]["text"] == f"{n_evals} True\n"  # kept in fitter.result
    # resumed in the notebook: the count goes on
    assert outputs[3][-1]["text"] == f"{n_evals + 20}\n"
    # a fit in a background thread shows nothing but what the cell prints
    assert [o["output_type"] for o in outputs[4]] == ["stream"] and outputs[4][0]["text"] == "10\n"
    # without ipywidgets: a text bar on stderr, with the best loss
    stderr = "".join(o.get("text", "") for o in outputs[5] if o.get("name") == "stderr")
    assert "10/10" in stderr and "best=" in stderr, outputs[5]

    # the widgets' final state: the interrupted bar is red at n_evals, the resumed one complete
    states = _widget_states(nb)
    bars = [s for s in states if s["_name"] == "FloatProgressModel"]
    assert [(b["value"], b["max"], b["bar_style"]) for b in bars] == [
        (n_evals, 5000, "danger"),
        (n_evals + 20, n_evals + 20, "success"),
    ]
    texts = [s["value"] for s in states if s["_name"] == "HTMLModel"]
    assert any(f"{n_evals + 20}/{n_evals + 20}" in t and "best=" in t for t in texts), texts


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ctrl_c_in_a_script_ends_with_the_count_and_where(tmp_path):
    jsonl = tmp_path / "fit.jsonl"
    script = tmp_path / "fit_script.py"
    script.write_text(
        textwrap.dedent(f"""
            import time
            from chemfit import Fitter
            from chemfit.fitter_callbacks import JSONLinesHistory

            def model(p):
                time.sleep(0.02)
                return (p["x"] - 1.0) ** 2 + (p["y"] + 2.0) ** 2

            fitter = Fitter(model, {{"x": 0.0, "y": 0.0}})
            fitter.register_evaluation_callback(JSONLinesHistory({str(jsonl)!r}))
            fitter.fit_nevergrad(budget=5000, optimizer_str="OnePlusOne")
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script)], stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 60
        while jsonl_lines(jsonl) < 10 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # CPython exits through SIGINT (130) only for a bare KeyboardInterrupt; a subclass exits 1
    assert proc.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    prefix = "chemfit.core.exceptions.FitInterrupted: "
    assert last.startswith(prefix), stderr
    match = COUNT.match(last.removeprefix(prefix))
    assert match and f"and {jsonl} (best loss " in last, last
    assert 10 <= int(match.group(1)) <= jsonl_lines(jsonl) + 1
    assert "The above exception was the direct cause" in stderr  # where it was interrupted
    assert not math.isnan(float(json.loads(jsonl.read_text().splitlines()[0])["loss"]))
