"""Optimal superposition of point sets (contract path; defined in :mod:`chemfit.chemistry.kabsch`)."""

from chemfit.chemistry.kabsch import apply_transform, kabsch, rmsd

__all__ = ["apply_transform", "kabsch", "rmsd"]
