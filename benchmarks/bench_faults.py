"""Fault-policy benchmarks (issue 15): what surviving faults costs, with and without faults.

Prints one JSON document. Each comparison runs side by side in this one process, alternating
the sides, repeated; the figures are the min and median over repeats.

1. ``overhead``: ``fit_nevergrad(num_workers=2, mode=...)`` on a 2-worker process pool from
   ``make_executor("process", 2)``, ``OnePlusOne``, a cheap objective (~1 ms), no failure:
   ``retries=0`` (the defaults) against ``retries=2``, and against ``retries=2,
   evaluation_timeout=60``, in both modes. Target: no measurable difference (the ratio's
   spread around 1 is the noise).
2. ``throughput_with_kills``: the same pool, async, an objective that sleeps 20 ms (an external
   program), ``retries=2``: evaluations per second of a failure-free fit against the same fit
   in which one busy worker is SIGKILLed every N evaluations (the pool is restarted and the
   evaluations it took with it submitted again).

Usage: ``python benchmarks/bench_faults.py [--repeats N] [--budget B] [--every N ...]``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path

from chemfit import Fitter
from chemfit.executors import make_executor

BUSY = Path(tempfile.mkdtemp(prefix="chemfit-bench-faults-"))


def objective(params: dict) -> float:
    """Marks its worker busy (for the killer); sleeps ``seconds`` or computes ~1 ms."""
    busy = BUSY / f"busy-{os.getpid()}"
    busy.touch()
    try:
        total = 0.0
        if params["seconds"] > 0:
            time.sleep(params["seconds"])
        else:
            for i in range(20_000):
                total += i * 1e-12
        return (params["x"] - 0.3) ** 2 + (params["y"] + 0.2) ** 2 + total * 0.0
    finally:
        busy.unlink(missing_ok=True)


class KillEvery:
    """Evaluation callback: after every ``n``-th record, a thread SIGKILLs a busy worker."""

    def __init__(self, n: int) -> None:
        self.n, self.kills = n, 0

    def __call__(self, record) -> None:
        if (record.index + 1) % self.n == 0:
            threading.Thread(target=self._kill, daemon=True).start()

    def _kill(self) -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for path in BUSY.glob("busy-*"):
                try:
                    os.kill(int(path.name.split("-")[1]), signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.kills += 1
                return
            time.sleep(0.002)


def _fit(pool, budget: int, seconds: float, mode: str, killer=None, **faults) -> tuple:
    fitter = Fitter(
        lambda p: objective({**p, "seconds": seconds}),
        {"x": 0.0, "y": 0.0},
        bounds={"x": (-1, 1), "y": (-1, 1)},
    )
    if killer is not None:
        fitter.register_evaluation_callback(killer)
    start = time.perf_counter()
    fitter.fit_nevergrad(
        budget=budget,
        optimizer_str="OnePlusOne",
        num_workers=2,
        executor=pool,
        mode=mode,
        seed=0,
        progress=False,
        **faults,
    )
    seconds_taken = time.perf_counter() - start
    result = fitter.result
    assert result.n_evals == budget and result.error is None
    return seconds_taken, result


def _summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "runs": len(values)}


def overhead(pool, repeats: int, budget: int) -> dict:
    arms = {
        "retries=0": {},
        "retries=2": {"retries": 2},
        "retries=2,timeout=60": {"retries": 2, "evaluation_timeout": 60.0},
    }
    out = {}
    for mode in ("async", "batch"):
        times: dict[str, list[float]] = {name: [] for name in arms}
        _fit(pool, 20, 0.0, mode)  # warm up the workers
        for repeat in range(repeats):
            names = list(arms) if repeat % 2 == 0 else list(reversed(arms))
            for name in names:
                times[name].append(_fit(pool, budget, 0.0, mode, **arms[name])[0] / budget)
        base = times["retries=0"]
        out[mode] = {
            "seconds_per_evaluation": {name: _summary(t) for name, t in times.items()},
            "ratio_to_retries=0": {
                name: _summary([a / b for a, b in zip(t, base)])
                for name, t in times.items()
                if name != "retries=0"
            },
        }
    return out


def throughput_with_kills(pool, repeats: int, budget: int, every: list[int]) -> dict:
    seconds = 0.02
    clean: list[float] = []
    killed: dict[int, list[float]] = {n: [] for n in every}
    kills: dict[int, list[int]] = {n: [] for n in every}
    retried: dict[int, list[int]] = {n: [] for n in every}
    _fit(pool, 10, seconds, "async")
    for _ in range(repeats):
        clean.append(budget / _fit(pool, budget, seconds, "async", retries=2)[0])
        for n in every:
            killer = KillEvery(n)
            taken, result = _fit(pool, budget, seconds, "async", killer=killer, retries=2)
            killed[n].append(budget / taken)
            kills[n].append(killer.kills)
            retried[n].append(sum(r.tries - 1 for r in result.history))
            assert result.n_lost == 0, "an evaluation was lost despite retries=2"
    out = {"evaluations_per_second_failure_free": _summary(clean)}
    for n in every:
        out[f"kill_every_{n}"] = {
            "evaluations_per_second": _summary(killed[n]),
            "ratio_to_failure_free": _summary([k / c for k, c in zip(killed[n], clean)]),
            "kills_per_fit": _summary(kills[n]),
            "extra_tries_per_fit": _summary(retried[n]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=int, default=200)
    parser.add_argument("--every", type=int, nargs="+", default=[50, 20])
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the retries' WARNINGs would flood the output
    pool = make_executor("process", 2)
    try:
        report = {
            "budget": args.budget,
            "repeats": args.repeats,
            "overhead": overhead(pool, args.repeats, args.budget),
            "throughput_with_kills": throughput_with_kills(
                pool, args.repeats, args.budget, args.every
            ),
        }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
