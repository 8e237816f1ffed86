"""ASE quantity computers (contract path; defined in :mod:`chemfit.chemistry`, extra ``ase``).

Importing this module does not import ASE; creating a computer does.
"""

from chemfit.chemistry.ase_atoms import PathAtomsFactory, read_reference_data
from chemfit.chemistry.ase_computers import (
    MinimizationASEComputer,
    MultiStructureASEComputer,
    SinglePointASEComputer,
)
from chemfit.chemistry.ase_eos import EquationOfStateError, LatticeConstantASEComputer
from chemfit.chemistry.ase_processors import DefaultQuantityProcessor, PositionsProcessor
from chemfit.chemistry.ase_protocols import (
    AtomsFactory,
    AtomsPostProcessor,
    CalculatorFactory,
    ParameterApplier,
    QuantityProcessor,
)

__all__ = [
    "AtomsFactory",
    "AtomsPostProcessor",
    "CalculatorFactory",
    "DefaultQuantityProcessor",
    "EquationOfStateError",
    "LatticeConstantASEComputer",
    "MinimizationASEComputer",
    "MultiStructureASEComputer",
    "ParameterApplier",
    "PathAtomsFactory",
    "PositionsProcessor",
    "QuantityProcessor",
    "SinglePointASEComputer",
    "read_reference_data",
]
