"""Imports of the Jupyter stack, with an ImportError that names the ``jupyter`` extra."""

from __future__ import annotations

import importlib.util
from typing import Any

_HINT = "install it with: pip install 'chemfit[jupyter]'"


def require_ipywidgets() -> Any:
    """Return the ``ipywidgets`` module, or raise ``ImportError`` naming the extra.

    Examples
    --------
    >>> require_ipywidgets().__name__
    'ipywidgets'
    """
    try:
        import ipywidgets
    except ImportError as exc:
        raise ImportError(f"chemfit_widgets needs ipywidgets (extra 'jupyter'); {_HINT}") from exc
    return ipywidgets


def require_matplotlib() -> Any:
    """Return the ``matplotlib`` module, or raise ``ImportError`` naming the extra.

    Examples
    --------
    >>> require_matplotlib().__name__
    'matplotlib'
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            f"the live plot needs matplotlib (extras 'jupyter' or 'plot'); {_HINT}"
        ) from exc
    return matplotlib


def has_ipympl() -> bool:
    """Whether ipympl (the interactive matplotlib canvas widget) is installed.

    Examples
    --------
    >>> isinstance(has_ipympl(), bool)
    True
    """
    return importlib.util.find_spec("ipympl") is not None


def close_children(box: Any, keep: tuple = ()) -> None:
    """Close the widgets inside ``box`` (recursively), except those in ``keep``.

    Examples
    --------
    >>> import ipywidgets as w
    >>> inner = w.Button()
    >>> box = w.VBox([w.HBox([inner])])
    >>> close_children(box)
    >>> inner.comm is None
    True
    """
    for child in getattr(box, "children", ()):
        if any(child is kept for kept in keep):
            continue
        close_children(child, keep)
        child.close()
