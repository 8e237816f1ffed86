"""Per-evaluation overhead of ``map_with_context`` against a bare ``executor.map``.

Both run the same trivial objective over the same inputs and contexts on the same executor.
Prints one JSON document: for each executor kind and chunksize, the seconds per evaluation
(min and median over the repeats) and the ratio ``map_with_context / executor.map``: of the
medians, of the mins, and ``ratio_paired_median``, the median over repeats of the ratio within
one repeat (the two runs of a repeat follow each other, in alternating order, so they share
the machine's load; the target, within 10%, is checked on it).

``alt_map_chunksize`` is the alternative design for chunking: ``executor.map`` with
``AttachContextAsReturnValue`` and the executor's own ``chunksize`` (states applied afterwards).

Usage::

    python benchmarks/bench_map_with_context.py [--n 2000] [--repeats 15] [--kinds thread,process,loky]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from chemfit.core.context import EvaluateContext
from chemfit.execution.executor_utils import AttachContextAsReturnValue, map_with_context
from chemfit.execution.executors import make_executor


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
    parser.add_argument("--kinds", default="thread,process,loky")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    report = {"n": args.n, "repeats": args.repeats, "workers": args.workers, "runs": []}
    for kind in args.kinds.split(","):
        executor = make_executor(kind, max_workers=args.workers)
        _bare(executor, list(range(64)), [EvaluateContext() for _ in range(64)], 1)  # warm up
        for chunksize in (1, 64):
            runs = [_bare, _with_context]
            if kind != "thread" and chunksize > 1:
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
