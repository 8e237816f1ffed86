"""One benchmark case, run the same way against upstream chemfit 3.1.1 and against chemfit.

Both packages are imported as ``chemfit``, so each side runs this script with its own venv's
python (``benchmarks/compare_upstream.py`` does that, alternating the sides). The script imports
only module paths that upstream 3.1.1 has (``chemfit.abstract_objective_function``,
``chemfit.combined_objective_function``, ``chemfit.executor_utils``,
``chemfit.executor_wrapper_cob``, ``chemfit.mpi_wrapper_cob``) and only their upstream API, so
the two sides run the same code here and differ only in the package.

Usage::

    python benchmarks/upstream_cases.py calibrate
    python benchmarks/upstream_cases.py CASE [--repeats N] [--numpy-iters I] [--python-iters J]
        [--cheap-iters K]
    mpiexec -n 2 python benchmarks/upstream_cases.py mpi_cheap [...]   (the ``mpi_*`` cases)

The terms are defined here, in ``__main__``, as users define them in notebooks. The loop counts
make "8 expensive terms" (about 11 ms each: ``numpy``, a loop of small numpy operations, or
``python``, an arithmetic loop) and "100 cheap terms" (a few microseconds each); without them
the script calibrates them itself (``calibrate`` prints them, so a caller can give both sides the
same work). One JSON line goes to stdout (on rank 0 for the MPI cases): the package's version
and location, the loss of the case's objective (serial and through the wrapper) and per metric
the raw per-call seconds (``seconds``) and, where a metric is relative, the paired reference
seconds (``reference``: the serial objective or a bare ``executor.map``, timed in the same
rounds).

Metric kinds: ``ms_per_call`` and ``us_per_call`` (lower is better), ``speedup`` (reference /
seconds, higher is better), ``ratio_to_bare`` (seconds / reference, lower is better),
``cpu_fraction`` (CPU seconds per second of a waiting worker rank, lower is better).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path

import numpy as np
from callers_own_executor import CallersOwnExecutor  # stdlib only, as compare_upstream
from compare_upstream import summarize  # stdlib only; this script's folder is on sys.path

from chemfit.abstract_objective_function import EvaluateContext, ObjectiveFunctor
from chemfit.combined_objective_function import CombinedObjectiveFunction
from chemfit.executor_utils import map_with_context
from chemfit.executor_wrapper_cob import ExecutorWrapperCOB

PARAMS = {"x": 0.25, "y": 1.5}
EXPENSIVE_SECONDS = 11e-3
CHEAP_SECONDS = 3e-6
N_EXPENSIVE = 8
N_CHEAP = 100
WORKERS = 2
WARMUP_CALLS = 2
CHEAP_REPEAT_FACTOR = 4  # a cheap call is short: time more of them for the same --repeats
MAP_CALLS = 2000  # calls per map in own_executor_map


# -- the terms ----------------------------------------------------------------------------------


class PythonTerm(ObjectiveFunctor):
    """A CPU-bound term: ``n_iter`` iterations of a pure-Python loop, then a quadratic."""

    def __init__(self, index: int, n_iter: int) -> None:
        self.index = index
        self.n_iter = n_iter

    def __call__(self, parameters, ctx=None):
        acc = 0.0
        for i in range(self.n_iter):
            acc += (i % 7) * 1e-9
        value = (parameters["x"] - 0.01 * self.index) ** 2 + parameters["y"] * acc
        if ctx is not None:
            ctx.parameters = parameters
            ctx.loss = value
        return value


class NumpyTerm(ObjectiveFunctor):
    """A term of ``n_iter`` small numpy operations (each releases and takes the GIL)."""

    def __init__(self, index: int, n_iter: int) -> None:
        self.index = index
        self.n_iter = n_iter

    def __call__(self, parameters, ctx=None):
        a = np.linspace(0.0, 1.0, 16) + 1e-3 * self.index
        for _ in range(self.n_iter):
            a = np.sin(a) * 0.5 + parameters["x"]
        value = (parameters["x"] - 0.01 * self.index) ** 2 + parameters["y"] * float(a.mean())
        if ctx is not None:
            ctx.parameters = parameters
            ctx.loss = value
        return value


TERM_KINDS = {"python": PythonTerm, "numpy": NumpyTerm}


def build_cob(kind: str, n_terms: int, n_iter: int) -> CombinedObjectiveFunction:
    """The objective of a case: the same on every side, process and rank."""
    terms = [TERM_KINDS[kind](k, n_iter) for k in range(n_terms)]
    return CombinedObjectiveFunction(terms, weights=[1.0 + 0.1 * k for k in range(n_terms)])


def calibrate(kind: str, seconds: float) -> int:
    """Loop iterations of a ``kind`` term that take about ``seconds`` of thread CPU time."""
    probe_iter = 200_000 if kind == "python" else 2_000
    probe = TERM_KINDS[kind](0, probe_iter)
    best = float("inf")
    for _ in range(5):
        start = time.thread_time()
        probe(PARAMS)
        best = min(best, time.thread_time() - start)
    return max(1, round(probe_iter * seconds / best))


def calibration() -> dict:
    return {
        "numpy_iters": calibrate("numpy", EXPENSIVE_SECONDS),
        "python_iters": calibrate("python", EXPENSIVE_SECONDS),
        "cheap_iters": calibrate("python", CHEAP_SECONDS),
    }


# -- an in-process executor of the caller's own -------------------------------------------------


def echo(x, ctx):
    ctx.loss = x
    return x


# -- timing -------------------------------------------------------------------------------------


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def call(objective) -> float:
    return objective(PARAMS, EvaluateContext())


def interleaved(runners: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each runner, in rounds of a random order (seeded).

    Each round shares the machine's load; a random order, not a rotation, so that no runner
    always follows the same one (a pool call right after the serial call, with idle workers,
    is a few per cent slower).
    """
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(1234)
    for _ in range(repeats):
        for name in order.sample(names, len(names)):
            times[name].append(timed(lambda r=runners[name]: call(r)))
    return times


def metric(kind: str, seconds: list[float], reference: list[float] | None = None) -> dict:
    entry: dict = {"kind": kind, "seconds": seconds}
    if reference is not None:
        entry["reference"] = reference
    return entry


def wrapper_metrics(times: dict[str, list[float]], serial: list[float], relative: bool) -> dict:
    """Per wrapper: its speed-up over serial and its time (``relative``), or its time only.

    The time of an expensive case (``"<name>/time"``) compares the wrappers directly: the work
    is the same on both sides, while each side's serial reference can be slowed by its own
    waiting workers (upstream's MPI ranks busy-poll a core).
    """
    metrics = {}
    for name, seconds in times.items():
        if relative:
            metrics[name] = metric("speedup", seconds, serial)
            metrics[f"{name}/time"] = metric("ms_per_call", seconds)
        else:
            metrics[name] = metric("ms_per_call", seconds)
    metrics["serial"] = metric("ms_per_call", serial)
    return metrics


# -- ExecutorWrapperCOB cases -------------------------------------------------------------------


def wrapper_variants() -> dict[str, dict]:
    """Keyword arguments of the ExecutorWrapperCOB variants this package offers.

    Upstream 3.1.1 has no ``terms_per_task``: only ``default``. chemfit: ``default`` and
    ``terms_per_task=1``, and ``terms_per_task=auto`` unless that is the default.
    """
    parameters = inspect.signature(ExecutorWrapperCOB.__init__).parameters
    if "terms_per_task" not in parameters:
        return {"default": {}}
    variants: dict[str, dict] = {"default": {}, "terms_per_task=1": {"terms_per_task": 1}}
    if parameters["terms_per_task"].default != "auto":
        variants["terms_per_task=auto"] = {"terms_per_task": "auto"}
    return variants


def default_terms_per_task() -> object:
    parameter = inspect.signature(ExecutorWrapperCOB.__init__).parameters.get("terms_per_task")
    return None if parameter is None else parameter.default


def make_executor(kind: str):
    if kind == "process":
        return ProcessPoolExecutor(WORKERS)
    if kind == "loky":
        import loky

        return loky.get_reusable_executor(max_workers=WORKERS)
    if kind == "own":
        return CallersOwnExecutor()
    raise ValueError(kind)


def wrapper_case(executor_kind: str, cob, repeats: int, relative: bool) -> dict:
    """ExecutorWrapperCOB (each variant) against the serial objective, interleaved."""
    executor = make_executor(executor_kind)
    try:
        list(executor.map(abs, range(4 * WORKERS)))  # start the workers before timing
        serial_loss = call(cob)
        runners: dict = {"serial": cob}
        losses = {}
        wrappers = []
        for name, kwargs in wrapper_variants().items():
            wrapper = ExecutorWrapperCOB(cob, executor, **kwargs)
            wrappers.append(wrapper)
            for _ in range(WARMUP_CALLS):  # chemfit's "auto" measures the terms here
                losses[name] = call(wrapper)
            runners[name] = wrapper
        times = interleaved(runners, repeats)
        serial = times.pop("serial")
        metrics = wrapper_metrics(times, serial, relative)
        for wrapper in wrappers:
            wrapper.__exit__(None, None, None)
    finally:
        executor.shutdown(wait=True)
    return {
        "serial_loss": serial_loss,
        "losses": losses,
        "metrics": metrics,
        "default_terms_per_task": default_terms_per_task(),
    }


def own_executor_map(repeats: int) -> dict:
    """map_with_context on the caller's own in-process executor against a bare executor.map."""
    executor = CallersOwnExecutor()
    xs = list(range(MAP_CALLS))

    def bare(ctxs):
        return list(executor.map(echo, xs, ctxs))

    def with_context(ctxs):
        return map_with_context(executor, echo, xs, ctxs=ctxs)

    runs = {"bare": bare, "map_with_context": with_context}
    times: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for repeat in range(repeats + WARMUP_CALLS):
        order = list(runs) if repeat % 2 == 0 else list(runs)[::-1]
        for name in order:
            ctxs = [EvaluateContext() for _ in xs]
            start = time.perf_counter()
            results[name] = runs[name](ctxs)
            elapsed = (time.perf_counter() - start) / MAP_CALLS
            if repeat >= WARMUP_CALLS:
                times[name].append(elapsed)
            if results[name] != xs or any(c.loss != x for c, x in zip(ctxs, xs)):
                raise RuntimeError(f"{name} returned wrong results or contexts")
    return {
        "serial_loss": float(sum(results["bare"])),
        "losses": {"map_with_context": float(sum(results["map_with_context"]))},
        "metrics": {
            "map_with_context": metric("us_per_call", times["map_with_context"]),
            "bare executor.map": metric("us_per_call", times["bare"]),
            "map_with_context / bare": metric(
                "ratio_to_bare", times["map_with_context"], times["bare"]
            ),
        },
    }


# -- MPIWrapperCOB cases ------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mpi_case(cob, repeats: int, relative: bool, idle_seconds: float) -> dict | None:
    """MPIWrapperCOB against the serial objective on rank 0; ``None`` on the worker ranks.

    Every rank builds the objective and the wrapper; the other ranks run ``worker_loop`` until
    rank 0 leaves the ``with`` block (upstream: an ABORT broadcast). With ``idle_seconds``,
    rank 0 then waits that long after its last call and reads a worker rank's CPU time.
    """
    from mpi4py import MPI

    from chemfit.mpi_wrapper_cob import MPIWrapperCOB

    world = MPI.COMM_WORLD
    with MPIWrapperCOB(cob) as mpi:
        pids = world.gather(os.getpid(), root=0)
        if mpi.rank != 0:
            mpi.worker_loop()
            return None
        serial_loss = call(cob)
        for _ in range(WARMUP_CALLS):
            loss = call(mpi)
        times = interleaved({"serial": cob, "mpi": mpi}, repeats)
        serial = times.pop("serial")
        metrics = wrapper_metrics({"MPIWrapperCOB": times["mpi"]}, serial, relative)
        if idle_seconds > 0 and len(pids) > 1:
            time.sleep(0.2)
            before = cpu_seconds(pids[1])
            start = time.perf_counter()
            time.sleep(idle_seconds)
            used = (cpu_seconds(pids[1]) - before) / (time.perf_counter() - start)
            metrics["idle worker rank"] = metric("cpu_fraction", [used])
    return {
        "serial_loss": serial_loss,
        "losses": {"MPIWrapperCOB": loss},
        "metrics": metrics,
        "ranks": len(pids),
    }


# -- the cases ----------------------------------------------------------------------------------


def cheap_cob(args) -> CombinedObjectiveFunction:
    return build_cob("python", N_CHEAP, args.cheap_iters)


def expensive_cob(args, kind: str) -> CombinedObjectiveFunction:
    return build_cob(kind, N_EXPENSIVE, getattr(args, f"{kind}_iters"))


# name: (description, runner(args) -> dict | None, launched under mpiexec)
CASES: dict = {
    "mpi_cheap": (
        f"MPIWrapperCOB, mpiexec -n 2, {N_CHEAP} cheap terms; idle worker CPU after the calls",
        lambda a: mpi_case(cheap_cob(a), a.repeats * CHEAP_REPEAT_FACTOR, False, a.idle_seconds),
        True,
    ),
    "mpi_numpy": (
        f"MPIWrapperCOB, mpiexec -n 2, {N_EXPENSIVE} numpy terms of ~11 ms",
        lambda a: mpi_case(expensive_cob(a, "numpy"), a.repeats, True, 0),
        True,
    ),
    "mpi_python": (
        f"MPIWrapperCOB, mpiexec -n 2, {N_EXPENSIVE} pure-Python terms of ~11 ms",
        lambda a: mpi_case(expensive_cob(a, "python"), a.repeats, True, 0),
        True,
    ),
    "pool_numpy": (
        f"ExecutorWrapperCOB, ProcessPoolExecutor(2), {N_EXPENSIVE} numpy terms of ~11 ms",
        lambda a: wrapper_case("process", expensive_cob(a, "numpy"), a.repeats, True),
        False,
    ),
    "pool_python": (
        f"ExecutorWrapperCOB, ProcessPoolExecutor(2), {N_EXPENSIVE} pure-Python terms of ~11 ms",
        lambda a: wrapper_case("process", expensive_cob(a, "python"), a.repeats, True),
        False,
    ),
    "loky_numpy": (
        f"ExecutorWrapperCOB, loky get_reusable_executor(2), {N_EXPENSIVE} numpy terms of ~11 ms",
        lambda a: wrapper_case("loky", expensive_cob(a, "numpy"), a.repeats, True),
        False,
    ),
    "loky_python": (
        f"ExecutorWrapperCOB, loky get_reusable_executor(2), {N_EXPENSIVE} pure-Python terms",
        lambda a: wrapper_case("loky", expensive_cob(a, "python"), a.repeats, True),
        False,
    ),
    "cheap_pool": (
        f"ExecutorWrapperCOB, ProcessPoolExecutor(2), {N_CHEAP} cheap terms",
        lambda a: wrapper_case("process", cheap_cob(a), a.repeats * CHEAP_REPEAT_FACTOR, False),
        False,
    ),
    "cheap_loky": (
        f"ExecutorWrapperCOB, loky get_reusable_executor(2), {N_CHEAP} cheap terms",
        lambda a: wrapper_case("loky", cheap_cob(a), a.repeats * CHEAP_REPEAT_FACTOR, False),
        False,
    ),
    "own_executor_map": (
        f"map_with_context on the caller's own in-process executor, {MAP_CALLS} calls per map",
        lambda a: own_executor_map(a.repeats * CHEAP_REPEAT_FACTOR),
        False,
    ),
    "own_executor_cob": (
        f"ExecutorWrapperCOB on the caller's own in-process executor, {N_CHEAP} cheap terms",
        lambda a: wrapper_case("own", cheap_cob(a), a.repeats * CHEAP_REPEAT_FACTOR, False),
        False,
    ),
}


def package_info() -> dict:
    import chemfit

    return {
        "version": getattr(chemfit, "__version__", None) or metadata.version("chemfit"),
        "path": str(Path(chemfit.executor_wrapper_cob.__file__).resolve().parent),
        "python": sys.executable,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=["calibrate", "list", *CASES])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--numpy-iters", type=int)
    parser.add_argument("--python-iters", type=int)
    parser.add_argument("--cheap-iters", type=int)
    parser.add_argument("--idle-seconds", type=float, default=1.0)
    args = parser.parse_args()
    if args.case == "calibrate":
        print(json.dumps(calibration()), flush=True)
        return 0
    if args.case == "list":
        print(json.dumps({name: [spec[0], spec[2]] for name, spec in CASES.items()}), flush=True)
        return 0
    if None in (args.numpy_iters, args.python_iters, args.cheap_iters):
        for key, value in calibration().items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    description, runner, under_mpi = CASES[args.case]
    try:
        result = runner(args)
    except BaseException:
        if not under_mpi:
            raise
        import traceback

        from mpi4py import MPI

        traceback.print_exc()
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)  # do not leave the other ranks waiting
        os._exit(1)  # MPICH's Abort can return on the calling rank before it is killed
    if result is None:  # an MPI worker rank
        return 0
    result.update(
        case=args.case,
        description=description,
        package=package_info(),
        repeats=args.repeats,
        iterations={k: getattr(args, k) for k in ("numpy_iters", "python_iters", "cheap_iters")},
    )
    for entry in result["metrics"].values():
        entry.update(summarize(entry["kind"], entry["seconds"], entry.get("reference")))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
