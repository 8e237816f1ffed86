"""asyncio helpers (contract path; defined in :mod:`chemfit.execution.async_helpers`)."""

from chemfit.execution.async_helpers import async_eval_many, async_eval_one

__all__ = ["async_eval_many", "async_eval_one"]
