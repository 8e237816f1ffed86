"""Equation of state and lattice constant of a crystal for a parameterised calculator.

:class:`LatticeConstantASEComputer` scales a cell isotropically over a window of linear
strains, moving the window until the energy minimum lies inside it, and fits an equation of
state (``ase.eos.EquationOfState``) to the energies. The equilibrium volume gives the lattice
constant, the curvature the bulk modulus.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from numbers import Number
from typing import Any

import numpy as np

from chemfit.chemistry.ase_computers import _ASEComputer
from chemfit.core.context import EvaluateContext

__all__ = ["EquationOfStateError", "LatticeConstantASEComputer"]

logger = logging.getLogger(__name__)

_DEFAULT_STRAINS = (-0.045, -0.03, -0.015, 0.0, 0.015, 0.03, 0.045)


class EquationOfStateError(RuntimeError):
    """No energy minimum could be bracketed, or the equation-of-state fit failed."""


def _next_window_centre(strains: np.ndarray, energies: np.ndarray, i_min: int) -> float:
    """Where to centre the scan window when its lowest energy lies at an edge.

    A parabola through the three edge points predicts the minimum beyond the edge; the window
    moves there, but at least onto the edge point and at most two window widths past it.

    Examples
    --------
    >>> s = np.linspace(-0.03, 0.03, 7)
    >>> round(float(_next_window_centre(s, (s - 0.05) ** 2, 6)), 6)
    0.05
    >>> round(float(_next_window_centre(s, -s, 6)), 6)  # no curvature: as far as allowed
    0.15
    """
    n = len(strains)
    edge = slice(0, 3) if i_min == 0 else slice(n - 3, n)
    direction = -1.0 if i_min == 0 else 1.0
    width = float(strains[-1] - strains[0])
    curvature, slope, _ = np.polyfit(strains[edge], energies[edge], 2)
    distance = 2.0 * width
    if curvature > 0:
        vertex = -slope / (2.0 * curvature)
        distance = float(np.clip(direction * (vertex - strains[i_min]), 0.0, 2.0 * width))
    return float(strains[i_min] + direction * distance)


def cubic_lattice_constant(cell: Any) -> float:
    """The edge length of a cubic cell; ``ValueError`` for any other cell.

    Examples
    --------
    >>> cubic_lattice_constant(np.diag([3.6, 3.6, 3.6]))
    3.6
    >>> cubic_lattice_constant([[0, 1.8, 1.8], [1.8, 0, 1.8], [1.8, 1.8, 0]])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...not cubic...
    """
    cell = np.asarray(cell, dtype=float)
    length = float(cell[0, 0])
    if not (length > 0 and np.allclose(cell, np.eye(3) * length, rtol=1e-8, atol=1e-8)):
        raise ValueError(
            f"the cell {cell.round(4).tolist()} is not cubic, so its lattice constant is not "
            "its edge; pass lattice_constant= (the lattice constant of the input structure)"
        )
    return length


class LatticeConstantASEComputer(_ASEComputer):
    """Equilibrium lattice constant, volume, energy and bulk modulus of a crystal.

    Parameters
    ----------
    calc_factory, param_applier, atoms_factory, atoms_post_processor
        As for :class:`~chemfit.chemistry.ase_computers.SinglePointASEComputer`. The structure
        must be periodic in three dimensions.
    strains : sequence of float, optional
        Linear strains of the scan window (at least 5, sorted); the cell is scaled by
        ``1 + strain``. Default: 7 points from -4.5 % to +4.5 %.
    eos : str
        An ``ase.eos`` equation of state: ``"birchmurnaghan"`` (default), ``"sj"``,
        ``"murnaghan"``, ``"vinet"``, ...
    lattice_constant : float, optional
        The lattice constant of the input structure. ``None`` takes the edge of a cubic cell
        (e.g. the conventional fcc cell); other cells need it.
    max_window_shifts : int
        How often the window may move when the lowest energy is at its edge (each move
        follows a parabola through the edge points, at most two window widths).
    tag : str, optional
        A label (static meta data).

    Notes
    -----
    The quantities are ``lattice_constant`` (Å), ``volume`` and ``volume_per_atom`` (Å³),
    ``energy`` and ``energy_per_atom`` (eV, at the minimum), ``bulk_modulus`` (eV/Å³),
    ``bulk_modulus_GPa``, ``n_atoms`` and the scan (``scan_volumes``, ``scan_energies``).
    ``ctx.meta["eos"]`` gets the same numbers as plain floats.

    Examples
    --------
    >>> from ase.build import bulk
    >>> from ase.calculators.emt import EMT
    >>> def emt(atoms):
    ...     atoms.calc = EMT()
    >>> def copper():
    ...     return bulk("Cu", "fcc", a=3.5, cubic=True)
    >>> computer = LatticeConstantASEComputer(emt, lambda atoms, p: None, copper)
    >>> round(computer({})["lattice_constant"], 2)
    3.59
    """

    def __init__(
        self,
        calc_factory: Callable[[Any], None],
        param_applier: Callable[[Any, dict], None],
        atoms_factory: Callable[[], Any],
        atoms_post_processor: Callable[[Any], None] | None = None,
        strains: Sequence[float] | None = None,
        eos: str = "birchmurnaghan",
        lattice_constant: float | None = None,
        max_window_shifts: int = 6,
        tag: str | None = None,
    ) -> None:
        super().__init__(calc_factory, param_applier, [atoms_factory], atoms_post_processor, tag)
        from ase.eos import eos_names

        strains_arr = np.array(_DEFAULT_STRAINS if strains is None else strains, dtype=float)
        if (
            strains_arr.ndim != 1
            or strains_arr.size < 5
            or not np.all(np.isfinite(strains_arr))
            or np.any(np.diff(strains_arr) <= 0)
            or np.any(strains_arr <= -1)
        ):
            raise ValueError(
                f"strains must be at least 5 increasing finite numbers > -1, got {strains!r}"
            )
        if eos not in eos_names:
            raise ValueError(f"eos must be one of {eos_names}, got {eos!r}")
        if lattice_constant is not None and not (
            isinstance(lattice_constant, Number) and lattice_constant > 0
        ):
            raise ValueError(
                f"lattice_constant must be a positive number or None, got {lattice_constant!r}"
            )
        if isinstance(max_window_shifts, bool) or not isinstance(max_window_shifts, int):
            raise TypeError(f"max_window_shifts must be an int, got {max_window_shifts!r}")
        if max_window_shifts < 0:
            raise ValueError(f"max_window_shifts must be >= 0, got {max_window_shifts}")
        self.atoms_factory = atoms_factory
        self.strains = strains_arr
        self.eos = eos
        self.lattice_constant = None if lattice_constant is None else float(lattice_constant)
        self.max_window_shifts = max_window_shifts

    @property
    def atoms(self) -> Any:
        """The cached input structure (built on first access)."""
        return self._get_structures()[0]

    def _input_lattice_constant(self, atoms: Any) -> float:
        if self.lattice_constant is not None:
            return self.lattice_constant
        return cubic_lattice_constant(atoms.cell[:])

    def _scan(self, atoms: Any, cell0: np.ndarray, strains: np.ndarray, cache: dict) -> np.ndarray:
        energies = []
        for strain in strains:
            key = round(float(strain), 12)
            if key not in cache:
                atoms.set_cell(cell0 * (1.0 + strain), scale_atoms=True)
                cache[key] = float(atoms.get_potential_energy())
            energies.append(cache[key])
        return np.array(energies)

    def _compute(self, parameters: dict, ctx: EvaluateContext) -> dict:
        from ase.eos import EquationOfState
        from ase.units import GPa

        base = self.atoms
        if not (base.pbc.all() and base.cell.rank == 3):
            raise ValueError(
                f"LatticeConstantASEComputer(tag={self.tag!r}) needs a structure periodic in "
                f"3 dimensions, got pbc={base.pbc.tolist()}"
            )
        a_input = self._input_lattice_constant(base)
        atoms = self._prepare(base, parameters)
        ctx.temp.atoms = atoms
        cell0 = np.array(atoms.cell[:])
        volume0 = abs(float(np.linalg.det(cell0)))

        cache: dict[float, float] = {}
        offset = 0.0
        centre = len(self.strains) // 2
        n_shifts = 0
        while True:
            strains = (1.0 + offset) * (1.0 + self.strains) - 1.0
            energies = self._scan(atoms, cell0, strains, cache)
            if not np.all(np.isfinite(energies)):
                raise EquationOfStateError(
                    f"non-finite energies in the strain scan of {self.tag!r} "
                    f"with parameters {parameters}"
                )
            i_min = int(np.argmin(energies))
            if 0 < i_min < len(strains) - 1:
                break
            if n_shifts == self.max_window_shifts:
                raise EquationOfStateError(
                    f"no energy minimum of {self.tag!r} within {self.max_window_shifts} window "
                    f"shifts (linear strain reached {strains[i_min]:+.3f}) with parameters "
                    f"{parameters}; widen strains= or check the parameters"
                )
            new_centre = _next_window_centre(strains, energies, i_min)
            offset = (1.0 + new_centre) / (1.0 + self.strains[centre]) - 1.0
            n_shifts += 1
        volumes = volume0 * (1.0 + strains) ** 3
        try:
            v0, e0, bulk_modulus = EquationOfState(volumes, energies, eos=self.eos).fit(warn=False)
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as exc:
            raise EquationOfStateError(
                f"the {self.eos!r} equation-of-state fit of {self.tag!r} failed with "
                f"parameters {parameters}: {exc}"
            ) from exc
        v0, e0, bulk_modulus = float(v0), float(e0), float(bulk_modulus)
        if not (volumes[0] <= v0 <= volumes[-1]) or not np.isfinite(e0):
            raise EquationOfStateError(
                f"the {self.eos!r} fit of {self.tag!r} put the minimum at V={v0:.4g} Å³, "
                f"outside the scanned {volumes[0]:.4g}..{volumes[-1]:.4g} Å³"
            )
        n_atoms = len(atoms)
        lattice_constant = a_input * (v0 / volume0) ** (1.0 / 3.0)
        summary = {
            "tag": self.tag,
            "lattice_constant": lattice_constant,
            "volume": v0,
            "volume_per_atom": v0 / n_atoms,
            "energy": e0,
            "energy_per_atom": e0 / n_atoms,
            "bulk_modulus_GPa": bulk_modulus / GPa,
            "n_atoms": n_atoms,
            "window_shifts": n_shifts,
            "scan_volumes": volumes.tolist(),
            "scan_energies": energies.tolist(),
        }
        ctx.meta["eos"] = summary
        quantities = {k: v for k, v in summary.items() if k != "tag"}
        quantities["bulk_modulus"] = bulk_modulus
        quantities["scan_volumes"] = volumes
        quantities["scan_energies"] = energies
        return quantities
