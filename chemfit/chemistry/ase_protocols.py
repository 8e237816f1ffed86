"""The seams of the ASE computers: plain callables, checked at runtime by shape only.

None of these needs inheritance; a function or any object with a matching ``__call__`` fits.
ASE itself is only needed for type checking here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ase import Atoms

__all__ = [
    "AtomsFactory",
    "AtomsPostProcessor",
    "CalculatorFactory",
    "ParameterApplier",
    "QuantityProcessor",
]


@runtime_checkable
class CalculatorFactory(Protocol):
    """Attach a fresh calculator to ``atoms`` (sets ``atoms.calc``; returns nothing).

    Examples
    --------
    >>> def morse_factory(atoms):
    ...     from ase.calculators.morse import MorsePotential
    ...     atoms.calc = MorsePotential()
    >>> isinstance(morse_factory, CalculatorFactory)
    True
    """

    def __call__(self, atoms: Atoms) -> None: ...


@runtime_checkable
class ParameterApplier(Protocol):
    """Write the fit parameters into the calculator attached to ``atoms``.

    Examples
    --------
    >>> def apply_morse(atoms, params):
    ...     atoms.calc.set(epsilon=params["epsilon"], r0=params["r0"], rho0=params["rho0"])
    >>> isinstance(apply_morse, ParameterApplier)
    True
    """

    def __call__(self, atoms: Atoms, params: dict) -> None: ...


@runtime_checkable
class AtomsPostProcessor(Protocol):
    """Modify a fresh copy of the structure before the calculator is attached (in place).

    Examples
    --------
    >>> def centre(atoms):
    ...     atoms.center(vacuum=5.0)
    >>> isinstance(centre, AtomsPostProcessor)
    True
    """

    def __call__(self, atoms: Atoms) -> None: ...


@runtime_checkable
class AtomsFactory(Protocol):
    """Build the structure (called once per computer, then cached).

    Examples
    --------
    >>> def dimer():
    ...     from ase import Atoms
    ...     return Atoms("Cu2", positions=[[0, 0, 0], [0, 0, 2.2]])
    >>> isinstance(dimer, AtomsFactory)
    True
    """

    def __call__(self) -> Atoms: ...


@runtime_checkable
class QuantityProcessor(Protocol):
    """Turn a finished calculation into a dict of quantities.

    Examples
    --------
    >>> def energy_only(calc, atoms):
    ...     return {"energy": calc.results["energy"]}
    >>> isinstance(energy_only, QuantityProcessor)
    True
    """

    def __call__(self, calc: Any, atoms: Atoms) -> dict: ...
