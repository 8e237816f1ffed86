"""Benchmark MPIWrapperCOB against a serial combined objective, and a waiting worker's CPU use.

Run it as ``.venv/bin/python benchmarks/bench_mpi_wrapper_cob.py`` (it relaunches itself with
the venv's ``mpiexec -n 2``, or ``--ranks N``), or directly as
``.venv/bin/mpiexec -n 2 .venv/bin/python benchmarks/bench_mpi_wrapper_cob.py``. Rank 0 prints
one JSON document:

* ``expensive``: 8 terms of about 20 ms CPU each; ``speedup`` = serial median / MPI median
  (target >= 1.8 on 2 ranks);
* ``cheap``: 100 terms of about 50 us each; ``slowdown`` = MPI median / serial median (target
  <= 1.25);
* ``idle_worker_cpu``: CPU seconds a worker rank used while rank 0 slept for 1 s, in
  ``worker_loop`` (this module's polling) and, for comparison, in a plain blocking
  ``comm.recv`` (MPICH busy-polls there).
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
from pathlib import Path

from chemfit.core.objectives import ObjectiveFunctor


def spin_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def spin_wall(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class BusyTerm(ObjectiveFunctor):
    """A term doing ``seconds`` of CPU work; its value depends only on the parameters."""

    def __init__(self, index: int, seconds: float, cpu_clock: bool) -> None:
        self.index = index
        self.seconds = seconds
        self.cpu_clock = cpu_clock

    def __call__(self, parameters, ctx=None):
        (spin_cpu if self.cpu_clock else spin_wall)(self.seconds)
        if ctx is not None:
            ctx.parameters = parameters
            ctx.meta["pid"] = os.getpid()
            value = (parameters["x"] - self.index) ** 2
            ctx.loss = value
        return (parameters["x"] - self.index) ** 2


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timings(func, repeats: int) -> dict:
    func()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return {"min": min(times), "median": statistics.median(times), "repeats": repeats}


def run_mpi(repeats: int) -> None:
    from mpi4py import MPI

    from chemfit.core.combined import CombinedObjectiveFunction
    from chemfit.core.context import EvaluateContext
    from chemfit.execution.mpi_wrapper_cob import MPIWrapperCOB, slice_up_range

    def build(n_terms: int, seconds: float, cpu_clock: bool) -> CombinedObjectiveFunction:
        return CombinedObjectiveFunction([BusyTerm(i, seconds, cpu_clock) for i in range(n_terms)])

    # "cheap" comes last: its wrapper stays open for the idle measurement.
    cases = {"expensive": (8, 20e-3, True), "cheap": (100, 50e-6, False)}
    wrappers = {name: MPIWrapperCOB(build(*spec)) for name, spec in cases.items()}
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    if rank != 0:
        for wrapper in wrappers.values():
            wrapper.worker_loop()
            wrapper.close()
        world.recv(source=0, tag=99)  # blocking receive: the comparison for the idle CPU
        return

    report: dict = {"ranks": size, "cases": {}}
    params = {"x": 0.3}
    for name, (n_terms, seconds, cpu_clock) in cases.items():
        serial_cob = build(n_terms, seconds, cpu_clock)
        mpi = wrappers[name]
        serial = timings(lambda cob=serial_cob: cob(params, EvaluateContext()), repeats)
        parallel = timings(lambda mpi=mpi: mpi(params, EvaluateContext()), repeats)
        assert serial_cob(params) == mpi(params), "MPI value differs from the serial one"
        report["cases"][name] = {
            "n_terms": n_terms,
            "term_seconds": seconds,
            "serial": serial,
            "mpi": parallel,
            "speedup": serial["median"] / parallel["median"],
            "slowdown": parallel["median"] / serial["median"],
            "bytes_per_call": mpi.last_call_bytes_sent,
        }
        if name != "cheap":  # the workers serve the wrappers one after another
            mpi.close()

    mpi = wrappers["cheap"]
    ctx = EvaluateContext()
    mpi(params, ctx)
    worker_start = list(slice_up_range(100, size))[1][0]
    worker_pid = ctx.meta["children"][worker_start]["meta"]["pid"]
    time.sleep(0.2)
    before = cpu_seconds(worker_pid)
    time.sleep(1.0)
    polling = cpu_seconds(worker_pid) - before
    mpi.close()
    time.sleep(0.2)  # the workers are now blocked in world.recv
    before = cpu_seconds(worker_pid)
    time.sleep(1.0)
    blocking = cpu_seconds(worker_pid) - before
    for dest in range(1, size):
        world.send(None, dest=dest, tag=99)
    report["idle_worker_cpu"] = {
        "worker_loop_cpu_seconds_per_s": polling,
        "blocking_recv_cpu_seconds_per_s": blocking,
    }
    print(json.dumps(report, indent=2), flush=True)


def launch(ranks: int, repeats: int, timeout: float) -> int:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    cmd = [str(mpiexec), "-n", str(ranks), sys.executable, __file__, "--repeats", str(repeats)]
    proc = subprocess.Popen(cmd, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"benchmark timed out after {timeout} s", file=sys.stderr)
        return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    under_mpi = any(k in os.environ for k in ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))
    if not under_mpi:
        return launch(args.ranks, args.repeats, args.timeout)
    try:
        run_mpi(args.repeats)
    except BaseException:
        import traceback

        from mpi4py import MPI

        traceback.print_exc()
        MPI.COMM_WORLD.Abort(1)  # do not leave the other ranks waiting
    return 0


if __name__ == "__main__":
    sys.exit(main())
