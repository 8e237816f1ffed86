"""Evaluation records, fit history and fit results (contract path).

The code lives in :mod:`chemfit.fitting.results`; the diagnostics' results (what
``Fitter.covariance()`` and ``Fitter.bootstrap()`` return) in :mod:`chemfit.fitting.diagnostics`.
"""

from chemfit.fitting.diagnostics import BootstrapResult, Covariance
from chemfit.fitting.results import EvaluationRecord, FitHistory, FitResult

__all__ = ["BootstrapResult", "Covariance", "EvaluationRecord", "FitHistory", "FitResult"]
