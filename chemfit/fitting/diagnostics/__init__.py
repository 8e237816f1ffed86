"""How good a fit is: per-term contributions, loss profiles, covariance and bootstrap.

Each job has its module; ``Fitter.contributions()``, ``profile()``, ``covariance()`` and
``bootstrap()`` delegate to them. Every evaluation beyond the single one of
:func:`~chemfit.fitting.diagnostics.contributions.contributions` runs on the executor the
caller passes, through the one submission primitive (``map_with_context`` /
``as_completed_with_context``).

* :mod:`~chemfit.fitting.diagnostics.evaluation`: the fitted point and parallel loss evaluations;
* :mod:`~chemfit.fitting.diagnostics.contributions`: one row per term at the best parameters;
* :mod:`~chemfit.fitting.diagnostics.profile`: the loss along each parameter;
* :mod:`~chemfit.fitting.diagnostics.covariance`: the Laplace / Gauss-Newton covariance;
* :mod:`~chemfit.fitting.diagnostics.bootstrap`: refits on resampled terms (or points);
* :mod:`~chemfit.fitting.diagnostics.resampling`: :class:`ResamplableTerm`, terms that draw
  their own data points (``bootstrap(..., resample="points")``);
* :mod:`~chemfit.fitting.diagnostics.store`: ``FitResult.diagnostics`` to and from JSON.
"""

from chemfit.fitting.diagnostics.bootstrap import BootstrapResult, bootstrap
from chemfit.fitting.diagnostics.contributions import contributions
from chemfit.fitting.diagnostics.covariance import Covariance, covariance
from chemfit.fitting.diagnostics.profile import profile
from chemfit.fitting.diagnostics.resampling import ResamplableTerm

__all__ = [
    "BootstrapResult",
    "Covariance",
    "ResamplableTerm",
    "bootstrap",
    "contributions",
    "covariance",
    "profile",
]
