"""The fit dashboard: executor picker, live plot, progress, best parameters, Start, Stop, New fit.

``dashboard(fitter)`` (or ``FitDashboard(fitter)``) returns a widget; the last expression of a
cell displays it. Start runs ``fitter.fit_nevergrad`` in a background thread, so the kernel
stays free and the plot updates while the fit runs. Stop calls ``fitter.request_stop()``: no new
candidate is asked, the evaluations in flight finish and are recorded, and the results stay in
``fitter.result`` (``stopped=True``); no worker is left running.

The budget is the number of evaluations of the whole fit. After Stop (or when the budget was
raised after a finished fit) **Continue** goes on with the rest of it: the earlier evaluations
are told to the optimizer (``fit_nevergrad(resume=True)``), the count, the plot and the table
go on, and ``fitter.result`` covers the whole fit. **New fit** starts over. A start that fails
(a misspelled optimizer, a budget already used up, an executor that cannot start, an error
before the first evaluation) changes nothing: the plot, the table and ``fitter.result`` stay as
they were, and the message says why.

The executor the picker started keeps running for the next fit until the picker's Shut down
(or closing the dashboard) stops it.
"""

from __future__ import annotations

import asyncio
import html
import logging
import math
import numbers
import threading
import time
from dataclasses import dataclass
from typing import Any

from chemfit.core.exceptions import UnknownOptimizerError
from chemfit.core.flatdict import flatten_dict
from chemfit.fitting.optimizer_lookup import nevergrad_optimizer_class

from ._jupyter import close_children, require_ipywidgets
from .executor_picker import KINDS, ExecutorPicker
from .live_plot import LivePlot
from .messages import describe_error, status_html

widgets = require_ipywidgets()
import traitlets  # noqa: E402  (ipywidgets depends on it)

__all__ = ["FitDashboard", "FitStopped", "dashboard"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ["NgIohTuned", "NGOpt", "OnePlusOne", "CMA", "TwoPointsDE", "DE", "PSO"]
_ACTIVE = ("starting", "running", "stopping")
_LOCKED_TIP = "Locked while the fit runs: click Stop to change it"
_LEVELS = {
    "starting": "busy",
    "running": "busy",
    "stopping": "warning",
    "finished": "ok",
    "stopped": "warning",
    "error": "error",
}


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


class _ExecutorFailed(RuntimeError):
    """The picker could not start (or rebuild) its executor; the message is the picker's."""


@dataclass(frozen=True)
class _Plan:
    """What one click of Start (or New fit) runs."""

    total: int  # the budget: evaluations of the whole fit
    new_evals: int  # evaluations this run adds
    optimizer: str
    mode: str
    resume: bool  # continue the dashboard's fit (fit_nevergrad(resume=True))


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
    """Run and watch a nevergrad fit of ``fitter`` from a notebook; stop, continue, start over.

    Parameters
    ----------
    fitter : chemfit.Fitter
        The fitter to run; its ``result`` holds the outcome (the whole fit after Continue).
    budget : int
        Evaluations of the whole fit (editable): Continue runs what is left of it.
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
        The status line in plain words (a traitlet).
    budget, optimizer, mode
        The settings, as traitlets linked to the controls.
    can_continue : bool
        Whether Start continues the dashboard's fit (a traitlet; the button then reads
        Continue). False before the first evaluation, and when ``fitter.result`` was replaced
        by a fit run outside the dashboard.
    n_evals : int
        Evaluations of the fit shown (all its runs).
    error : BaseException or None
        The error that ended (or prevented) the last run, if any.
    warnings : list of str
        chemfit WARNING/ERROR log messages of the last run (also shown in the widget).

    Examples
    --------
    >>> from chemfit import Fitter
    >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0}, bounds={"x": (-2, 2)})
    >>> dash = FitDashboard(fitter, budget=30, optimizer="OnePlusOne", kind="serial",
    ...                     plot_options={"backend": "png"})
    >>> dash.start()                        # returns at once; the fit runs in a thread
    >>> dash.wait(timeout=60).n_evals       # the FitResult
    30
    >>> dash.state, dash.progress.value, dash.start_button.description
    ('finished', 30, 'Continue')
    >>> dash.budget = 50                    # the budget counts the whole fit ...
    >>> dash.start()                        # ... so Continue runs 20 more
    >>> dash.wait(timeout=60).n_evals, dash.n_evals
    (50, 50)
    >>> dash.new_fit(budget=10)             # forgets the plot and table, starts over
    >>> dash.wait(timeout=60).n_evals
    10
    >>> dash.close()
    """

    state = traitlets.Unicode("idle")
    message = traitlets.Unicode("")
    budget = traitlets.Int(200)
    optimizer = traitlets.Unicode("NgIohTuned")
    mode = traitlets.Unicode("batch")
    can_continue = traitlets.Bool(False)
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
        self.fitter = fitter
        self.fit_options = dict(fit_options or {})
        self.ui_interval = float(ui_interval)
        self._owns_picker = picker is None
        self.picker = picker if picker is not None else ExecutorPicker(kind, workers=workers)
        self._owns_plot = plot is None
        self.plot = plot if plot is not None else LivePlot(**(plot_options or {}))
        self._init_run_state()
        super().__init__(children=self._make_rows(optimizer), **box_kwargs)
        self.add_class("chemfit-dashboard")
        self.budget, self.optimizer, self.mode = budget, optimizer, mode
        self._link_controls()
        self.observe(self._on_state_change, names=["state", "message"])
        self.observe(self._on_budget_change, names="budget")
        self.observe(self._on_can_continue, names="can_continue")
        self._set_state("idle", "Ready: choose where to run, then click Start fit")
        self._on_can_continue()
        self._on_budget_change({"new": self.budget})
        self._refresh_ui()
        self._initialised = True
        # nevergrad takes seconds to import: load it now, so that Start fit answers at once.
        threading.Thread(target=_import_nevergrad, name="chemfit-import", daemon=True).start()

    def _init_run_state(self) -> None:
        self.error: BaseException | None = None
        self.warnings: list[str] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ui_lock = threading.Lock()
        self._ui_timer: threading.Timer | None = None
        self._plan: _Plan | None = None
        self._fresh = False  # the running fit is new: forget the shown one at its first record
        self._session_result: Any = None  # fitter.result after the dashboard's last evaluations
        self._run_evals = 0
        self._reset_progress()

    # -- controls -----------------------------------------------------------------------------

    def _make_rows(self, optimizer: str) -> list:
        """Create the controls; returns the rows of the widget."""
        w = widgets
        style = {"description_width": "70px"}
        self.budget_input = w.BoundedIntText(
            min=1, max=10_000_000, description="Budget", style=style,
            layout=w.Layout(width="180px"),
        )  # fmt: skip
        self.optimizer_input = w.Combobox(
            options=OPTIMIZERS if optimizer in OPTIMIZERS else [optimizer, *OPTIMIZERS],
            ensure_option=False, description="Optimizer", style=style,
            layout=w.Layout(width="240px"),
        )  # fmt: skip
        self.mode_input = w.Dropdown(
            options=[("batch", "batch"), ("async", "async")], description="Mode", style=style,
            layout=w.Layout(width="170px"),
        )  # fmt: skip
        #: What Start will do (continue, and how far) and what New fit does.
        self.plan_label = w.HTML()
        self.start_button = w.Button(
            description="Start fit", icon="play", button_style="success",
            layout=w.Layout(width="110px"),
        )  # fmt: skip
        self.new_button = w.Button(
            description="New fit", icon="refresh", layout=w.Layout(width="100px")
        )
        self.stop_button = w.Button(
            description="Stop", icon="stop", button_style="danger", disabled=True,
            layout=w.Layout(width="90px"),
        )  # fmt: skip
        self.progress = w.IntProgress(min=0, layout=w.Layout(width="220px", flex="1 1 auto"))
        self.progress_label = w.Label()
        self.best_label = w.HTML()
        self.table = w.HTML()
        self.status = w.HTML()
        self.log_view = w.HTML()
        self._add_classes()
        self.start_button.on_click(self._on_start_click)
        self.new_button.on_click(self._on_new_click)
        self.stop_button.on_click(lambda _button: self.stop(wait=False))

        def row(children: list) -> Any:  # one Layout per row
            layout = w.Layout(flex_flow="row wrap", align_items="center", width="100%")
            return w.HBox(children, layout=layout)

        side = w.VBox(
            [self.best_label, self.table, self.status, self.log_view],
            layout=w.Layout(min_width="240px", max_width="420px", flex="1 1 260px", padding="4px"),
        )
        n_params = len(flatten_dict(self.fitter.initial_parameters))
        header = w.HTML(
            f"<b>chemfit fit dashboard</b> &mdash; {n_params} parameter"
            f"{'s' if n_params != 1 else ''}"
        )
        return [
            header,
            self.picker,
            row([self.budget_input, self.optimizer_input, self.mode_input, self.plan_label]),
            row(
                [
                    self.start_button,
                    self.new_button,
                    self.stop_button,
                    self.progress,
                    self.progress_label,
                ]
            ),
            row([self.plot, side]),
        ]

    def _add_classes(self) -> None:
        for widget, name in (
            (self.budget_input, "chemfit-budget"),
            (self.optimizer_input, "chemfit-optimizer"),
            (self.mode_input, "chemfit-mode"),
            (self.plan_label, "chemfit-plan"),
            (self.start_button, "chemfit-start"),
            (self.new_button, "chemfit-new-fit"),
            (self.stop_button, "chemfit-stop"),
            (self.progress, "chemfit-progress"),
            (self.progress_label, "chemfit-progress-label"),
            (self.best_label, "chemfit-best-loss"),
            (self.table, "chemfit-best-table"),
            (self.status, "chemfit-status"),
            (self.log_view, "chemfit-log"),
        ):
            widget.add_class(name)

    def _link_controls(self) -> None:
        widgets.link((self, "budget"), (self.budget_input, "value"))
        widgets.link((self, "optimizer"), (self.optimizer_input, "value"))
        widgets.link((self, "mode"), (self.mode_input, "value"))

    @traitlets.validate("budget")
    def _validate_budget(self, proposal: Any) -> int:
        value = proposal["value"]
        if value < 1:
            raise ValueError(f"the budget must be >= 1 evaluation, got {value}")
        return value

    @traitlets.validate("mode")
    def _validate_mode(self, proposal: Any) -> str:
        if proposal["value"] not in ("batch", "async"):
            raise ValueError(f"mode must be 'batch' or 'async', got {proposal['value']!r}")
        return proposal["value"]

    # -- state --------------------------------------------------------------------------------

    def _set_state(self, state: str, message: str) -> None:
        self.message = message
        self.state = state

    def _on_state_change(self, _change: Any = None) -> None:
        self.status.value = status_html(self.message, _LEVELS.get(self.state, "info"))
        active = self.state in _ACTIVE
        self.can_continue = not active and self._continuable()
        self.start_button.disabled = active
        self.new_button.disabled = active or not self.can_continue
        self.stop_button.disabled = not active or self.state == "stopping"
        self.stop_button.tooltip = None if active else "No fit is running"
        for control in (self.budget_input, self.optimizer_input, self.mode_input):
            control.disabled = active
            control.tooltip = _LOCKED_TIP if active else None
        if not active:
            self.budget_input.tooltip = "Evaluations of the whole fit: Continue runs the rest"
        self.new_button.tooltip = (
            _LOCKED_TIP
            if active
            else "Forget this fit (plot, table) and start a new one"
            if self.can_continue
            else "Nothing to start over yet: Start fit starts a new fit"
        )
        self.picker.locked = active
        self._update_plan()

    def _on_can_continue(self, _change: Any = None) -> None:
        if self.can_continue:
            self.start_button.description = "Continue"
            self.start_button.tooltip = (
                "Go on with this fit until the budget (evaluations in all) is used; the "
                "evaluations so far are told to the optimizer"
            )
        else:
            self.start_button.description = "Start fit"
            self.start_button.tooltip = "Start a new fit of 'Budget' evaluations"

    def _on_budget_change(self, change: Any) -> None:
        if not self.running:
            self.progress.max = max(1, int(change["new"]))
            self.progress.value = min(self._n_evals, self.progress.max)
            self.progress_label.value = f"{self._n_evals} / {self.progress.max}"
        self._update_plan()

    def _update_plan(self) -> None:
        """Say what Continue would run (and that New fit starts over)."""
        text = ""
        if self.can_continue:
            left = self.budget - self._n_evals
            if left > 0:
                text = (
                    f"Continue runs {left} more, to the budget of {self.budget} in all; "
                    "New fit starts over"
                )
            else:
                text = (
                    f"All {self.budget} evaluations of the budget are done: raise it to "
                    "continue, or click New fit"
                )
        self.plan_label.value = (
            f'<span style="font-size: 0.85em; opacity: 0.8">{html.escape(text)}</span>'
        )

    def _continuable(self) -> bool:
        """Whether the fit shown can go on (``fitter.result`` is still the dashboard's)."""
        result = self._session_result
        return result is not None and self.fitter.result is result and self._n_evals > 0

    @property
    def running(self) -> bool:
        """Whether a fit (or its start-up) is in progress."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def result(self) -> Any:
        """``fitter.result``: the fit's ``FitResult`` (``None`` before any fit)."""
        return self.fitter.result

    @property
    def n_evals(self) -> int:
        """Evaluations of the fit shown: all its runs (Start, Stop, Continue, ...)."""
        return self._n_evals

    # -- progress -----------------------------------------------------------------------------

    def _reset_progress(self) -> None:
        self._n_evals = 0
        self._best_loss = math.inf
        self._best_params: dict | None = None
        self._best_index: int | None = None
        self._last_ui = -math.inf

    def _begin_fresh(self) -> None:
        """At a new fit's first record: forget the fit shown (plot, table, progress)."""
        self._fresh = False
        timer = self._ui_timer
        if timer is not None:
            timer.cancel()
        with self._ui_lock:
            self._reset_progress()
        total = self._plan.total if self._plan is not None else self.budget
        self.progress.max = total
        self.plot.reset(
            expected=total,
            names=list(flatten_dict(self.fitter.initial_parameters)),
            bounds=self.fitter.bounds,
            objective=self.fitter,  # the legend names the terms
        )

    def _on_record(self, record: Any) -> None:
        """Evaluation callback (fit thread): count, track the best, feed the plot, refresh."""
        if self._fresh:
            self._begin_fresh()
        self._n_evals += 1
        self._run_evals += 1
        if not record.penalised and record.loss < self._best_loss:
            self._best_loss = record.loss
            self._best_params = record.parameters
            self._best_index = self._n_evals
        self.plot.on_evaluation(record)
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
        self._start_from_button(new=False)

    def _on_new_click(self, _button: Any = None) -> None:
        self._start_from_button(new=True)

    def _start_from_button(self, new: bool) -> None:
        try:
            self.start(new=new)
        except (ValueError, TypeError, RuntimeError) as exc:
            self.error = exc
            text = str(exc) if isinstance(exc, ValueError) else describe_error(exc)
            self._set_state("error", f"Not started: {text.rstrip('.')}. Nothing was changed")

    def start(
        self,
        budget: int | None = None,
        optimizer: str | None = None,
        mode: str | None = None,
        *,
        new: bool = False,
    ) -> None:
        """Continue the fit shown (or start one) in a background thread; returns at once.

        Arguments that are given replace the widget's settings. With a fit to continue
        (:attr:`can_continue`) and ``new=False``, this runs ``budget`` minus the evaluations
        so far with ``fit_nevergrad(resume=True)``; otherwise (or with ``new=True``) a new
        fit of ``budget`` evaluations, which replaces the plot and table at its first
        evaluation. The settings are checked first: a bad one raises and changes nothing.
        Errors during the fit are shown in the widget and kept in :attr:`error`; :meth:`wait`
        returns the result.

        Raises
        ------
        RuntimeError
            When a fit is already running.
        ValueError
            For a bad budget (or one already used up), optimizer or mode.
        """
        if self.running:
            raise RuntimeError("a fit is already running; click Stop (or call stop()) first")
        plan = self._make_plan(budget, optimizer, mode, new)
        verb = "Continuing" if plan.resume else "Starting"
        if not new and not plan.resume and self.can_continue:  # the button read Continue
            verb = "fitter.result was replaced by a fit run outside the dashboard: starting anew"
        self.budget, self.optimizer, self.mode = plan.total, plan.optimizer, plan.mode
        self._launch(plan, f"{verb}: preparing the executor...")

    def new_fit(
        self, budget: int | None = None, optimizer: str | None = None, mode: str | None = None
    ) -> None:
        """Start a new fit (what New fit does): ``start(..., new=True)``."""
        self.start(budget, optimizer, mode, new=True)

    def _make_plan(
        self, budget: int | None, optimizer: str | None, mode: str | None, new: bool
    ) -> _Plan:
        """Check the settings (raises ``ValueError``) and decide what to run; changes nothing."""
        total = self.budget if budget is None else budget
        if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 1:
            raise ValueError(
                f"the budget must be a whole number of evaluations >= 1, got {total!r}"
            )
        name = self.optimizer if optimizer is None else optimizer
        if not isinstance(name, str) or not name.strip():
            raise ValueError("choose an optimizer, e.g. NgIohTuned or OnePlusOne")
        try:
            nevergrad_optimizer_class(name.strip())
        except UnknownOptimizerError as exc:  # it names the closest ones; say it in UI words
            raise UnknownOptimizerError(
                str(exc).replace("optimizer_str", "the optimizer")
            ) from None
        mode = self.mode if mode is None else mode
        if mode not in ("batch", "async"):
            raise ValueError(f"mode must be 'batch' or 'async', got {mode!r}")
        resume = not new and self._continuable()
        done = self._n_evals if resume else 0
        if total <= done:
            raise ValueError(
                f"all {total} evaluations of the budget are done ({done} so far). The budget "
                "counts every evaluation of this fit: raise it to continue, or click New fit "
                "to start over"
            )
        return _Plan(int(total), int(total - done), name.strip(), mode, resume)

    def _launch(self, plan: _Plan, message: str) -> None:
        self._stop.clear()
        self.error = None
        self.warnings = []
        self.log_view.value = ""
        self._plan = plan
        self._fresh = not plan.resume
        self._run_evals = 0
        if plan.resume:  # the plot and the progress bar go on, to the (new) budget
            self.progress.max = plan.total
            self.plot.expected = plan.total
            self._refresh_ui()
        self._set_state("starting", message)
        self._thread = threading.Thread(
            target=self._run, args=(plan,), name="chemfit-dashboard-fit", daemon=True
        )
        self._thread.start()

    def _executor(self) -> Any:
        try:
            return self.picker.ensure_executor()
        except RuntimeError as exc:
            raise _ExecutorFailed(self.picker.message) from exc

    def _run(self, plan: _Plan) -> None:
        fitter = self.fitter
        before = fitter.result
        collector = _LogCollector(self._on_log)
        logging.getLogger("chemfit").addHandler(collector)
        fitter.register_evaluation_callback(self._on_record)
        fitter.register_callback(self._on_step, 1)
        outcome, message = "finished", ""
        t0 = time.perf_counter()
        try:
            executor = self._executor()
            if self._stop.is_set():
                raise FitStopped("stopped before the fit started")
            self._set_state("running", self._running_message(plan))
            options = {"progress": False, **self.fit_options, "resume": plan.resume}
            fitter.fit_nevergrad(
                budget=plan.new_evals,
                optimizer_str=plan.optimizer,
                num_workers=self.picker.num_workers,
                executor=executor,
                mode=plan.mode,
                **options,
            )
            if self._stop.is_set():
                outcome = "stopped"
        except KeyboardInterrupt:  # FitStopped, or an interrupt that reached this thread
            outcome = "stopped"
        except _ExecutorFailed as exc:
            self.error = exc
            outcome, message = "error", f"The executor could not start: {exc}"
        except Exception as exc:
            logger.debug("the dashboard's fit failed", exc_info=True)
            self.error = exc
            outcome, message = "error", describe_error(exc, "The fit")
        finally:
            self._detach(collector)
            self._end_run(plan, before, outcome, message, time.perf_counter() - t0)

    def _running_message(self, plan: _Plan) -> str:
        where = KINDS.get(self.picker.kind, self.picker.kind).lower()
        at_once = f"{self.picker.num_workers} at a time on {where}"
        if plan.resume:
            return (
                f"Continuing with {plan.optimizer} ({plan.mode}): {plan.new_evals} more "
                f"evaluations, {at_once}"
            )
        return f"Running {plan.optimizer} ({plan.mode}), {at_once}"

    def _detach(self, collector: logging.Handler) -> None:
        fitter = self.fitter
        fitter.evaluation_callbacks[:] = [
            f for f in fitter.evaluation_callbacks if f != self._on_record
        ]
        fitter.callbacks[:] = [(f, n) for f, n in fitter.callbacks if f != self._on_step]
        logging.getLogger("chemfit").removeHandler(collector)

    def _end_run(
        self, plan: _Plan, before: Any, outcome: str, message: str, seconds: float
    ) -> None:
        """Keep what the run added; a run that evaluated nothing leaves everything as it was."""
        if self._run_evals == 0:
            self._fresh = False
            self.fitter.result = before
        else:
            self._session_result = self.fitter.result
            try:
                self.plot.finish()
            except Exception:
                logger.warning("drawing the final plot failed", exc_info=True)
        timer = self._ui_timer
        if timer is not None:
            timer.cancel()
        self._refresh_ui()
        if outcome == "error":
            self.picker.check()  # a pool whose worker died shows as broken
        self._set_state(outcome, self._outcome_message(outcome, message, plan, seconds))

    def _outcome_message(self, outcome: str, message: str, plan: _Plan, seconds: float) -> str:
        n, k = self._n_evals, self._run_evals
        best = f"best loss {self._best_loss:.6g}" if self._best_params is not None else "no result"
        if outcome == "finished":
            done = f"{k} more in {seconds:.1f} s" if plan.resume else f"in {seconds:.1f} s"
            return f"Finished: {n} evaluations ({done}), {best}. The result is in fitter.result"
        if outcome == "stopped":
            if n == 0:
                return "Stopped before any evaluation"
            if k == 0:
                return (
                    f"Stopped before any new evaluation; fitter.result still holds the {n} "
                    f"evaluations so far ({best})"
                )
            return (
                f"Stopped after {n} evaluations ({best}), kept in fitter.result. Continue "
                "goes on from here; New fit starts over"
            )
        message = message.rstrip(".")
        if n and k == 0:
            return (
                f"{message}. Nothing was changed: the plot, the table and fitter.result still "
                f"hold the {n} evaluations so far"
            )
        if n:
            return f"{message}. The {n} evaluations so far are kept in fitter.result"
        return message

    def stop(self, wait: bool = True, timeout: float = 60) -> None:
        """Stop the running fit once its evaluations in flight finish; every result is kept.

        Start (Continue) goes on from there; New fit starts over.

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
        """Wait for the running fit to end and return ``fitter.result`` (blocks the kernel).

        In a notebook, ``await dash.wait_async()`` waits without blocking it, so the plot
        keeps drawing.

        Raises
        ------
        TimeoutError
            When the fit is still running after ``timeout`` seconds (it keeps running).
        """
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                raise self._still_running(timeout)
        return self.fitter.result

    async def wait_async(self, timeout: float | None = None, poll: float = 0.1) -> Any:
        """Wait for the running fit to end without blocking the event loop; returns the result.

        In a notebook cell, ``result = await dash.wait_async()`` lets the kernel handle the
        widgets' messages meanwhile, so the live plot draws while the cell waits.

        Raises
        ------
        TimeoutError
            When the fit is still running after ``timeout`` seconds (it keeps running).

        Examples
        --------
        >>> import asyncio
        >>> from chemfit import Fitter
        >>> dash = FitDashboard(Fitter(lambda p: p["x"] ** 2, {"x": 1.0}), budget=20,
        ...                     optimizer="OnePlusOne", kind="serial",
        ...                     plot_options={"backend": "png"})
        >>> dash.start()
        >>> asyncio.run(dash.wait_async(timeout=60)).n_evals
        20
        >>> dash.close()
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            if deadline is not None and time.monotonic() >= deadline:
                raise self._still_running(timeout)
            await asyncio.sleep(poll)
        return self.fitter.result

    def _still_running(self, timeout: float | None) -> TimeoutError:
        return TimeoutError(
            f"the fit is still running after {timeout} s ({self._n_evals} evaluations so "
            "far); wait again, or stop()"
        )

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
