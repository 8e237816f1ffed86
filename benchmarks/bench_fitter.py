"""Fitter benchmarks: batch vs asynchronous mode, the fitter's own overhead, optimizer cost.

Prints one JSON document. Every comparison runs side by side in this one process, and each
case is repeated; the figures are the min and median over repeats.

1. ``batch_vs_async``: ``fit_nevergrad`` on 2 thread workers with log-normally distributed
   evaluation costs (median 100 ms, sigma 1; the objective sleeps, like an external program),
   ``OnePlusOne``, budget 60. Target: asynchronous >= 1.25x faster than batch.
2. ``fitter_overhead``: a cheap objective, serial, ``OnePlusOne``: ``Fitter.fit_nevergrad``
   against a bare nevergrad ask/tell loop on the same parametrization and seed, in pairs.
   The time spent inside nevergrad's ask and tell is measured apart: what is left is the
   loop's own time, and the fitter's minus the bare loop's is the fitter's own overhead per
   evaluation. Target: <= 5% of the bare loop's time per evaluation. The wall-time ratio is
   reported too; it carries nevergrad's run-to-run noise (+-15% on this machine).
3. ``optimizer_cost``: seconds per ask/tell pair of a few optimizers on a 2-parameter problem,
   the floor under any parallel speed-up for cheap objectives.

Usage: ``python benchmarks/bench_fitter.py [--repeats N] [--quick]``
"""

from __future__ import annotations

import argparse
import contextlib
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


@contextlib.contextmanager
def _optimizer_clock():
    """Adds the seconds spent inside nevergrad's ``Optimizer.ask`` and ``tell`` to a list.

    What is left of a run's time is the loop's own: the objective, and chemfit's bookkeeping in
    the Fitter (or the bare loop's few lines).
    """
    from nevergrad.optimization import base

    spent = [0.0]
    ask, tell = base.Optimizer.ask, base.Optimizer.tell

    def timed(method):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    base.Optimizer.ask, base.Optimizer.tell = timed(ask), timed(tell)
    try:
        yield spent
    finally:
        base.Optimizer.ask, base.Optimizer.tell = ask, tell


def fitter_overhead(repeats: int, budget: int, optimizer: str = "OnePlusOne") -> dict:
    """The Fitter against a bare ask/tell loop, in pairs on the same seed (same candidates).

    The order within a pair alternates. Two figures: the wall-time ratio, which carries the
    run-to-run noise of nevergrad's own ask/tell (+-15% here), and the time spent outside
    ask/tell, which is the fitter's own overhead per evaluation.
    """

    def bare(seed: int) -> None:
        _bare_nevergrad_loop(budget, optimizer, seed=seed)

    def fitter(seed: int) -> None:
        Fitter(_cheap, {"x": 0.0, "y": 0.0}).fit_nevergrad(
            budget=budget, optimizer_str=optimizer, seed=seed, progress=False
        )

    bare(0)  # warm-up: imports and first-use caches
    fitter(0)
    wall: dict[str, list[float]] = {"bare": [], "fitter": []}
    own: dict[str, list[float]] = {"bare": [], "fitter": []}
    with _optimizer_clock() as in_optimizer:
        for pair in range(2 * repeats):
            for run in (bare, fitter) if pair % 2 else (fitter, bare):
                in_optimizer[0] = 0.0
                start = time.perf_counter()
                run(pair)
                seconds = time.perf_counter() - start
                wall[run.__name__].append(seconds)
                own[run.__name__].append(seconds - in_optimizer[0])
    pairs = list(zip(wall["bare"], wall["fitter"], own["bare"], own["fitter"]))
    bare_s, ours_s = _summary(wall["bare"]), _summary(wall["fitter"])
    own_us = {name: 1e6 * statistics.median(times) / budget for name, times in own.items()}
    return {
        "budget": budget,
        "optimizer": optimizer,
        "pairs": len(pairs),
        "bare_s": bare_s,
        "fitter_s": ours_s,
        "per_eval_us": {
            "bare_median": 1e6 * bare_s["median"] / budget,
            "fitter_median": 1e6 * ours_s["median"] / budget,
            "outside_ask_tell_bare_median": own_us["bare"],
            "outside_ask_tell_fitter_median": own_us["fitter"],
            "fitter_own_median": own_us["fitter"] - own_us["bare"],
        },
        # the fitter's own time per evaluation (outside ask/tell, minus the bare loop's) over
        # the bare loop's time per evaluation: what the target is checked on
        "own_overhead": {
            "min_ratio": min((fo - bo) / bw for bw, _, bo, fo in pairs),
            "median_ratio": statistics.median((fo - bo) / bw for bw, _, bo, fo in pairs),
        },
        "wall_overhead": {
            "min_ratio": ours_s["min"] / bare_s["min"] - 1.0,
            "paired_median_ratio": statistics.median(fw / bw - 1.0 for bw, fw, _, _ in pairs),
        },
        "target": "own_overhead <= 0.05",
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
