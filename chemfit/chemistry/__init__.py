"""Layer 1b: chemistry helpers on top of the core (structure comparison, reference data files,
ASE computers and external programs).

Imports :mod:`chemfit.core` only.
"""
