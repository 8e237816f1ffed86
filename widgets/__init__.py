"""Layer 4: Jupyter front ends for chemfit (import name ``chemfit_widgets``).

Needs the ``jupyter`` extra (ipywidgets, ipympl, matplotlib). The core ``chemfit`` package never
imports this one.

* :class:`ExecutorPicker`: choose, start and stop where a fit runs (threads, processes, loky,
  ipyparallel engines, MPI engines, a running ipcluster).
* :class:`LivePlot`: losses, best so far, parameter traces and per-term losses of a running or
  finished fit, fed by the fitter's callbacks.
* :class:`FitDashboard` / :func:`dashboard`: picker + live plot + progress + best parameters,
  with Start and Stop; the fit runs in a background thread.
* :func:`plot_correlation`, :func:`plot_profiles`, :func:`plot_parity`: how good a fit is
  (``Fitter.covariance()``, ``bootstrap()``, ``profile()``, ``contributions()``).

Examples
--------
In a notebook::

    from chemfit_widgets import dashboard
    dashboard(fitter)          # the last expression of the cell shows it
"""

from __future__ import annotations

from ._jupyter import require_ipywidgets

require_ipywidgets()  # a clear ImportError naming the extra, before anything else fails

from .diagnostics_plots import plot_correlation, plot_parity, plot_profiles  # noqa: E402
from .executor_picker import KINDS, ExecutorPicker  # noqa: E402
from .fit_dashboard import FitDashboard, FitStopped, dashboard  # noqa: E402
from .live_plot import LivePlot  # noqa: E402
from .messages import describe_error  # noqa: E402

__all__ = [
    "KINDS",
    "ExecutorPicker",
    "FitDashboard",
    "FitStopped",
    "LivePlot",
    "dashboard",
    "describe_error",
    "plot_correlation",
    "plot_parity",
    "plot_profiles",
]
