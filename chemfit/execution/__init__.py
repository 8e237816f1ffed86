"""Layer 2: running evaluations on executors (threads, processes, loky, ipyparallel, MPI).

Imports :mod:`chemfit.core` only, never :mod:`chemfit.fitting`.
"""
