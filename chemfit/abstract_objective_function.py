"""Evaluation contexts, objectives and quantity computers (contract path).

The code lives in :mod:`chemfit.core.context` and :mod:`chemfit.core.objectives`.
"""

from chemfit.core.context import (
    ChildContextConfigurator,
    EvaluateContext,
    ExecutorLike,
    FutureLike,
    LossFunction,
)
from chemfit.core.objectives import (
    ObjectiveFunctor,
    QuantityComputer,
    QuantityComputerObjectiveFunction,
)

__all__ = [
    "ChildContextConfigurator",
    "EvaluateContext",
    "ExecutorLike",
    "FutureLike",
    "LossFunction",
    "ObjectiveFunctor",
    "QuantityComputer",
    "QuantityComputerObjectiveFunction",
]
