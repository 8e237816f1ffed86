"""A fast neighbour list for ASE pair potentials (extra ``ase``).

ASE's ``neighbor_list`` bins space in Python loops: on the small periodic cells of a fit it costs
~90 ms per call, which dominates a pair potential. matscipy's compiled neighbour list returns the
same pairs in ~0.06 ms but needs a full-rank cell, so structures without one (molecules,
dimers) go to ASE's, which is quick for them.
"""

from __future__ import annotations

from typing import Any

from chemfit.chemistry._optional import require_ase

__all__ = ["fast_neighbor_list"]


def fast_neighbor_list(quantities: str, atoms: Any, cutoff: float, **kwargs: Any) -> Any:
    """Drop-in for ``ase.neighborlist.neighbor_list``: matscipy where it applies, else ASE.

    Pass it to calculators that take a neighbour-list function, e.g.
    ``MorsePotential(neighbor_list=fast_neighbor_list)``.

    Examples
    --------
    >>> from ase.build import bulk
    >>> i, j = fast_neighbor_list("ij", bulk("Cu", "fcc", a=3.6), 2.6)
    >>> len(i)  # the 12 nearest neighbours of fcc
    12
    """
    if atoms.cell.rank == 3 and not kwargs:
        neighbours = require_ase("matscipy.neighbours")
        return neighbours.neighbour_list(quantities, atoms, cutoff)
    neighborlist = require_ase("ase.neighborlist")
    return neighborlist.neighbor_list(quantities, atoms, cutoff, **kwargs)
