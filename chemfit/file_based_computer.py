"""External programs as quantity computers (contract path; defined in :mod:`chemfit.chemistry`)."""

from chemfit.chemistry.external_program import ExternalProgramComputer, TemplateInputWriter
from chemfit.chemistry.file_based_computer import (
    CommandType,
    FileBasedQuantityComputer,
    OutputParser,
    PreSubmitHook,
)

__all__ = [
    "CommandType",
    "ExternalProgramComputer",
    "FileBasedQuantityComputer",
    "OutputParser",
    "PreSubmitHook",
    "TemplateInputWriter",
]
