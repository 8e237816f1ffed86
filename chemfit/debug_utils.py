"""Debugging aids (contract path; defined in :mod:`chemfit.core.debug_utils`)."""

from chemfit.core.debug_utils import log_all_methods, log_invocation

__all__ = ["log_all_methods", "log_invocation"]
