"""Fitter benchmarks: batch vs asynchronous mode, the fitter's own overhead, optimizer cost.

Prints one JSON document. Every comparison runs side by side in this one process, and each
case is repeated; the figures are the min and median over repeats.

1. ``batch_vs_async``: ``fit_nevergrad`` on 2 thread workers with log-normally distributed
   evaluation costs (median 100 ms, sigma 1; the objective sleeps, like an external program),
   ``OnePlusOne``, budget 60. Target: asynchronous >= 1.25x faster than batch.
2. ``fitter_overhead``: a cheap objective, serial, ``OnePlusOne``: ``Fitter.fit_nevergrad``
   against a bare nevergrad ask/tell loop on the same parametrization. Target: <= 5% slower.
3. ``optimizer_cost``: seconds per ask/tell pair of a few optimizers on a 2-parameter problem,
   the floor under any parallel speed-up for cheap objectives.

Usage: ``python benchmarks/bench_fitter.py [--repeats N] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import zlib

import numpy as np

from chemfit import Fitter


def _summary(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times), "runs": len(times)}


class LogNormalCostObjective:
    """Sleeps a log-normal time drawn from the parameters (reproducible per candidate)."""

    def __init__(self, median: float = 0.1, sigma: float = 1.0):
        self.median = median
        self.sigma = sigma

    def __call__(self, parameters: dict) -> float:
        x, y = parameters["x"], parameters["y"]
        seed = zlib.crc32(np.array([x, y]).tobytes())
        cost = self.median * float(np.exp(self.sigma * np.random.default_rng(seed).normal()))
        time.sleep(cost)
        return (x - 1.0) ** 2 + (y + 0.5) ** 2


def batch_vs_async(repeats: int, budget: int) -> dict:
    objective = LogNormalCostObjective()
    times: dict[str, list[float]] = {"batch": [], "async": []}
    for repeat in range(repeats):
        for mode in ("batch", "async"):  # interleaved, so drifts in machine load hit both
            fitter = Fitter(objective, {"x": 0.0, "y": 0.0})
            start = time.perf_counter()
            fitter.fit_nevergrad(
                budget=budget, optimizer_str="OnePlusOne", num_workers=2, mode=mode, seed=repeat
            )
            times[mode].append(time.perf_counter() - start)
    batch, asynchronous = _summary(times["batch"]), _summary(times["async"])
    return {
        "budget": budget,
        "workers": 2,
        "cost": "lognormal(median=0.1 s, sigma=1)",
        "batch_s": batch,
        "async_s": asynchronous,
        "speedup_async_over_batch": {
            "min_ratio": batch["min"] / asynchronous["min"],
            "median_ratio": batch["median"] / asynchronous["median"],
        },
        "target": ">= 1.25",
    }


def _cheap(parameters: dict) -> float:
    return (parameters["x"] - 1.0) ** 2 + (parameters["y"] + 0.5) ** 2


def _bare_nevergrad_loop(budget: int, optimizer: str, seed: int) -> None:
    import nevergrad as ng

    parametrization = ng.p.Dict(x=ng.p.Scalar(init=0.0), y=ng.p.Scalar(init=0.0))
    parametrization.random_state = np.random.RandomState(seed)
    opt = ng.optimizers.registry[optimizer](parametrization=parametrization, budget=budget)
    for _ in range(budget):
        candidate = opt.ask()
        opt.tell(candidate, _cheap(candidate.value))
    opt.provide_recommendation()


def fitter_overhead(repeats: int, budget: int, optimizer: str = "OnePlusOne") -> dict:
    times: dict[str, list[float]] = {"bare": [], "fitter": []}
    _bare_nevergrad_loop(50, optimizer, seed=0)  # warm-up: imports and first-use caches
    Fitter(_cheap, {"x": 0.0, "y": 0.0}).fit_nevergrad(budget=50, optimizer_str=optimizer)
    for repeat in range(repeats):
        start = time.perf_counter()
        _bare_nevergrad_loop(budget, optimizer, seed=repeat)
        times["bare"].append(time.perf_counter() - start)
        fitter = Fitter(_cheap, {"x": 0.0, "y": 0.0})
        start = time.perf_counter()
        fitter.fit_nevergrad(budget=budget, optimizer_str=optimizer, seed=repeat, progress=False)
        times["fitter"].append(time.perf_counter() - start)
    bare, ours = _summary(times["bare"]), _summary(times["fitter"])
    return {
        "budget": budget,
        "optimizer": optimizer,
        "bare_s": bare,
        "fitter_s": ours,
        "per_eval_us": {
            "bare_median": 1e6 * bare["median"] / budget,
            "fitter_median": 1e6 * ours["median"] / budget,
        },
        "overhead": {
            "min_ratio": ours["min"] / bare["min"] - 1.0,
            "median_ratio": ours["median"] / bare["median"] - 1.0,
        },
        "target": "<= 0.05",
    }


def optimizer_cost(repeats: int, budget: int) -> dict:
    import nevergrad as ng

    out = {}
    for name in ("OnePlusOne", "NGOpt", "NgIohTuned"):
        per_pair = []
        for repeat in range(repeats):
            parametrization = ng.p.Dict(x=ng.p.Scalar(init=0.0), y=ng.p.Scalar(init=0.0))
            parametrization.random_state = np.random.RandomState(repeat)
            opt = ng.optimizers.registry[name](parametrization=parametrization, budget=budget)
            start = time.perf_counter()
            for _ in range(budget):
                candidate = opt.ask()
                opt.tell(candidate, _cheap(candidate.value))
            per_pair.append((time.perf_counter() - start) / budget)
        out[name] = {
            "ms_per_ask_tell": {k: 1e3 * v for k, v in _summary(per_pair).items() if k != "runs"},
            "budget": budget,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller budgets, 2 repeats")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    repeats = 2 if args.quick else args.repeats
    report = {
        "fitter_overhead": fitter_overhead(repeats, budget=500 if args.quick else 2000),
        "optimizer_cost": optimizer_cost(repeats, budget=60 if args.quick else 200),
        "batch_vs_async": batch_vs_async(repeats, budget=30 if args.quick else 60),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
