"""The Fitter and its evaluation context (contract path).

The code lives in :mod:`chemfit.fitting.fitter`.
"""

from chemfit.fitting.fitter import Fitter, FitterEvaluateContext, FitterObjectiveFunctor

__all__ = ["Fitter", "FitterEvaluateContext", "FitterObjectiveFunctor"]
