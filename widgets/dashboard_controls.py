"""The fit dashboard's controls: settings, buttons, progress, best-loss table and status lines.

:class:`Controls` creates the widgets, lays them out in rows and shows a state (which buttons
and settings are enabled, and what their tooltips say); the dashboard wires them to its fit.
"""

from __future__ import annotations

from typing import Any

from ._jupyter import require_ipywidgets

widgets = require_ipywidgets()

__all__ = ["CONTROL_CLASSES", "OPTIMIZERS", "Controls"]

OPTIMIZERS = ["NgIohTuned", "NGOpt", "OnePlusOne", "CMA", "TwoPointsDE", "DE", "PSO"]
_LOCKED_TIP = "Locked while the fit runs: click Stop to change it"
#: The settings' tooltips while they can be changed.
_TIPS = {
    "budget_input": "Evaluations of the whole fit: Continue runs the rest",
    "retries_input": "How often an evaluation whose worker died (or that timed out) is "
    "submitted again",
    "on_error_input": "When the objective raises: stop the fit, or record the evaluation as "
    "failed (the optimizer is told a bad loss) and go on",
    "timeout_input": "Seconds before an evaluation is abandoned (its process killed where "
    "the executor allows) and counted as lost; 0: no limit",
}
#: Attribute -> CSS class (the browser test and the page's styles find the controls by it).
CONTROL_CLASSES = {
    "budget_input": "chemfit-budget",
    "optimizer_input": "chemfit-optimizer",
    "mode_input": "chemfit-mode",
    "retries_input": "chemfit-retries",
    "on_error_input": "chemfit-on-error",
    "timeout_input": "chemfit-timeout",
    "plan_label": "chemfit-plan",
    "start_button": "chemfit-start",
    "new_button": "chemfit-new-fit",
    "stop_button": "chemfit-stop",
    "progress": "chemfit-progress",
    "progress_label": "chemfit-progress-label",
    "best_label": "chemfit-best-loss",
    "table": "chemfit-best-table",
    "status": "chemfit-status",
    "log_view": "chemfit-log",
}


_SETTINGS = (
    "budget_input",
    "optimizer_input",
    "mode_input",
    "retries_input",
    "on_error_input",
    "timeout_input",
)


def _row(children: list) -> Any:
    """A row that wraps in a narrow notebook (one Layout per row)."""
    layout = widgets.Layout(flex_flow="row wrap", align_items="center", width="100%")
    return widgets.HBox(children, layout=layout)


class Controls:
    """The dashboard's widgets (no behaviour beyond showing a state).

    Parameters
    ----------
    optimizer : str
        The optimizer first shown (added to the choices when it is not one of them).

    Examples
    --------
    >>> controls = Controls("OnePlusOne")
    >>> controls.show_state(active=True, stopping=False, can_continue=False)
    >>> controls.start_button.disabled, controls.stop_button.disabled
    (True, False)
    """

    def __init__(self, optimizer: str) -> None:
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
        #: When evaluations fail (fit_nevergrad's retries, on_error, evaluation_timeout).
        self.retries_input = w.BoundedIntText(
            min=0, max=1000, description="Retries", style=style, layout=w.Layout(width="150px"),
        )  # fmt: skip
        self.on_error_input = w.Dropdown(
            options=[("stop the fit", "raise"), ("record, go on", "record")],
            description="On error", style=style, layout=w.Layout(width="230px"),
        )  # fmt: skip
        self.timeout_input = w.BoundedFloatText(
            min=0, max=1e7, step=1, description="Eval timeout (s)",
            style={"description_width": "110px"}, layout=w.Layout(width="220px"),
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
        for name, css_class in CONTROL_CLASSES.items():
            getattr(self, name).add_class(css_class)

    @property
    def settings(self) -> tuple[Any, ...]:
        """The controls of the settings: budget, optimizer, mode, retries, on error, timeout."""
        return tuple(getattr(self, name) for name in _SETTINGS)

    def rows(self, header: Any, picker: Any, plot: Any, below: Any = None) -> list:
        """The dashboard's rows: header, picker, settings, buttons and progress, plot and table,
        and ``below`` (a widget) in a row of its own."""
        side = widgets.VBox(
            [self.best_label, self.table, self.status, self.log_view],
            layout=widgets.Layout(
                min_width="240px", max_width="420px", flex="1 1 260px", padding="4px"
            ),
        )
        return [
            header,
            picker,
            _row([*self.settings[:3], self.plan_label]),
            _row(list(self.settings[3:])),
            _row(
                [
                    self.start_button,
                    self.new_button,
                    self.stop_button,
                    self.progress,
                    self.progress_label,
                ]
            ),
            _row([plot, side]),
            *([_row([below])] if below is not None else []),
        ]

    def show_state(self, active: bool, stopping: bool, can_continue: bool) -> None:
        """Enable what can be used now; tooltips say why the rest is disabled."""
        self.start_button.disabled = active
        self.new_button.disabled = active or not can_continue
        self.stop_button.disabled = not active or stopping
        self.stop_button.tooltip = None if active else "No fit is running"
        for name, control in zip(_SETTINGS, self.settings):
            control.disabled = active
            control.tooltip = _LOCKED_TIP if active else _TIPS.get(name)
        self.new_button.tooltip = (
            _LOCKED_TIP
            if active
            else "Forget this fit (plot, table) and start a new one"
            if can_continue
            else "Nothing to start over yet: Start fit starts a new fit"
        )

    def show_continue(self, can_continue: bool) -> None:
        """Start reads Continue when there is a fit to go on with."""
        if can_continue:
            self.start_button.description = "Continue"
            self.start_button.tooltip = (
                "Go on with this fit until the budget (evaluations in all) is used; the "
                "evaluations so far are told to the optimizer"
            )
        else:
            self.start_button.description = "Start fit"
            self.start_button.tooltip = "Start a new fit of 'Budget' evaluations"

    def show_progress(self, n: int, budget: int) -> None:
        """The progress bar and its label: ``n / budget``."""
        self.progress.value = min(n, budget)
        self.progress_label.value = f"{n} / {budget}"
