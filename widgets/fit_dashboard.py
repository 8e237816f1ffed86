"""The fit dashboard: executor picker, live plot, progress, best parameters, Start and Stop.

``dashboard(fitter)`` (or ``FitDashboard(fitter)``) returns a widget; the last expression of a
cell displays it. Start runs ``fitter.fit_nevergrad`` in a background thread, so the kernel
stays free and the plot updates while the fit runs. Stop calls ``fitter.request_stop()``: no new
candidate is asked, the evaluations in flight finish and are recorded, and the results stay in
``fitter.result`` (``stopped=True``); no worker is left running. The executor the picker
started keeps running for the next fit until the picker's Stop (or closing the dashboard)
stops it.
"""

from __future__ import annotations

import html
import logging
import math
import threading
import time
from typing import Any

from chemfit.core.flatdict import flatten_dict

from ._jupyter import close_children, require_ipywidgets
from .executor_picker import KINDS, ExecutorPicker
from .live_plot import LivePlot
from .messages import describe_error, status_html

widgets = require_ipywidgets()
import traitlets  # noqa: E402  (ipywidgets depends on it)

__all__ = ["FitDashboard", "FitStopped", "dashboard"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ["NgIohTuned", "NGOpt", "OnePlusOne", "CMA", "TwoPointsDE", "DE", "PSO"]


def _import_nevergrad() -> None:
    try:
        import nevergrad  # noqa: F401
    except Exception:  # the fit reports a missing nevergrad in plain words later
        logger.debug("importing nevergrad in the background failed", exc_info=True)


class FitStopped(KeyboardInterrupt):
    """Raised in the dashboard's fit thread when Stop was clicked before the fit started.

    A running fit is stopped with ``fitter.request_stop()`` instead, which ends it without an
    exception.
    """


class _LogCollector(logging.Handler):
    """Keeps the chemfit WARNING/ERROR messages of a fit (text only, never tracebacks)."""

    def __init__(self, on_message: Any) -> None:
        super().__init__(level=logging.WARNING)
        self.on_message = on_message

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
        except Exception:  # a bad log call must not break the fit
            return
        self.on_message(f"{record.levelname.lower()}: {text[:300]}")


class FitDashboard(widgets.VBox):
    """Run and watch a nevergrad fit of ``fitter`` from a notebook.

    Parameters
    ----------
    fitter : chemfit.Fitter
        The fitter to run; its ``result`` holds the outcome of each fit.
    budget : int
        Evaluations per fit (editable in the widget).
    optimizer : str
        nevergrad optimizer name (editable).
    mode : {"batch", "async"}
        ``fit_nevergrad`` mode (editable).
    picker : ExecutorPicker, optional
        Where to run; by default a new picker with ``kind`` and ``workers``, which the
        dashboard stops when it is closed.
    kind : str
        Executor kind of the default picker (see :data:`~chemfit_widgets.executor_picker.KINDS`).
    workers : int
        Worker count of the default picker.
    plot : LivePlot, optional
        The live plot; by default a new one with ``plot_options``.
    plot_options : dict, optional
        Keyword arguments for the default :class:`LivePlot`.
    fit_options : dict, optional
        More keyword arguments for ``fit_nevergrad`` (e.g. ``seed``).
    ui_interval : float
        Seconds between updates of the progress bar, best loss and table.

    Attributes
    ----------
    state : str
        ``"idle"``, ``"starting"``, ``"running"``, ``"stopping"``, ``"finished"``,
        ``"stopped"`` or ``"error"`` (a traitlet: ``dash.observe(handler, names="state")``).
    message : str
        The status line in plain words.
    error : BaseException or None
        The error that ended the last fit, if any.
    warnings : list of str
        chemfit WARNING/ERROR log messages of the last fit (also shown in the widget).

    Examples
    --------
    >>> from chemfit import Fitter
    >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0}, bounds={"x": (-2, 2)})
    >>> dash = FitDashboard(fitter, budget=30, optimizer="OnePlusOne", kind="serial",
    ...                     plot_options={"backend": "png"})
    >>> dash.start()                        # returns at once; the fit runs in a thread
    >>> dash.wait(timeout=60).n_evals       # the FitResult
    30
    >>> dash.state, dash.progress.value
    ('finished', 30)
    >>> dash.close()
    """

    state = traitlets.Unicode("idle")
    message = traitlets.Unicode("")
    _initialised = False

    def __init__(
        self,
        fitter: Any,
        *,
        budget: int = 200,
        optimizer: str = "NgIohTuned",
        mode: str = "batch",
        picker: ExecutorPicker | None = None,
        kind: str = "thread",
        workers: int = 2,
        plot: LivePlot | None = None,
        plot_options: dict | None = None,
        fit_options: dict | None = None,
        ui_interval: float = 0.25,
        **box_kwargs: Any,
    ) -> None:
        if not callable(getattr(fitter, "fit_nevergrad", None)):
            raise TypeError(
                f"fitter must be a chemfit Fitter, got {type(fitter).__name__}; create one with "
                "chemfit.Fitter(objective, initial_params, bounds)"
            )
        w = widgets
        self.fitter = fitter
        self.fit_options = dict(fit_options or {})
        self.ui_interval = float(ui_interval)
        self._owns_picker = picker is None
        self.picker = picker if picker is not None else ExecutorPicker(kind, workers=workers)
        self._owns_plot = plot is None
        self.plot = plot if plot is not None else LivePlot(**(plot_options or {}))

        style = {"description_width": "70px"}
        self.budget_input = w.BoundedIntText(
            value=budget,
            min=1,
            max=10_000_000,
            description="Budget",
            style=style,
            layout=w.Layout(width="180px"),
        )
        options = OPTIMIZERS if optimizer in OPTIMIZERS else [optimizer, *OPTIMIZERS]
        self.optimizer_input = w.Combobox(
            value=optimizer,
            options=options,
            ensure_option=False,
            description="Optimizer",
            style=style,
            layout=w.Layout(width="240px"),
        )
        self.mode_input = w.Dropdown(
            options=[("batch", "batch"), ("async", "async")],
            value=mode,
            description="Mode",
            style=style,
            layout=w.Layout(width="170px"),
        )
        self.start_button = w.Button(
            description="Start fit", icon="play", button_style="success",
            layout=w.Layout(width="110px"),
        )  # fmt: skip
        self.stop_button = w.Button(
            description="Stop", icon="stop", button_style="danger", disabled=True,
            layout=w.Layout(width="90px"),
        )  # fmt: skip
        self.progress = w.IntProgress(
            value=0, min=0, max=budget, layout=w.Layout(width="260px", flex="1 1 auto")
        )
        self.progress_label = w.Label(value=f"0 / {budget}")
        self.best_label = w.HTML()
        self.table = w.HTML()
        self.status = w.HTML()
        self.log_view = w.HTML()
        for widget, name in (
            (self.budget_input, "chemfit-budget"),
            (self.optimizer_input, "chemfit-optimizer"),
            (self.start_button, "chemfit-start"),
            (self.stop_button, "chemfit-stop"),
            (self.progress, "chemfit-progress"),
            (self.progress_label, "chemfit-progress-label"),
            (self.best_label, "chemfit-best-loss"),
            (self.table, "chemfit-best-table"),
            (self.status, "chemfit-status"),
            (self.log_view, "chemfit-log"),
        ):
            widget.add_class(name)

        def wrap() -> Any:  # one Layout per row
            return w.Layout(flex_flow="row wrap", align_items="center", width="100%")

        side = w.VBox(
            [self.best_label, self.table, self.status, self.log_view],
            layout=w.Layout(min_width="240px", max_width="420px", flex="1 1 260px", padding="4px"),
        )
        n_params = len(flatten_dict(fitter.initial_parameters))
        header = w.HTML(
            f"<b>chemfit fit dashboard</b> &mdash; {n_params} parameter"
            f"{'s' if n_params != 1 else ''}"
        )
        super().__init__(
            children=[
                header,
                self.picker,
                w.HBox([self.budget_input, self.optimizer_input, self.mode_input], layout=wrap()),
                w.HBox(
                    [self.start_button, self.stop_button, self.progress, self.progress_label],
                    layout=wrap(),
                ),
                w.HBox([self.plot, side], layout=wrap()),
            ],
            **box_kwargs,
        )
        self.add_class("chemfit-dashboard")

        self.error: BaseException | None = None
        self.warnings: list[str] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ui_lock = threading.Lock()
        self._ui_timer: threading.Timer | None = None
        self._reset_progress()
        self.start_button.on_click(self._on_start_click)
        self.stop_button.on_click(lambda _button: self.stop(wait=False))
        self.budget_input.observe(self._on_budget_change, names="value")
        self.observe(self._on_state_change, names=["state", "message"])
        self._set_state("idle", "Ready: choose where to run, then click Start fit")
        self._refresh_ui()
        self._initialised = True
        # nevergrad takes seconds to import: load it now, so that Start fit answers at once.
        threading.Thread(target=_import_nevergrad, name="chemfit-import", daemon=True).start()

    # -- state --------------------------------------------------------------------------------

    def _set_state(self, state: str, message: str) -> None:
        self.message = message
        self.state = state

    def _on_state_change(self, _change: Any = None) -> None:
        level = {
            "starting": "busy",
            "running": "busy",
            "stopping": "warning",
            "finished": "ok",
            "stopped": "warning",
            "error": "error",
        }.get(self.state, "info")
        self.status.value = status_html(self.message, level)
        active = self.state in ("starting", "running", "stopping")
        self.start_button.disabled = active
        self.stop_button.disabled = not active or self.state == "stopping"
        for control in (self.budget_input, self.optimizer_input, self.mode_input):
            control.disabled = active
        self.picker.locked = active

    def _on_budget_change(self, change: Any) -> None:
        if not self.running:
            self.progress.max = max(1, int(change["new"]))
            self.progress_label.value = f"{self.progress.value} / {self.progress.max}"

    @property
    def running(self) -> bool:
        """Whether a fit (or its start-up) is in progress."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def result(self) -> Any:
        """``fitter.result``: the last fit's ``FitResult`` (``None`` before any fit)."""
        return self.fitter.result

    # -- progress -----------------------------------------------------------------------------

    def _reset_progress(self) -> None:
        self._n_evals = 0
        self._best_loss = math.inf
        self._best_params: dict | None = None
        self._best_index: int | None = None
        self._last_ui = -math.inf
        self.warnings = []

    def _on_record(self, record: Any) -> None:
        """Evaluation callback (fit thread): count, track the best, refresh now and then."""
        self._n_evals += 1
        if not record.penalised and record.loss < self._best_loss:
            self._best_loss = record.loss
            self._best_params = record.parameters
            self._best_index = self._n_evals
        now = time.perf_counter()
        if now - self._last_ui >= self.ui_interval:
            self._refresh_ui()
        elif self._ui_timer is None:
            self._ui_timer = threading.Timer(self.ui_interval, self._refresh_ui)
            self._ui_timer.daemon = True
            self._ui_timer.start()

    def _on_step(self, step: int, contexts: Any) -> None:
        """Step callback (fit thread): passes on a Stop clicked while the fit was starting
        (the fitter clears stop requests made before its fit began)."""
        if self._stop.is_set() and not self.fitter.stop_requested:
            self.fitter.request_stop()

    def _on_log(self, text: str) -> None:
        self.warnings.append(text)
        shown = self.warnings[-3:]
        more = len(self.warnings) - len(shown)
        lines = "".join(f"<div>{html.escape(t)}</div>" for t in shown)
        if more:
            lines += f"<div>(and {more} earlier)</div>"
        self.log_view.value = (
            f'<div style="font-size: 0.85em; color: var(--jp-warn-color1, #f57c00)">{lines}</div>'
        )

    def _refresh_ui(self) -> None:
        with self._ui_lock:
            self._ui_timer = None
            self._last_ui = time.perf_counter()
            n, budget = self._n_evals, self.progress.max
            self.progress.value = min(n, budget)
            self.progress_label.value = f"{n} / {budget}"
            if self._best_params is None:
                self.best_label.value = "Best loss: &mdash; (no evaluation yet)"
                self.table.value = ""
                return
            self.best_label.value = (
                f"Best loss: <b>{self._best_loss:.6g}</b> (evaluation {self._best_index} of {n})"
            )
            rows = "".join(
                f"<tr><td>{html.escape(key)}</td><td style='text-align:right'>{value:.6g}</td></tr>"
                for key, value in flatten_dict(self._best_params).items()
            )
            self.table.value = (
                "<table style='border-collapse: collapse; font-size: 0.9em'>"
                "<tr><th style='text-align:left'>parameter</th><th>best value</th></tr>"
                f"{rows}"
                f"<tr><td>loss</td><td style='text-align:right'>{self._best_loss:.6g}</td></tr>"
                f"<tr><td>evaluations</td><td style='text-align:right'>{n}</td></tr>"
                "</table>"
            )

    # -- running ------------------------------------------------------------------------------

    def _on_start_click(self, _button: Any = None) -> None:
        try:
            self.start()
        except (ValueError, TypeError, RuntimeError) as exc:
            self._set_state("error", describe_error(exc, "Starting the fit"))

    def start(
        self,
        budget: int | None = None,
        optimizer: str | None = None,
        mode: str | None = None,
    ) -> None:
        """Start a fit in a background thread and return at once.

        Arguments that are given replace the widget's settings. Errors during the fit are shown
        in the widget and kept in :attr:`error`; :meth:`wait` returns the result.

        Raises
        ------
        RuntimeError
            When a fit is already running.
        ValueError
            For a bad budget, optimizer or mode.
        """
        if self.running:
            raise RuntimeError("a fit is already running; click Stop (or call stop()) first")
        if budget is not None:
            self.budget_input.value = budget
        if optimizer is not None:
            self.optimizer_input.value = optimizer
        if mode is not None:
            self.mode_input.value = mode
        budget = int(self.budget_input.value)
        optimizer = self.optimizer_input.value.strip()
        if budget < 1:
            raise ValueError(f"budget must be >= 1, got {budget}")
        if not optimizer:
            raise ValueError("choose an optimizer, e.g. NgIohTuned or OnePlusOne")
        self._stop.clear()
        self.error = None
        self._reset_progress()
        self.log_view.value = ""
        self.progress.max = budget
        self.plot.reset(
            expected=budget,
            names=list(flatten_dict(self.fitter.initial_parameters)),
            bounds=self.fitter.bounds,
        )
        self._refresh_ui()
        self._set_state("starting", "Preparing the executor...")
        self._thread = threading.Thread(
            target=self._run,
            args=(budget, optimizer, self.mode_input.value),
            name="chemfit-dashboard-fit",
            daemon=True,
        )
        self._thread.start()

    def _run(self, budget: int, optimizer: str, mode: str) -> None:
        fitter, plot = self.fitter, self.plot
        collector = _LogCollector(self._on_log)
        chemfit_logger = logging.getLogger("chemfit")
        chemfit_logger.addHandler(collector)
        fitter.register_evaluation_callback(self._on_record)
        fitter.register_evaluation_callback(plot.on_evaluation)
        fitter.register_callback(self._on_step, 1)
        outcome, message = "finished", ""
        try:
            executor = self.picker.ensure_executor()
            num_workers = self.picker.num_workers
            if self._stop.is_set():
                raise FitStopped("stopped before the fit started")
            where = KINDS.get(self.picker.kind, self.picker.kind)
            self._set_state(
                "running",
                f"Running {optimizer} ({mode}), {num_workers} at a time on {where.lower()}",
            )
            fitter.fit_nevergrad(
                budget=budget,
                optimizer_str=optimizer,
                num_workers=num_workers,
                executor=executor,
                mode=mode,
                progress=False,
                **self.fit_options,
            )
            if self._stop.is_set():
                outcome = "stopped"
        except KeyboardInterrupt:  # FitStopped, or an interrupt that reached this thread
            outcome = "stopped"
        except Exception as exc:
            logger.debug("the dashboard's fit failed", exc_info=True)
            self.error = exc
            outcome = "error"
            message = describe_error(exc, "The fit")
        finally:
            fitter.evaluation_callbacks[:] = [
                f
                for f in fitter.evaluation_callbacks
                if f not in (self._on_record, plot.on_evaluation)
            ]
            fitter.callbacks[:] = [(f, n) for f, n in fitter.callbacks if f != self._on_step]
            chemfit_logger.removeHandler(collector)
            try:
                plot.finish()
            except Exception:
                logger.warning("drawing the final plot failed", exc_info=True)
            timer = self._ui_timer
            if timer is not None:
                timer.cancel()
            self._refresh_ui()
            self._set_state(outcome, self._outcome_message(outcome, message))

    def _outcome_message(self, outcome: str, message: str) -> str:
        result = self.fitter.result
        n = self._n_evals
        best = f"best loss {self._best_loss:.6g}" if self._best_params is not None else "no result"
        if outcome == "finished":
            wall = f" in {result.wall_time:.1f} s" if result is not None else ""
            return f"Finished: {n} evaluations{wall}, {best}. The result is in fitter.result"
        if outcome == "stopped":
            if n == 0:
                return "Stopped before any evaluation"
            return (
                f"Stopped after {n} evaluations ({best}); the results so far are kept in "
                "fitter.result"
            )
        kept = f" The {n} evaluations before it are kept in fitter.result." if n else ""
        return f"{message}{kept}"

    def stop(self, wait: bool = True, timeout: float = 60) -> None:
        """Stop the running fit once its evaluations in flight finish; every result is kept.

        Parameters
        ----------
        wait : bool
            Wait (up to ``timeout`` seconds) until the fit has ended.
        """
        if not self.running:
            return
        self._stop.set()
        self.fitter.request_stop()
        if self.state in ("starting", "running"):
            self._set_state("stopping", "Stopping once the evaluations in flight finish...")
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the running fit to end and return ``fitter.result``.

        Raises
        ------
        TimeoutError
            When the fit is still running after ``timeout`` seconds (it keeps running).
        """
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise TimeoutError(
                    f"the fit is still running after {timeout} s ({self._n_evals} evaluations "
                    "so far); call wait() again, or stop()"
                )
        return self.fitter.result

    def close(self) -> None:
        """Stop a running fit, stop what the own picker started and close the widgets."""
        if not self._initialised:  # __init__ failed; ipywidgets still calls close()
            super().close()
            return
        self.stop(wait=True)
        if self._owns_plot:
            self.plot.close()
        if self._owns_picker:
            self.picker.close()
        else:
            self.picker.locked = False
        close_children(self, keep=(self.picker, self.plot))
        super().close()

    def __repr__(self) -> str:
        return f"FitDashboard(state={self.state!r}, evaluations={self._n_evals})"


def dashboard(fitter: Any, **options: Any) -> FitDashboard:
    """Open a :class:`FitDashboard` for ``fitter`` (the one-liner).

    Parameters
    ----------
    fitter : chemfit.Fitter
    **options
        Keyword arguments of :class:`FitDashboard` (``budget``, ``optimizer``, ``kind``, ...).

    Examples
    --------
    >>> from chemfit import Fitter
    >>> dash = dashboard(Fitter(lambda p: p["x"] ** 2, {"x": 1.0}), budget=50, kind="serial")
    >>> dash.state, dash.progress.max
    ('idle', 50)
    >>> dash.close()
    """
    return FitDashboard(fitter, **options)
