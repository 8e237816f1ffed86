"""The diagnostics on 2 workers against serial: a bootstrap's refits and a Hessian's evaluations.

* ``bootstrap``: ``Fitter.bootstrap(20, budget=...)`` of a straight-line fit whose terms each
  burn ``--term-ms`` of CPU (a refit takes about ``--budget * --terms * --term-ms``); each
  refit is one task.
* ``hessian``: ``Fitter.covariance()`` of an objective that burns ``--hessian-ms`` of CPU per
  evaluation, with 4 parameters: 1 + 8 + 24 = 33 finite-difference evaluations, all submitted
  at once.

Each repeat runs serial, process pool and loky one after the other (the order alternates from
repeat to repeat, so the sides share the machine's load); the pools are made (and warmed up by
one task) before timing, as a user's pool already runs after a fit. Prints one JSON document:
for each case and kind the seconds (min, median) and the speed-up over serial, as the ratio of
the mins, and the median over repeats of the ratio within one repeat (target >= 1.8).

The objectives are defined here, in ``__main__``: the workers get them by value, as they would
get a notebook's.

Usage::

    python benchmarks/bench_diagnostics.py [--repeats 5] [--budget 40] [--terms 10]
        [--term-ms 1.0] [--hessian-ms 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from chemfit import CombinedObjectiveFunction, Fitter
from chemfit.execution.executors import make_executor

WORKERS = 2


def burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class BusyResidual:
    def __init__(self, x: float, y: float, seconds: float) -> None:
        self.x, self.y, self.seconds = x, y, seconds

    def __call__(self, p: dict) -> float:
        burn(self.seconds)
        return (self.y - p["a"] - p["b"] * self.x) ** 2


class BusyQuadratic:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, p: dict) -> float:
        burn(self.seconds)
        return sum((i + 1) * (p[k] - i) ** 2 for i, k in enumerate(sorted(p)))


def bootstrap_fitter(terms: int, seconds: float) -> Fitter:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 3, terms)
    y = 1.0 + 0.5 * x + rng.normal(0, 0.1, terms)
    cob = CombinedObjectiveFunction([BusyResidual(xi, yi, seconds) for xi, yi in zip(x, y)])
    fitter = Fitter(cob, {"a": 1.0, "b": 0.5})
    fitter.fit_scipy(method="Nelder-Mead", options={"maxfev": 60})
    return fitter


def hessian_fitter(seconds: float) -> Fitter:
    fitter = Fitter(BusyQuadratic(0.0), {"p0": 0.1, "p1": 1.1, "p2": 2.1, "p3": 3.1})
    fitter.fit_scipy()
    fitter.objective_function.wrap_me.func.seconds = seconds  # the costly objective from here
    return fitter


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def summary(times: dict[str, list[float]]) -> dict:
    out = {}
    serial = times["serial"]
    for kind, values in times.items():
        entry = {"min_s": min(values), "median_s": statistics.median(values)}
        if kind != "serial":
            paired = [s / v for s, v in zip(serial, values)]
            entry["speedup_of_mins"] = min(serial) / min(values)
            entry["speedup_paired_median"] = statistics.median(paired)
            entry["speedup_paired_min"] = min(paired)
        out[kind] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resamples", type=int, default=20)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--terms", type=int, default=10)
    parser.add_argument("--term-ms", type=float, default=1.0)
    parser.add_argument("--hessian-ms", type=float, default=20.0)
    args = parser.parse_args()

    boot = bootstrap_fitter(args.terms, args.term_ms / 1e3)
    hess = hessian_fitter(args.hessian_ms / 1e3)
    pools = {
        "process": make_executor("process", max_workers=WORKERS),
        "loky": make_executor("loky", max_workers=WORKERS),
    }
    executors = {"serial": None, **pools}
    try:
        for pool in pools.values():  # start the workers before timing
            list(pool.map(abs, range(2 * WORKERS)))
        cases = {
            "bootstrap": lambda ex: boot.bootstrap(
                args.resamples, executor=ex, budget=args.budget, seed=0, progress=False
            ),
            "hessian": lambda ex: hess.covariance(executor=ex, n_residuals=10),
        }
        results = {}
        for name, case in cases.items():
            times: dict[str, list[float]] = {kind: [] for kind in executors}
            case(pools["process"])  # the first call of a case pays for imports in the workers
            case(pools["loky"])
            for repeat in range(args.repeats):
                order = list(executors) if repeat % 2 == 0 else list(reversed(executors))
                for kind in order:
                    times[kind].append(timed(case, executors[kind]))
            results[name] = summary(times)
    finally:
        for pool in pools.values():
            pool.shutdown()
    document = {
        "workers": WORKERS,
        "repeats": args.repeats,
        "bootstrap": {
            "resamples": args.resamples,
            "budget": args.budget,
            "terms": args.terms,
            "term_ms": args.term_ms,
            **results["bootstrap"],
        },
        "hessian": {"evaluations": 33, "objective_ms": args.hessian_ms, **results["hessian"]},
    }
    print(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
