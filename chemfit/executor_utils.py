"""Executor helpers that keep contexts up to date (contract path).

The code lives in :mod:`chemfit.execution.executor_utils`.
"""

from chemfit.execution.executor_utils import (
    AttachContextAsReturnValue,
    as_completed_with_context,
    map_with_context,
)

__all__ = ["AttachContextAsReturnValue", "as_completed_with_context", "map_with_context"]
