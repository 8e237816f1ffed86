"""Parallel evaluation, at the documented upstream import path.

* :class:`ExecutorWrapperCOB` evaluates the terms of a combined objective on an executor;
* :class:`MPIWrapperCOB` evaluates them across MPI ranks (mpi4py is imported on first access);
* :func:`map_with_context` and :func:`as_completed_with_context` evaluate many parameter sets,
  bringing each evaluation's context state back to the caller.
"""

from __future__ import annotations

from typing import Any

from chemfit.execution.executor_utils import as_completed_with_context, map_with_context
from chemfit.execution.executor_wrapper_cob import ExecutorWrapperCOB

__all__ = [
    "ExecutorWrapperCOB",
    "MPIWrapperCOB",  # noqa: F822 (resolved lazily by __getattr__)
    "as_completed_with_context",
    "map_with_context",
]


def __getattr__(name: str) -> Any:
    if name == "MPIWrapperCOB":
        from chemfit.execution.mpi_wrapper_cob import MPIWrapperCOB

        return MPIWrapperCOB
    raise AttributeError(f"module 'chemfit.parallel_execution' has no attribute {name!r}")
