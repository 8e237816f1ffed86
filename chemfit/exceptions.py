"""Exceptions raised by chemfit (contract path; defined in :mod:`chemfit.core.exceptions`)."""

from chemfit.core.exceptions import *  # noqa: F403
from chemfit.core.exceptions import __all__  # noqa: F401
