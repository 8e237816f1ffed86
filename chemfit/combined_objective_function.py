"""Combined objective functions, reducers and exception handlers (contract path).

The code lives in :mod:`chemfit.core.combined`.
"""

from chemfit.core.combined import (
    Aggregator,
    CombinedObjectiveFunction,
    ExceptionHandler,
    Reducer,
    WrappedReducer,
    mean_reducer,
    nan_exception_handler,
    raising_exception_handler,
    root_mean_reducer,
    skip_exception_handler,
    sum_reducer,
    transform_generic_callables,
)

__all__ = [
    "Aggregator",
    "CombinedObjectiveFunction",
    "ExceptionHandler",
    "Reducer",
    "WrappedReducer",
    "mean_reducer",
    "nan_exception_handler",
    "raising_exception_handler",
    "root_mean_reducer",
    "skip_exception_handler",
    "sum_reducer",
    "transform_generic_callables",
]
