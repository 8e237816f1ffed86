"""Plain-words messages for the widgets: errors without tracebacks, status lines as HTML.

Expected failures (a missing extra, a cluster that did not start in time, an objective that
cannot be pickled, an engine that died, a bad setting) are shown in the widget as one or two
sentences. The traceback goes to the logger at DEBUG level only, never into the page.
"""

from __future__ import annotations

import html
from typing import Literal

__all__ = ["describe_error", "status_html"]

Level = Literal["info", "busy", "ok", "warning", "error"]

_MAX_CHARS = 600
_COLORS = {
    "info": "var(--jp-ui-font-color1, #333)",
    "busy": "var(--jp-brand-color1, #1976d2)",
    "ok": "var(--jp-success-color1, #388e3c)",
    "warning": "var(--jp-warn-color1, #f57c00)",
    "error": "var(--jp-error-color1, #d32f2f)",
}


def _first_part(text: str) -> str:
    """The message before any embedded traceback or remote details."""
    for marker in ("\n\nRemote traceback:", "\nTraceback (most recent call last):", "\n\n"):
        head, sep, _ = text.partition(marker)
        if sep:
            text = head
    text = " ".join(text.split())
    if len(text) > _MAX_CHARS:
        text = text[: _MAX_CHARS - 3] + "..."
    return text


def describe_error(exc: BaseException, doing: str | None = None) -> str:
    """One plain sentence (or two) describing ``exc``, without a traceback.

    Parameters
    ----------
    exc : BaseException
        The error.
    doing : str, optional
        What failed, e.g. ``"Starting the cluster"``; prefixed to the message.

    Returns
    -------
    str
        ``"<doing> failed: <what happened>"``. chemfit's own messages already name the cause
        and the fix, so they are kept; others get their type name in front.

    Examples
    --------
    >>> describe_error(ValueError("budget must be >= 1, got 0"))
    'ValueError: budget must be >= 1, got 0'
    >>> describe_error(TimeoutError("2 engines not ready in 5 seconds"), "Starting the cluster")
    'Starting the cluster failed: it did not finish in time (2 engines not ready in 5 seconds).'
    >>> describe_error(ImportError("needs ipyparallel; install it with: pip install x"))
    'needs ipyparallel; install it with: pip install x'
    """
    message = _first_part(str(exc))
    name = type(exc).__name__
    if isinstance(exc, TimeoutError):
        text = "it did not finish in time" + (f" ({message.rstrip('.')})." if message else ".")
    elif isinstance(exc, ImportError):
        text = message or f"{name}: a package is missing"
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted"
    else:
        text = f"{name}: {message}" if message else name
    if doing:
        return f"{doing} failed: {text}"
    return text


def status_html(text: str, level: Level = "info") -> str:
    """``text`` (escaped) as a coloured line of HTML for an ``ipywidgets.HTML``.

    Examples
    --------
    >>> status_html("2 engines <up>", "ok")
    '<span style="color: var(--jp-success-color1, #388e3c)">2 engines &lt;up&gt;</span>'
    """
    color = _COLORS.get(level, _COLORS["info"])
    return f'<span style="color: {color}">{html.escape(text)}</span>'
