"""Benchmark: parallel wrappers of a combined objective against serial evaluation.

Cases (CPU-bound pure-Python terms that hold the GIL, so thread pools show no gain):

* ``expensive``: 8 terms of about 20 ms each;
* ``cheap``: 100 terms of about 50 us each.

Each case is timed serially (``cob(params, ctx)``) and through :class:`ExecutorWrapperCOB` on
a thread pool, a process pool and loky (``--workers`` workers, default 2), with
``terms_per_task="auto"`` (after one warm-up call, so the grouping uses measured times) and with
``terms_per_task=1``. The warm-up value of every mode is checked bitwise against the serial one.
As a reference, ``process/bare`` and ``loky/bare`` send the bare terms through
``executor.map`` with no chemfit code at all: the speed-up the machine gives at best.
The modes are timed in interleaved rounds, in an order rotated each round, so that changes in
machine load hit them alike; on a shared machine, compare the min times. The script prints one JSON document with the min and
median times and the speed-ups over serial: ``speedup_min`` compares min times,
``speedup_paired_median`` is the median over rounds of serial time / mode time (what the
targets are checked on); ``inline_calls`` counts the timed calls in which ``"auto"`` found the
executor not worth it and evaluated the terms in the calling thread.

Run::

    .venv/bin/python benchmarks/bench_cob_wrappers.py [--repeats 15] [--workers 2] [--case cheap]

MPIWrapperCOB on the same two cases is measured by ``benchmarks/bench_mpi_wrapper_cob.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor, ensure_context
from chemfit.execution.executor_wrapper_cob import ExecutorWrapperCOB

PARAMS = {"x": 0.25, "y": 1.5}
CASES = {"expensive": (8, 20e-3), "cheap": (100, 50e-6)}
TARGETS = {
    "expensive": {"process/auto": 1.8, "loky/auto": 1.8},  # minimum speed-up
    "cheap": {"thread/auto": 1 / 1.25, "process/auto": 1 / 1.25, "loky/auto": 1 / 1.25},
}


class SpinTerm(ObjectiveFunctor):
    """A CPU-bound term: ``n_iter`` iterations of a pure-Python loop, then a quadratic."""

    def __init__(self, n_iter: int, shift: float) -> None:
        self.n_iter = n_iter
        self.shift = shift

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        ctx.parameters = parameters
        acc = 0.0
        for i in range(self.n_iter):
            acc += (i % 7) * 1e-9
        ctx.meta["acc"] = acc
        ctx.loss = (parameters["x"] - self.shift) ** 2 + parameters["y"] * acc
        return ctx.loss


def calibrate_iterations(seconds: float) -> int:
    """Loop iterations that take about ``seconds`` of CPU time (thread CPU time, so that other
    processes competing for the cores do not shorten the terms)."""
    probe = SpinTerm(200_000, 0.0)
    best = float("inf")
    for _ in range(5):
        start = time.thread_time()
        probe(PARAMS)
        best = min(best, time.thread_time() - start)
    return max(1, round(200_000 * seconds / best))


def build_cob(case: str, n_iter: int) -> CombinedObjectiveFunction:
    """The combined objective of ``case`` (the same on every process or rank)."""
    n_terms, _ = CASES[case]
    terms = [SpinTerm(n_iter, 0.01 * k) for k in range(n_terms)]
    return CombinedObjectiveFunction(terms, weights=[1.0 + 0.1 * k for k in range(n_terms)])


def _call_term(term: SpinTerm, parameters: dict) -> float:
    return term(parameters)


class BareMap:
    """The reference: the terms through ``executor.map`` with no chemfit code (no contexts,
    no configurator, no reduction): the speed-up this machine allows at all."""

    def __init__(self, cob: CombinedObjectiveFunction, executor) -> None:
        self.terms = list(cob.objective_functions)
        self.executor = executor

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        return sum(self.executor.map(_call_term, self.terms, [parameters] * len(self.terms)))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stats(times: list[float]) -> dict:
    return {"min": min(times), "median": statistics.median(times)}


def make_executors(workers: int) -> dict:
    import loky

    return {
        "thread": ThreadPoolExecutor(workers),
        "process": ProcessPoolExecutor(workers),
        "loky": loky.get_reusable_executor(max_workers=workers),
    }


def bench_executors(repeats: int, workers: int, cases: list[str]) -> dict:
    executors = make_executors(workers)
    # start the worker processes before anything is timed
    for executor in executors.values():
        list(executor.map(abs, range(4 * workers)))
    results: dict = {}
    try:
        for case in cases:
            n_terms, seconds = CASES[case]
            n_iter = calibrate_iterations(seconds)
            cob = build_cob(case, n_iter)
            expected = cob(PARAMS, EvaluateContext())
            runners = {"serial": cob}
            for name, executor in executors.items():
                for terms_per_task in ("auto", 1):
                    wrapper = ExecutorWrapperCOB(cob, executor, terms_per_task=terms_per_task)
                    value = wrapper(PARAMS, EvaluateContext())  # warm-up; "auto" measures here
                    if value != expected:
                        raise RuntimeError(
                            f"{name}/{terms_per_task}: {value!r} != serial {expected!r}"
                        )
                    runners[f"{name}/{terms_per_task}"] = wrapper
                if name != "thread":
                    runners[f"{name}/bare"] = BareMap(cob, executor)
                    runners[f"{name}/bare"](PARAMS)
            # interleaved rounds, so that a change in machine load hits every mode alike
            times: dict[str, list[float]] = {mode: [] for mode in runners}
            inline: dict[str, list[bool]] = {mode: [] for mode in runners}
            modes = list(runners)
            for round_index in range(repeats):
                # rotate the order, so that no mode always runs first on a pool that has been
                # idle (waking sleeping workers costs the first call) or right after another
                shift = round_index % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    runner = runners[mode]
                    times[mode].append(_timed(lambda r=runner: r(PARAMS, EvaluateContext())))
                    inline[mode].append(getattr(runner, "last_tasks", None) == 0)
            serial_times = times.pop("serial")
            entry: dict = {
                "n_terms": n_terms,
                "term_seconds_target": seconds,
                "loop_iterations": n_iter,
                "serial": _stats(serial_times),
            }
            for mode, mode_times in times.items():
                stats = _stats(mode_times)
                stats["speedup_min"] = entry["serial"]["min"] / stats["min"]
                stats["speedup_median"] = entry["serial"]["median"] / stats["median"]
                # each round's serial time over this mode's time in the same round: robust
                # against load that drifts during the run
                stats["speedup_paired_median"] = statistics.median(
                    s / t for s, t in zip(serial_times, mode_times)
                )
                # calls where "auto" kept the terms in this thread (the executor did not pay),
                # and the median time of those calls and of the calls on the executor
                stats["inline_calls"] = sum(inline[mode])
                for label, kept in (("inline", True), ("executor", False)):
                    chosen = [t for t, i in zip(mode_times, inline[mode]) if i == kept]
                    if chosen:
                        stats[f"{label}_call_median"] = statistics.median(chosen)
                entry[mode] = stats
            results[case] = entry
    finally:
        executors["thread"].shutdown()
        executors["process"].shutdown()
    return results


def check_targets(results: dict) -> dict:
    """``{case: {mode: {"target_speedup", "speedup_*", "met"}}}``.

    A target is met when the paired median speed-up (see :func:`bench_executors`) reaches it.
    """
    verdicts: dict = {}
    for case, targets in TARGETS.items():
        if case not in results:
            continue
        for mode, target in targets.items():
            stats = results[case][mode]
            verdicts.setdefault(case, {})[mode] = {
                "target_speedup": round(target, 3),
                "speedup_min": round(stats["speedup_min"], 3),
                "speedup_median": round(stats["speedup_median"], 3),
                "speedup_paired_median": round(stats["speedup_paired_median"], 3),
                "met": stats["speedup_paired_median"] >= target,
            }
            bare = results[case].get(f"{mode.split('/')[0]}/bare")
            if bare is not None:  # what executor.map alone reaches on this machine
                verdicts[case][mode]["bare_speedup_paired_median"] = round(
                    bare["speedup_paired_median"], 3
                )
    return verdicts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per mode (>= 5)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: all")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5")
    cases = args.case or list(CASES)
    results = bench_executors(args.repeats, args.workers, cases)
    report = {
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        },
        "workers": args.workers,
        "repeats": args.repeats,
        "results": results,
        "targets": check_targets(results),
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
