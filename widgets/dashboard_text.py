"""The fit dashboard's words: status lines, what Continue runs, the best-loss line and table."""

from __future__ import annotations

import html
from typing import Any

from chemfit.core.flatdict import flatten_dict

from .fit_plan import Plan

__all__ = [
    "best_html",
    "log_html",
    "outcome_message",
    "plan_html",
    "running_message",
    "table_html",
]


def running_message(plan: Plan, where: str, n_workers: int) -> str:
    """The status line while a fit runs.

    Examples
    --------
    >>> running_message(Plan(50, 20, "CMA", "batch", True), "threads", 2)
    'Continuing with CMA (batch): 20 more evaluations, 2 at a time on threads'
    """
    at_once = f"{n_workers} at a time on {where}"
    if plan.resume:
        return (
            f"Continuing with {plan.optimizer} ({plan.mode}): {plan.new_evals} more "
            f"evaluations, {at_once}"
        )
    return f"Running {plan.optimizer} ({plan.mode}), {at_once}"


def outcome_message(
    outcome: str, message: str, plan: Plan, n: int, added: int, best: Any, seconds: float
) -> str:
    """The status line once a run ended.

    Parameters
    ----------
    outcome : {"finished", "stopped", "error"}
    message : str
        What failed (for ``"error"``).
    plan : Plan
        What the run was to do.
    n, added : int
        Evaluations of the fit shown, and those this run added.
    best : EvaluationRecord or None
        The fit's best record.
    seconds : float
        How long the run took.

    Examples
    --------
    >>> plan = Plan(100, 100, "CMA", "batch", False)
    >>> outcome_message("stopped", "", plan, 0, 0, None, 1.0)
    'Stopped before any evaluation'
    """
    best_text = f"best loss {best.loss:.6g}" if best is not None else "no result"
    if outcome == "finished":
        done = f"{added} more in {seconds:.1f} s" if plan.resume else f"in {seconds:.1f} s"
        return f"Finished: {n} evaluations ({done}), {best_text}. The result is in fitter.result"
    if outcome == "stopped":
        if n == 0:
            return "Stopped before any evaluation"
        if added == 0:
            return (
                f"Stopped before any new evaluation; fitter.result still holds the {n} "
                f"evaluations so far ({best_text})"
            )
        return (
            f"Stopped after {n} evaluations ({best_text}), kept in fitter.result. Continue "
            "goes on from here; New fit starts over"
        )
    message = message.rstrip(".")
    if n and added == 0:
        return (
            f"{message}. Nothing was changed: the plot, the table and fitter.result still "
            f"hold the {n} evaluations so far"
        )
    if n:
        return f"{message}. The {n} evaluations so far are kept in fitter.result"
    return message


def plan_html(can_continue: bool, budget: int, n: int) -> str:
    """What Continue would run (and that New fit starts over), as a small line of HTML.

    Examples
    --------
    >>> "Continue runs 30 more, to the budget of 50 in all" in plan_html(True, 50, 20)
    True
    """
    text = ""
    if can_continue:
        left = budget - n
        if left > 0:
            text = (
                f"Continue runs {left} more, to the budget of {budget} in all; New fit starts over"
            )
        else:
            text = (
                f"All {budget} evaluations of the budget are done: raise it to continue, or "
                "click New fit"
            )
    return f'<span style="font-size: 0.85em; opacity: 0.8">{html.escape(text)}</span>'


def _where(best: Any, n: int) -> str:
    if best.index < 0:  # an initial observation told to the fit
        return "an initial observation"
    return f"evaluation {best.index + 1} of {n}"


def best_html(best: Any, n: int, *, n_failed: int = 0, n_lost: int = 0) -> str:
    """The best-loss line, with the failed and lost evaluations counted.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> best_html(SimpleNamespace(loss=0.25, index=3), 10)
    'Best loss: <b>0.25</b> (evaluation 4 of 10)'
    >>> best_html(None, 0)
    'Best loss: &mdash; (no evaluation yet)'
    >>> best_html(SimpleNamespace(loss=0.25, index=3), 10, n_failed=2, n_lost=1)
    'Best loss: <b>0.25</b> (evaluation 4 of 10); <span style="color: #c00">2 failed, 1 lost</span>'
    """
    if best is None:
        text = "Best loss: &mdash; (no evaluation yet)"
    else:
        text = f"Best loss: <b>{best.loss:.6g}</b> ({_where(best, n)})"
    faults = [f"{k} {what}" for k, what in ((n_failed, "failed"), (n_lost, "lost")) if k]
    if faults:
        text += f'; <span style="color: #c00">{", ".join(faults)}</span>'
    return text


def table_html(best: Any, n: int) -> str:
    """The best parameters, the loss and the evaluations as an HTML table ("" without best).

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> "<td>x</td>" in table_html(SimpleNamespace(loss=1.0, parameters={"x": 0.5}), 3)
    True
    """
    if best is None:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(key)}</td><td style='text-align:right'>{value:.6g}</td></tr>"
        for key, value in flatten_dict(best.parameters).items()
    )
    return (
        "<table style='border-collapse: collapse; font-size: 0.9em'>"
        "<tr><th style='text-align:left'>parameter</th><th>best value</th></tr>"
        f"{rows}"
        f"<tr><td>loss</td><td style='text-align:right'>{best.loss:.6g}</td></tr>"
        f"<tr><td>evaluations</td><td style='text-align:right'>{n}</td></tr>"
        "</table>"
    )


def log_html(messages: list[str]) -> str:
    """The last three WARNING/ERROR messages of a run (and how many came before).

    Examples
    --------
    >>> "(and 1 earlier)" in log_html(["a", "b", "c", "d"])
    True
    """
    shown = messages[-3:]
    more = len(messages) - len(shown)
    lines = "".join(f"<div>{html.escape(t)}</div>" for t in shown)
    if more:
        lines += f"<div>(and {more} earlier)</div>"
    return f'<div style="font-size: 0.85em; color: var(--jp-warn-color1, #f57c00)">{lines}</div>'
