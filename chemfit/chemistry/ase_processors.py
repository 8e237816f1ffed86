"""Quantity processors: turn a finished ASE calculation into a dict of quantities.

Processors never import ASE; they only read ``calc.results`` and the atoms they are given.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["DefaultQuantityProcessor", "PositionsProcessor"]


def _copy_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, np.generic):
        return value.item()  # numpy scalars become plain Python numbers
    return value


class DefaultQuantityProcessor:
    """Everything the calculator computed (``calc.results``) plus ``n_atoms``.

    Parameters
    ----------
    filter_keys : iterable of str, optional
        Keys to leave out; keys that are absent are fine.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> calc = SimpleNamespace(results={"energy": -1.0, "free_energy": -1.0})
    >>> DefaultQuantityProcessor(filter_keys=["free_energy", "stress"])(calc, [0, 1])
    {'energy': -1.0, 'n_atoms': 2}
    """

    def __init__(self, filter_keys: Iterable[str] | None = None) -> None:
        if isinstance(filter_keys, str):
            raise TypeError(
                f"filter_keys must be an iterable of keys, got the string {filter_keys!r}; "
                f"pass [{filter_keys!r}]"
            )
        self.filter_keys = frozenset(filter_keys or ())

    def __call__(self, calc: Any, atoms: Any) -> dict:
        quantities = {k: _copy_value(v) for k, v in calc.results.items()}
        quantities["n_atoms"] = len(atoms)
        for key in self.filter_keys:
            quantities.pop(key, None)
        return quantities

    def __repr__(self) -> str:
        return f"DefaultQuantityProcessor(filter_keys={sorted(self.filter_keys)!r})"


class PositionsProcessor:
    """The atoms' Cartesian positions (e.g. of a relaxed geometry) as ``"positions"``.

    Examples
    --------
    >>> from ase import Atoms
    >>> PositionsProcessor()(None, Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]))["positions"]
    array([[0.  , 0.  , 0.  ],
           [0.  , 0.  , 0.74]])
    """

    def __call__(self, calc: Any, atoms: Any) -> dict:
        return {"positions": np.array(atoms.get_positions(), dtype=float)}

    def __repr__(self) -> str:
        return "PositionsProcessor()"
