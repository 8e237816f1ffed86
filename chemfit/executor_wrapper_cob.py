"""Evaluate the terms of a combined objective on an executor (contract path).

The code lives in :mod:`chemfit.execution.executor_wrapper_cob`.
"""

from chemfit.execution.executor_wrapper_cob import ExecutorWrapperCOB

__all__ = ["ExecutorWrapperCOB"]
