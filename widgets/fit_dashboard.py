"""The fit dashboard: executor picker, live plot, progress, best parameters, Start, Stop, New fit.

``dashboard(fitter)`` (or ``FitDashboard(fitter)``) returns a widget; the last expression of a
cell displays it. Start runs ``fitter.fit_nevergrad`` in a background thread, so the kernel
stays free and the plot updates while the fit runs. Stop calls ``fitter.request_stop()``: no new
candidate is asked, the evaluations in flight finish and are recorded, and the results stay in
``fitter.result`` (``stopped=True``); no worker is left running. A Stop pressed while the fit is
being started is that same request: the fit ends before its first evaluation.

The budget is the number of evaluations of the whole fit. After Stop (or when the budget was
raised after a finished fit) **Continue** goes on with the rest of it: the earlier evaluations
are told to the optimizer (``fit_nevergrad(resume=True)``), the count, the plot and the table
go on, and ``fitter.result`` covers the whole fit. **New fit** starts over. A start that fails
(a misspelled optimizer, a budget already used up, an executor that cannot start, an error
before the first evaluation) changes nothing: the plot, the table and ``fitter.result`` stay as
they were, and the message says why.

The progress shown (count, best loss, best parameters) is read from the fit's history
(``fitter.history``), which the live plot follows too. The executor the picker started keeps
running for the next fit until the picker's Shut down (or closing the dashboard) stops it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import Any

from chemfit.core.flatdict import flatten_dict
from chemfit.fitting.fault_policy import check_on_error

from ._jupyter import close_children, require_ipywidgets
from .contributions_view import ContributionsPanel
from .dashboard_controls import CONTROL_CLASSES, Controls
from .dashboard_text import (
    best_html,
    log_html,
    outcome_message,
    plan_html,
    running_message,
    table_html,
)
from .executor_picker import KINDS, ExecutorPicker
from .fit_plan import LogCollector, Plan, make_plan
from .live_plot import LivePlot
from .messages import describe_error, status_html

widgets = require_ipywidgets()
import traitlets  # noqa: E402  (ipywidgets depends on it)

__all__ = ["FitDashboard", "FitStopped", "dashboard"]

logger = logging.getLogger(__name__)

_ACTIVE = ("starting", "running", "stopping")
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
    """A fit that Stop ended before it started (kept for code that catches it).

    The dashboard no longer raises it: Stop is ``fitter.request_stop()``, which ends a fit
    that is still starting before its first evaluation, without an exception.
    """


class _ExecutorFailed(RuntimeError):
    """The picker could not start (or rebuild) its executor; the message is the picker's."""


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
    retries : int
        Times a lost evaluation (its worker died, or it outlasted ``evaluation_timeout``) is
        submitted again (editable; ``fit_nevergrad(retries=)``).
    on_error : {"raise", "record"}
        When the objective raises: stop the fit, or record the evaluation as failed and go on
        (editable; shown as "stop the fit" / "record, go on").
    evaluation_timeout : float, optional
        Seconds before an evaluation is abandoned and counted as lost (editable; ``None`` or
        0: no limit).
    fit_options : dict, optional
        More keyword arguments for ``fit_nevergrad`` (e.g. ``seed``). ``retries``,
        ``on_error`` and ``evaluation_timeout`` given here set the fields above.
    ui_interval : float
        Seconds between updates of the progress bar, best loss and table.

    Attributes
    ----------
    state : str
        ``"idle"``, ``"starting"``, ``"running"``, ``"stopping"``, ``"finished"``,
        ``"stopped"`` or ``"error"`` (a traitlet: ``dash.observe(handler, names="state")``).
    message : str
        The status line in plain words (a traitlet).
    budget, optimizer, mode, retries, on_error, evaluation_timeout
        The settings, as traitlets linked to the controls (``evaluation_timeout`` 0: none).
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
    contributions_panel : ContributionsPanel
        After a fit of a combined objective: ``fitter.contributions()`` (term, weight, loss,
        share) at the best parameters; empty otherwise, or when it cannot be computed.

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
    retries = traitlets.Int(0, min=0)
    on_error = traitlets.Unicode("raise")
    evaluation_timeout = traitlets.Float(0.0, min=0.0)
    can_continue = traitlets.Bool(False)
    _initialised = False
    _setting_state = False

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
        retries: int = 0,
        on_error: str = "raise",
        evaluation_timeout: float | None = None,
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
        self.controls = Controls(optimizer)
        for name in CONTROL_CLASSES:  # the controls are attributes of the dashboard too
            setattr(self, name, getattr(self.controls, name))
        self.contributions_panel = ContributionsPanel()  # after a fit of a combined objective
        rows = self.controls.rows(
            self._header(), self.picker, self.plot, below=self.contributions_panel
        )
        super().__init__(children=rows, **box_kwargs)
        self.add_class("chemfit-dashboard")
        self.budget, self.optimizer, self.mode = budget, optimizer, mode
        self.retries = self.fit_options.pop("retries", retries)
        self.on_error = self.fit_options.pop("on_error", on_error)
        self.evaluation_timeout = (
            self.fit_options.pop("evaluation_timeout", evaluation_timeout) or 0
        )
        self._wire_controls()
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
        self._ui_lock = threading.Lock()
        self._ui_timer: threading.Timer | None = None
        self._last_ui = -math.inf
        self._plan: Plan | None = None
        self._history: Any = None  # the FitHistory shown (the fit's, from its first record)
        self._session_result: Any = None  # fitter.result after the dashboard's last evaluations
        self._fresh = False  # the running fit is new: forget the shown one at its first record
        self._run_started = False  # the running fit's first record came
        self._n_before = 0  # evaluations shown when the run started (it adds the rest)
        self._fit_over = True  # the run's fit_nevergrad returned (a Stop now is too late)

    def _header(self) -> Any:
        n_params = len(flatten_dict(self.fitter.initial_parameters))
        return widgets.HTML(
            f"<b>chemfit fit dashboard</b> &mdash; {n_params} parameter"
            f"{'s' if n_params != 1 else ''}"
        )

    def _wire_controls(self) -> None:
        controls = self.controls
        controls.start_button.on_click(self._on_start_click)
        controls.new_button.on_click(self._on_new_click)
        controls.stop_button.on_click(lambda _button: self.stop(wait=False))
        names = ("budget", "optimizer", "mode", "retries", "on_error", "evaluation_timeout")
        for name, control in zip(names, controls.settings, strict=True):
            widgets.link((self, name), (control, "value"))

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

    @traitlets.validate("on_error")
    def _validate_on_error(self, proposal: Any) -> str:
        return check_on_error(proposal["value"])

    # -- state --------------------------------------------------------------------------------

    def _set_state(self, state: str, message: str) -> None:
        """Set the message, then the state (an observer of ``state`` sees the new message),
        and show both at once."""
        self._setting_state = True
        try:
            self.message = message
            self.state = state
        finally:
            self._setting_state = False
        self._show_state()

    @traitlets.observe("state", "message")
    def _on_state_change(self, _change: Any = None) -> None:
        if not self._setting_state:  # set from code (dash.message = ...), not by _set_state
            self._show_state()

    def _show_state(self) -> None:
        active = self.state in _ACTIVE
        self.can_continue = not active and self._continuable()
        self.controls.show_state(active, self.state == "stopping", self.can_continue)
        self.picker.locked = active
        self._update_plan()
        # Last: when the page shows the words, the buttons already match them.
        self.status.value = status_html(self.message, _LEVELS.get(self.state, "info"))

    @traitlets.observe("can_continue")
    def _on_can_continue(self, _change: Any = None) -> None:
        self.controls.show_continue(self.can_continue)

    @traitlets.observe("budget")
    def _on_budget_change(self, change: Any) -> None:
        if not self.running:
            self.progress.max = max(1, int(change["new"]))
            self.controls.show_progress(self.n_evals, self.progress.max)
        self._update_plan()

    def _update_plan(self) -> None:
        self.plan_label.value = plan_html(self.can_continue, self.budget, self.n_evals)

    def _continuable(self) -> bool:
        """Whether the fit shown can go on (``fitter.result`` is still the dashboard's)."""
        result = self._session_result
        return result is not None and self.fitter.result is result and self.n_evals > 0

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
        return len(self._history) if self._history is not None else 0

    def _best(self) -> Any:
        """The best record of the fit shown (its history's), or None."""
        return self._history.best() if self._history is not None else None

    # -- progress -----------------------------------------------------------------------------

    def _on_record(self, record: Any) -> None:
        """Evaluation callback (fit thread): the record is in ``fitter.history`` already."""
        if not self._run_started:
            self._first_record()
        self.plot.on_evaluation(record)
        now = time.perf_counter()
        if now - self._last_ui >= self.ui_interval:
            self._refresh_ui()
        elif self._ui_timer is None:
            self._ui_timer = threading.Timer(self.ui_interval, self._refresh_ui)
            self._ui_timer.daemon = True
            self._ui_timer.start()

    def _first_record(self) -> None:
        """At the run's first record: show the fit's history (a new fit replaces the one shown:
        plot, table, progress)."""
        self._run_started = True
        if self._fresh:
            self._fresh = False
            self._cancel_ui_timer()
            self.progress.max = self._plan.total if self._plan is not None else self.budget
            self.plot.reset(
                expected=self.progress.max,
                names=list(flatten_dict(self.fitter.initial_parameters)),
                bounds=self.fitter.bounds,
                objective=self.fitter,  # the legend names the terms
            )
        self._history = self.fitter.history
        self.plot.follow(self._history)

    def _cancel_ui_timer(self) -> None:
        timer = self._ui_timer
        if timer is not None:
            timer.cancel()

    def _on_log(self, text: str) -> None:
        self.warnings.append(text)
        self.log_view.value = log_html(self.warnings)

    def _refresh_ui(self) -> None:
        with self._ui_lock:
            self._ui_timer = None
            self._last_ui = time.perf_counter()
            n, best = self.n_evals, self._best()
            self.controls.show_progress(n, self.progress.max)
            history = self._history
            self.best_label.value = best_html(
                best,
                n,
                n_failed=getattr(history, "n_failed", 0),
                n_lost=getattr(history, "n_lost", 0),
            )
            self.table.value = table_html(best, n)

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
        plan = make_plan(
            self.budget if budget is None else budget,
            self.optimizer if optimizer is None else optimizer,
            self.mode if mode is None else mode,
            resume=not new and self._continuable(),
            done=self.n_evals,
            retries=self.retries,
            on_error=self.on_error,
            evaluation_timeout=self.evaluation_timeout,
        )
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

    def _launch(self, plan: Plan, message: str) -> None:
        self.error = None
        self.warnings = []
        self.log_view.value = ""
        self.contributions_panel.clear()
        self._plan = plan
        self._fresh = not plan.resume
        self._run_started = False
        self._n_before = self.n_evals if plan.resume else 0
        self._fit_over = False
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

    def _run(self, plan: Plan) -> None:
        fitter = self.fitter
        before = fitter.result
        collector = LogCollector(self._on_log)
        logging.getLogger("chemfit").addHandler(collector)
        handle = fitter.register_evaluation_callback(self._on_record)
        outcome, message = "finished", ""
        t0 = time.perf_counter()
        try:
            outcome = self._fit(plan)
        except KeyboardInterrupt:  # an interrupt that reached this thread
            outcome = "stopped"
        except _ExecutorFailed as exc:
            self.error = exc
            outcome, message = "error", f"The executor could not start: {exc}"
        except Exception as exc:
            logger.debug("the dashboard's fit failed", exc_info=True)
            self.error = exc
            outcome, message = "error", describe_error(exc, "The fit")
        finally:
            self._fit_over = True
            fitter.remove_callback(handle)
            logging.getLogger("chemfit").removeHandler(collector)
            self._end_run(plan, before, outcome, message, time.perf_counter() - t0)

    def _fit(self, plan: Plan) -> str:
        """Run ``plan`` (a Stop pressed meanwhile is the fitter's request); its outcome."""
        executor = self._executor()
        if self.state == "starting":  # not "stopping": a Stop came while starting
            where = KINDS.get(self.picker.kind, self.picker.kind).lower()
            self._set_state("running", running_message(plan, where, self.picker.num_workers))
        options = {
            "progress": False,
            **self.fit_options,
            **plan.fault_options(),
            "resume": plan.resume,
        }
        self.fitter.fit_nevergrad(
            budget=plan.new_evals,
            optimizer_str=plan.optimizer,
            num_workers=self.picker.num_workers,
            executor=executor,
            mode=plan.mode,
            **options,
        )
        return "stopped" if self.fitter.result.stopped else "finished"

    def _end_run(self, plan: Plan, before: Any, outcome: str, message: str, seconds: float) -> None:
        """Keep what the run added; a run that evaluated nothing leaves everything as it was."""
        if not self._run_started:
            self._fresh = False
            self.fitter.result = before
        else:
            self._session_result = self.fitter.result
            self._history = self.fitter.history  # the result's (the fit's, once it ended)
            try:
                self.plot.follow(self._history)
                self.plot.finish()
            except Exception:
                logger.warning("drawing the final plot failed", exc_info=True)
        self._cancel_ui_timer()
        self._refresh_ui()
        if outcome == "error":
            self.picker.check()  # a pool whose worker died shows as broken
        added = self.n_evals - self._n_before if self._run_started else 0
        text = outcome_message(outcome, message, plan, self.n_evals, added, self._best(), seconds)
        self._set_state(outcome, text)
        if outcome != "error" and self._run_started:  # one evaluation, in this (fit) thread
            self.contributions_panel.show_for(self.fitter)

    def stop(self, wait: bool = True, timeout: float = 60) -> None:
        """Stop the running fit once its evaluations in flight finish; every result is kept.

        A fit that is still starting ends before its first evaluation. Start (Continue) goes
        on from there; New fit starts over.

        Parameters
        ----------
        wait : bool
            Wait (up to ``timeout`` seconds) until the fit has ended.
        """
        if not self.running:
            return
        if not self._fit_over:  # a request after the fit ended would stop the next one
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
            f"the fit is still running after {timeout} s ({self.n_evals} evaluations so "
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
        return f"FitDashboard(state={self.state!r}, evaluations={self.n_evals})"


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
