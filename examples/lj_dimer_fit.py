"""Recover a Lennard-Jones dimer's epsilon and sigma from reference energies.

Run with ``make demo`` (or ``python examples/lj_dimer_fit.py``). The reference energies come
from argon-like parameters (epsilon = 0.0104 eV, sigma = 3.40 Å) with 0.1 meV of noise; the fit
starts from a guess 40% off and must find them again.
"""

from __future__ import annotations

import argparse
import logging

import numpy as np

from chemfit import CombinedObjectiveFunction, Fitter
from chemfit.wrap_funcs import to_quantity_computer

TRUE_PARAMETERS = {"lj": {"epsilon": 0.0104, "sigma": 3.40}}
DISTANCES = np.linspace(3.2, 7.0, 16)


@to_quantity_computer()
def dimer_energy(parameters: dict, distance: float) -> dict:
    """Energy (eV) of two Lennard-Jones atoms ``distance`` Å apart."""
    eps, sigma = parameters["lj"]["epsilon"], parameters["lj"]["sigma"]
    sr6 = (sigma / distance) ** 6
    return {"energy": 4.0 * eps * (sr6 * sr6 - sr6), "distance": distance}


def squared_error(quantities: dict, reference: float) -> float:
    """Squared energy error in meV²."""
    return (1e3 * (quantities["energy"] - reference)) ** 2


def build_objective(seed: int = 0) -> CombinedObjectiveFunction:
    """One term per reference distance; the total is the sum of squared errors."""
    rng = np.random.default_rng(seed)
    terms = []
    for distance in DISTANCES:
        computer = dimer_energy.bind(distance=float(distance))
        reference = computer(TRUE_PARAMETERS)["energy"]
        reference += rng.normal(scale=1e-4)
        terms.append(computer.with_loss(squared_error, reference=reference))
    return CombinedObjectiveFunction(terms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget", type=int, default=600)
    parser.add_argument("--optimizer", default="NGOpt")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    fitter = Fitter(
        build_objective(),
        initial_params={"lj": {"epsilon": 0.0062, "sigma": 4.1}},
        bounds={"lj": {"epsilon": (1e-4, 0.05), "sigma": (2.5, 5.0)}},
    )
    fitter.fit_nevergrad(
        budget=args.budget,
        optimizer_str=args.optimizer,
        num_workers=args.workers,
        seed=args.seed,
        progress=True,
    )
    result = fitter.result
    best = result.best_parameters["lj"]
    true = TRUE_PARAMETERS["lj"]
    print(result)
    print()
    print(f"{'parameter':<10} {'fitted':>10} {'true':>10} {'error':>8}")
    for name in ("epsilon", "sigma"):
        error = abs(best[name] - true[name]) / true[name]
        print(f"{name:<10} {best[name]:>10.5f} {true[name]:>10.5f} {error:>8.2%}")
    print(
        f"best loss {result.best_loss:.4g} meV² after {result.n_evals} evaluations "
        f"in {result.wall_time:.1f} s on {args.workers} worker(s)"
    )


if __name__ == "__main__":
    main()
