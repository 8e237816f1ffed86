"""Wrap plain functions as objectives and quantity computers (contract path).

The code lives in :mod:`chemfit.core.wrapping`.
"""

from chemfit.core.wrapping import (
    WrappableObjFunction,
    WrappableQuantFunction,
    WrappedObjectiveFunctor,
    WrappedQuantityComputer,
    to_objective_functor,
    to_quantity_computer,
)

__all__ = [
    "WrappableObjFunction",
    "WrappableQuantFunction",
    "WrappedObjectiveFunctor",
    "WrappedQuantityComputer",
    "to_objective_functor",
    "to_quantity_computer",
]
