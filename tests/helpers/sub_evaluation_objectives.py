"""Terms that run sub-evaluations of their own, for tests/execution/test_cob_sub_evaluations.py.

A term of a combined objective may spawn children of its own context (the COB's grandchildren,
and deeper). Serially they are collected into ``ctx.meta``; every parallel wrapper must give the
same ``ctx.meta``. The terms below are written as a user writes them in a notebook cell: a
functor class, a decorated function using ``ctx.child_contexts``, a decorated function using
``ctx.spawn_children`` (never collecting) and a nested combined objective of such terms.

The file is used three ways:

* imported, by the in-process tests (the terms live in this module);
* run as ``__main__``: ``python sub_evaluation_objectives.py executors`` compares
  ``ExecutorWrapperCOB`` on threads, a process pool and loky (``terms_per_task`` 1 and
  ``"auto"``) with the serial evaluation; the terms are then defined in ``__main__``;
* under MPI: ``mpiexec -n 2 python sub_evaluation_objectives.py mpi`` compares
  ``MPIWrapperCOB`` with the serial evaluation (every rank defines the terms in ``__main__``).

Both script modes print one line ``RESULT {json}``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from chemfit import CombinedObjectiveFunction, EvaluateContext, ObjectiveFunctor
from chemfit.wrap_funcs import to_objective_functor

# -- what a user writes -------------------------------------------------------------------------


def label(idx_child_ctx, child_ctx, num_children, parent_ctx):
    child_ctx.config.label = f"{idx_child_ctx}/{num_children}"


def sub_loss(params, shift, i):
    return (params["x"] * (shift + 0.37 * i) - 0.11 * params["y"]) ** 2 / 3.0


class SubEvaluations(ObjectiveFunctor):
    """Spawns ``n_sub`` children of its context and sums their losses (``depth`` 2: each child
    spawns its own); sleeps ``seconds`` so that ``terms_per_task="auto"`` can group terms."""

    def __init__(self, shift, n_sub=2, depth=1, seconds=0.0):
        self.shift = shift
        self.n_sub = n_sub
        self.depth = depth
        self.seconds = seconds

    def __call__(self, params, ctx=None):
        ctx = EvaluateContext() if ctx is None else ctx
        ctx.parameters = params
        ctx.loss = self.sub_evaluations(params, ctx, self.depth)
        ctx.meta["label"] = getattr(ctx.config, "label", None)
        if self.seconds:
            time.sleep(self.seconds)
        return ctx.loss

    def sub_evaluations(self, params, ctx, depth):
        total = 0.0
        for i, sub in enumerate(ctx.spawn_children(self.n_sub, label)):
            sub.parameters = params
            if depth > 1:
                value = self.sub_evaluations(params, sub, depth - 1)
            else:
                value = sub_loss(params, self.shift, i)
                sub.quantities = {"value": value}
            sub.loss = value
            sub.meta["label"] = sub.config.label
            total += value
        return total


@to_objective_functor(pass_ctx=True)
def in_a_block(params, ctx):
    with ctx.child_contexts(3, label) as subs:
        for i, sub in enumerate(subs):
            sub.loss = sub_loss(params, 2.5, i)
            sub.meta["i"] = i
    return sum(sub.loss for sub in subs)


@to_objective_functor(pass_ctx=True)
def spawned(params, ctx):
    total = 0.0
    for i, sub in enumerate(ctx.spawn_children(2)):
        sub.loss = sub_loss(params, 0.7, i)
        sub.meta["spawned"] = i
        total += sub.loss
    ctx.meta["n_spawned"] = 2
    return total


def build_cob():
    """Eight terms: two of 8 ms and three of 1.5 ms (so ``"auto"`` groups the cheap ones),
    a decorated function with a ``with`` block, one that only spawns, and a nested COB."""
    inner = CombinedObjectiveFunction(
        [SubEvaluations(0.9), SubEvaluations(1.3, depth=2)],
        weights=[0.3, 1.7],
        child_context_configurator=label,
    )
    terms = [
        SubEvaluations(0.5, seconds=8e-3),
        SubEvaluations(0.75, n_sub=3, depth=2, seconds=8e-3),
        SubEvaluations(1.0, seconds=1.5e-3),
        SubEvaluations(1.25, seconds=1.5e-3),
        SubEvaluations(1.5, seconds=1.5e-3),
        in_a_block,
        spawned,
        inner,
    ]
    weights = [1.651, 2.254, 2.244, 2.596, 0.865, 2.897, 1.705, 2.245]
    return CombinedObjectiveFunction(terms, weights=weights, child_context_configurator=label)


# -- comparing with the serial evaluation -------------------------------------------------------

PARAMETERS = [{"x": 0.3 + 0.17 * call, "y": 1.1 - 0.05 * call} for call in range(6)]


def compare_with_serial(evaluate, builder=None) -> dict:
    """Evaluate every point of :data:`PARAMETERS` serially and with ``evaluate(params, ctx)``.

    Returns ``{"mismatches": [...], "n_calls": ...}``: one mismatch per call whose value
    (bitwise) or ``ctx.meta`` (equal and the same ``repr``) differs from the serial one.
    """
    serial = (builder or build_cob)()
    mismatches = []
    for call, params in enumerate(PARAMETERS):
        ctx_serial, ctx = EvaluateContext(), EvaluateContext()
        expected = serial(params, ctx_serial)
        value = evaluate(params, ctx)
        if float(value).hex() != expected.hex() or not (
            ctx.meta == ctx_serial.meta and repr(ctx.meta) == repr(ctx_serial.meta)
        ):
            mismatches.append(
                {
                    "call": call,
                    "value": [float(value).hex(), expected.hex()],
                    "meta": repr(ctx.meta),
                    "serial_meta": repr(ctx_serial.meta),
                }
            )
    return {"mismatches": mismatches, "n_calls": len(PARAMETERS)}


def check_executor(executor: Any, terms_per_task: Any) -> dict:
    """:func:`compare_with_serial` for ``ExecutorWrapperCOB`` on ``executor``; also returns
    ``last_tasks`` of every call (``"auto"`` groups terms from the second call on)."""
    from chemfit.parallel_execution import ExecutorWrapperCOB

    wrapper = ExecutorWrapperCOB(build_cob(), executor, terms_per_task=terms_per_task)
    tasks = []

    def evaluate(params, ctx):
        value = wrapper(params, ctx)
        tasks.append(wrapper.last_tasks)
        return value

    result = compare_with_serial(evaluate)
    result["tasks"] = tasks
    result["n_terms"] = wrapper.cob.n_terms()
    return result


def run_executors() -> dict:
    """Threads, a process pool and loky (two workers each), ``terms_per_task`` 1 and "auto"."""
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    from chemfit.executors import make_executor

    out = {}
    with ThreadPoolExecutor(2) as threads, ProcessPoolExecutor(2) as processes:
        loky = make_executor("loky", 2)
        try:
            for name, executor in (
                ("threads", threads),
                ("process-pool", processes),
                ("loky", loky),
            ):
                for terms_per_task in (1, "auto"):
                    out[f"{name}/{terms_per_task}"] = check_executor(executor, terms_per_task)
        finally:
            loky.shutdown(wait=True, kill_workers=True)
    return out


def run_mpi() -> dict | None:
    """``MPIWrapperCOB`` on every rank of ``COMM_WORLD``; rank 0 compares, the others serve."""
    from chemfit.parallel_execution import MPIWrapperCOB

    with MPIWrapperCOB(build_cob()) as mpi:
        if mpi.rank != 0:
            mpi.worker_loop()
            return None
        result = compare_with_serial(mpi)
        result["size"] = mpi.size
        return result


if __name__ == "__main__":
    mode = sys.argv[1]
    try:
        result = {"executors": run_executors, "mpi": run_mpi}[mode]()
    except BaseException:
        if mode != "mpi":
            raise
        import traceback

        from mpi4py import MPI

        traceback.print_exc()
        MPI.COMM_WORLD.Abort(1)  # end every rank now instead of leaving them waiting
    if result is not None:
        result["terms_module"] = SubEvaluations.__module__
        print("RESULT " + json.dumps(result), flush=True)
