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
4. ``process_pool``: ``fit_nevergrad`` with ``num_workers=2`` on a 2-worker stdlib process pool
   and a cheap objective, async and batch mode, interleaved: the pickles made in this process per
   evaluation (of the evaluation's context, and of the objective) and the time per evaluation.
   Target (issue 13): one pickle per evaluation, the objective pickled once per fit.
5. ``async_vs_batch_ngiohtuned`` (issue 14): ``fit_nevergrad(optimizer_str="NgIohTuned",
   num_workers=2)`` on a 2-worker stdlib process pool, 8 parameters (nevergrad's ask and tell
   cost ~8-10 ms per candidate here, as much as an evaluation), a ~10 ms objective that
   computes (a pure-Python loop calibrated at start-up), the same budget in both modes,
   alternating; throughput = evaluations per second. Target: async >= 1.3x batch.
6. ``async_vs_batch_oneplusone``: the same with a cheap optimizer (``OnePlusOne``, 2
   parameters, ~1 ms per ask and tell) and uniform ~10 ms costs. Target: async >= batch.
7. ``async_vs_batch_ngiohtuned_sleep``: case 5 with an objective that sleeps 10 ms (an
   external program): the workers do not compete with the optimizer for the 2 cores.

``--profile`` adds, for cases 5-7, where the fitting thread's time goes per evaluation (inside
nevergrad's ask and tell, submitting, waiting, recording and callbacks) and how busy the
workers are, from one more run of each mode.

Usage: ``python benchmarks/bench_fitter.py [--repeats N] [--quick] [--only CASE] [--profile]``
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import statistics
import time
import zlib
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor

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


class PickleCountingObjective:
    """The cheap quadratic; counts how often it is pickled in this process."""

    pickled = 0

    def __call__(self, parameters: dict) -> float:
        return _cheap(parameters)

    def __reduce__(self):
        type(self).pickled += 1
        return (PickleCountingObjective, ())


@contextlib.contextmanager
def _context_pickle_counter():
    """Counts ``FitterEvaluateContext.__getstate__`` calls (each pickle of a context)."""
    from chemfit.fitter import FitterEvaluateContext

    count = [0]
    getstate = FitterEvaluateContext.__getstate__

    def counting(self):
        count[0] += 1
        return getstate(self)

    FitterEvaluateContext.__getstate__ = counting
    try:
        yield count
    finally:
        FitterEvaluateContext.__getstate__ = getstate


def process_pool(repeats: int, budget: int) -> dict:
    times: dict[str, list[float]] = {"async": [], "batch": []}
    pickles: dict[str, dict] = {}
    with ProcessPoolExecutor(2) as pool:
        pool.submit(int, 1).result()  # start the workers
        Fitter(_cheap, {"x": 0.0, "y": 0.0}).fit_nevergrad(  # warm-up: imports, caches
            budget=4, optimizer_str="OnePlusOne", num_workers=2, executor=pool, progress=False
        )
        for repeat in range(repeats):
            for mode in ("async", "batch"):  # interleaved
                PickleCountingObjective.pickled = 0
                fitter = Fitter(PickleCountingObjective(), {"x": 0.0, "y": 0.0})
                with _context_pickle_counter() as contexts:
                    start = time.perf_counter()
                    fitter.fit_nevergrad(
                        budget=budget,
                        optimizer_str="OnePlusOne",
                        num_workers=2,
                        executor=pool,
                        mode=mode,
                        seed=repeat,
                        progress=False,
                    )
                    times[mode].append((time.perf_counter() - start) / budget)
                pickles[mode] = {
                    "context_pickles_per_eval": contexts[0] / budget,
                    "objective_pickles_per_fit": PickleCountingObjective.pickled,
                }
    return {
        "budget": budget,
        "workers": 2,
        "ms_per_eval": {
            mode: {k: 1e3 * v for k, v in _summary(t).items() if k != "runs"}
            for mode, t in times.items()
        },
        "pickles": pickles,
        "target": "context_pickles_per_eval == 1; objective_pickles_per_fit independent of the budget",
    }


# -- async vs batch on a process pool (issue 14) ------------------------------------------------


def _spin(n: int) -> float:
    total = 0.0
    for i in range(n):
        total += i * 0.5
    return total


def calibrate_loops(seconds: float = 0.010) -> int:
    """Iterations of :func:`_spin` that take ``seconds`` here (the fastest of five tries)."""
    n = 20_000
    _spin(n)
    best = min(_timed(_spin, n) for _ in range(5))
    return max(1, int(n * seconds / best))


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


class TimedObjective:
    """A quadratic that first computes (``loops`` iterations of a Python loop) or sleeps
    (``sleep`` seconds); ``ctx.meta["span"]`` holds ``(start, end, cpu seconds, pid)``."""

    def __init__(self, loops: int = 0, sleep: float = 0.0) -> None:
        self.loops = loops
        self.sleep = sleep

    def __call__(self, parameters: dict, ctx) -> float:
        start, cpu = time.perf_counter(), time.process_time()
        if self.sleep:
            time.sleep(self.sleep)
        else:
            _spin(self.loops)
        ctx.meta["span"] = (start, time.perf_counter(), time.process_time() - cpu, os.getpid())
        return sum((value - 0.3) ** 2 for value in parameters.values())


class _DriverClock:
    """Adds up, per label, the seconds the fitting thread spends in nevergrad's ask and tell
    (outermost calls only: meta-optimizers nest) and in the fit session's steps."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0
        self._undo: list = []

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            if self._depth:
                return original(*args, **kwargs)
            self._depth += 1
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._depth -= 1
                self.seconds[label] += time.perf_counter() - start

        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def __enter__(self) -> _DriverClock:
        from nevergrad.optimization import base

        from chemfit.fitting import fit_session, nevergrad_loop

        self.wrap(base.Optimizer, "ask", "ask")
        self.wrap(base.Optimizer, "tell", "tell")
        self.wrap(fit_session.FitSession, "submit", "submit (incl. pickling)")
        for name in ("collect", "record", "notify", "end_step"):  # collect: new in issue 14
            if hasattr(fit_session.FitSession, name):
                self.wrap(fit_session.FitSession, name, "record, callbacks, results")
        self.wrap(nevergrad_loop, "wait_first", "wait")
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)


def _fit_seconds(objective, pool, mode: str, optimizer: str, n_params: int, budget: int, seed):
    start_values = {f"p{i}": 0.5 for i in range(n_params)}
    fitter = Fitter(objective, start_values)
    start = time.perf_counter()
    fitter.fit_nevergrad(
        budget=budget,
        optimizer_str=optimizer,
        num_workers=2,
        executor=pool,
        mode=mode,
        seed=seed,
        progress=False,
    )
    return time.perf_counter() - start, fitter


def _profile(objective, pool, mode: str, optimizer: str, n_params: int, budget: int) -> dict:
    """One more fit in ``mode``: ms per evaluation in each part of the fitting thread, and
    the workers' evaluations (wall, CPU) and idle time."""
    with _DriverClock() as clock:
        seconds, fitter = _fit_seconds(objective, pool, mode, optimizer, n_params, budget, 99)
    per_eval = {label: 1e3 * s / budget for label, s in sorted(clock.seconds.items())}
    per_eval["other"] = 1e3 * seconds / budget - sum(per_eval.values())
    spans = [record.meta["span"] for record in fitter.history]
    by_worker: dict[int, list] = defaultdict(list)
    for start, end, _, pid in spans:
        by_worker[pid].append((start, end))
    gaps = []
    for worker_spans in by_worker.values():
        worker_spans.sort()
        gaps += [b[0] - a[1] for a, b in itertools.pairwise(worker_spans)]
    busy = sum(end - start for start, end, _, _ in spans)
    return {
        "ms_per_eval": 1e3 * seconds / budget,
        "fitting_thread_ms_per_eval": {k: round(v, 3) for k, v in per_eval.items()},
        "evaluation_ms": {
            "wall": 1e3 * busy / budget,
            "cpu": 1e3 * sum(span[2] for span in spans) / budget,
        },
        "workers_busy_fraction": busy / (len(by_worker) * seconds),
        "worker_idle_between_evaluations_ms": {
            "median": 1e3 * statistics.median(gaps) if gaps else None,
            "mean": 1e3 * statistics.mean(gaps) if gaps else None,
        },
    }


def async_vs_batch(
    repeats: int,
    budget: int,
    optimizer: str,
    n_params: int,
    *,
    sleep: float = 0.0,
    profile: bool = False,
) -> dict:
    """Batch and async mode on one 2-worker process pool, alternating (the order swaps
    every repeat); each repeat's fits use the same seed in both modes."""
    objective = TimedObjective(loops=0 if sleep else calibrate_loops(), sleep=sleep)
    times: dict[str, list[float]] = {"batch": [], "async": []}
    with ProcessPoolExecutor(2) as pool:
        _fit_seconds(objective, pool, "async", optimizer, n_params, 8, 0)  # start the workers
        for repeat in range(repeats):
            for mode in ("batch", "async") if repeat % 2 == 0 else ("async", "batch"):
                seconds, _ = _fit_seconds(
                    objective, pool, mode, optimizer, n_params, budget, repeat
                )
                times[mode].append(seconds)
        profiles = (
            {mode: _profile(objective, pool, mode, optimizer, n_params, budget) for mode in times}
            if profile
            else None
        )
    batch, asynchronous = _summary(times["batch"]), _summary(times["async"])
    out = {
        "optimizer": optimizer,
        "parameters": n_params,
        "budget": budget,
        "workers": 2,
        "objective": f"sleeps {sleep * 1e3:g} ms" if sleep else "computes ~10 ms (Python loop)",
        "ms_per_eval": {
            "batch": {k: 1e3 * v / budget for k, v in batch.items() if k != "runs"},
            "async": {k: 1e3 * v / budget for k, v in asynchronous.items() if k != "runs"},
        },
        "throughput_async_over_batch": {
            "min_ratio": batch["min"] / asynchronous["min"],
            "median_ratio": batch["median"] / asynchronous["median"],
            "paired_median_ratio": statistics.median(
                b / a for b, a in zip(times["batch"], times["async"])
            ),
        },
        "runs": repeats,
    }
    if profiles is not None:
        out["profile"] = profiles
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller budgets, 2 repeats")
    parser.add_argument("--only", help="run only this case (e.g. process_pool)")
    parser.add_argument("--profile", action="store_true", help="profile cases 5-7 (one run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    repeats = 2 if args.quick else args.repeats
    quick = args.quick
    cases = {
        "fitter_overhead": lambda: fitter_overhead(repeats, budget=500 if quick else 2000),
        "optimizer_cost": lambda: optimizer_cost(repeats, budget=60 if quick else 200),
        "batch_vs_async": lambda: batch_vs_async(repeats, budget=30 if quick else 60),
        "process_pool": lambda: process_pool(repeats, budget=100 if quick else 400),
        "async_vs_batch_ngiohtuned": lambda: async_vs_batch(
            repeats, 60 if quick else 150, "NgIohTuned", 8, profile=args.profile
        ),
        "async_vs_batch_oneplusone": lambda: async_vs_batch(
            repeats, 80 if quick else 200, "OnePlusOne", 2, profile=args.profile
        ),
        "async_vs_batch_ngiohtuned_sleep": lambda: async_vs_batch(
            repeats, 60 if quick else 150, "NgIohTuned", 8, sleep=0.010, profile=args.profile
        ),
    }
    if args.only is not None and args.only not in cases:
        parser.error(f"--only must be one of {sorted(cases)}, got {args.only!r}")
    report = {name: run() for name, run in cases.items() if args.only in (None, name)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
