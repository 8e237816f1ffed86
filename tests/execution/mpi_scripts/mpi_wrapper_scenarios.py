"""MPIWrapperCOB scenarios, run under ``mpiexec`` by ``tests/execution/test_mpi_wrapper_cob.py``.

Usage: ``mpiexec -n N python mpi_wrapper_scenarios.py SCENARIO``. Every rank builds the same
objectives; rank 0 drives them and prints one JSON line ``RESULT {...}`` with what it observed,
the other ranks serve in ``worker_loop()``. The serial reference values are computed on rank 0
in the same process, so "equal to serial" means bitwise equal floats and equal ``repr`` of meta.

A term's behaviour is steered by the parameters: ``params["fail"] = [term_index, kind]`` makes
that term fail in the given way on whichever rank evaluates it; ``params["also_fail"]`` adds a
second failing term.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from types import SimpleNamespace
from typing import Any

from mpi4py import MPI

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import NotPicklableError, RemoteEvaluationError
from chemfit.core.objectives import ObjectiveFunctor
from chemfit.execution.mpi_wrapper_cob import MPIWrapperCOB

WORLD = MPI.COMM_WORLD
RANK = WORLD.Get_rank()


class TermFailure(ValueError):
    """A picklable exception raised by a term on request."""


class UnpicklableFailure(RuntimeError):
    """An exception that cannot be pickled (it holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


class SkipMe(Exception):
    """Tells the scenario's exception handler to skip the term."""


if RANK == 0:

    class OnlyOnRank0:
        """Pickled by reference to ``__main__``; the other ranks cannot load it."""

else:

    class OnlyOnWorkers:
        """Pickled by reference to ``__main__``; rank 0 cannot load it."""


class Term(ObjectiveFunctor):
    """A term with quantities, meta and failure modes; its value depends on its index."""

    def __init__(self, index: int) -> None:
        self.index = index

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = EvaluateContext() if ctx is None else ctx
        ctx.parameters = parameters
        fails = [parameters.get("fail"), parameters.get("also_fail")]
        kind = next((f[1] for f in fails if f is not None and f[0] == self.index), None)
        if kind is not None:
            if kind == "raise":
                raise TermFailure(f"term {self.index} failed on purpose")
            if kind == "unpicklable":
                raise UnpicklableFailure(f"term {self.index} raised an unpicklable error")
            if kind == "meta":
                ctx.meta["lock"] = threading.Lock()
            if kind == "skip":
                raise SkipMe(f"skip term {self.index}")
            if kind == "slow":
                time.sleep(0.5)
            if kind == "worker_class":
                ctx.meta["thing"] = OnlyOnWorkers()
        x = parameters["x"]
        y = math.sin(x * (self.index + 1.1)) + 0.1 * (x - self.index) ** 2
        # what the parent context passes down: its shared data and (copied) config
        y = y * getattr(ctx.shared, "scale", 1.0) + getattr(ctx.config, "offset", 0.0)
        ctx.quantities = {"y": y, "label": getattr(ctx.config, "label", None)}
        ctx.meta["term"] = self.index
        if parameters.get("record_pid"):
            ctx.meta["pid"] = os.getpid()
        ctx.loss = y * y + 0.3
        return ctx.loss


def configurator(idx_child_ctx, child_ctx, num_children, parent_ctx):
    fail = (parent_ctx.parameters or {}).get("fail")
    if fail is not None and fail[0] == "configurator":
        raise TermFailure("the configurator failed on purpose")
    child_ctx.config.label = f"{idx_child_ctx}/{num_children}"
    child_ctx.meta["configured_idx"] = idx_child_ctx
    parent_ctx.meta["configured"] = parent_ctx.meta.get("configured", 0) + 1


def aggregator(terms, quantities, ctx):
    if (ctx.parameters or {}).get("fail") == ["reduction", "raise"]:
        raise TermFailure("the reduction failed on purpose")
    ys = [0.0 if q is None else q["y"] for q in quantities]  # a nested COB has no quantities
    return sum(t * (1.0 + 0.01 * y) for t, y in zip(terms, ys))


def skip_handler(exception, ctx, idx):
    if isinstance(exception, SkipMe):
        return None
    raise exception


def make_cob(n_terms: int, cls: type = CombinedObjectiveFunction, configured: bool = True) -> Any:
    """``n_terms`` terms; the second one (if any) is a nested COB of two terms. Without
    ``configured`` neither has a child-context configurator, so the workers spawn the children
    of their slice themselves."""
    own = configurator if configured else None
    terms: list[Any] = []
    for i in range(n_terms):
        if i == 1:
            inner = CombinedObjectiveFunction(
                [Term(100), Term(101)], weights=[0.5, 1.5], child_context_configurator=own
            )
            terms.append(inner)
        else:
            terms.append(Term(i))
    weights = [0.7 + 0.13 * i for i in range(n_terms)]
    return cls(
        terms,
        weights=weights,
        child_context_configurator=own,
        reduction=aggregator,
        exception_handler=skip_handler,
    )


class OffsetCOB(CombinedObjectiveFunction):
    """A recipe step overridden: every child copies the offset put into the parent's config."""

    def prepare_context(self, parameters, ctx=None):
        ctx = super().prepare_context(parameters, ctx)
        ctx.config.offset = 0.25
        return ctx


def parent_context() -> EvaluateContext:
    """A parent context whose config and shared data the terms read."""
    return EvaluateContext(config=SimpleNamespace(offset=-0.5), shared=SimpleNamespace(scale=3.0))


# -- helpers used on rank 0 ---------------------------------------------------------------------


def same_as_serial(
    mpi: MPIWrapperCOB, serial: CombinedObjectiveFunction, params: dict, make_ctx=EvaluateContext
) -> dict:
    ctx_serial, ctx_mpi = make_ctx(), make_ctx()
    value_serial = serial(params, ctx_serial)
    value_mpi = mpi(params, ctx_mpi)
    return {
        "value_serial": value_serial.hex(),
        "value_mpi": float(value_mpi).hex(),
        "meta_equal": repr(ctx_serial.meta) == repr(ctx_mpi.meta),
        "loss_equal": ctx_serial.loss == ctx_mpi.loss,
        "meta_mpi": repr(ctx_mpi.meta) if repr(ctx_serial.meta) != repr(ctx_mpi.meta) else "",
        "meta_serial": repr(ctx_serial.meta) if repr(ctx_serial.meta) != repr(ctx_mpi.meta) else "",
        "skipped": ctx_mpi.meta.get("skipped_indices"),
        "n_terms": ctx_mpi.meta.get("n_terms"),
    }


def failure(mpi: MPIWrapperCOB, params: dict, ctx: EvaluateContext | None = None) -> dict:
    """Call, expecting an exception; describe it."""
    t0 = time.perf_counter()
    try:
        mpi(params, EvaluateContext() if ctx is None else ctx)
    except BaseException as exc:
        cause = exc.__cause__
        info = {
            "type": type(exc).__name__,
            "message": str(exc).splitlines()[0] if str(exc) else "",
            "is_remote_error": isinstance(exc, RemoteEvaluationError),
            "is_not_picklable": isinstance(exc, NotPicklableError),
            "cause_type": type(cause).__name__ if cause is not None else None,
            "seconds": time.perf_counter() - t0,
        }
        remote = exc if isinstance(exc, RemoteEvaluationError) else cause
        if isinstance(remote, RemoteEvaluationError):
            info.update(
                rank=remote.rank,
                term_index=remote.term_index,
                type_name=remote.type_name,
                remote_message=remote.remote_message,
                has_traceback="Traceback" in remote.remote_traceback,
            )
        return info
    return {"type": None}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle_worker_cpu(mpi: MPIWrapperCOB, n_terms: int, rank: int) -> dict:
    ctx = EvaluateContext()
    mpi({"x": 0.5, "record_pid": True}, ctx)
    start, _ = list(slice_up(n_terms, mpi.size))[rank]
    pid = ctx.meta["children"][start]["meta"]["pid"]
    # from right after the call (the worker still polls without sleeping for a while) over 2 s
    t0, cpu0 = time.perf_counter(), cpu_seconds(pid)
    time.sleep(0.1)
    before = cpu_seconds(pid)
    time.sleep(1.0)
    after = cpu_seconds(pid)
    time.sleep(max(0.0, t0 + 2.0 - time.perf_counter()))
    elapsed, cpu2 = time.perf_counter() - t0, cpu_seconds(pid)
    return {
        "pid_differs": pid != os.getpid(),
        "cpu_fraction": after - before,  # CPU seconds over the 1 s from 0.1 s after the call
        "cpu_fraction_2s": (cpu2 - cpu0) / elapsed,  # over the first 2 s after the call
    }


def slice_up(n, size):
    from chemfit.execution.mpi_wrapper_cob import slice_up_range

    return slice_up_range(n, size)


class Interrupted(Exception):
    pass


def interrupted_call(mpi: MPIWrapperCOB) -> str:
    """Interrupt rank 0 (a signal handler raising) while it waits for a slow worker."""
    import signal

    def handler(signum, frame):
        raise Interrupted("interrupted while waiting")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.1)
    try:
        mpi({"x": 1.0, "fail": [5, "slow"]}, EvaluateContext())
    except Interrupted as exc:
        return str(exc)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return "not interrupted"


def bytes_per_call(mpi: MPIWrapperCOB, n_calls: int) -> list[int]:
    ctx = EvaluateContext()  # reused without reset: its meta grows "children" every call
    sizes = []
    for i in range(n_calls):
        mpi({"x": 0.1 * i}, ctx)
        sizes.append(mpi.last_call_bytes_sent)
    return sizes


# -- scenarios ----------------------------------------------------------------------------------


def scenario_two_ranks() -> dict | None:
    cob = make_cob(6)
    # rank 1 builds a different objective for the term-count check
    mismatched = make_cob(6 if RANK == 0 else 5)
    with MPIWrapperCOB(cob) as mpi, MPIWrapperCOB(mismatched, mpi_debug_log=True) as bad:
        if RANK != 0:
            mpi.worker_loop()
            bad.worker_loop()
            return None
        out: dict[str, Any] = {"size": mpi.size, "serialises_calls": mpi.serialises_calls}
        serial = make_cob(6)
        out["equal"] = [same_as_serial(mpi, serial, {"x": x}) for x in (0.3, 1.7, -2.2)]
        out["skip"] = same_as_serial(mpi, serial, {"x": 0.9, "fail": [4, "skip"]})
        out["raise_rank1"] = failure(mpi, {"x": 1.0, "fail": [4, "raise"]})
        out["after_raise"] = same_as_serial(mpi, serial, {"x": 1.1})
        out["unpicklable_rank1"] = failure(mpi, {"x": 1.0, "fail": [5, "unpicklable"]})
        out["meta_rank1"] = failure(mpi, {"x": 1.0, "fail": [3, "meta"]})
        out["request_unloadable"] = failure(mpi, {"x": 1.0, "thing": OnlyOnRank0()})
        out["reply_unloadable"] = failure(mpi, {"x": 1.0, "fail": [5, "worker_class"]})
        out["raise_rank0"] = failure(mpi, {"x": 1.0, "fail": [0, "raise"]})
        out["configurator"] = failure(mpi, {"x": 1.0, "fail": ["configurator", "raise"]})
        out["reduction"] = failure(mpi, {"x": 1.0, "fail": ["reduction", "raise"]})
        out["after_rank0_failures"] = same_as_serial(mpi, serial, {"x": 1.2})
        out["interrupted"] = interrupted_call(mpi)
        out["after_interrupt"] = same_as_serial(mpi, serial, {"x": 1.3})
        out["bytes_per_call"] = bytes_per_call(mpi, 5)
        out["idle"] = idle_worker_cpu(mpi, 6, 1)

        # R10: concurrent callers are served one at a time, each with the serial value
        params = [{"x": 0.05 * i} for i in range(12)]
        expected = [serial(p).hex() for p in params]
        got: dict[int, str] = {}

        def work(indices):
            for i in indices:
                got[i] = mpi(params[i], EvaluateContext()).hex()

        threads = [threading.Thread(target=work, args=(range(k, 12, 3),)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["threads_equal"] = [got[i] for i in range(12)] == expected

        mpi.release_workers()
        mpi.release_workers()  # idempotent
        out["released"] = True
        try:
            mpi({"x": 1.0})
        except RuntimeError as exc:
            out["after_release"] = str(exc)

        records: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        logging.getLogger("chemfit.execution.mpi_wrapper_cob").addHandler(Collect())
        out["mismatch"] = failure(bad, {"x": 1.0})
        out["debug_log"] = [r for r in records if r.startswith("[Rank 0]")][:3]
        return out


def scenario_three_ranks() -> dict | None:
    few, many = make_cob(2), make_cob(5)
    with MPIWrapperCOB(few) as mpi_few, MPIWrapperCOB(many) as mpi:
        if RANK != 0:
            mpi_few.worker_loop()
            mpi.worker_loop()
            return None
        out: dict[str, Any] = {"size": mpi.size}
        serial_few, serial = make_cob(2), make_cob(5)
        out["few_equal"] = [same_as_serial(mpi_few, serial_few, {"x": x}) for x in (0.4, 2.5)]
        out["few_idle_rank2"] = mpi_few.last_call_bytes_sent
        mpi_few.close()
        # slices of 5 terms on 3 ranks: (0, 2), (2, 4), (4, 5)
        out["equal"] = [same_as_serial(mpi, serial, {"x": x}) for x in (0.3, -1.4)]
        out["raise_rank2"] = failure(mpi, {"x": 1.0, "fail": [4, "raise"]})
        out["unpicklable_rank2"] = failure(mpi, {"x": 1.0, "fail": [4, "unpicklable"]})
        out["raise_rank1"] = failure(mpi, {"x": 1.0, "fail": [3, "raise"]})
        out["raise_rank1_and_rank2"] = failure(
            mpi, {"x": 1.0, "fail": [4, "unpicklable"], "also_fail": [2, "raise"]}
        )
        out["raise_rank0_and_rank2"] = failure(
            mpi, {"x": 1.0, "fail": [4, "raise"], "also_fail": [0, "raise"]}
        )
        out["meta_rank2"] = failure(mpi, {"x": 1.0, "fail": [4, "meta"]})
        out["after_failures"] = same_as_serial(mpi, serial, {"x": 0.8})
        out["raise_rank0"] = failure(mpi, {"x": 1.0, "fail": [0, "raise"]})
        out["configurator"] = failure(mpi, {"x": 1.0, "fail": ["configurator", "raise"]})
        out["reduction"] = failure(mpi, {"x": 1.0, "fail": ["reduction", "raise"]})
        out["after_rank0_failures"] = same_as_serial(mpi, serial, {"x": 0.9})
        out["skip_rank2"] = same_as_serial(mpi, serial, {"x": 0.9, "fail": [4, "skip"]})
        return out


def scenario_fitter() -> dict | None:
    from chemfit.fitting.fitter import Fitter

    def build():
        return CombinedObjectiveFunction([Term(i) for i in range(4)], weights=[1.0, 0.5, 2.0, 1.5])

    with MPIWrapperCOB(build()) as mpi:
        if RANK != 0:
            mpi.worker_loop()
            return None
        initial = {"x": 0.4}
        fitted_mpi = Fitter(mpi, initial).fit_nevergrad(budget=20, optimizer_str="OnePlusOne")
        serial_fitter = Fitter(build(), initial)
        best_serial = serial_fitter.objective_function(fitted_mpi, EvaluateContext())
        best_mpi = mpi(fitted_mpi, EvaluateContext())

        # R10: two fitter threads share the wrapper; the fitter says candidates are serialised
        records: list[str] = []

        class Collect(logging.Handler):
            def emit(self, record):
                records.append(record.getMessage())

        chemfit_logger = logging.getLogger("chemfit")
        chemfit_logger.addHandler(Collect())
        chemfit_logger.setLevel(logging.INFO)
        threaded = Fitter(mpi, initial)
        fitted_threads = threaded.fit_nevergrad(
            budget=20, optimizer_str="OnePlusOne", num_workers=2
        )
        best = threaded.result
        return {
            "fitted": fitted_mpi,
            "finite": all(math.isfinite(v) for v in fitted_mpi.values()),
            "value_equal": best_serial == best_mpi,
            "threads_finite": all(math.isfinite(v) for v in fitted_threads.values()),
            "threads_best_equal": build()(best.best_parameters) == best.best_loss,
            "threads_n_evals": best.n_evals,
            "serialised_info": any("serialised" in r for r in records),
        }


def scenario_spawning() -> dict | None:
    """Objectives without a child-context configurator: the workers spawn their children."""
    plain, offset = make_cob(6, configured=False), make_cob(6, OffsetCOB, configured=False)
    big, few = make_cob(40, configured=False), make_cob(2, configured=False)
    with (
        MPIWrapperCOB(plain) as mpi,
        MPIWrapperCOB(offset) as mpi_offset,
        MPIWrapperCOB(big) as mpi_big,
        MPIWrapperCOB(few) as mpi_few,
    ):
        if RANK != 0:
            for wrapper in (mpi, mpi_offset, mpi_big, mpi_few):
                wrapper.worker_loop()
            return None
        out: dict[str, Any] = {"size": mpi.size}
        serial = make_cob(6, configured=False)
        out["equal"] = [
            same_as_serial(mpi, serial, {"x": x}, make_ctx)
            for x in (0.3, -1.7)
            for make_ctx in (EvaluateContext, parent_context)
        ]
        out["skip"] = same_as_serial(mpi, serial, {"x": 0.9, "fail": [5, "skip"]}, parent_context)
        # term 5 runs on the last rank, term 0 on rank 0
        out["raise_worker"] = failure(mpi, {"x": 1.0, "fail": [5, "raise"]})
        out["unpicklable_worker"] = failure(mpi, {"x": 1.0, "fail": [5, "unpicklable"]})
        out["meta_worker"] = failure(mpi, {"x": 1.0, "fail": [5, "meta"]})
        out["raise_rank0_and_worker"] = failure(
            mpi, {"x": 1.0, "fail": [5, "raise"], "also_fail": [0, "raise"]}
        )
        out["reduction"] = failure(mpi, {"x": 1.0, "fail": ["reduction", "raise"]})
        # the recipe fails before it runs the terms, after the workers' requests went out (R9)
        mpi.cob.weights.append(1.0)
        out["prepare_fails"] = failure(mpi, {"x": 1.0})
        mpi.cob.weights.pop()
        unpicklable = EvaluateContext(shared=SimpleNamespace(lock=threading.Lock()))
        out["unpicklable_shared"] = failure(mpi, {"x": 1.0}, unpicklable)
        out["interrupted"] = interrupted_call(mpi)
        out["after_failures"] = same_as_serial(mpi, serial, {"x": 1.2}, parent_context)
        # R21, and no per-term data: the same request size for 6 and for 40 terms
        out["bytes_6"] = bytes_per_call(mpi, 3)
        mpi.close()  # the workers go on to the next wrapper
        # a recipe step is overridden, so rank 0 sends the children it spawned
        out["offset_equal"] = same_as_serial(
            mpi_offset, make_cob(6, OffsetCOB, configured=False), {"x": 0.6}, parent_context
        )
        out["bytes_configured"] = bytes_per_call(mpi_offset, 1)
        mpi_offset.close()
        big_serial = make_cob(40, configured=False)
        out["big_equal"] = same_as_serial(mpi_big, big_serial, {"x": 0.4}, parent_context)
        out["bytes_40"] = bytes_per_call(mpi_big, 3)
        mpi_big.close()
        few_serial = make_cob(2, configured=False)
        out["few_equal"] = same_as_serial(mpi_few, few_serial, {"x": 0.4}, parent_context)
        out["few_bytes"] = bytes_per_call(mpi_few, 1)[0]
        return out


SCENARIOS = {
    "two_ranks": scenario_two_ranks,
    "three_ranks": scenario_three_ranks,
    "spawning": scenario_spawning,
    "fitter": scenario_fitter,
}


if __name__ == "__main__":
    try:
        result = SCENARIOS[sys.argv[1]]()
    except BaseException:
        import traceback

        traceback.print_exc()
        WORLD.Abort(1)  # end every rank now instead of leaving them waiting
    if RANK == 0:
        print("RESULT " + json.dumps(result), flush=True)
