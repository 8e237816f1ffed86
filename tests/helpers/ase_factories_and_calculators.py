"""Module-level (picklable) factories and calculators for the ASE computer tests."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.calculators.morse import MorsePotential

from chemfit.chemistry.neighbor_list import fast_neighbor_list

MORSE = {"epsilon": 0.35, "r0": 2.6, "rho0": 4.0}


def emt_factory(atoms: Atoms) -> None:
    atoms.calc = EMT()


def morse_factory(atoms: Atoms) -> None:
    atoms.calc = MorsePotential(neighbor_list=fast_neighbor_list)


def no_calc_factory(atoms: Atoms) -> None:
    """A broken calculator factory: attaches nothing."""


def apply_nothing(atoms: Atoms, params: dict) -> None:
    pass


def apply_morse(atoms: Atoms, params: dict) -> None:
    atoms.calc.set(**params)


def cu_dimer(distance: float = 2.5) -> Atoms:
    return Atoms("Cu2", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, distance]])


def cu_trimer() -> Atoms:
    """A bent, stretched Cu3 that relaxes to an equilateral triangle."""
    return Atoms("Cu3", positions=[[0.0, 0.0, 0.0], [2.9, 0.0, 0.0], [0.8, 2.2, 0.3]])


def cu_fcc_cubic(a: float = 3.6) -> Atoms:
    return bulk("Cu", "fcc", a=a, cubic=True)


def cu_fcc_primitive(a: float = 3.6) -> Atoms:
    return bulk("Cu", "fcc", a=a)


def cu_fcc_squeezed() -> Atoms:
    """A cubic Cu cell far from equilibrium: the strain window has to move."""
    return bulk("Cu", "fcc", a=3.0, cubic=True)


def not_atoms() -> str:
    return "not atoms"


def shift_atoms(atoms: Atoms) -> None:
    atoms.translate([1.0, 2.0, 3.0])


class VolumeCalculator(Calculator):
    """E = slope * V: no minimum for any volume (for the equation-of-state error paths)."""

    implemented_properties = ["energy"]
    default_parameters = {"slope": -1.0}

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.results["energy"] = self.parameters["slope"] * self.atoms.get_volume()


def volume_factory(atoms: Atoms) -> None:
    atoms.calc = VolumeCalculator()


def energy_of(atoms: Atoms, factory=emt_factory) -> float:
    copy = atoms.copy()
    factory(copy)
    return float(copy.get_potential_energy())


def random_cluster(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3)) * 2.0
