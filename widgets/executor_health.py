"""Whether an executor can (still) run tasks, and whether MPI engines can start here.

Read from the state the executors and the environment keep; nothing is submitted or started.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from typing import Any

from chemfit.execution.executor_info import executor_info

__all__ = ["executor_problem", "mpi_problem"]


def mpi_problem() -> str | None:
    """Why MPI engines cannot start in this environment, or ``None`` when they can.

    Checks that mpi4py is installed and that an ``mpiexec`` sits next to this Python (the one
    the engines are launched with), without initialising MPI in the kernel.

    Examples
    --------
    >>> mpi_problem() is None or mpi_problem().startswith("MPI is not installed")
    True
    """
    fix = (
        "Install it with: pip install 'chemfit[mpi]' (mpi4py and the mpich wheel), then restart "
        "the kernel"
    )
    try:
        spec = importlib.util.find_spec("mpi4py")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return f"MPI is not installed: the Python package mpi4py is missing. {fix}."
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        where = f" (the one on PATH, {found}, may be a different MPI)" if found else ""
        return f"MPI is not installed: there is no mpiexec next to {sys.executable}{where}. {fix}."
    return None


def _first_sentence(reason: Any) -> str:
    text = " ".join(str(reason).split())
    return text.partition(". ")[0].rstrip(".") or type(reason).__name__


def executor_problem(executor: Any) -> str | None:
    """Why ``executor`` can no longer run tasks, or ``None`` when it looks usable.

    Reads the state the executors keep (nothing is submitted), by the executor's kind
    (:func:`~chemfit.execution.executor_info.executor_info`): a loky, stdlib process or thread
    pool whose worker died (or whose initializer failed) is broken, a pool that was shut down
    is closed, and an ipyparallel executor is broken when no engine is left, or when an engine
    of its MPI world died.

    Parameters
    ----------
    executor : executor, ExecutorInfo or None
        ``None`` is "serial": evaluations run in the fit's thread.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> pool = ThreadPoolExecutor(1)
    >>> executor_problem(pool) is None
    True
    >>> pool.shutdown()
    >>> executor_problem(pool)
    'it was shut down'
    >>> import logging
    >>> logging.getLogger("concurrent.futures").disabled = True  # its CRITICAL line, here
    >>> def no_thread():
    ...     raise RuntimeError("no thread today")
    >>> broken = ThreadPoolExecutor(1, initializer=no_thread)
    >>> type(broken.submit(abs, -1).exception()).__name__
    'BrokenThreadPool'
    >>> logging.getLogger("concurrent.futures").disabled = False
    >>> executor_problem(broken)
    'A thread initializer failed, the thread pool is not usable anymore'
    >>> executor_problem(None) is None
    True
    """
    if executor is None:
        return None
    info = executor_info(executor)
    state = _pool_state.get(info.kind)
    if state is None:
        return _cluster_problem(info.executor) if info.kind == "ipyparallel" else None
    broken, shut_down = state(info.executor)
    if broken:
        return _first_sentence(broken)
    if shut_down is True:
        return "it was shut down"
    return None


def _loky_state(executor: Any) -> tuple[Any, Any]:
    flags = getattr(executor, "_flags", None)  # loky keeps its state here
    return getattr(flags, "broken", None), getattr(flags, "shutdown", False)


def _stdlib_state(shutdown_attribute: str) -> Any:
    def state(executor: Any) -> tuple[Any, Any]:
        return getattr(executor, "_broken", None), getattr(executor, shutdown_attribute, False)

    return state


#: Executor kind -> (why it is broken, whether it was shut down), read from the pool's state.
_pool_state = {
    "loky": _loky_state,
    "process-pool": _stdlib_state("_shutdown_thread"),
    "threads": _stdlib_state("_shutdown"),
}


def _cluster_problem(executor: Any) -> str | None:
    try:
        n_up = executor.n_engines
    except Exception:  # the client went away under us
        n_up = 0
    n_started = len(executor.engines)
    if n_up == 0:
        return "every engine has stopped or died"
    if n_up < n_started and executor.mpi_size:
        return (
            f"{n_started - n_up} of {n_started} MPI engines stopped or died, so their MPI world "
            "is broken"
        )
    return None
