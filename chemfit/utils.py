"""Small utilities (contract path; defined in :mod:`chemfit.core.utils`)."""

from chemfit.core.utils import (
    ExtendedJSONEncoder,
    atomic_write_text,
    check_params_near_bounds,
    check_protocol,
    dump_dict_to_file,
    next_free_folder,
)

__all__ = [
    "ExtendedJSONEncoder",
    "atomic_write_text",
    "check_params_near_bounds",
    "check_protocol",
    "dump_dict_to_file",
    "next_free_folder",
]
