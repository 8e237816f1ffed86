"""Structures from files: an atoms factory and a reader for reference data (extra ``ase``).

Extended-XYZ files written by ASE keep each image's energy and forces next to its geometry, so
one file can hold both the structures to evaluate and their reference values.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from chemfit.chemistry._optional import require_ase

__all__ = ["PathAtomsFactory", "count_images", "read_reference_data"]

logger = logging.getLogger(__name__)

IndexType = int | slice | str | None


def _existing_file(path: str | os.PathLike, argument: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"{argument} must be a str or os.PathLike, got {path!r} ({type(path).__name__})"
        )
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise FileNotFoundError(f"{argument}={str(path)!r}: no such file ({resolved})")
    return resolved


class PathAtomsFactory:
    """Read one structure from any file ASE can read.

    Parameters
    ----------
    path : str or os.PathLike
        The structure file, resolved to an absolute path when the factory is created.
    index : int, slice or str, optional
        Which image to read (as for ``ase.io.read``). ``None`` requires the file to hold
        exactly one image.

    Raises
    ------
    ValueError
        When the file, or the selection, holds several images (or none).

    Examples
    --------
    >>> import tempfile
    >>> from ase import Atoms
    >>> from ase.io import write
    >>> path = Path(tempfile.mkdtemp()) / "two.xyz"
    >>> write(path, [Atoms("H"), Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])])
    >>> len(PathAtomsFactory(path, index=1)())
    2
    >>> PathAtomsFactory(path)()  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...holds 2 images...
    """

    def __init__(self, path: str | os.PathLike, index: IndexType = None) -> None:
        self.path = Path(path).expanduser().resolve()
        self.index = index

    def __call__(self) -> Any:
        ase_io = require_ase("ase.io")
        if not self.path.is_file():
            raise FileNotFoundError(f"PathAtomsFactory: no such file {self.path}")
        index = ":" if self.index is None else self.index
        images = ase_io.read(self.path, index=index)
        if isinstance(images, list):
            if len(images) != 1:
                raise ValueError(
                    f"PathAtomsFactory(path={str(self.path)!r}, index={self.index!r}) "
                    f"holds {len(images)} images; pass index= to select exactly one"
                )
            images = images[0]
        return images

    def __repr__(self) -> str:
        return f"PathAtomsFactory(path={str(self.path)!r}, index={self.index!r})"


def count_images(path: str | os.PathLike) -> int:
    """Number of images in a structure file.

    Examples
    --------
    >>> import tempfile
    >>> from ase import Atoms
    >>> from ase.io import write
    >>> path = Path(tempfile.mkdtemp()) / "three.xyz"
    >>> write(path, [Atoms("H")] * 3)
    >>> count_images(path)
    3
    """
    ase_io = require_ase("ase.io")
    return len(ase_io.read(_existing_file(path, "path"), index=":"))


def read_reference_data(path: str | os.PathLike, index: IndexType = ":") -> dict:
    """Read the reference energies (and forces, when stored) of the images in a file.

    Parameters
    ----------
    path : str or os.PathLike
        A file with stored results, e.g. extended XYZ written by ``ase.io.write`` from atoms
        with a calculator attached.
    index : int, slice or str
        Which images to read (as for ``ase.io.read``); all by default.

    Returns
    -------
    dict
        ``"energy"`` (array, one per image), ``"n_atoms"`` (int array), ``"forces"`` (list of
        ``(n, 3)`` arrays, or ``None`` when some image has none), ``"tags"`` (each image's
        ``info["tag"]``, or its position as a string) and ``"info"`` (the images' info dicts).

    Raises
    ------
    ValueError
        When an image has no stored energy; the message names the file and the image.

    Examples
    --------
    >>> import tempfile
    >>> from ase import Atoms
    >>> from ase.calculators.singlepoint import SinglePointCalculator
    >>> from ase.io import write
    >>> atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    >>> atoms.calc = SinglePointCalculator(atoms, energy=-4.5)
    >>> path = Path(tempfile.mkdtemp()) / "h2.xyz"
    >>> write(path, atoms)
    >>> read_reference_data(path)["energy"]
    array([-4.5])
    """
    ase_io = require_ase("ase.io")
    file = _existing_file(path, "path")
    images = ase_io.read(file, index=index)
    if not isinstance(images, list):
        images = [images]
    energies, forces, tags = [], [], []
    for i, atoms in enumerate(images):
        results = atoms.calc.results if atoms.calc is not None else {}
        if "energy" in results:
            energies.append(float(results["energy"]))
        elif "energy" in atoms.info:
            energies.append(float(atoms.info["energy"]))
        else:
            raise ValueError(
                f"image {i} of {file} has no stored energy; write the reference file from "
                "atoms with a (single-point) calculator or an info['energy'] entry"
            )
        forces.append(np.array(results["forces"], dtype=float) if "forces" in results else None)
        tags.append(str(atoms.info.get("tag", i)))
    return {
        "energy": np.array(energies),
        "n_atoms": np.array([len(a) for a in images], dtype=int),
        "forces": None if any(f is None for f in forces) else forces,
        "tags": tags,
        "info": [dict(a.info) for a in images],
    }
