"""Argon's second virial coefficient: the reference data and model of the demo notebooks.

The second virial coefficient B(T) measures how far a dilute gas is from ideal,
``p V_m / (R T) = 1 + B(T) / V_m + ...``. For molecules interacting through a pair potential
u(r), classical statistical mechanics gives

    B(T) = -2 pi N_A  integral_0^inf (exp(-u(r) / (k_B T)) - 1) r^2 dr,

so measured values of B(T) over a range of temperatures pin down the potential. Here u is the
Lennard-Jones potential ``4 eps ((sigma/r)^12 - (sigma/r)^6)`` with ``eps`` given as
``eps / k_B`` in kelvin and ``sigma`` in angstrom, and the fit recovers argon's eps and sigma.

The notebooks import this module (rather than define the model in the notebook) so that
process pools, which import functions by name, can run it in their worker processes.
"""

from __future__ import annotations

import math

import numpy as np

from chemfit import CombinedObjectiveFunction
from chemfit.wrap_funcs import to_quantity_computer

#: Second virial coefficient of argon, B in cm^3/mol at temperature T in K: the smoothed values
#: tabulated in the CRC Handbook of Chemistry and Physics ("Virial coefficients of selected
#: gases", H. V. Kehiaian), fitted to the compilation of J. H. Dymond and E. B. Smith, "The
#: Virial Coefficients of Pure Gases and Mixtures", Oxford University Press, 1980.
REFERENCE = {
    100.0: -184.0,
    120.0: -131.0,
    140.0: -98.0,
    160.0: -76.0,
    180.0: -60.0,
    200.0: -48.0,
    300.0: -16.0,
    400.0: -1.0,
    500.0: 7.0,
    600.0: 12.0,
    700.0: 15.0,
    800.0: 18.0,
    900.0: 20.0,
    1000.0: 22.0,
}

#: Literature Lennard-Jones parameters of argon from second virial coefficients (Hirschfelder,
#: Curtiss and Bird, "Molecular Theory of Gases and Liquids", 1954), for comparison.
LITERATURE = {"epsilon": 119.8, "sigma": 3.405}

AVOGADRO = 6.02214076e23  # 1/mol
ANGSTROM3_TO_CM3 = 1e-24

#: Integration grid in angstrom, log-spaced: dense around the potential well, and wide enough
#: that the part of B outside it is negligible (under 1e-5 cm^3/mol).
GRID = np.geomspace(0.01, 1000.0, 4000)


def lennard_jones(r, epsilon: float, sigma: float):
    """The Lennard-Jones pair potential (in kelvin, i.e. u / k_B) at distance ``r`` (angstrom)."""
    sr6 = (sigma / r) ** 6
    return 4.0 * epsilon * (sr6 * sr6 - sr6)


def b_lennard_jones(temperature: float, epsilon: float, sigma: float) -> float:
    """B(T) in cm^3/mol of a Lennard-Jones gas (numpy trapezoidal rule, ~0.1 ms)."""
    mayer = np.expm1(-lennard_jones(GRID, epsilon, sigma) / temperature)
    integral = np.trapezoid(mayer * GRID**2, GRID)
    return float(-2.0 * math.pi * AVOGADRO * integral * ANGSTROM3_TO_CM3)


def b_lennard_jones_slow(
    temperature: float, epsilon: float, sigma: float, repeats: int = 10
) -> float:
    """The same B(T), computed ``repeats`` times in a pure-Python loop (about 1 ms per repeat).

    It holds the GIL throughout, and stands in for an expensive model (a simulation, an
    external code) in the notebook on parallel execution.
    """
    grid = _GRID_LIST
    for _ in range(repeats):
        integral, previous = 0.0, 0.0
        for i, r in enumerate(grid):
            sr6 = (sigma / r) ** 6
            value = math.expm1(-4.0 * epsilon * (sr6 * sr6 - sr6) / temperature) * r * r
            if i:
                integral += 0.5 * (value + previous) * (r - grid[i - 1])
            previous = value
    return -2.0 * math.pi * AVOGADRO * integral * ANGSTROM3_TO_CM3


_GRID_LIST = GRID.tolist()


@to_quantity_computer()
def second_virial(parameters: dict, temperature: float) -> dict:
    """Quantity computer: B(T) for the parameters ``{"epsilon", "sigma"}``."""
    b = b_lennard_jones(temperature, parameters["epsilon"], parameters["sigma"])
    return {"B": b, "T": temperature}


@to_quantity_computer()
def second_virial_slow(parameters: dict, temperature: float, repeats: int = 10) -> dict:
    """Quantity computer: B(T) with :func:`b_lennard_jones_slow`."""
    b = b_lennard_jones_slow(temperature, parameters["epsilon"], parameters["sigma"], repeats)
    return {"B": b, "T": temperature}


def relative_error(quantities: dict, b_ref: float) -> float:
    """Squared error of B, relative to |B_ref| + 10 cm^3/mol (B crosses zero near 410 K)."""
    return ((quantities["B"] - b_ref) / (abs(b_ref) + 10.0)) ** 2


def build_objective(slow: bool = False, repeats: int = 10) -> CombinedObjectiveFunction:
    """One term per reference temperature; the loss is the sum of squared relative errors."""
    terms = []
    for temperature, b_ref in REFERENCE.items():
        if slow:
            computer = second_virial_slow.bind(temperature=temperature, repeats=repeats)
        else:
            computer = second_virial.bind(temperature=temperature)
        terms.append(computer.with_loss(relative_error, b_ref=b_ref))
    return CombinedObjectiveFunction(terms)
