"""Benchmark MPIWrapperCOB: latency, speed-up and the CPU a waiting worker rank uses.

Run it as ``.venv/bin/python benchmarks/bench_mpi_wrapper_cob.py`` (it relaunches itself under
``mpiexec -n 2`` of the interpreter's venv; ``--ranks N`` for another size). Cases, the same on
every rank (sizes calibrated on rank 0 at start-up and broadcast):

* ``cheap``: 100 terms of a few microseconds; ms per call, serial and MPI;
* ``cheap_fit``: the same objective in a fit: nevergrad's ``NgIohTuned`` asks and tells on
  rank 0 between two calls (about 1-10 ms); ms per call, without the ask and tell;
* ``numpy`` and ``python``: 8 terms of about 11 ms each (a loop of small numpy operations; a
  pure-Python arithmetic loop); ``speedup`` = serial time / MPI time in the same process;
* ``idle``: CPU % of a core used by each worker rank while rank 0 sleeps after a call, over the
  first 0.5 s and over the first 2 s (from ``/proc/<pid>/schedstat``, in ns).

Each repeat times a block of serial calls, then a block of MPI calls (the blocks alternate);
the report gives min and median over ``--repeats``, and the MPI side's first call of a block
(its workers have been idle during the serial block) apart from the others. Rank 0 prints one JSON document on stdout
and a short table on stderr.

The script imports only module paths that chemfit 3.1.1 has too, so ``--python
/path/to/upstream-venv/bin/python`` runs the same cases against upstream (whose worker ranks
block in ``comm.bcast`` and show about 100 % idle CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from chemfit.abstract_objective_function import EvaluateContext, ObjectiveFunctor

N_CHEAP = 100
N_EXPENSIVE = 8
TERM_SECONDS = 11e-3
PARAMS = {"x": 0.3}


class CheapTerm(ObjectiveFunctor):
    """A term of a few microseconds."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, parameters, ctx=None):
        value = (parameters["x"] - 0.01 * self.index) ** 2
        if ctx is not None:
            ctx.parameters = parameters
            ctx.loss = value
        return value


class NumpyTerm(ObjectiveFunctor):
    """``n_iter`` rounds of small numpy operations (no BLAS, so no BLAS threads)."""

    def __init__(self, index: int, n_iter: int) -> None:
        self.index = index
        self.n_iter = n_iter

    def __call__(self, parameters, ctx=None):
        # the values stay near 1 (a contracting map would reach subnormal numbers, whose
        # arithmetic is many times slower, and make the time depend on n_iter)
        shift = 0.5 + parameters["x"]
        a = np.linspace(0.0, 1.0, 32) + shift
        for _ in range(self.n_iter):
            a = np.cos(a) * 0.5 + shift
        value = float(a.sum()) + self.index
        if ctx is not None:
            ctx.parameters = parameters
            ctx.loss = value
        return value


class PythonTerm(ObjectiveFunctor):
    """``n_iter`` rounds of pure-Python arithmetic."""

    def __init__(self, index: int, n_iter: int) -> None:
        self.index = index
        self.n_iter = n_iter

    def __call__(self, parameters, ctx=None):
        s = parameters["x"]
        for i in range(self.n_iter):
            s = (s * 1.000001 + i) % 97.0
        value = s + self.index
        if ctx is not None:
            ctx.parameters = parameters
            ctx.loss = value
        return value


def calibrate(term_class, seconds: float) -> int:
    """Iterations of ``term_class`` that take about ``seconds`` (best of 3 runs)."""
    n_iter = 100
    while True:
        best = min(_time_once(term_class(0, n_iter)) for _ in range(3))
        if best > 0.02 * seconds:
            break
        n_iter *= 4
    n_iter = max(1, round(n_iter * seconds / best))  # then refine once at about the target
    best = min(_time_once(term_class(0, n_iter)) for _ in range(3))
    return max(1, round(n_iter * seconds / best))


def _time_once(term) -> float:
    t0 = time.perf_counter()
    term(PARAMS)
    return time.perf_counter() - t0


def on_cpu_seconds(pid: int) -> float:
    """CPU time of process ``pid`` (all its threads): schedstat's ns, else stat's ticks."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except OSError:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "n": len(values)}


class AskTell:
    """Candidates from nevergrad's ``NgIohTuned`` (as ``Fitter.fit_nevergrad`` uses by default):
    its ask and tell run on rank 0 between two calls, as in a fit."""

    def __init__(self, budget: int) -> None:
        import nevergrad as ng

        parametrization = ng.p.Array(init=[PARAMS["x"], 0.0]).set_bounds(-5.0, 5.0)
        parametrization.random_state.seed(0)
        self.optimizer = ng.optimizers.NgIohTuned(parametrization=parametrization, budget=budget)
        self.candidate = None

    def ask(self) -> dict:
        with warnings.catch_warnings():  # its COBYLA warns about its own settings
            warnings.simplefilter("ignore")
            self.candidate = self.optimizer.ask()
        return {"x": float(self.candidate.value[0])}

    def tell(self, value: float) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.optimizer.tell(self.candidate, value)


def time_calls(call, n_calls: int, fit: bool) -> list[float]:
    """Seconds of each ``call(params)`` of ``n_calls`` calls; with ``fit``, an optimizer's ask
    and tell (not timed) run before and after each call."""
    optimizer = AskTell(n_calls) if fit else None
    times = []
    for _ in range(n_calls):
        params = PARAMS if optimizer is None else optimizer.ask()
        t0 = time.perf_counter()
        value = call(params)
        times.append(time.perf_counter() - t0)
        if optimizer is not None:
            optimizer.tell(value)
    return times


def compare(serial_call, mpi_call, repeats: int, n_calls: int, fit: bool = False) -> dict:
    """Alternate a block of serial calls and a block of MPI calls ``repeats`` times.

    Besides the mean per call, the MPI side reports its first call of each block apart from
    the others: after the serial block the worker ranks have been idle, and sleep.
    """
    serial_call(PARAMS)
    mpi_call(PARAMS)
    serial, parallel, ratios, first, rest = [], [], [], [], []
    for _ in range(repeats):
        s = statistics.fmean(time_calls(serial_call, n_calls, fit))
        times = time_calls(mpi_call, n_calls, fit)
        m = statistics.fmean(times)
        serial.append(s * 1e3)
        parallel.append(m * 1e3)
        ratios.append(s / m)
        first.append(times[0] * 1e3)
        rest.append(statistics.fmean(times[1:]) * 1e3)
    return {
        "serial_ms": summary(serial),
        "mpi_ms": summary(parallel),
        "speedup": summary(ratios),
        "mpi_first_call_ms": summary(first),
        "mpi_other_calls_ms": summary(rest),
    }


def idle_cpu(mpi, worker_pids: list[int], windows: tuple[float, ...]) -> dict:
    """CPU % of a core used by the busiest worker in the first ``windows`` seconds after a
    call, while rank 0 sleeps (as between two fits)."""
    mpi(PARAMS, EvaluateContext())
    start = time.perf_counter()
    before = {pid: on_cpu_seconds(pid) for pid in worker_pids}
    out = {}
    for window in windows:
        time.sleep(max(0.0, start + window - time.perf_counter()))
        elapsed = time.perf_counter() - start
        used = [on_cpu_seconds(pid) - before[pid] for pid in worker_pids]
        out[f"{window:g}s"] = max(100.0 * u / elapsed for u in used)
    return out


def run_case(name: str, mpi, serial_cob, args) -> dict:
    """The figures of one objective: its cases, timed serially and through ``mpi``."""
    assert serial_cob(PARAMS) == mpi(PARAMS), f"{name}: MPI value differs from the serial one"

    def serial_call(params):
        return serial_cob(params, EvaluateContext())

    def mpi_call(params):
        return mpi(params, EvaluateContext())

    cases = {}
    if name == "cheap":
        cases["cheap"] = compare(serial_call, mpi_call, args.repeats, 100)
        if "cheap_fit" in args.cases:
            cases["cheap_fit"] = compare(serial_call, mpi_call, args.repeats, 30, fit=True)
    else:
        cases[name] = compare(serial_call, mpi_call, args.repeats, 3)
    for case in cases.values():
        case["bytes_per_call"] = getattr(mpi, "last_call_bytes_sent", None)
    return cases


def run_mpi(args) -> None:
    from mpi4py import MPI

    from chemfit.combined_objective_function import CombinedObjectiveFunction
    from chemfit.mpi_wrapper_cob import MPIWrapperCOB

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    calibration = None
    if rank == 0:
        calibration = {
            name: args.iterations.get(name) or calibrate(term_class, TERM_SECONDS)
            for name, term_class in (("numpy", NumpyTerm), ("python", PythonTerm))
        }
    calibration = world.bcast(calibration, root=0)
    worker_pids = world.gather(os.getpid(), root=0)
    builders = {
        "numpy": lambda: [NumpyTerm(i, calibration["numpy"]) for i in range(N_EXPENSIVE)],
        "python": lambda: [PythonTerm(i, calibration["python"]) for i in range(N_EXPENSIVE)],
        "cheap": lambda: [CheapTerm(i) for i in range(N_CHEAP)],
    }
    names = [name for name in builders if name in args.cases] or ["cheap"]
    report: dict = {"cases": {}}
    for name in names:
        with MPIWrapperCOB(CombinedObjectiveFunction(builders[name]())) as mpi:
            if rank != 0:
                mpi.worker_loop()
                continue
            serial_cob = CombinedObjectiveFunction(builders[name]())
            report["cases"].update(run_case(name, mpi, serial_cob, args))
            if name == names[-1] and "idle" in args.cases:
                runs = [
                    idle_cpu(mpi, worker_pids[1:], (0.5, 2.0)) for _ in range(args.idle_repeats)
                ]
                report["idle_cpu_pct"] = {key: summary([r[key] for r in runs]) for key in runs[0]}
    if rank == 0:
        import chemfit

        report.update(
            ranks=size,
            chemfit=getattr(chemfit, "__version__", "3.1.1 or older (no __version__)"),
            chemfit_path=str(Path(chemfit.__file__).parent),
            calibration=calibration,
            threads_env={k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")},
        )
        print(json.dumps(report, indent=2), flush=True)
        print_table(report)


def print_table(report: dict) -> None:
    lines = [f"chemfit {report['chemfit']} ({report['chemfit_path']}), {report['ranks']} ranks"]
    for name, case in report["cases"].items():
        m, s, r = case["mpi_ms"], case["serial_ms"], case["speedup"]
        first, other = case["mpi_first_call_ms"]["median"], case["mpi_other_calls_ms"]["median"]
        lines.append(
            f"  {name:10s} MPI ms/call min {m['min']:7.3f} median {m['median']:7.3f} (first of a "
            f"block {first:7.3f}, others {other:7.3f}) | serial median {s['median']:7.3f} | "
            f"speed-up min {r['min']:.2f} median {r['median']:.2f}"
        )
    for window, values in report.get("idle_cpu_pct", {}).items():
        lines.append(
            f"  idle worker CPU % of a core over the first {window} after a call: "
            f"min {values['min']:.1f} median {values['median']:.1f}"
        )
    print("\n".join(lines), file=sys.stderr, flush=True)


def launch(args) -> int:
    python = args.python or sys.executable
    mpiexec = Path(python).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(args.ranks), python, __file__, *sys.argv[1:]]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"benchmark timed out after {args.timeout} s", file=sys.stderr)
        return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--idle-repeats", type=int, default=3)
    parser.add_argument(
        "--cases",
        default="numpy,python,cheap,cheap_fit,idle",
        type=lambda s: s.split(","),
        help="comma-separated subset of numpy,python,cheap,cheap_fit,idle",
    )
    parser.add_argument(
        "--iterations",
        default={},
        type=lambda s: {k: int(v) for k, v in (item.split("=") for item in s.split(","))},
        help="loop sizes of the expensive terms instead of calibrating, e.g. numpy=7000,"
        "python=150000 (the same on both sides of a comparison)",
    )
    parser.add_argument("--python", help="interpreter for the ranks (default: this one)")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    under_mpi = any(k in os.environ for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not under_mpi:
        return launch(args)
    try:
        run_mpi(args)
    except BaseException:
        import traceback

        from mpi4py import MPI

        traceback.print_exc()
        MPI.COMM_WORLD.Abort(1)  # do not leave the other ranks waiting
    return 0


if __name__ == "__main__":
    sys.exit(main())
