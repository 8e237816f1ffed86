"""MPI wrapper of a combined objective (contract path; see :mod:`chemfit.execution.mpi_wrapper_cob`).

Importing this module imports mpi4py; without it the import raises an ``ImportError`` naming
the ``mpi`` extra.
"""

from chemfit.execution.mpi_wrapper_cob import MPIWrapperCOB, Signal, slice_up_range

__all__ = ["MPIWrapperCOB", "Signal", "slice_up_range"]
