"""Loss functions for computed structures: energies, forces, binding curves, lattice constants.

Each takes the quantities dict of a computer as its first argument and references as keywords,
so it plugs into ``computer.with_loss(loss, reference_energy=...)``. They work on the
quantities of :class:`~chemfit.chemistry.ase_computers.SinglePointASEComputer` (one structure),
:class:`~chemfit.chemistry.ase_computers.MultiStructureASEComputer` (arrays, one entry per
structure) and :class:`~chemfit.chemistry.ase_eos.LatticeConstantASEComputer`, and need no ASE.
Units are those of the quantities (eV, eV/Å, Å with ASE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "energy_error",
    "energy_rmse",
    "force_rmse",
    "lattice_constant_error",
    "relative_energy_rmse",
]


def _quantity(quantities: dict, key: str) -> Any:
    if not isinstance(quantities, dict):
        raise TypeError(
            f"quantities must be the dict a quantity computer returned, got "
            f"{type(quantities).__name__}"
        )
    if key not in quantities:
        raise ValueError(
            f"the quantities have no {key!r} (they have {sorted(map(str, quantities))}); "
            "pick a computer or processor that produces it"
        )
    return quantities[key]


def _energies(quantities: dict, per_atom: bool) -> np.ndarray:
    energies = np.atleast_1d(np.asarray(_quantity(quantities, "energy"), dtype=float))
    if per_atom:
        n_atoms = np.atleast_1d(np.asarray(_quantity(quantities, "n_atoms"), dtype=float))
        if n_atoms.shape != energies.shape:
            raise ValueError(
                f"'n_atoms' has shape {n_atoms.shape} but 'energy' has shape {energies.shape}"
            )
        energies = energies / n_atoms
    return energies


def _references(name: str, reference: ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    ref = np.atleast_1d(np.asarray(reference, dtype=float))
    if ref.shape != shape:
        raise ValueError(
            f"{name} has shape {ref.shape} but the computed energies have shape {shape}; "
            "pass one reference per structure, in the same order"
        )
    return ref


def energy_error(
    quantities: dict, reference_energy: float, *, per_atom: bool = False, squared: bool = False
) -> float:
    """Absolute (or squared) error of one structure's energy.

    Parameters
    ----------
    quantities : dict
        With ``"energy"`` (and ``"n_atoms"`` when ``per_atom``).
    reference_energy : float
        The reference, per atom when ``per_atom`` is set.
    per_atom : bool
        Compare energies per atom.
    squared : bool
        Return the squared error (sums of these give sums of squares).

    Examples
    --------
    >>> energy_error({"energy": -3.5, "n_atoms": 2}, -3.0)
    0.5
    >>> energy_error({"energy": -3.5, "n_atoms": 2}, -1.5, per_atom=True, squared=True)
    0.0625
    """
    energy = _energies(quantities, per_atom)
    if energy.size != 1:
        raise ValueError(
            f"energy_error compares one structure, got {energy.size} energies; "
            "use energy_rmse for several structures"
        )
    error = float(energy[0]) - float(reference_energy)
    return error * error if squared else abs(error)


def energy_rmse(
    quantities: dict, reference_energies: ArrayLike, *, per_atom: bool = False
) -> float:
    """Root-mean-square error of the energies of one or several structures.

    Parameters
    ----------
    quantities : dict
        With ``"energy"`` (a number or an array) and, for ``per_atom``, ``"n_atoms"``.
    reference_energies : array_like
        One reference per structure (per atom when ``per_atom`` is set).
    per_atom : bool
        Compare energies per atom (e.g. an energy-volume curve of cells of any size).

    Examples
    --------
    >>> q = {"energy": np.array([-14.0, -13.6]), "n_atoms": np.array([4, 4])}
    >>> round(energy_rmse(q, [-3.5, -3.5], per_atom=True), 6)
    0.070711
    """
    energies = _energies(quantities, per_atom)
    ref = _references("reference_energies", reference_energies, energies.shape)
    return float(np.sqrt(np.mean((energies - ref) ** 2)))


def relative_energy_rmse(
    quantities: dict,
    reference_energies: ArrayLike,
    *,
    reference_index: int | None = None,
    per_atom: bool = False,
) -> float:
    """RMSE of energies along a curve, each measured from a reference point of its own curve.

    Only the shape of the curve counts, not its absolute offset, which suits binding curves
    and reference data whose energy zero differs from the model's.

    Parameters
    ----------
    quantities : dict
        With ``"energy"`` as an array (one per point of the curve).
    reference_energies : array_like
        The reference curve, same length and order.
    reference_index : int, optional
        The point both curves are measured from (e.g. ``-1``, the dissociated end of a
        binding curve). ``None`` subtracts each curve's mean, i.e. the best constant shift.
    per_atom : bool
        Compare energies per atom.

    Examples
    --------
    >>> q = {"energy": np.array([1.0, 0.0, 0.5])}
    >>> relative_energy_rmse(q, [11.0, 10.0, 10.5])
    0.0
    >>> round(relative_energy_rmse(q, [12.0, 10.0, 10.5], reference_index=1), 6)
    0.57735
    """
    energies = _energies(quantities, per_atom)
    ref = _references("reference_energies", reference_energies, energies.shape)
    if energies.size < 2:
        raise ValueError(
            f"relative_energy_rmse needs a curve of at least 2 points, got {energies.size}"
        )
    if reference_index is None:
        delta = (energies - energies.mean()) - (ref - ref.mean())
    else:
        if not -energies.size <= reference_index < energies.size:
            raise ValueError(
                f"reference_index={reference_index} is out of range for a curve of "
                f"{energies.size} points"
            )
        delta = (energies - energies[reference_index]) - (ref - ref[reference_index])
    return float(np.sqrt(np.mean(delta**2)))


def _force_blocks(forces: Any, name: str) -> list[np.ndarray]:
    if isinstance(forces, np.ndarray) and forces.ndim == 2:
        blocks = [forces]
    elif isinstance(forces, Sequence) or (isinstance(forces, np.ndarray) and forces.ndim == 3):
        blocks = [np.asarray(f, dtype=float) for f in forces]
        if blocks and np.ndim(blocks[0]) == 1:  # a single (N, 3) given as nested lists
            blocks = [np.asarray(forces, dtype=float)]
    else:
        raise TypeError(f"{name} must be an (N, 3) array or a list of them, got {forces!r:.60}")
    for i, block in enumerate(blocks):
        if block.ndim != 2 or block.shape[1] != 3:
            raise ValueError(f"{name}[{i}] must have shape (N, 3), got {block.shape}")
    return [np.asarray(b, dtype=float) for b in blocks]


def force_rmse(quantities: dict, reference_forces: Any) -> float:
    """Per-atom force RMSE: ``sqrt(mean_i |F_i - F_ref_i|^2)`` over all atoms.

    Parameters
    ----------
    quantities : dict
        With ``"forces"``: an ``(N, 3)`` array, or a list of them (several structures).
    reference_forces : array_like or list of array_like
        The same layout.

    Examples
    --------
    >>> q = {"forces": np.array([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])}
    >>> force_rmse(q, [[0.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    0.7071067811865476
    """
    computed = _force_blocks(_quantity(quantities, "forces"), "quantities['forces']")
    reference = _force_blocks(reference_forces, "reference_forces")
    shapes = [b.shape for b in computed]
    if shapes != [b.shape for b in reference]:
        raise ValueError(
            f"reference_forces have shapes {[b.shape for b in reference]} but the computed "
            f"forces have shapes {shapes}"
        )
    diff = np.concatenate([c - r for c, r in zip(computed, reference)])
    if diff.size == 0:
        raise ValueError("force_rmse got no atoms")
    return float(np.sqrt(np.mean(np.sum(diff**2, axis=1))))


def lattice_constant_error(
    quantities: dict,
    reference_lattice_constant: float,
    *,
    relative: bool = True,
    squared: bool = False,
) -> float:
    """Error of the lattice constant (``"lattice_constant"``), relative by default.

    Examples
    --------
    >>> round(lattice_constant_error({"lattice_constant": 3.65}, 3.61), 6)
    0.01108
    >>> round(lattice_constant_error({"lattice_constant": 3.65}, 3.61, relative=False), 6)
    0.04
    """
    value = float(_quantity(quantities, "lattice_constant"))
    reference = float(reference_lattice_constant)
    if not reference > 0:
        raise ValueError(
            f"reference_lattice_constant must be positive, got {reference_lattice_constant!r}"
        )
    error = value - reference
    if relative:
        error /= reference
    return error * error if squared else abs(error)
