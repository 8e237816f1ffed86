"""After a lost evaluation: an executor that can take the retry, or a clear error.

:func:`recover_executor` is what a fit calls after a
:class:`~chemfit.core.exceptions.WorkerLostError` (a worker, engine or Dask worker died, or an
evaluation was abandoned): it returns the same executor while it still works (ipyparallel
engines or Dask workers left, a pool that is not broken), restarts a broken pool that chemfit
created, and raises a ``WorkerLostError`` that says what to do when it cannot.

* A stdlib pool from ``make_executor("process")``
  (:class:`~chemfit.execution.executors.RestartableProcessPoolExecutor`) is restarted in place:
  the caller's reference stays valid.
* loky's reusable executor (``make_executor("loky")``, ``loky.get_reusable_executor``) is
  replaced by ``get_reusable_executor`` with the same arguments: the returned info holds the new
  executor (loky's own way: its users ask ``get_reusable_executor`` again).
* A broken pool the caller created (``ProcessPoolExecutor(...)``, ``loky.ProcessPoolExecutor``)
  cannot be restarted from outside: the error says to pass ``make_executor("process", n)`` or
  loky, or to start a new pool and resume.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from chemfit.core.exceptions import WorkerLostError
from chemfit.execution.executor_info import ExecutorInfo, executor_info
from chemfit.execution.executors import RestartableProcessPoolExecutor

__all__ = ["executor_alive", "recover_executor"]

logger = logging.getLogger(__name__)

_RESUME = (
    "The history (and any JSONLinesHistory file) keeps every evaluation so far: resume with "
    "initial_observations=load_observations(...) on a working executor"
)


def recover_executor(info: ExecutorInfo, error: BaseException) -> ExecutorInfo:
    """An executor that can take the retry of an evaluation lost with ``error``.

    Parameters
    ----------
    info : ExecutorInfo
        The executor the evaluation was lost on (see
        :func:`~chemfit.execution.executor_info.executor_info`).
    error : BaseException
        Why it was lost (a ``WorkerLostError``, usually); named in the error raised.

    Returns
    -------
    ExecutorInfo
        ``info`` itself when its executor still works, or was restarted in place (a pool from
        ``make_executor("process")``); a new info for loky's reusable executor, which is
        replaced by a new one (submit the retry there: e.g.
        :meth:`~chemfit.execution.submission.ContextSubmitter.switch_to`).

    Raises
    ------
    WorkerLostError
        When no executor can take the retry: a broken pool that the caller created, an
        ipyparallel cluster with no engine or a Dask cluster with no worker left, an executor
        that was shut down. The message says why and what to do; ``error`` is its cause.

    Examples
    --------
    A pool from ``make_executor("process")`` whose worker died is restarted in place:

    >>> import os, signal
    >>> from chemfit.executors import make_executor
    >>> with make_executor("process", 1) as pool:
    ...     info = executor_info(pool)
    ...     os.kill(pool.submit(os.getpid).result(), signal.SIGKILL)
    ...     try:
    ...         pool.submit(abs, -1).result()
    ...     except Exception as exc:
    ...         lost = exc
    ...     recovered = recover_executor(info, lost)
    ...     recovered is info, pool.submit(abs, -3).result()
    (True, 3)

    One the caller created cannot be:

    >>> from concurrent.futures import ProcessPoolExecutor
    >>> with ProcessPoolExecutor(1) as pool:
    ...     os.kill(pool.submit(os.getpid).result(), signal.SIGKILL)
    ...     try:
    ...         pool.submit(abs, -1).result()
    ...     except Exception as exc:
    ...         lost = exc
    ...     try:
    ...         recover_executor(executor_info(pool), lost)
    ...     except WorkerLostError as exc:
    ...         print(str(exc)[:78])
    the ProcessPoolExecutor lost a worker and is broken; it was created by you and
    """
    if info.in_process:
        return info  # threads and serial: no process to lose
    if info.kind == "process-pool":
        return _recover_stdlib_pool(info, error)
    if info.kind == "loky":
        return _recover_loky(info, error)
    if info.kind in ("ipyparallel", "dask"):
        if _closed(info.executor):
            raise _shut_down(info, error)
        if executor_alive(info) is False and not _workers_come_back(info):
            raise _no_worker_left(info, error)
    return info


def executor_alive(info: ExecutorInfo) -> bool | None:
    """Whether the executor of ``info`` can run tasks now; ``None`` when that cannot be told.

    A pool is alive when it is neither broken nor shut down; an ipyparallel executor while it
    has engines, a Dask executor while it has workers.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> with ThreadPoolExecutor(1) as pool:
    ...     executor_alive(executor_info(pool))
    True
    """
    executor = info.executor
    if info.in_process:
        return not getattr(executor, "_shutdown", False)
    if info.kind == "process-pool":
        return not (executor._broken or executor._shutdown_thread)
    if info.kind == "loky":
        flags = getattr(executor, "_flags", None)
        return flags is not None and not (flags.broken or flags.shutdown)
    if info.kind == "ipyparallel":
        return not _closed(executor) and _ipyparallel_engines(executor) > 0
    if info.kind == "dask":
        workers = _dask_workers(executor)
        return None if workers is None else workers > 0
    return None


# -- pools ---------------------------------------------------------------------------------------


#: Seconds to wait for a pool to notice that a worker died (its manager thread marks it broken).
_BREAK_WAIT = 5.0


def _wait_until_noticed(pool: Any, broken: Callable[[], bool]) -> None:
    """Wait while a worker of ``pool`` is dead but the pool not yet marked broken (just after
    ``abandon`` killed it), so that the retry does not go to a pool about to break."""
    deadline = time.monotonic() + _BREAK_WAIT
    while not broken() and time.monotonic() < deadline:
        processes = list((getattr(pool, "_processes", None) or {}).values())
        if all(_is_alive(process) for process in processes):
            return
        time.sleep(0.01)


def _is_alive(process: Any) -> bool:
    try:
        return bool(process.is_alive())
    except Exception:  # closed, or a process object of another kind
        return True


def _recover_stdlib_pool(info: ExecutorInfo, error: BaseException) -> ExecutorInfo:
    pool = info.executor
    _wait_until_noticed(pool, lambda: bool(pool._broken))
    if not pool._broken:
        if pool._shutdown_thread:
            raise _shut_down(info, error)
        return info
    if isinstance(pool, RestartableProcessPoolExecutor):
        pool.restart()
        logger.warning("a worker of the process pool died: the pool was restarted")
        return info
    raise _not_ours(info, error)


def _recover_loky(info: ExecutorInfo, error: BaseException) -> ExecutorInfo:
    pool = info.executor
    flags = getattr(pool, "_flags", None)
    if flags is not None:
        _wait_until_noticed(pool, lambda: flags.broken is not None)
    broken = flags is None or flags.broken is not None
    if not broken:
        if flags.shutdown:
            raise _shut_down(info, error)
        return info
    reusable = sys.modules.get("loky.reusable_executor")
    pool_class = getattr(reusable, "_ReusablePoolExecutor", None)
    if pool_class is None or not isinstance(pool, pool_class):
        raise _not_ours(info, error)
    storage = getattr(reusable, "_executor_storage", None)
    current = getattr(storage, "executor", None)
    flags = getattr(current, "_flags", None)
    if current is not pool and flags is not None and not (flags.broken or flags.shutdown):
        new = current  # someone asked for a new one already: do not replace it again
    else:
        # the same arguments as before (other ones would make loky replace it once more)
        arguments = dict(getattr(storage, "executor_kwargs", None) or {})
        new = reusable.get_reusable_executor(max_workers=pool._max_workers, **arguments)
    logger.warning("a worker of loky's reusable executor died: loky started a new one")
    return executor_info(new, owned=info.owned)


# -- errors ----------------------------------------------------------------------------------------


def _cause_text(error: BaseException) -> str:
    text = str(error).splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _lost(message: str, error: BaseException) -> WorkerLostError:
    lost = WorkerLostError(
        message,
        index=getattr(error, "index", None),
        parameters=getattr(error, "parameters", None),
    )
    lost.__cause__ = error
    return lost


def _not_ours(info: ExecutorInfo, error: BaseException) -> WorkerLostError:
    return _lost(
        f"the {info.name} lost a worker and is broken; it was created by you and cannot be "
        "rebuilt: pass make_executor('process', n) or make_executor('loky', n) so chemfit can "
        f"restart it, or start a new pool and resume with load_observations(...). {_RESUME}. "
        f"({_cause_text(error)})",
        error,
    )


def _shut_down(info: ExecutorInfo, error: BaseException) -> WorkerLostError:
    return _lost(
        f"the {info.name} was shut down and takes no more work; pass a running executor. "
        f"{_RESUME}. ({_cause_text(error)})",
        error,
    )


def _no_worker_left(info: ExecutorInfo, error: BaseException) -> WorkerLostError:
    what = "engine" if info.kind == "ipyparallel" else "worker"
    return _lost(
        f"no {what} left on the {info.name}: every {what} has died, so no evaluation can run. "
        f"Start new {what}s (a new executor) and resume. {_RESUME}. ({_cause_text(error)})",
        error,
    )


# -- remote executors ------------------------------------------------------------------------------


#: Seconds to wait for a Dask worker to come back (a nanny restarts a worker that died).
_WORKER_RETURN_WAIT = 3.0


def _workers_come_back(info: ExecutorInfo) -> bool:
    """Whether a Dask worker connects within a few seconds (ipyparallel engines do not come
    back by themselves)."""
    if info.kind != "dask":
        return False
    deadline = time.monotonic() + _WORKER_RETURN_WAIT
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if executor_alive(info):
            return True
    return False


def _closed(executor: Any) -> bool:
    return bool(getattr(executor, "_shutdown", False))


def _ipyparallel_engines(executor: Any) -> int:
    count = getattr(executor, "n_engines", None)
    if isinstance(count, int):
        return count
    client = getattr(getattr(executor, "view", None), "client", None)
    with contextlib.suppress(Exception):
        return len(client.ids)
    return 0


def _dask_workers(executor: Any) -> int | None:
    if _closed(executor):
        return 0
    client = getattr(executor, "_client", None)
    if client is None:
        return None
    with contextlib.suppress(Exception):
        return len(client.scheduler_info(n_workers=-1)["workers"])
    with contextlib.suppress(Exception):
        return len(client.scheduler_info()["workers"])
    return None
