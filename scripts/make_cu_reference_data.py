"""Generate the copper reference data of the Morse-fit example with ASE's EMT calculator.

Writes two extended-XYZ files to ``examples/data/copper/`` (or ``--output``):

* ``cu_fcc_eos.xyz``: the conventional cubic cell of fcc Cu (4 atoms) at lattice constants
  from 3.40 to 3.85 Å, an energy-volume curve;
* ``cu2_binding.xyz``: the Cu2 dimer at distances from 2.0 to 4.4 Å, a binding curve.

Energies are binding energies: the EMT energy minus that of the same number of free Cu atoms,
so that zero means separated atoms, as for a Morse potential. Forces are stored as well. Each
image's ``info`` holds a ``tag``, its lattice constant or distance and the energy reference.

Run from the repository root: ``python scripts/make_cu_reference_data.py``. The output is
deterministic; the files in the repository were made with ASE 3.29.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

logger = logging.getLogger("make_cu_reference_data")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO / "examples" / "data" / "copper"
LATTICE_CONSTANTS = np.round(np.linspace(3.40, 3.85, 10), 4)
DIMER_DISTANCES = np.round(np.linspace(2.0, 4.4, 13), 4)
ENERGY_REFERENCE = "free atoms (EMT)"


def free_atom_energy() -> float:
    """EMT energy of one isolated Cu atom (EMT's zero is the fcc crystal, not free atoms)."""
    atom = Atoms("Cu", calculator=EMT())
    return float(atom.get_potential_energy())


def _labelled(atoms: Atoms, e_free: float, **info: object) -> Atoms:
    """``atoms`` with its EMT binding energy and forces frozen in a single-point calculator."""
    atoms.calc = EMT()
    energy = float(atoms.get_potential_energy()) - len(atoms) * e_free
    forces = atoms.get_forces()
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    atoms.info.update(info, energy_reference=ENERGY_REFERENCE)
    return atoms


def eos_images(e_free: float) -> list[Atoms]:
    """The energy-volume curve of fcc Cu (conventional 4-atom cell)."""
    return [
        _labelled(
            bulk("Cu", "fcc", a=float(a), cubic=True),
            e_free,
            tag=f"fcc a={a:.3f}",
            lattice_constant=float(a),
        )
        for a in LATTICE_CONSTANTS
    ]


def dimer_images(e_free: float) -> list[Atoms]:
    """The Cu2 binding curve (a dimer along z in an open box)."""
    images = []
    for d in DIMER_DISTANCES:
        atoms = Atoms("Cu2", positions=[[0.0, 0.0, 0.0], [0.0, 0.0, float(d)]], pbc=False)
        images.append(_labelled(atoms, e_free, tag=f"Cu2 d={d:.2f}", distance=float(d)))
    return images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="output folder")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.output.mkdir(parents=True, exist_ok=True)
    e_free = free_atom_energy()
    for name, images in (
        ("cu_fcc_eos.xyz", eos_images(e_free)),
        ("cu2_binding.xyz", dimer_images(e_free)),
    ):
        path = args.output / name
        write(path, images, format="extxyz")
        logger.info("wrote %d images to %s", len(images), path)


if __name__ == "__main__":
    main()
