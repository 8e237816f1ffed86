"""Compare geometries by their RMSD after optimal superposition (Kabsch), as quantity and loss.

Three ways in, all built on :mod:`chemfit.chemistry.kabsch`:

* :func:`kabsch_rmsd`, the plain function;
* :class:`KabschRMSDProcessor`, a quantity processor for the ASE computers (e.g. the relaxed
  geometry of a :class:`~chemfit.chemistry.ase_computers.MinimizationASEComputer`);
* :class:`KabschRMSDComputer`, which adds ``"kabsch_rmsd"`` to the quantities of any computer
  that produces positions, and :func:`kabsch_rmsd_loss`, a loss on such quantities.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from chemfit.chemistry.kabsch import apply_transform, kabsch, rmsd
from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import QuantityComputer

__all__ = ["KabschRMSDComputer", "KabschRMSDProcessor", "kabsch_rmsd", "kabsch_rmsd_loss"]


def kabsch_rmsd(
    P: ArrayLike,
    Q: ArrayLike,
    weights: ArrayLike | None = None,
    allow_reflection: bool = False,
) -> float:
    """RMSD between two point sets after the best rigid superposition of ``P`` onto ``Q``.

    Parameters
    ----------
    P, Q : array_like, shape (N, D)
        Corresponding points as rows (``N >= D``).
    weights : array_like, shape (N,), optional
        Non-negative weights (e.g. masses), used for the superposition and the RMSD.
    allow_reflection : bool
        Also allow mirror images.

    Examples
    --------
    >>> P = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    >>> rotated = P @ np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]) + 5.0
    >>> round(kabsch_rmsd(P, rotated), 12)
    0.0
    """
    R, t = kabsch(P, Q, weights=weights, allow_reflection=allow_reflection)
    return rmsd(apply_transform(P, R, t), Q, weights=weights)


def _reference(reference_positions: ArrayLike) -> np.ndarray:
    ref = np.array(reference_positions, dtype=float)
    if ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError(f"reference_positions must be an (N, D) array, got shape {ref.shape}")
    return ref


class KabschRMSDProcessor:
    """Quantity processor: ``{key: kabsch_rmsd(atoms positions, reference_positions)}``.

    Parameters
    ----------
    reference_positions : array_like, shape (N, 3)
        The reference geometry, atoms in the same order as the computed structure.
    weights : array_like, optional
        Per-atom weights (e.g. ``atoms.get_masses()``).
    allow_reflection : bool
        Also allow mirror images.
    key : str
        The quantity's name.

    Examples
    --------
    >>> from ase import Atoms
    >>> ref = [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    >>> atoms = Atoms("H3", positions=[[5.0, 5.0, 5.0], [5.0, 6.0, 5.0], [4.0, 5.0, 5.0]])
    >>> round(KabschRMSDProcessor(ref)(None, atoms)["kabsch_rmsd"], 12)
    0.0
    """

    def __init__(
        self,
        reference_positions: ArrayLike,
        weights: ArrayLike | None = None,
        allow_reflection: bool = False,
        key: str = "kabsch_rmsd",
    ) -> None:
        self.reference_positions = _reference(reference_positions)
        self.weights = None if weights is None else np.array(weights, dtype=float)
        self.allow_reflection = allow_reflection
        self.key = key

    def __call__(self, calc: Any, atoms: Any) -> dict:
        positions = np.asarray(atoms.get_positions(), dtype=float)
        value = kabsch_rmsd(
            positions, self.reference_positions, self.weights, self.allow_reflection
        )
        return {self.key: value}


class KabschRMSDComputer(QuantityComputer):
    """Run a computer and add the Kabsch RMSD of its positions to a reference geometry.

    Parameters
    ----------
    quantity_computer : callable
        ``computer(parameters, ctx) -> dict`` producing ``positions_key`` (an ``(N, D)`` array).
    reference_positions : array_like, shape (N, D)
        The reference geometry.
    positions_key : str
        Where the computed positions are in the inner quantities.
    weights : array_like, optional
        Per-point weights.
    allow_reflection : bool
        Also allow mirror images.

    Notes
    -----
    The quantities are the inner computer's plus ``"kabsch_rmsd"``, which is also written to
    ``ctx.meta["kabsch_rmsd"]``.

    Examples
    --------
    >>> from chemfit.core.wrapping import WrappedQuantityComputer
    >>> ref = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    >>> def stretched(params):
    ...     return {"positions": ref * [params["s"], 1.0]}
    >>> computer = KabschRMSDComputer(WrappedQuantityComputer(stretched), ref)
    >>> computer({"s": 1.0})["kabsch_rmsd"] < 1e-12
    True
    >>> objective = computer.with_loss(kabsch_rmsd_loss, reference_positions=ref)
    >>> round(objective({"s": 1.5}), 4)
    0.4629
    """

    def __init__(
        self,
        quantity_computer: Callable[..., dict],
        reference_positions: ArrayLike,
        positions_key: str = "positions",
        weights: ArrayLike | None = None,
        allow_reflection: bool = False,
    ) -> None:
        super().__init__()
        if not callable(quantity_computer):
            raise TypeError(
                f"quantity_computer must be callable, got {type(quantity_computer).__name__}"
            )
        self.quantity_computer = quantity_computer
        self.reference_positions = _reference(reference_positions)
        self.positions_key = positions_key
        self.weights = None if weights is None else np.array(weights, dtype=float)
        self.allow_reflection = allow_reflection

    def _compute(self, parameters: dict, ctx: EvaluateContext) -> dict:
        inner = dict(self.quantity_computer(parameters, ctx))
        value = kabsch_rmsd_loss(
            inner,
            self.reference_positions,
            positions_key=self.positions_key,
            weights=self.weights,
            allow_reflection=self.allow_reflection,
        )
        inner["kabsch_rmsd"] = value
        ctx.meta["kabsch_rmsd"] = value
        return inner


def kabsch_rmsd_loss(
    quantities: dict,
    reference_positions: ArrayLike,
    *,
    positions_key: str = "positions",
    weights: ArrayLike | None = None,
    allow_reflection: bool = False,
) -> float:
    """Loss: the Kabsch RMSD of ``quantities[positions_key]`` to ``reference_positions``.

    Examples
    --------
    >>> ref = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    >>> round(kabsch_rmsd_loss({"positions": [[0.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]}, ref), 12)
    0.0
    """
    if positions_key not in quantities:
        raise ValueError(
            f"the quantities have no {positions_key!r} (they have {sorted(map(str, quantities))}); "
            "add a PositionsProcessor or pass positions_key="
        )
    return kabsch_rmsd(quantities[positions_key], reference_positions, weights, allow_reflection)
