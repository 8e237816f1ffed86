"""Benchmark: parallel wrappers of a combined objective against serial evaluation.

Cases (terms defined here, in ``__main__``, as users define them in notebooks):

* ``numpy``: 8 terms of about 11 ms, each a loop of small numpy operations (issue 14);
* ``python``: 8 terms of about 11 ms, each a pure-Python arithmetic loop that holds the GIL
  (issue 14);
* ``tiny``: 100 pure-Python terms of a few microseconds (issue 14's "100 cheap terms");
* ``expensive``: 8 pure-Python terms of about 20 ms;
* ``cheap``: 100 pure-Python terms of about 50 us.

The terms of ``numpy``, ``python`` and ``tiny`` are those of ``benchmarks/upstream_cases.py``,
so the figures agree with the side-by-side comparison with upstream chemfit 3.1.1. Loop counts
are calibrated at start-up on thread CPU time.

Each case is timed serially (``cob(params, ctx)``) and through :class:`ExecutorWrapperCOB` on a
thread pool, a process pool, loky (``--workers`` workers, default 2) and, in the cases of cheap
terms, on ``own``: an in-process executor of the caller's own, unknown to chemfit (an
``Executor`` subclass of callers_own_executor.py whose ``submit`` runs the call at once). Each with
``terms_per_task="auto"`` and ``terms_per_task=1``, after two warm-up calls (``"auto"`` measures
the terms there); the warm-up value is checked bitwise against the serial one. As a reference,
``process/bare`` and ``loky/bare`` send the bare terms through ``executor.map`` with no chemfit
code at all: the speed-up the machine gives at best.

The modes are timed in interleaved rounds, each in a new random order (seeded), so that changes
in machine load hit them alike and no mode always follows the same one. One JSON document goes to stdout: per case and mode the min and
median seconds per call, the speed-ups over serial (``speedup_min`` compares min times,
``speedup_paired_median`` is the median over rounds of serial time / mode time, what the
targets are checked on), ``auto_over_1_paired_median`` (the median over rounds of the time of
``"auto"`` over that of ``terms_per_task=1`` on the same executor: above 1, ``"auto"`` lost) and
``inline_calls`` (timed calls in which ``"auto"`` kept the terms in the calling thread). A
short table goes to stderr.

Run::

    .venv/bin/python benchmarks/bench_cob_wrappers.py [--repeats 15] [--workers 2]
        [--case numpy --case python ...] [--executors process,loky]

MPIWrapperCOB on the same cases is measured by ``benchmarks/bench_mpi_wrapper_cob.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
from callers_own_executor import CallersOwnExecutor  # this script's folder is on sys.path

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor
from chemfit.execution.executor_wrapper_cob import ExecutorWrapperCOB

PARAMS = {"x": 0.25, "y": 1.5}
#: name -> (number of terms, seconds per term, flavour)
CASES = {
    "numpy": (8, 11e-3, "numpy"),
    "python": (8, 11e-3, "python"),
    "tiny": (100, 3e-6, "python"),
    "expensive": (8, 20e-3, "python"),
    "cheap": (100, 50e-6, "python"),
}
EXECUTORS = ("thread", "process", "loky", "own")
#: minimum paired-median speed-up over serial
TARGETS = {
    "numpy": {"process/auto": 1.8, "loky/auto": 1.8},
    "python": {"process/auto": 1.8, "loky/auto": 1.8},
    "expensive": {"process/auto": 1.8, "loky/auto": 1.8},
    "cheap": {"thread/auto": 1 / 1.25, "process/auto": 1 / 1.25, "loky/auto": 1 / 1.25},
    "tiny": {"own/auto": 1 / 1.25, "loky/auto": 1 / 1.25},
}
#: ``"auto"`` never loses to ``terms_per_task=1`` on expensive terms: its paired-median time
#: over that of 1 stays under this (a few percent of noise)
AUTO_OVER_1_LIMIT = 1.03
WARMUP_CALLS = 2


class PythonTerm(ObjectiveFunctor):
    """A CPU-bound term: ``n_iter`` iterations of a pure-Python loop, then a quadratic."""

    def __init__(self, index: int, n_iter: int) -> None:
        self.index = index
        self.n_iter = n_iter

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        acc = 0.0
        for i in range(self.n_iter):
            acc += (i % 7) * 1e-9
        value = (parameters["x"] - 0.01 * self.index) ** 2 + parameters["y"] * acc
        if ctx is not None:
            ctx.parameters = parameters
            ctx.loss = value
        return value


class NumpyTerm(ObjectiveFunctor):
    """A term of ``n_iter`` small numpy operations."""

    def __init__(self, index: int, n_iter: int) -> None:
        self.index = index
        self.n_iter = n_iter

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        a = np.linspace(0.0, 1.0, 16) + 1e-3 * self.index
        for _ in range(self.n_iter):
            a = np.sin(a) * 0.5 + parameters["x"]
        value = (parameters["x"] - 0.01 * self.index) ** 2 + parameters["y"] * float(a.mean())
        if ctx is not None:
            ctx.parameters = parameters
            ctx.loss = value
        return value


TERMS = {"python": PythonTerm, "numpy": NumpyTerm}


def calibrate_iterations(flavour: str, seconds: float) -> int:
    """Loop iterations of a ``flavour`` term that take about ``seconds`` of thread CPU time
    (CPU time, so that other processes competing for the cores do not shorten the terms)."""
    probe_iter = 200_000 if flavour == "python" else 2_000
    probe = TERMS[flavour](0, probe_iter)
    best = float("inf")
    for _ in range(5):
        start = time.thread_time()
        probe(PARAMS)
        best = min(best, time.thread_time() - start)
    return max(1, round(probe_iter * seconds / best))


def build_cob(case: str, n_iter: int) -> CombinedObjectiveFunction:
    """The combined objective of ``case`` (the same on every process or rank)."""
    n_terms, _, flavour = CASES[case]
    terms = [TERMS[flavour](k, n_iter) for k in range(n_terms)]
    return CombinedObjectiveFunction(terms, weights=[1.0 + 0.1 * k for k in range(n_terms)])


def _call_term(term: ObjectiveFunctor, parameters: dict) -> float:
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


def make_executors(workers: int, kinds: list[str]) -> dict:
    executors: dict = {}
    for kind in kinds:
        if kind == "thread":
            executors[kind] = ThreadPoolExecutor(workers)
        elif kind == "process":
            executors[kind] = ProcessPoolExecutor(workers)
        elif kind == "loky":
            import loky

            executors[kind] = loky.get_reusable_executor(max_workers=workers)
        elif kind == "own":
            executors[kind] = CallersOwnExecutor()
        else:
            raise ValueError(f"unknown executor {kind!r}; use {', '.join(EXECUTORS)}")
    return executors


def _is_cheap(case: str) -> bool:
    n_terms, seconds, _ = CASES[case]
    return n_terms * seconds < 10e-3


def _runners(case: str, cob: CombinedObjectiveFunction, executors: dict) -> dict:
    """``{mode: callable}``: serial, each executor with "auto" and 1, and the bare maps."""
    expected = cob(PARAMS, EvaluateContext())
    runners: dict = {"serial": cob}
    for name, executor in executors.items():
        if name == "own" and not _is_cheap(case):  # runs the terms one after the other
            continue
        for terms_per_task in ("auto", 1):
            wrapper = ExecutorWrapperCOB(cob, executor, terms_per_task=terms_per_task)
            for _ in range(WARMUP_CALLS):  # "auto" measures the terms here
                value = wrapper(PARAMS, EvaluateContext())
            if value != expected:
                raise RuntimeError(f"{name}/{terms_per_task}: {value!r} != serial {expected!r}")
            runners[f"{name}/{terms_per_task}"] = wrapper
        if name in ("process", "loky"):
            runners[f"{name}/bare"] = BareMap(cob, executor)
            runners[f"{name}/bare"](PARAMS)
    return runners


def _interleaved(runners: dict, repeats: int) -> tuple[dict, dict]:
    """Seconds per call of each mode and whether "auto" kept a call inline, in rounds of a
    new random order each (seeded). Not a rotation: that keeps each mode behind the same one,
    and a call that comes right after the serial one finds the pool's workers idle (and
    slower to wake) round after round, while the next one finds them warm."""
    times: dict[str, list[float]] = {mode: [] for mode in runners}
    inline: dict[str, list[bool]] = {mode: [] for mode in runners}
    modes = list(runners)
    order = random.Random(14)
    for _ in range(repeats):
        order.shuffle(modes)
        for mode in modes:
            runner = runners[mode]
            times[mode].append(_timed(lambda r=runner: r(PARAMS, EvaluateContext())))
            inline[mode].append(getattr(runner, "last_tasks", None) == 0)
    return times, inline


def _paired_median(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerators, denominators))


def _case_entry(case: str, n_iter: int, times: dict, inline: dict) -> dict:
    n_terms, seconds, flavour = CASES[case]
    serial_times = times.pop("serial")
    entry: dict = {
        "n_terms": n_terms,
        "term_seconds_target": seconds,
        "flavour": flavour,
        "loop_iterations": n_iter,
        "serial": _stats(serial_times),
    }
    for mode, mode_times in times.items():
        stats = _stats(mode_times)
        stats["speedup_min"] = entry["serial"]["min"] / stats["min"]
        stats["speedup_median"] = entry["serial"]["median"] / stats["median"]
        # each round's serial time over this mode's time in the same round: robust against
        # load that drifts during the run
        stats["speedup_paired_median"] = _paired_median(serial_times, mode_times)
        stats["inline_calls"] = sum(inline[mode])
        executor, _, variant = mode.partition("/")
        if variant == "auto" and f"{executor}/1" in times:
            stats["auto_over_1_paired_median"] = _paired_median(mode_times, times[f"{executor}/1"])
        entry[mode] = stats
    return entry


def bench_executors(repeats: int, workers: int, cases: list[str], kinds: list[str]) -> dict:
    executors = make_executors(workers, kinds)
    for executor in executors.values():  # start the worker processes before anything is timed
        list(executor.map(abs, range(4 * workers)))
    results: dict = {}
    try:
        for case in cases:
            _, seconds, flavour = CASES[case]
            n_iter = calibrate_iterations(flavour, seconds)
            cob = build_cob(case, n_iter)
            runners = _runners(case, cob, executors)
            times, inline = _interleaved(runners, repeats)
            results[case] = _case_entry(case, n_iter, times, inline)
    finally:
        for name, executor in executors.items():
            if name != "loky":  # the reusable loky executor is left for loky to clean up
                executor.shutdown()
    return results


def check_targets(results: dict) -> dict:
    """``{case: {mode: {"target_speedup", "speedup_*", "met", ...}}}``.

    A speed-up target is met when the paired median speed-up reaches it; on the expensive
    cases ``"auto"`` must also stay within :data:`AUTO_OVER_1_LIMIT` of ``terms_per_task=1``.
    """
    verdicts: dict = {}
    for case, targets in TARGETS.items():
        if case not in results:
            continue
        for mode, target in targets.items():
            stats = results[case].get(mode)
            if stats is None:
                continue
            verdict = {
                "target_speedup": round(target, 3),
                "speedup_min": round(stats["speedup_min"], 3),
                "speedup_median": round(stats["speedup_median"], 3),
                "speedup_paired_median": round(stats["speedup_paired_median"], 3),
                "met": stats["speedup_paired_median"] >= target,
            }
            auto_over_1 = stats.get("auto_over_1_paired_median")
            if auto_over_1 is not None and not _is_cheap(case):
                verdict["auto_over_1_paired_median"] = round(auto_over_1, 3)
                verdict["met"] = verdict["met"] and auto_over_1 <= AUTO_OVER_1_LIMIT
            bare = results[case].get(f"{mode.split('/')[0]}/bare")
            if bare is not None:  # what executor.map alone reaches on this machine
                verdict["bare_speedup_paired_median"] = round(bare["speedup_paired_median"], 3)
            verdicts.setdefault(case, {})[mode] = verdict
    return verdicts


def _table(results: dict) -> str:
    lines = [
        f"{'case':10s} {'mode':14s} {'min ms':>8s} {'med ms':>8s} {'x min':>6s} "
        f"{'x paired':>8s} {'auto/1':>7s} {'inline':>6s}"
    ]
    for case, entry in results.items():
        serial = entry["serial"]
        lines.append(
            f"{case:10s} {'serial':14s} {1e3 * serial['min']:8.3f} {1e3 * serial['median']:8.3f}"
        )
        for mode, stats in entry.items():
            if not isinstance(stats, dict) or mode == "serial" or "min" not in stats:
                continue
            auto_over_1 = stats.get("auto_over_1_paired_median")
            lines.append(
                f"{'':10s} {mode:14s} {1e3 * stats['min']:8.3f} {1e3 * stats['median']:8.3f} "
                f"{stats['speedup_min']:6.2f} {stats['speedup_paired_median']:8.2f} "
                f"{'' if auto_over_1 is None else format(auto_over_1, '.3f'):>7s} "
                f"{stats['inline_calls']:6d}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed calls per mode (>= 5)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="default: all")
    parser.add_argument(
        "--executors", default=",".join(EXECUTORS), help=f"default: {','.join(EXECUTORS)}"
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be >= 5")
    cases = args.case or list(CASES)
    kinds = [kind for kind in args.executors.split(",") if kind]
    results = bench_executors(args.repeats, args.workers, cases, kinds)
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
    print(_table(results), file=sys.stderr)


if __name__ == "__main__":
    main()
