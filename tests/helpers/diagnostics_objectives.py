"""Objectives with known answers for the diagnostics tests and benchmark (importable by workers)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.fitting.fitter import Fitter


class SquaredResidual:
    """One datum of the straight line ``y = a + b x``: ``(y - a - b x)**2``."""

    def __init__(self, x: float, y: float) -> None:
        self.x = float(x)
        self.y = float(y)

    def __call__(self, parameters: dict) -> float:
        return (self.y - parameters["a"] - parameters["b"] * self.x) ** 2


@dataclass
class LinearProblem:
    """A straight line with Gaussian noise and its analytic least-squares answer."""

    x: np.ndarray
    y: np.ndarray
    estimate: np.ndarray  # (a, b)
    covariance: np.ndarray  # s**2 (X^T X)**-1, s**2 = RSS / (n - 2)

    @property
    def standard_errors(self) -> np.ndarray:
        return np.sqrt(np.diag(self.covariance))

    def objective(self) -> CombinedObjectiveFunction:
        return CombinedObjectiveFunction([SquaredResidual(x, y) for x, y in zip(self.x, self.y)])

    def fitted(self, bounds: dict | None = None) -> Fitter:
        fitter = Fitter(self.objective(), {"a": 0.0, "b": 0.0}, bounds=bounds)
        fitter.fit_scipy(method="L-BFGS-B", options={"ftol": 1e-14, "gtol": 1e-10})
        return fitter


def linear_problem(n: int = 40, sigma: float = 0.5, seed: int = 2) -> LinearProblem:
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 4.0, n)
    y = 1.5 + 0.8 * x + rng.normal(0.0, sigma, n)
    design = np.column_stack([np.ones(n), x])
    estimate, rss, *_ = np.linalg.lstsq(design, y, rcond=None)
    s2 = float(rss[0]) / (n - 2)
    return LinearProblem(x, y, estimate, s2 * np.linalg.inv(design.T @ design))


class SlowQuadratic:
    """``sum_i (p_i - i)**2`` after sleeping ``seconds`` (an objective that costs time)."""

    def __init__(self, seconds: float = 0.02) -> None:
        self.seconds = seconds

    def __call__(self, parameters: dict) -> float:
        time.sleep(self.seconds)
        return float(sum((parameters[k] - i) ** 2 for i, k in enumerate(sorted(parameters))))


class SlowResidual(SquaredResidual):
    """A :class:`SquaredResidual` that costs ``seconds`` of CPU (a busy loop, not a sleep)."""

    def __init__(self, x: float, y: float, seconds: float) -> None:
        super().__init__(x, y)
        self.seconds = seconds

    def __call__(self, parameters: dict) -> float:
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return super().__call__(parameters)
