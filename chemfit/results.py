"""Evaluation records, fit history and fit results (contract path).

The code lives in :mod:`chemfit.fitting.results`.
"""

from chemfit.fitting.results import EvaluationRecord, FitHistory, FitResult

__all__ = ["EvaluationRecord", "FitHistory", "FitResult"]
