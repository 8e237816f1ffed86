"""Creating and normalising executors (contract path; defined in :mod:`chemfit.execution.executors`).

``IPyParallelExecutor`` is resolved lazily, so that importing this module stays light.
"""

from __future__ import annotations

from typing import Any

from chemfit.execution.executors import ExecutorKind, SerialExecutor, as_executor, make_executor

__all__ = [
    "ExecutorKind",
    "IPyParallelExecutor",  # noqa: F822 (resolved by __getattr__)
    "SerialExecutor",
    "as_executor",
    "make_executor",
]


def __getattr__(name: str) -> Any:
    if name == "IPyParallelExecutor":
        from chemfit.execution.ipyparallel_executor import IPyParallelExecutor

        return IPyParallelExecutor
    raise AttributeError(f"module 'chemfit.executors' has no attribute {name!r}")
