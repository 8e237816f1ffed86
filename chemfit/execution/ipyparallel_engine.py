"""What chemfit runs on ipyparallel engines, and how their answers are read back.

A call goes to an engine wrapped in :class:`RemoteCall`, which returns ``("ok", value)`` or
``("failed", failure)`` instead of raising; ``failure`` is a
:class:`~chemfit.execution.task_errors.RemoteFailure`, from which the caller rebuilds the
original exception chained from a :class:`~chemfit.core.exceptions.RemoteEvaluationError` with
the remote traceback (the convention of every chemfit executor). What ipyparallel itself raises
for a task (a dead engine, an aborted task, an error outside the call) is turned into chemfit's
exceptions by :func:`translate_engine_error`. Used by
:class:`~chemfit.execution.ipyparallel_executor.IPyParallelExecutor` and
:class:`~chemfit.execution.mpi_engines.MPIEngineJob`.

This module imports neither ipyparallel nor cloudpickle: engines import it to run the calls.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import CancelledError
from typing import Any

from chemfit.core.exceptions import WorkerLostError
from chemfit.execution.task_errors import RemoteFailure

__all__ = [
    "RemoteCall",
    "engine_info",
    "failure_to_exception",
    "kill_engine_running",
    "translate_engine_error",
]

OK = "ok"
FAILED = "failed"
_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def failure_to_exception(
    failure: RemoteFailure | dict, where: str, rank: int | None = None
) -> BaseException:
    """Rebuild the exception that :class:`RemoteCall` sent back (caller side).

    Kept for callers of chemfit 3.x; chemfit itself calls ``failure.to_exception`` directly.

    Parameters
    ----------
    failure : RemoteFailure or dict
        What :class:`RemoteCall` returned for a failed call (a dict with the fields of
        :class:`~chemfit.execution.task_errors.RemoteFailure` is accepted too).
    where : str
        Where it happened, for the message (e.g. ``"ipyparallel engine 1"``).
    rank : int, optional
        The engine id or MPI rank, stored in ``RemoteEvaluationError.rank``.

    Returns
    -------
    BaseException
        ``failure.to_exception(where, rank=rank)``: the original exception when it could be
        unpickled, with ``__cause__`` set to a
        :class:`~chemfit.core.exceptions.RemoteEvaluationError` that holds the remote
        traceback; otherwise that ``RemoteEvaluationError`` itself.

    Examples
    --------
    >>> status, failure = RemoteCall(int)("x")
    >>> exc = failure_to_exception(failure, "engine 0", rank=0)
    >>> type(exc).__name__, type(exc.__cause__).__name__, exc.__cause__.rank
    ('ValueError', 'RemoteEvaluationError', 0)
    """
    if isinstance(failure, dict):
        fields = ("type_name", "message", "traceback", "pickled")
        failure = RemoteFailure(**{name: failure.get(name) for name in fields})
    return failure.to_exception(where, rank=rank)


class RemoteCall:
    """Run ``fn`` on an engine and return ``(status, value)`` instead of raising.

    ``("ok", result)`` on success; ``("failed", failure)`` when ``fn`` raised an ``Exception``,
    ``failure`` a :class:`~chemfit.execution.task_errors.RemoteFailure` whose
    ``to_exception(where, rank=...)`` raises it again in the caller.

    Parameters
    ----------
    fn : callable
        The function to call with the submitted arguments.

    Examples
    --------
    >>> RemoteCall(divmod)(7, 2)
    ('ok', (3, 1))
    >>> status, failure = RemoteCall(divmod)(1, 0)
    >>> status, failure.type_name
    ('failed', 'ZeroDivisionError')
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[str, Any]:
        try:
            return OK, self.fn(*args, **kwargs)
        except Exception as exc:
            return FAILED, RemoteFailure.capture(exc, f"ipyparallel engine process {os.getpid()}")

    def __reduce__(self):
        return (RemoteCall, (self.fn,))


def run_chunk(fn: Callable[..., Any], chunk: list[tuple]) -> list:
    """``[fn(*args) for args in chunk]``: several calls sent to an engine as one task.

    Examples
    --------
    >>> run_chunk(pow, [(2, 3), (3, 2)])
    [8, 9]
    """
    return [fn(*args) for args in chunk]


def engine_info() -> dict:
    """Process id, host and MPI rank/size of an engine (engine side).

    Examples
    --------
    >>> info = engine_info()
    >>> info["pid"] == os.getpid(), "host" in info
    (True, True)
    """
    import socket
    import sys as engine_sys

    info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
    if "mpi4py.MPI" in engine_sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            info["mpi_rank"] = MPI.COMM_WORLD.Get_rank()
            info["mpi_size"] = MPI.COMM_WORLD.Get_size()
    return info


def translate_engine_error(
    exc: BaseException,
    where: str,
    rank: int | None = None,
    lost: Callable[[str], WorkerLostError] | None = None,
) -> BaseException:
    """Turn an exception of an ipyparallel ``AsyncResult`` into a chemfit one.

    Parameters
    ----------
    exc : BaseException
        What the ``AsyncResult`` raised.
    where : str
        The engine, for messages (e.g. ``"ipyparallel engine 1"``).
    rank : int, optional
        Engine id or MPI rank, for ``RemoteEvaluationError.rank``.
    lost : callable, optional
        ``lost(reason) -> WorkerLostError``, to describe the lost evaluation.

    Returns
    -------
    BaseException
        :class:`~chemfit.core.exceptions.WorkerLostError` for a dead engine (ipyparallel's
        ``EngineError``, which reaches the client as a ``RemoteError`` named ``EngineError``),
        ``CancelledError`` for an aborted task, :class:`~chemfit.core.exceptions.RemoteEvaluationError`
        for any other remote error; ``exc`` itself otherwise. The ipyparallel exception is the
        ``__cause__``.

    Examples
    --------
    >>> translate_engine_error(KeyError("k"), "engine 0")
    KeyError('k')
    """
    ename = getattr(exc, "ename", None) or type(exc).__name__
    translated: BaseException
    if ename == "EngineError":
        reason = f"{where} died"
        translated = lost(reason) if lost is not None else WorkerLostError(reason)
    elif ename == "TaskAborted":
        translated = CancelledError(f"the call was aborted on {where}")
    elif hasattr(exc, "ename") and hasattr(exc, "evalue"):  # ipyparallel RemoteError
        # Raised on the engine outside RemoteCall (e.g. the task did not unpickle): only its
        # type name, message and traceback arrive, so it stays a RemoteEvaluationError.
        remote_tb = getattr(exc, "traceback", None) or ""
        if isinstance(remote_tb, list):
            remote_tb = "".join(remote_tb)
        # IPython colours the engine's traceback; plain text as from every other executor.
        remote_tb = _ANSI_COLOUR.sub("", str(remote_tb))
        failure = RemoteFailure(str(exc.ename), str(exc.evalue), remote_tb, None, where)
        translated = failure.to_exception(rank=rank)
    else:
        return exc
    translated.__cause__ = exc
    return translated


def kill_engine_running(async_result: Any, wait: float = 0.5) -> str | None:
    """Kill the engine that runs the task of an ipyparallel ``AsyncResult`` (caller side).

    For executors of ipyparallel's own (``client.executor()``, a view's ``executor``), whose
    futures are ``AsyncResult`` objects; :class:`~chemfit.execution.ipyparallel_executor.IPyParallelExecutor`
    has its own ``kill_worker_of``. The engine is sent ``SIGKILL`` through its nanny
    (``Client.send_signal``), which works while it is busy. A task that has not started on an
    engine within ``wait`` seconds is aborted instead.

    Returns
    -------
    str or None
        What was done, for messages; ``None`` when nothing was (not an ``AsyncResult``, or its
        task finished).

    Examples
    --------
    >>> kill_engine_running(object()) is None
    True
    """
    client = getattr(async_result, "_client", None)
    msg_ids = getattr(async_result, "msg_ids", None)
    if client is None or not msg_ids or async_result.done():
        return None
    deadline = time.monotonic() + wait
    engine_id = None
    while True:
        with contextlib.suppress(Exception):
            engine_id = client.metadata[msg_ids[0]].get("engine_id")
        if engine_id is not None or time.monotonic() >= deadline or async_result.done():
            break
        time.sleep(0.01)  # its engine is known once it reports that it started
    if engine_id is None:
        if async_result.done():
            return None
        with contextlib.suppress(Exception):
            client.abort(jobs=async_result, block=False)
        return "it was aborted before it started on an engine"
    client.send_signal("SIGKILL", targets=[engine_id], block=False)
    return f"ipyparallel engine {engine_id}, which ran it, was killed"
