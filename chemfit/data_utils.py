"""Reference-data CSV files (contract path; defined in :mod:`chemfit.chemistry.data_utils`)."""

from chemfit.chemistry.data_utils import (
    DEFAULT_SLICE,
    MissingColumnError,
    process_csv,
    process_single_csv,
)

__all__ = ["DEFAULT_SLICE", "MissingColumnError", "process_csv", "process_single_csv"]
