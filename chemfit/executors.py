"""Creating and normalising executors (contract path; defined in :mod:`chemfit.execution.executors`)."""

from chemfit.execution.executors import ExecutorKind, SerialExecutor, as_executor, make_executor

__all__ = ["ExecutorKind", "SerialExecutor", "as_executor", "make_executor"]
