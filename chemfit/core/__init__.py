"""Layer 1: evaluation contexts, objectives, combined objectives and plain utilities.

Imports nothing from :mod:`chemfit.execution` or :mod:`chemfit.fitting`.
"""
