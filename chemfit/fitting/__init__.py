"""Layer 3: the Fitter, its results, history and callbacks.

Imports :mod:`chemfit.core` and :mod:`chemfit.execution`.
"""
