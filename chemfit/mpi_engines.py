"""Fits on ipyparallel MPI engines with progress streamed to the notebook.

The generic job (build an objective on every engine, drive it from rank 0 inside
``MPIWrapperCOB``) is :class:`chemfit.execution.mpi_engines.MPIEngineJob`; the Fitter on top of
it is :class:`chemfit.fitting.mpi_engine_fit.MPIEngineFit`.
"""

from chemfit.execution.mpi_engines import MPIEngineJob
from chemfit.fitting.mpi_engine_fit import MPIEngineFit, run_fit_on_mpi_engines

__all__ = ["MPIEngineFit", "MPIEngineJob", "run_fit_on_mpi_engines"]
