"""Import optional dependencies of the chemistry layer on first use."""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require_ase"]


def require_ase(module: str = "ase") -> ModuleType:
    """Import ``module`` (ASE, matscipy or a submodule), naming the extra if it is missing.

    Parameters
    ----------
    module : str
        A module of the ASE package, e.g. ``"ase.io"``.

    Raises
    ------
    ImportError
        When ASE is not installed; the message names the ``ase`` extra.

    Examples
    --------
    >>> require_ase("ase.io").__name__
    'ase.io'
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] not in {"ase", "matscipy"}:
            raise
        raise ImportError(
            f"{module} is needed for chemfit's ASE computers but cannot be imported ({exc}); "
            "install the optional extra: pip install 'chemfit[ase]'"
        ) from exc
