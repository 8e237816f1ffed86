"""Helpers for tests/integration/test_main_defined_models.py: models in ``__main__``, as users do.

``MODELS`` is the code of a user's notebook cell (or the top of a script): a decorated
Lennard-Jones dimer model fitted as in the README, plus one term of every other kind a user
defines (plain function, lambda, closure, ``functools.partial``, a class used inside a
function, an ``ObjectiveFunctor`` subclass and its instance, a decorated objective functor, a
``QuantityComputer`` subclass). Every term pulls ``sigma`` towards the true value, so the
combined objective has its minimum at ``TRUE``.

The check functions below run in the user's process (the kernel or the script) and receive
the user's namespace (``globals()``); what travels to the workers is only what the user
defined. Each raises ``AssertionError`` with a message when something is wrong and returns a
small summary.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: Variable set in the environment of the script or kernel; every process it starts inherits
#: it, which is how the tests find processes left behind.
TAG_VARIABLE = "CHEMFIT_MAIN_MODELS_TEST"

MODELS = """\
import functools
import os

import numpy as np
from chemfit import CombinedObjectiveFunction, ObjectiveFunctor, QuantityComputer
from chemfit.wrap_funcs import to_objective_functor, to_quantity_computer

TRUE = {"epsilon": 0.0104, "sigma": 3.4}
START = {"epsilon": 0.006, "sigma": 4.0}
BOUNDS = {"epsilon": (1e-4, 0.05), "sigma": (2.5, 5.0)}


@to_quantity_computer()
def dimer(params, r):  # energy of a Lennard-Jones dimer at distance r
    sr6 = (params["sigma"] / r) ** 6
    return {"energy": 4 * params["epsilon"] * (sr6 * sr6 - sr6)}


error = lambda q, e_ref: (1e3 * (q["energy"] - e_ref)) ** 2  # noqa: E731


def model_terms():
    return [
        dimer.bind(r=r).with_loss(error, e_ref=dimer.bind(r=r)(TRUE)["energy"])
        for r in np.linspace(3.2, 7, 8)
    ]


def sigma_error(params):
    return (params["sigma"] - TRUE["sigma"]) ** 2


def record(ctx, value):
    if ctx is not None:
        ctx.meta["pid"] = os.getpid()
        ctx.loss = value
    return value


def plain(params, ctx=None):
    return record(ctx, 1.0 * sigma_error(params))


lam = lambda params, ctx=None: record(ctx, 2.0 * sigma_error(params))  # noqa: E731


def make_closure(weight):
    def closure(params, ctx=None):
        return record(ctx, weight * sigma_error(params))

    return closure


def weighted(params, ctx=None, *, weight):
    return record(ctx, weight * sigma_error(params))


class Weight:
    def __init__(self, value):
        self.value = value


def uses_class(params, ctx=None):
    return record(ctx, Weight(5.0).value * sigma_error(params))


class Term(ObjectiveFunctor):
    def __init__(self, weight):
        self.weight = weight

    def __call__(self, params, ctx=None):
        return record(ctx, self.weight * sigma_error(params))


@to_objective_functor(pass_ctx=True)
def decorated_loss(params, ctx):
    return record(ctx, 7.0 * sigma_error(params))


@to_quantity_computer(pass_ctx=True)
def spacing(params, ctx):
    ctx.meta["pid"] = os.getpid()
    return {"sigma": params["sigma"]}


class SigmaComputer(QuantityComputer):
    def _compute(self, params, ctx):
        ctx.meta["pid"] = os.getpid()
        return {"sigma": params["sigma"]}


KINDS = {
    "function": plain,
    "lambda": lam,
    "closure": make_closure(3.0),
    "partial": functools.partial(weighted, weight=4.0),
    "class": uses_class,
    "instance": Term(6.0),
    "decorated objective functor": decorated_loss,
    "decorated quantity computer": spacing.with_loss(
        lambda q: 9.0 * (q["sigma"] - TRUE["sigma"]) ** 2
    ),
    "README term": model_terms()[0],
    "quantity computer subclass": SigmaComputer().with_loss(
        lambda q: 8.0 * (q["sigma"] - TRUE["sigma"]) ** 2
    ),
}


def build_objective():
    return CombinedObjectiveFunction(model_terms() + list(KINDS.values()))
"""

#: Redefines ``decorated_loss`` under the same name (a user editing a cell and running it again).
REDEFINITION = """\
@to_objective_functor(pass_ctx=True)
def decorated_loss(params, ctx):
    return record(ctx, 70.0 * sigma_error(params))


KINDS["decorated objective functor"] = decorated_loss
"""

FIT = {"budget": 40, "optimizer_str": "NGOpt", "num_workers": 2, "seed": 0}
POINTS = [{"epsilon": 0.009, "sigma": 3.1}, {"epsilon": 0.012, "sigma": 3.7}]


def _contexts(n: int) -> list:
    from chemfit import EvaluateContext

    return [EvaluateContext() for _ in range(n)]


def reference_fit(ns: dict) -> dict:
    """The fit without any executor: what every executor must reproduce exactly."""
    return fit_on(ns, None)


def fit_on(ns: dict, executor: Any, objective: Any = None) -> dict:
    """The README's fit of ``build_objective()`` on ``executor``; its best parameters and loss."""
    from chemfit import Fitter

    fitter = Fitter(objective or ns["build_objective"](), ns["START"], bounds=ns["BOUNDS"])
    start = time.perf_counter()
    best = fitter.fit_nevergrad(**FIT, executor=executor, progress=False)
    return {
        "best": best,
        "best_parameters": fitter.result.best_parameters,
        "loss": fitter.result.best_loss,
        "n_evals": fitter.result.n_evals,
        "seconds": time.perf_counter() - start,
    }


def check_fit(ns: dict, got: dict, reference: dict, where: str) -> None:
    """``got`` is the reference fit, to the bit, and near the true parameters."""
    assert got["best"] == reference["best"], f"{where}: fit {got} != serial fit {reference}"
    true = ns["TRUE"]
    assert abs(got["best"]["sigma"] - true["sigma"]) < 0.05, f"{where}: {got}"
    assert abs(got["best"]["epsilon"] / true["epsilon"] - 1) < 0.15, f"{where}: {got}"


def map_kinds(ns: dict, executor: Any, *, remote: bool = True) -> dict:
    """Every kind in ``KINDS`` through ``map_with_context``: values and pids."""
    from chemfit import EvaluateContext, map_with_context

    pids = {}
    for name, fn in ns["KINDS"].items():
        ctxs = _contexts(len(POINTS))
        chunksize = 2 if name == "lambda" else 1
        values = map_with_context(executor, fn, POINTS, ctxs=ctxs, chunksize=chunksize)
        expected = [fn(p, EvaluateContext()) for p in POINTS]
        assert values == expected, f"{name}: {values} != {expected}"
        assert [c.loss for c in ctxs] == expected, f"{name}: losses {[c.loss for c in ctxs]}"
        pids[name] = sorted({c.meta.get("pid") for c in ctxs})
        if remote:
            assert os.getpid() not in pids[name], f"{name} ran in the caller's process"
    return pids


def check_ewcob(ns: dict, executor: Any, reference: dict) -> dict:
    """``ExecutorWrapperCOB`` with the user's terms: the serial value, and the serial fit."""
    from chemfit import EvaluateContext, ExecutorWrapperCOB

    cob = ns["build_objective"]()
    with ExecutorWrapperCOB(cob, executor, terms_per_task=4) as wrapper:
        ctx = EvaluateContext()
        value = wrapper(POINTS[0], ctx)
        assert value == cob(POINTS[0]), f"ExecutorWrapperCOB: {value} != {cob(POINTS[0])}"
        pids = {child.get("meta", {}).get("pid") for child in ctx.meta["children"]} - {None}
        assert pids and os.getpid() not in pids, f"terms ran in pids {pids}"
        got = fit_on(ns, None, objective=wrapper)
    check_fit(ns, got, reference, "ExecutorWrapperCOB")
    return {"fit": got, "pids": sorted(pids)}


def check_redefinition(ns: dict, executor: Any) -> None:
    """After a cell redefines ``decorated_loss``, workers run the new definition."""
    from chemfit import EvaluateContext, map_with_context

    fn = ns["decorated_loss"]
    values = map_with_context(executor, fn, POINTS, ctxs=_contexts(len(POINTS)))
    expected = [fn(p, EvaluateContext()) for p in POINTS]
    assert values == expected, f"a worker ran a stale decorated_loss: {values} != {expected}"


def run_checks(ns: dict, executor: Any, reference: dict, *, remote: bool = True) -> dict:
    """What a user does with the models on ``executor``: map every kind, fit."""
    summary = {"map_pids": map_kinds(ns, executor, remote=remote)}
    summary["fit"] = fit_on(ns, executor)
    check_fit(ns, summary["fit"], reference, type(executor).__name__)
    return summary


# -- a module that only the user's process has ------------------------------------------------


def install_caller_only_module() -> types.ModuleType:
    """``only_here``: a module registered in this process only (as one on a path that the
    workers do not have), with an objective and a term defined in it."""
    module = types.ModuleType("only_here")
    exec(
        "def objective(params, ctx=None):\n    return (params['sigma'] - 3.4) ** 2\n",
        module.__dict__,
    )
    sys.modules["only_here"] = module
    return module


def check_rebuild_failure(ns: dict, executor: Any) -> str:
    """A worker that cannot rebuild a task says so, naming what; the executor still works."""
    from chemfit import CombinedObjectiveFunction, ExecutorWrapperCOB
    from chemfit.core.exceptions import NotPicklableError, WorkerLostError
    from chemfit.executor_utils import map_with_context

    module = install_caller_only_module()
    messages = []
    for attempt in ("map", "terms"):
        try:
            if attempt == "map":
                map_with_context(executor, module.objective, POINTS, ctxs=_contexts(2))
            else:
                cob = CombinedObjectiveFunction([ns["plain"], module.objective])
                with ExecutorWrapperCOB(cob, executor, terms_per_task=1) as wrapper:
                    wrapper(POINTS[0])
        except NotPicklableError as exc:
            messages.append(str(exc))
        except WorkerLostError as exc:
            raise AssertionError(f"{attempt}: a rebuild failure reported as lost: {exc}") from exc
        else:
            raise AssertionError(f"{attempt}: no error for a module the workers lack")
    for message in messages:
        assert "could not rebuild" in message and "only_here" in message, message
        assert "died" not in message and "create a new executor" not in message, message
    map_kinds(ns, executor)  # the executor still works
    return messages[0]


# -- processes ---------------------------------------------------------------------------------


def tagged_processes(tag: str) -> dict[int, str]:
    """Processes (pid -> command line) whose environment holds ``TAG_VARIABLE=tag``."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            status = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            if status and status[0] == "Z":  # a zombie is gone, only not yet reaped
                continue
            found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return found


def wait_until_gone(tag: str, seconds: float) -> dict[int, str]:
    """The tagged processes still running after up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = tagged_processes(tag)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def kill_tagged(tag: str) -> None:
    """SIGKILL whatever a failed test left (after the assertion has recorded it)."""
    import signal

    for pid in tagged_processes(tag):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


# -- MPI engines ---------------------------------------------------------------------------------


def check_mpi_fit(ns: dict, engines: Any, reference: dict) -> dict:
    """The fit on MPI engines (``MPIEngineFit``: MPIWrapperCOB on every rank, the Fitter on
    rank 0) with ``build_objective`` from ``__main__``: the serial fit, streamed back."""
    from chemfit.mpi_engines import MPIEngineFit

    records: list = []
    start = time.perf_counter()
    with MPIEngineFit(
        ns["build_objective"],
        ns["START"],
        ns["BOUNDS"],
        executor=engines,
        fit_kwargs={**FIT, "progress": False},
        on_record=records.append,
    ) as fit:
        result = fit.wait(timeout=180)
    got = {"best": result.parameters, "loss": result.best_loss, "n_evals": result.n_evals}
    got["seconds"] = time.perf_counter() - start
    check_fit(ns, got, reference, "MPI engines")
    assert result.n_evals == FIT["budget"] and len(records) == FIT["budget"], (result, records)
    return got


def check_mpi_rebuild_failure(ns: dict, engines: Any) -> str:
    """Engines that cannot rebuild ``build_objective`` say so, naming what they lack."""
    import functools

    from chemfit import CombinedObjectiveFunction
    from chemfit.core.exceptions import NotPicklableError
    from chemfit.mpi_engines import MPIEngineFit

    module = install_caller_only_module()
    build = functools.partial(CombinedObjectiveFunction, [module.objective])
    fit = MPIEngineFit(build, ns["START"], ns["BOUNDS"], executor=engines, fit_kwargs={"budget": 4})
    with fit:
        try:
            fit.wait(timeout=120)
        except NotPicklableError as exc:
            message = str(exc)
        else:
            raise AssertionError("MPI engines: no error for a module the engines lack")
    assert "could not rebuild" in message and "only_here" in message, message
    return message


# -- stdlib pools that spawn -----------------------------------------------------------------------


def check_spawn_refuses_without_cloudpickle(ns: dict) -> str:
    """Without cloudpickle, a spawning pool cannot send notebook definitions: NotPicklableError
    naming one, suggesting loky, before anything is submitted."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from chemfit import Fitter
    from chemfit.core.exceptions import NotPicklableError

    missing = object()
    saved = sys.modules.get("cloudpickle", missing)
    sys.modules["cloudpickle"] = None  # type: ignore[assignment]  # `import cloudpickle` fails
    try:
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            fitter = Fitter(ns["build_objective"](), ns["START"], bounds=ns["BOUNDS"])
            try:
                fitter.fit_nevergrad(**FIT, executor=pool, progress=False)
            except NotPicklableError as exc:
                message = str(exc)
            else:
                raise AssertionError("a spawn pool without cloudpickle raised nothing")
            assert not pool._processes, "a worker process started: something was submitted"
        finally:
            pool.shutdown()
    finally:
        if saved is missing:
            del sys.modules["cloudpickle"]
        else:
            sys.modules["cloudpickle"] = saved
    assert "__main__" in message and "loky" in message, message
    assert "dimer" in message or "lambda" in message, message
    return message


def section(report: dict, name: str, check: Any, *args: Any, **kwargs: Any) -> None:
    """``report[name] = check(*args, **kwargs)``; a failure goes to ``report["errors"][name]``
    so that the other sections still run (and the run shows everything that fails)."""
    try:
        report[name] = check(*args, **kwargs)
    except Exception as exc:
        import traceback

        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        report.setdefault("errors", {})[name] = text[-4000:]
        print(f"{name} FAILED: {type(exc).__name__}: {str(exc)[:2000]}", file=sys.stderr)
