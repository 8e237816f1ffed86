"""Module-level objectives for the Fitter tests (picklable for process pools and loky)."""

from __future__ import annotations

import math
import os
import threading
import time

import numpy as np

from chemfit.core.objectives import ObjectiveFunctor

# -- a quadratic with a known minimum ----------------------------------------------------------

QUAD_MIN = {"x": 1.0, "y": -2.0}


def quadratic(params: dict) -> float:
    return (params["x"] - 1.0) ** 2 + (params["y"] + 2.0) ** 2


def shifted_square(params: dict) -> float:
    """Minimum at x = 1; used with one-sided bounds that exclude it."""
    return (params["x"] - 1.0) ** 2


# -- a Lennard-Jones dimer: recover epsilon and sigma from reference energies -----------------

EPS_TRUE, SIGMA_TRUE = 0.5, 1.5
R_GRID = np.linspace(1.35, 3.0, 12)


def lj_energy(eps: float, sigma: float, r: np.ndarray) -> np.ndarray:
    sr6 = (sigma / r) ** 6
    return 4.0 * eps * (sr6 * sr6 - sr6)


E_REF = lj_energy(EPS_TRUE, SIGMA_TRUE, R_GRID)


def lj_loss(params: dict) -> float:
    """Mean squared error of the dimer energies; parameters nested as {"lj": {eps, sigma}}."""
    energies = lj_energy(params["lj"]["eps"], params["lj"]["sigma"], R_GRID)
    return float(np.mean((energies - E_REF) ** 2))


LJ_START = {"lj": {"eps": 0.8, "sigma": 1.4}}
LJ_BOUNDS = {"lj": {"eps": (0.1, 2.0), "sigma": (1.2, 1.8)}}


# -- objectives that write to the context ------------------------------------------------------


class MetaObjective(ObjectiveFunctor):
    """The quadratic; records the worker's pid and x in the meta, and y in the quantities."""

    def __call__(self, parameters, ctx=None):
        ctx.meta["pid"] = os.getpid()
        ctx.meta["x"] = parameters["x"]
        ctx.quantities = {"y": parameters["y"]}
        ctx.parameters = parameters
        ctx.loss = quadratic(parameters)
        return ctx.loss


def leaky_meta(params: dict, ctx) -> float:
    """Writes the key "positive" only for x > 0 (a stale key would show a meta leak)."""
    if params["x"] > 0:
        ctx.meta["positive"] = True
    ctx.meta["x"] = params["x"]
    ctx.meta["items"] = [params["x"]]
    return (params["x"] + 0.5) ** 2


def value_by_index(params: dict) -> object:
    """Returns BAD_VALUES[int(x)]: numbers, non-numbers and non-finite values (R3, R4)."""
    return BAD_VALUES[int(params["x"])]


BAD_VALUES = [
    3,
    np.float32(2.5),
    np.array(1.5),
    None,
    "bad",
    1 + 2j,
    np.array([1.0, 2.0]),
    math.nan,
    math.inf,
    -math.inf,
]


def always_nan(params: dict) -> float:
    return math.nan


def fails_for_negative(params: dict) -> float:
    if params["x"] < 0:
        raise ValueError(f"negative x={params['x']}")
    return params["x"] ** 2


def crash_after_three(params: dict, ctx) -> float:
    """Kills its worker process on the fourth evaluation in a context (a lost worker, R19)."""
    if ctx.n_evals >= 3:
        os._exit(1)
    return quadratic(params)


def interrupt_on_third(params: dict, ctx) -> float:
    """Raises KeyboardInterrupt on the third evaluation in a context (a Ctrl-C, R13)."""
    if ctx.n_evals == 2:
        raise KeyboardInterrupt
    return quadratic(params)


def slow_initial(params: dict) -> float:
    """The initial point (x == 0.0 exactly) takes 0.3 s, every other point 1 ms (async mode)."""
    time.sleep(0.3 if params["x"] == 0.0 and params["y"] == 0.0 else 0.001)
    return quadratic(params)


class CountingObjective:
    """The quadratic, counting its calls (thread-safe)."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, params: dict) -> float:
        with self._lock:
            self.calls += 1
        return quadratic(params)


class SerialisingObjective(ObjectiveFunctor):
    """Declares that it serves concurrent calls one at a time, like MPIWrapperCOB (R10)."""

    serialises_calls = True

    def __call__(self, parameters, ctx=None):
        ctx.parameters = parameters
        ctx.loss = quadratic(parameters)
        return ctx.loss


def slow_quadratic(params: dict) -> float:
    """:func:`quadratic` after 20 ms, so that a fit runs long enough to be stopped."""
    time.sleep(0.02)
    return quadratic(params)


class InterruptOnce:
    """The quadratic; the ``at``-th call (1-based, across threads) raises KeyboardInterrupt,
    like a Ctrl-C arriving during that evaluation. Every other call returns normally."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, params: dict) -> float:
        with self._lock:
            self.calls += 1
            interrupt = self.calls == self.at
        if interrupt:
            raise KeyboardInterrupt
        return quadratic(params)


def stop_after(fitter, n_records: int) -> threading.Thread:
    """A thread that calls ``fitter.request_stop()`` once ``n_records`` more evaluations were
    told (as a dashboard's Stop button does); its evaluation callback stays registered."""
    told = threading.Event()
    seen = []

    def on_record(record) -> None:
        seen.append(record)
        if len(seen) >= n_records:
            told.set()

    fitter.register_evaluation_callback(on_record)

    def stopper() -> None:
        if told.wait(30):
            fitter.request_stop()

    thread = threading.Thread(target=stopper, daemon=True)
    thread.start()
    return thread


class PickleCountingObjective:
    """The quadratic; counts (in the process that pickles it) how often it was pickled."""

    pickled = 0

    def __call__(self, params: dict) -> float:
        return quadratic(params)

    def __reduce__(self):
        type(self).pickled += 1
        return (PickleCountingObjective, ())
