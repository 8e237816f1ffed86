"""The dashboard's contributions table: ``fitter.contributions()`` after a fit.

:class:`ContributionsPanel` shows term, weight, loss and share of each term of a combined
objective at the best parameters, once a fit has ended (one evaluation of the objective).
"""

from __future__ import annotations

import html
import logging
import math
from typing import Any

from chemfit.fitting.diagnostics.evaluation import combined_objective

from ._jupyter import require_ipywidgets

widgets = require_ipywidgets()

__all__ = ["ContributionsPanel", "contributions_html"]

logger = logging.getLogger(__name__)


def _number(value: Any) -> str:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "&ndash;"
    return "&ndash;" if math.isnan(value) else f"{value:.4g}"


def contributions_html(table: Any, max_rows: int = 30) -> str:
    """A small HTML table (term, weight, loss, share) of a ``contributions()`` DataFrame.

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame({"name": ["fcc", "bcc"], "weight": [1.0, 2.0],
    ...                       "loss": [0.5, 0.25], "share": [0.5, 0.5]})
    >>> text = contributions_html(table)
    >>> "<td>fcc</td>" in text, "50.0 %" in text
    (True, True)
    """
    rows = []
    for _, row in table.head(max_rows).iterrows():
        share = row.get("share")
        share_text = "&ndash;" if share is None or not math.isfinite(share) else f"{share:.1%}"
        rows.append(
            f"<tr><td>{html.escape(str(row.get('name')))}</td>"
            f"<td>{_number(row.get('weight'))}</td><td>{_number(row.get('loss'))}</td>"
            f"<td>{share_text.replace('%', ' %')}</td></tr>"
        )
    more = len(table) - max_rows
    if more > 0:
        rows.append(f"<tr><td colspan='4'>... and {more} more terms</td></tr>")
    header = "".join(
        f"<th style='text-align:left'>{h}</th>" for h in ("term", "weight", "loss", "share")
    )
    return (
        "<div class='chemfit-contributions'><b>Contributions at the best parameters</b>"
        f"<table><tr>{header}</tr>{''.join(rows)}</table></div>"
    )


class ContributionsPanel(widgets.HTML):
    """Shows ``fitter.contributions()`` after a fit of a combined objective (else nothing).

    :meth:`show_for` evaluates the objective once (in the caller's thread: the dashboard's
    fit thread, never the kernel's); when the objective is not combined, the fit found no
    finite loss, or ``contributions()`` raises, the panel stays empty (logged at DEBUG).

    Examples
    --------
    >>> from chemfit import CombinedObjectiveFunction, Fitter
    >>> fitter = Fitter(CombinedObjectiveFunction(
    ...     [lambda p: (p["x"] - 1.0) ** 2, lambda p: (p["x"] - 3.0) ** 2]), {"x": 0.0})
    >>> _ = fitter.fit_scipy()
    >>> panel = ContributionsPanel()
    >>> panel.show_for(fitter)
    True
    >>> panel.table.shape[0], "share" in panel.value
    (2, True)
    >>> panel.clear(); panel.value, panel.table
    ('', None)
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_class("chemfit-contributions-panel")
        self.table: Any = None

    def show_for(self, fitter: Any) -> bool:
        """Show the contributions of ``fitter``'s best parameters; returns whether it did."""
        self.clear()
        objective = getattr(getattr(fitter, "objective_function", None), "wrap_me", None)
        if combined_objective(objective) is None:
            return False
        try:
            table = fitter.contributions()
            text = contributions_html(table)
        except Exception:
            logger.debug("the dashboard shows no contributions", exc_info=True)
            return False
        self.table = table
        self.value = text
        return True

    def clear(self) -> None:
        """Show nothing."""
        self.table = None
        self.value = ""
