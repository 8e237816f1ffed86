"""Per-evaluation overhead of ``map_with_context`` against a bare ``executor.map``.

Both run the same trivial objective over the same inputs and contexts on the same executor.
Prints one JSON document: for each executor kind and chunksize, the seconds per evaluation
(min and median over the repeats) and the ratio ``map_with_context / executor.map``: of the
medians, of the mins, and ``ratio_paired_median``, the median over repeats of the ratio within
one repeat (the two runs of a repeat follow each other, in alternating order, so they share
the machine's load; the target, within 10%, is checked on it).

Kinds: ``thread``, ``process``, ``loky`` (``make_executor``) and ``own``: an in-process executor
of the caller's own, unknown to chemfit (an ``Executor`` subclass from callers_own_executor.py whose ``submit``
runs the call at once and whose ``map`` is the inherited ``Executor.map``; issue 14's target:
within 2x a bare map).

``alt_map_chunksize`` is the alternative design for chunking: ``executor.map`` with
``AttachContextAsReturnValue`` and the executor's own ``chunksize`` (states applied afterwards).

``--one-call N`` adds ``one_call_maps``: N maps of one call each, as an asynchronous fit submits
its evaluations, with parameters of ``--params`` floats: seconds per evaluation and how often
the call's arguments were pickled per evaluation (counted by an object among them).

Usage::

    python benchmarks/bench_map_with_context.py [--n 2000] [--repeats 15]
        [--kinds thread,process,loky,own]
        [--one-call 300] [--params 200] [--only-one-call]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from callers_own_executor import CallersOwnExecutor  # this script's folder is on sys.path

from chemfit.core.context import EvaluateContext
from chemfit.execution.executor_utils import AttachContextAsReturnValue, map_with_context
from chemfit.execution.executors import make_executor


def _make_executor(kind: str, workers: int):
    if kind == "own":
        return CallersOwnExecutor()
    return make_executor(kind, max_workers=workers)


def objective(x, ctx):
    ctx.loss = x
    return x


def _bare(executor, xs, ctxs, chunksize):
    return list(executor.map(objective, xs, ctxs, chunksize=chunksize))


def _with_context(executor, xs, ctxs, chunksize):
    return map_with_context(executor, objective, xs, ctxs=ctxs, chunksize=chunksize)


def _alt_map_chunksize(executor, xs, ctxs, chunksize):
    outputs = list(
        executor.map(AttachContextAsReturnValue(objective), xs, ctxs, chunksize=chunksize)
    )
    results = []
    for ctx, (value, state) in zip(ctxs, outputs):
        ctx.apply_result_state(state)
        results.append(value)
    return results


class Counted:
    """Counts how often it is pickled in this process (it travels with each call's parameters).

    It arrives in the worker as an empty dict: its pickle refers to nothing in ``__main__``, as
    a fit's parameters do not (a ``__main__`` class would be sent by value).
    """

    pickles = 0

    def __reduce__(self):
        Counted.pickles += 1
        return (dict, ())


def _one_call_maps(executor, n, n_params):
    """Seconds per evaluation and pickles per evaluation of ``n`` one-call maps."""
    parameters = [
        {"counted": Counted(), **{f"p{j}": float(i + j) for j in range(n_params)}} for i in range(n)
    ]
    ctxs = [EvaluateContext() for _ in range(n)]
    Counted.pickles = 0
    start = time.perf_counter()
    for x, ctx in zip(parameters, ctxs):
        map_with_context(executor, _first_float, [x], ctxs=[ctx])
    elapsed = (time.perf_counter() - start) / n
    return elapsed, Counted.pickles / n


def _first_float(parameters, ctx):
    ctx.loss = parameters["p0"]
    return ctx.loss


def _run_once(run, executor, n, chunksize):
    xs = list(range(n))
    ctxs = [EvaluateContext() for _ in range(n)]
    start = time.perf_counter()
    results = run(executor, xs, ctxs, chunksize)
    elapsed = (time.perf_counter() - start) / n
    if results != xs:
        raise RuntimeError(f"{run.__name__} returned wrong results")
    return elapsed


def _compare(runs, executor, n, chunksize, repeats):
    """Seconds per evaluation of each run; the runs alternate so they share the machine's load."""
    times = {run.__name__: [] for run in runs}
    for repeat in range(repeats):
        order = runs if repeat % 2 == 0 else runs[::-1]
        for run in order:
            times[run.__name__].append(_run_once(run, executor, n, chunksize))
    return times


def _summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="evaluations per map")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--kinds", default="thread,process,loky,own")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one-call", type=int, default=0, help="one-call maps per repeat")
    parser.add_argument("--params", type=int, default=200, help="floats per parameter set")
    parser.add_argument("--only-one-call", action="store_true")
    args = parser.parse_args()

    report = {"n": args.n, "repeats": args.repeats, "workers": args.workers, "runs": []}
    for kind in args.kinds.split(","):
        executor = _make_executor(kind, args.workers)
        _bare(executor, list(range(64)), [EvaluateContext() for _ in range(64)], 1)  # warm up
        # the first map_with_context on an executor chemfit does not know takes the wire form
        # (it learns there whether the executor runs the calls in this process): report it
        first = _run_once(_with_context, executor, args.n, 1)
        report.setdefault("first_map_with_context_s_per_eval", {})[kind] = first
        if args.one_call:
            _one_call_maps(executor, 10, args.params)  # warm up
            runs = [
                _one_call_maps(executor, args.one_call, args.params) for _ in range(args.repeats)
            ]
            seconds = [r[0] for r in runs]
            report.setdefault("one_call_maps", []).append(
                {
                    "kind": kind,
                    "n_params": args.params,
                    "s_per_eval": _summary(seconds),
                    "pickles_per_eval": statistics.median(r[1] for r in runs),
                }
            )
        for chunksize in () if args.only_one_call else (1, 64):
            runs = [_bare, _with_context]
            if kind in ("process", "loky") and chunksize > 1:
                runs.append(_alt_map_chunksize)
            timing = _compare(runs, executor, args.n, chunksize, args.repeats)
            bare, wrapped = _summary(timing["_bare"]), _summary(timing["_with_context"])
            paired = [w / b for b, w in zip(timing["_bare"], timing["_with_context"])]
            entry = {
                "kind": kind,
                "chunksize": chunksize,
                "bare_executor_map_s_per_eval": bare,
                "map_with_context_s_per_eval": wrapped,
                "ratio_median": wrapped["median"] / bare["median"],
                "ratio_min": wrapped["min"] / bare["min"],
                "ratio_paired_median": statistics.median(paired),
            }
            if "_alt_map_chunksize" in timing:
                entry["alt_map_chunksize_s_per_eval"] = _summary(timing["_alt_map_chunksize"])
            report["runs"].append(entry)
        if kind != "loky":  # the reusable loky executor is left for loky to clean up
            executor.shutdown(wait=True)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
