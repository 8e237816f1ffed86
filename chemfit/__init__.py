"""chemfit: fit the parameters of simulation models to reference data.

The package is layered; each layer imports only those below it:

1. :mod:`chemfit.core` — evaluation contexts, objectives, combined objectives, utilities
   (and :mod:`chemfit.chemistry` beside it: structure comparison, reference data files);
2. :mod:`chemfit.execution` — running evaluations on executors and MPI ranks;
3. :mod:`chemfit.fitting` — the :class:`Fitter`, its results, history and callbacks.

The top-level modules (``chemfit.abstract_objective_function``, ``chemfit.fitter``, ...) are the
public, upstream-compatible import paths. ``import chemfit`` imports no Jupyter package, and
mpi4py only when :class:`MPIWrapperCOB` is first used.
"""

from __future__ import annotations

from typing import Any

from chemfit._version import __version__
from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor, QuantityComputer
from chemfit.execution.executor_utils import as_completed_with_context, map_with_context
from chemfit.execution.executor_wrapper_cob import ExecutorWrapperCOB
from chemfit.fitting.fitter import Fitter, FitterEvaluateContext
from chemfit.fitting.results import FitResult

__all__ = [
    "CombinedObjectiveFunction",
    "EvaluateContext",
    "ExecutorWrapperCOB",
    "FitResult",
    "Fitter",
    "FitterEvaluateContext",
    "MPIWrapperCOB",
    "ObjectiveFunctor",
    "QuantityComputer",
    "__version__",
    "as_completed_with_context",
    "map_with_context",
]


def __getattr__(name: str) -> Any:
    # MPIWrapperCOB imports mpi4py, which headless batch jobs without MPI must not need.
    if name == "MPIWrapperCOB":
        from chemfit.execution.mpi_wrapper_cob import MPIWrapperCOB

        return MPIWrapperCOB
    raise AttributeError(f"module 'chemfit' has no attribute {name!r}")
