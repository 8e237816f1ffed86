"""An executor over the engines of an ipyparallel cluster.

:class:`IPyParallelExecutor` is a ``concurrent.futures.Executor`` whose calls run on the engines
of an ipyparallel cluster, load balanced. It either

* **starts** a local cluster of ``max_workers`` engines (``mpi=True``: the engines are launched
  by the venv's ``mpiexec`` and form one MPI world) in a throwaway profile directory, and stops
  it again on :meth:`~IPyParallelExecutor.shutdown`, leaving no engine, controller or
  ``mpiexec`` behind; or
* **connects** to a running cluster (``ipcluster start``, ``ipp.Cluster``) found by ``profile``,
  ``cluster_id`` and/or ``profile_dir``; then ``shutdown()`` only disconnects.

Calls are serialised with cloudpickle, so lambdas and functions defined in a notebook work.
An exception raised by a call comes back as itself (chained ``from`` a
:class:`~chemfit.core.exceptions.RemoteEvaluationError` carrying the remote traceback); an
engine that dies while running a call fails that call's future with
:class:`~chemfit.core.exceptions.WorkerLostError`, and when the last engine is gone every
pending call fails the same way instead of waiting forever.

Starting and stopping a cluster prints nothing, also in IPython and notebooks: ipyparallel's
progress bar is off, and its own messages go to the logger
``chemfit.execution.ipyparallel_executor.cluster`` at the cluster's ``log_level`` (``ERROR``
unless ``cluster_options`` say otherwise). The engines' output stays in the cluster's log files;
when engines fail to start, the error quotes its last lines.

ipyparallel and cloudpickle are imported when an executor is created, not at module import.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError, Executor, Future
from concurrent.futures import wait as wait_futures
from functools import partial
from pathlib import Path
from typing import Any

from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import NotPicklableError, RemoteEvaluationError, WorkerLostError
from chemfit.execution.task_errors import (
    exception_traceback,
    looks_like_pickling_error,
    pickled_exception,
    shorten,
)

__all__ = [
    "IPyParallelExecutor",
    "RemoteCall",
    "failure_to_exception",
    "translate_engine_error",
]

logger = logging.getLogger(__name__)

# A 0.5 s heartbeat instead of the default 3 s registers engines (and notices dead ones) sooner.
_HEARTBEAT_MS = 500
_EXTRA_HINT = "install it with: pip install 'chemfit[ipyparallel]'"
# Lines of each engine's (and a failed controller's) output quoted when engines do not start.
_OUTPUT_LINES = 40

# ipyparallel's own messages about the clusters chemfit starts ("Starting 2 engines with ...",
# "Stopping controller", the output of an engine that exited with an error). In an IPython
# session ipyparallel would write them to sys.stdout.
_cluster_logger = logging.getLogger(f"{__name__}.cluster")


class _ClusterLog(logging.LoggerAdapter):
    """The ``log`` of a cluster chemfit starts: ``_cluster_logger`` at the cluster's ``log_level``.

    Its effective level is never DEBUG or lower, so that ipyparallel's launchers do not copy the
    engines' output to ``sys.stderr`` (it stays in the cluster's log files).

    Parameters
    ----------
    level : int
        The lowest level passed on (the cluster's ``log_level``).

    Examples
    --------
    >>> log = _ClusterLog(logging.ERROR)
    >>> log.isEnabledFor(logging.INFO), log.getEffectiveLevel() > logging.DEBUG
    (False, True)
    """

    def __init__(self, level: int) -> None:
        super().__init__(_cluster_logger, {})
        self._level = level

    def isEnabledFor(self, level: int) -> bool:
        return level >= self._level and self.logger.isEnabledFor(level)

    def getEffectiveLevel(self) -> int:
        return max(self._level, self.logger.getEffectiveLevel(), logging.DEBUG + 1)


def _require_ipyparallel() -> Any:
    """Import ipyparallel (and check cloudpickle), or raise ImportError naming the extra."""
    try:
        import ipyparallel
    except ImportError as exc:
        raise ImportError(
            f"IPyParallelExecutor needs the optional dependency ipyparallel; {_EXTRA_HINT}"
        ) from exc
    try:
        import cloudpickle  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "IPyParallelExecutor sends calls with cloudpickle, which is not installed; "
            f"{_EXTRA_HINT}"
        ) from exc
    return ipyparallel


# -- what runs on the engine --------------------------------------------------------------------

_OK = "ok"
_FAILED = "failed"


def _capture_failure(exc: BaseException) -> dict:
    """Describe an exception so that the caller can raise it again (engine side)."""
    return {
        "type_name": type(exc).__qualname__,
        "message": str(exc),
        "traceback": exception_traceback(exc),
        "pickled": pickled_exception(exc),
        "pid": os.getpid(),
    }


def failure_to_exception(failure: dict, where: str, rank: int | None = None) -> BaseException:
    """Rebuild the exception described by an engine (caller side).

    Parameters
    ----------
    failure : dict
        What :class:`RemoteCall` returned for a failed call.
    where : str
        Where it happened, for the message (e.g. ``"ipyparallel engine 1"``).
    rank : int, optional
        The engine id or MPI rank, stored in ``RemoteEvaluationError.rank``.

    Returns
    -------
    BaseException
        The original exception when it could be unpickled, with ``__cause__`` set to a
        :class:`~chemfit.core.exceptions.RemoteEvaluationError` that holds the remote
        traceback; otherwise that ``RemoteEvaluationError`` itself.

    Examples
    --------
    >>> status, failure = RemoteCall(int)("x")
    >>> exc = failure_to_exception(failure, "engine 0", rank=0)
    >>> type(exc).__name__, type(exc.__cause__).__name__, exc.__cause__.rank
    ('ValueError', 'RemoteEvaluationError', 0)
    """
    remote = RemoteEvaluationError(
        f"{failure['type_name']} on {where}: {failure['message']}\n\n"
        f"Remote traceback:\n{failure['traceback']}",
        rank=rank,
        type_name=failure["type_name"],
        remote_message=failure["message"],
        remote_traceback=failure["traceback"],
    )
    original = None
    if failure.get("pickled") is not None:
        try:
            original = pickle.loads(failure["pickled"])
        except Exception:
            original = None
    if not isinstance(original, BaseException):
        return remote
    original.__cause__ = remote
    return original


class RemoteCall:
    """Run ``fn`` on an engine and return ``(status, value)`` instead of raising.

    ``("ok", result)`` on success; ``("failed", description)`` when ``fn`` raised an
    ``Exception``; :func:`failure_to_exception` turns the description back into the exception.

    Parameters
    ----------
    fn : callable
        The function to call with the submitted arguments.

    Examples
    --------
    >>> RemoteCall(divmod)(7, 2)
    ('ok', (3, 1))
    >>> status, failure = RemoteCall(divmod)(1, 0)
    >>> status, failure["type_name"]
    ('failed', 'ZeroDivisionError')
    """

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[str, Any]:
        try:
            return _OK, self.fn(*args, **kwargs)
        except Exception as exc:
            return _FAILED, _capture_failure(exc)

    def __reduce__(self):
        return (RemoteCall, (self.fn,))


def _run_chunk(fn: Callable[..., Any], chunk: list[tuple]) -> list:
    return [fn(*args) for args in chunk]


def _chunks(iterable: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _engine_info() -> dict:
    """Process id, host and MPI rank/size of an engine (engine side)."""
    import socket
    import sys as engine_sys

    info: dict[str, Any] = {"pid": os.getpid(), "host": socket.gethostname()}
    if "mpi4py.MPI" in engine_sys.modules:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized():
            info["mpi_rank"] = MPI.COMM_WORLD.Get_rank()
            info["mpi_size"] = MPI.COMM_WORLD.Get_size()
    return info


# -- the caller side ----------------------------------------------------------------------------


def _world_size(engines: dict[int, dict]) -> int | None:
    """The MPI world size when the engines are exactly the ranks of one world, else ``None``.

    Examples
    --------
    >>> _world_size({0: {"mpi_rank": 0, "mpi_size": 2}, 1: {"mpi_rank": 1, "mpi_size": 2}})
    2
    >>> _world_size({0: {"mpi_rank": 0, "mpi_size": 2}}) is None   # rank 1 is missing
    True
    """
    sizes = {info.get("mpi_size") for info in engines.values()}
    ranks = sorted(info.get("mpi_rank", -1) for info in engines.values())
    if len(sizes) != 1 or None in sizes or ranks != list(range(len(engines))):
        return None
    size = sizes.pop()
    return size if size == len(engines) else None


def _function_name(fn: Any) -> str:
    """The name of the innermost function of wrappers that keep it in ``fn`` or ``func``."""
    for _ in range(5):
        inner = getattr(fn, "fn", None) or getattr(fn, "func", None)
        if inner is None or inner is fn:
            break
        fn = inner
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _call_parameters(args: tuple) -> Any:
    """The parameters of a ``fn(*args, ctx)`` call: the context's, else the first argument."""
    if args and isinstance(args[-1], EvaluateContext) and args[-1].parameters is not None:
        return args[-1].parameters
    if len(args) > 1 and isinstance(args[-1], EvaluateContext):
        return args[0]
    return None


def _describe_call(fn: Callable[..., Any], args: tuple) -> str:
    parameters = _call_parameters(args)
    if parameters is not None:
        text = f"parameters {parameters!r}"
    else:
        text = "arguments " + ", ".join(repr(a) for a in args)
    return f"{_function_name(fn)} with {shorten(text, 200)}"


class _EngineFuture(Future):
    """A ``concurrent.futures.Future`` fed by an ipyparallel ``AsyncResult``."""

    def __init__(self, executor: IPyParallelExecutor, fn: Callable[..., Any], args: tuple):
        super().__init__()
        self._executor = executor
        self._call: tuple | None = (fn, args)
        self._async_result: Any = None

    def cancel(self) -> bool:
        ar = self._async_result
        if ar is not None and not self.done() and not ar.done():
            # Only tasks that have not started can be aborted; a running one finishes on its
            # engine and its result is dropped.
            with contextlib.suppress(Exception):
                ar._client.abort(jobs=ar.msg_ids, block=False)
        return super().cancel()

    def _finish(self, *, result: Any = None, exception: BaseException | None = None) -> None:
        self._call = None
        with contextlib.suppress(Exception):  # already cancelled or set
            if exception is not None:
                self.set_exception(exception)
            else:
                self.set_result(result)

    def _lost(self, reason: str) -> WorkerLostError:
        fn, args = self._call if self._call is not None else (None, ())
        call = _describe_call(fn, args) if fn is not None else "a call"
        return WorkerLostError(
            f"{reason} while evaluating {call}; that evaluation was lost. Restart the engines "
            "(or the cluster) and resume",
            parameters=_call_parameters(args),
        )

    def _on_async_result_done(self, ar: Any) -> None:
        """Runs in the ipyparallel client's IO thread."""
        if self.done():
            return
        try:
            status, value = ar.result()
        except BaseException as exc:
            self._finish(exception=self._executor._translate(exc, ar, self))
            return
        if status == _OK:
            self._finish(result=value)
        else:
            engine_id = self._executor._engine_id_of(ar)
            self._finish(
                exception=failure_to_exception(
                    value, f"ipyparallel engine {engine_id}", rank=engine_id
                )
            )


class IPyParallelExecutor(Executor):
    """Run calls on the engines of an ipyparallel cluster (load balanced).

    Parameters
    ----------
    max_workers : int, optional
        Number of engines to start. ``None``: ``os.cpu_count()``. When connecting, wait for at
        least that many engines (``None``: at least one).
    mpi : bool
        Start the engines with ``mpiexec`` (the one next to ``sys.executable``) so that they
        form one MPI world of size ``max_workers``. When connecting, require MPI engines.
    profile : str, optional
        Connect to the running cluster of this IPython profile (e.g. ``"default"``).
    cluster_id : str, optional
        Connect to the running cluster with this id (``ipcluster start --cluster-id=...``).
    profile_dir : str or Path, optional
        With ``profile`` or ``cluster_id``: where to look for the cluster's connection file.
        Alone: start the cluster in this profile directory (kept afterwards). By default a
        started cluster uses a throwaway directory that :meth:`shutdown` deletes.
    timeout : float
        Seconds to wait for the engines to register (and for connecting).
    use_cloudpickle : bool
        Serialise calls with cloudpickle (here and on the engines), so notebook lambdas and
        closures work.
    cluster_options : dict, optional
        Extra keyword arguments for ``ipyparallel.Cluster`` when starting one.

    Attributes
    ----------
    client : ipyparallel.Client
        The connected client.
    cluster : ipyparallel.Cluster or None
        The cluster this executor started, ``None`` when it connected to a running one.
    view : ipyparallel.LoadBalancedView
        The view calls are submitted to.
    engines : dict[int, dict]
        Per engine id at start-up: ``pid``, ``host`` and, for MPI engines, ``mpi_rank`` and
        ``mpi_size``.
    mpi_size : int or None
        The size of the engines' MPI world, ``None`` if the engines do not use MPI.
    profile_dir : str or None
        The cluster's profile directory (a started cluster's throwaway directory is deleted
        by :meth:`shutdown`).

    Raises
    ------
    ImportError
        Without ipyparallel or cloudpickle (extra ``ipyparallel``).
    TimeoutError
        When the engines do not register within ``timeout``.
    RuntimeError
        When the engines of a started cluster exit while starting; like the ``TimeoutError``
        of a started cluster, the message gives their exit codes and last lines of output.

    Notes
    -----
    Starting and stopping print nothing, in IPython and notebooks too (no progress bar). Log
    at INFO to see what happens, e.g. ``started 2 local engines in 5.2 s``; ipyparallel's own
    messages go to the logger ``chemfit.execution.ipyparallel_executor.cluster`` at the
    cluster's ``log_level`` (``cluster_options={"log_level": logging.INFO}`` shows them).

    Examples
    --------
    Starting engines takes seconds, so this is not run as a doctest::

        with IPyParallelExecutor(2) as ex:              # 2 local engines, stopped on exit
            print(list(ex.map(lambda x: x * x, range(4))))
        with IPyParallelExecutor(2, mpi=True) as ex:    # one MPI world of 2 engines
            print(ex.mpi_size)
        ex = IPyParallelExecutor(cluster_id="mycluster")  # `ipcluster start --cluster-id=...`
        ex.shutdown()                                   # disconnects; the cluster keeps running

    >>> IPyParallelExecutor.__mro__[1].__name__
    'Executor'
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        mpi: bool = False,
        profile: str | None = None,
        cluster_id: str | None = None,
        profile_dir: str | os.PathLike | None = None,
        timeout: float = 60,
        use_cloudpickle: bool = True,
        cluster_options: dict | None = None,
    ) -> None:
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise ValueError(
                f"max_workers must be None or a positive int, got {max_workers!r}; "
                "pass the number of engines, e.g. max_workers=2"
            )
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        ipp = _require_ipyparallel()
        self._ipp = ipp
        self._lock = threading.Lock()
        self._pending: set[_EngineFuture] = set()
        self._shutdown = False
        self._all_engines_lost = False
        self.cluster: Any = None
        self.client: Any = None
        self.view: Any = None
        self.engines: dict[int, dict] = {}
        self.mpi_size: int | None = None
        self._owned_profile_dir: str | None = None
        self.profile_dir: str | None = None
        self._mpi = bool(mpi)
        # The controller, launcher, engine and engine-nanny processes of a started cluster,
        # reaped after stopping it (the nannies otherwise linger for seconds).
        self._processes: list = []
        self._engine_ids_by_uuid: dict[str, int] = {}
        self._connected_id = cluster_id
        self._finalizer: weakref.finalize | None = None

        connect = profile is not None or cluster_id is not None
        if connect:
            if cluster_options:
                raise TypeError(
                    "cluster_options only apply when starting a cluster; remove them or drop "
                    "profile=/cluster_id= to start a new cluster"
                )
            self._connect(profile, cluster_id, profile_dir, max_workers, timeout)
        else:
            n = max_workers if max_workers is not None else (os.cpu_count() or 1)
            self._start(n, profile_dir, timeout, cluster_options or {})
        try:
            self._set_up(use_cloudpickle, timeout)
        except BaseException:
            self._stop()
            raise

    # -- start / connect ----------------------------------------------------------------------

    def _start(
        self, n: int, profile_dir: str | os.PathLike | None, timeout: float, options: dict
    ) -> None:
        from traitlets.config import Config

        if profile_dir is None:
            profile_dir = self._owned_profile_dir = tempfile.mkdtemp(prefix="chemfit-ipp-")
        self.profile_dir = str(profile_dir)
        config = Config()
        # Pin the launcher to this environment's mpiexec: a different MPI on PATH would start
        # n singletons of size 1 instead of one world.
        config.MPIEngineSetLauncher.mpi_cmd = [str(Path(sys.executable).parent / "mpiexec")]
        # mpiexec takes ~3 s to exit after SIGTERM; kill it after 1 s instead (whatever it
        # leaves behind is reaped by _stop_cluster).
        config.MPIEngineSetLauncher.stop_seconds_until_kill = 1
        kwargs = {
            "n": n,
            "engines": "mpi" if self._mpi else "local",
            "profile_dir": str(profile_dir),
            "log_level": logging.ERROR,
            "controller_args": [f"--HeartMonitor.period={_HEARTBEAT_MS}"],
            "engine_timeout": max(1, math.ceil(timeout)),
            "config": config,
            # The finalizer below stops the cluster at exit; ipyparallel's own exit hook would
            # print "Stopping cluster ..." to stderr.
            "shutdown_atexit": False,
        }
        kwargs.update(options)
        # In an IPython session ipyparallel's default log writes to sys.stdout.
        kwargs.setdefault("log", _ClusterLog(kwargs["log_level"]))
        self.cluster = self._ipp.Cluster(**kwargs)
        # Stops the cluster when this executor is garbage collected or at exit.
        self._finalizer = weakref.finalize(
            self, _stop_cluster, self.cluster, None, self._owned_profile_dir, self._processes
        )
        kind = "MPI" if self._mpi else "local"
        logger.info("starting an ipyparallel cluster of %d %s engines in %s", n, kind, profile_dir)
        t0 = time.perf_counter()
        try:
            # Run like Cluster.start_and_connect_sync(), which picks a background event loop
            # when one is already running (as in a notebook kernel).
            synchronize = getattr(self.cluster, "_synchronize", None)
            if synchronize is not None:
                synchronize(self._start_and_connect, n, timeout)
            else:  # an ipyparallel without it: same steps, but dead engines show at timeout
                self.cluster.start_cluster_sync(n=n)
                self.client = self.cluster.connect_client_sync()
                self.client.wait_for_engines(n, timeout=timeout, interactive=False, widget=False)
        except Exception as exc:
            error = self._start_error(exc, n, kind, timeout)
            self._stop()
            if error is exc:
                raise
            raise error from exc
        except BaseException:
            self._stop()
            raise
        self._processes.extend(_cluster_processes(self.cluster))
        logger.info(
            "started %d %s engines in %.1f s (ipyparallel cluster %s)",
            n,
            kind,
            time.perf_counter() - t0,
            self.cluster.cluster_id,
        )

    async def _start_and_connect(self, n: int, timeout: float) -> None:
        """``Cluster.start_and_connect`` without its progress bar.

        That waits for the engines with ``interactive`` left to ipyparallel, which shows a
        progress bar in an IPython session (tqdm on stdout, or a widget in a notebook cell).
        The wait runs in the same event loop as the start, so that engines that exit while
        starting fail it at once instead of after ``timeout``.
        """
        import asyncio

        await self.cluster.start_cluster(n=n)
        self.client = await self.cluster.connect_client()
        await asyncio.wrap_future(
            self.client.wait_for_engines(
                n, timeout=timeout, block=False, interactive=False, widget=False
            )
        )

    def _start_error(self, exc: Exception, n: int, kind: str, timeout: float) -> Exception:
        """The error to raise when the engines of a started cluster did not come up.

        A timeout stays a ``TimeoutError`` and engines that exited become a ``RuntimeError``;
        both name the engines' exit codes and quote the last lines of their output (which the
        clean-up deletes with a throwaway profile directory). Other errors are kept as they are.
        """
        if isinstance(exc, TimeoutError):
            registered = len(self.client.ids) if self.client is not None else 0
            reason = f"only {registered} of them registered within {timeout} s"
            hint = "pass a longer timeout= if the engines are only slow to start"
            error_type: type[Exception] = TimeoutError
        elif type(exc).__name__ == "EngineError":
            reason = "they exited while starting"
            hint = "fix the engines' environment (see their output above)"
            error_type = RuntimeError
        else:
            return exc
        report = _startup_report(self.cluster)
        return error_type(
            f"{n} {kind} ipyparallel engines did not start: {reason} ({exc}).\n"
            f"{report or 'The engines printed nothing.'}\n{hint}"
        )

    def _connect(
        self,
        profile: str | None,
        cluster_id: str | None,
        profile_dir: str | os.PathLike | None,
        max_workers: int | None,
        timeout: float,
    ) -> None:
        connection_file = _find_connection_file(profile, cluster_id, profile_dir, timeout)
        self.client = self._ipp.Client(connection_file, timeout=timeout)
        self._finalizer = weakref.finalize(self, _stop_cluster, None, self.client, None, [])
        self.profile_dir = str(Path(connection_file).parent.parent)
        try:
            self.client.wait_for_engines(
                max_workers or 1, timeout=timeout, interactive=False, widget=False
            )
        except BaseException:
            self._stop()
            raise
        logger.info("connected to an ipyparallel cluster with %d engines", len(self.client.ids))

    def _set_up(self, use_cloudpickle: bool, timeout: float) -> None:
        everywhere = self.client[:]
        if use_cloudpickle:
            everywhere.use_cloudpickle().get(timeout=timeout)
        self.engines = dict(
            zip(everywhere.targets, everywhere.apply_async(_engine_info).get(timeout=timeout))
        )
        self.mpi_size = _world_size(self.engines)
        if self._mpi and self.mpi_size is None:
            raise ValueError(
                f"mpi=True, but the engines do not form one MPI world (engines: {self.engines}); "
                "start the cluster with `ipcluster start --engines=mpi` or pass mpi=False"
            )
        self.view = self.client.load_balanced_view()
        self._engine_ids_by_uuid = {self.client._engines[eid]: eid for eid in self.client.ids}
        # A weak reference, so that the client does not keep this executor alive.
        self.client._registration_callbacks.append(_weak_callback(self._on_registration_event))

    # -- properties ---------------------------------------------------------------------------

    @property
    def n_engines(self) -> int:
        """The number of engines registered now."""
        if self.client is None or self.client._closed:
            return 0
        return len(self.client.ids)

    @property
    def owns_cluster(self) -> bool:
        """Whether :meth:`shutdown` stops the cluster (it started it)."""
        return self.cluster is not None

    @property
    def cluster_id(self) -> str | None:
        """The id of the cluster this executor started or connected to (``None``: no id)."""
        return self.cluster.cluster_id if self.cluster is not None else self._connected_id

    @property
    def engine_pids(self) -> list[int]:
        """Process ids of the engines at start-up."""
        return [info["pid"] for info in self.engines.values()]

    # -- executor API -------------------------------------------------------------------------

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` on some engine; returns a ``concurrent.futures.Future``.

        Raises
        ------
        RuntimeError
            After :meth:`shutdown`.
        WorkerLostError
            When every engine of the cluster has died.
        """
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to an IPyParallelExecutor after shutdown()")
            if self._all_engines_lost and not self.client.ids:
                raise WorkerLostError(
                    "every engine of the ipyparallel cluster has died; no call can run. "
                    "Restart the cluster (or the engines) and resume"
                )
            future = _EngineFuture(self, fn, args)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        try:
            ar = self.view.apply_async(RemoteCall(fn), *args, **kwargs)
        except Exception as exc:
            self._forget(future)
            if looks_like_pickling_error(exc):
                raise NotPicklableError(
                    f"cannot send {_describe_call(fn, args)} to the ipyparallel engines: "
                    f"{type(exc).__name__}: {exc}. Make the function and its arguments "
                    "picklable (module-level functions, no open files, locks or sockets), or "
                    "use a thread pool, which needs no pickling"
                ) from exc
            raise
        except BaseException:
            self._forget(future)
            raise
        future._async_result = ar
        ar.add_done_callback(future._on_async_result_done)
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like ``Executor.map``; ``chunksize`` calls go to an engine as one task."""
        if isinstance(chunksize, bool) or not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"chunksize must be a positive int, got {chunksize!r}")
        if chunksize == 1:
            return super().map(fn, *iterables, timeout=timeout)
        results = super().map(
            partial(_run_chunk, fn), _chunks(zip(*iterables), chunksize), timeout=timeout
        )
        return itertools.chain.from_iterable(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop a cluster this executor started, or disconnect from one it connected to.

        Parameters
        ----------
        wait : bool
            Wait for the pending calls first.
        cancel_futures : bool
            Cancel the pending calls that have not started.

        Calls still pending when the engines stop are cancelled. Calling it again does nothing.
        """
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait:
            wait_futures(pending)
        self._stop()

    def _stop(self) -> None:
        with self._lock:
            self._shutdown = True
            pending = list(self._pending)
        for future in pending:
            future.cancel()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close(linger=0)
        if self._finalizer is not None:
            self._finalizer()  # stops a cluster this executor started; runs only once

    def __repr__(self) -> str:
        if self.client is None:
            return "IPyParallelExecutor(not connected)"
        state = "shut down" if self._shutdown else f"{self.n_engines} engines"
        kind = "started" if self.owns_cluster else "connected"
        mpi = f", MPI world of {self.mpi_size}" if self.mpi_size else ""
        return f"IPyParallelExecutor({state}, {kind}{mpi})"

    # -- internals ----------------------------------------------------------------------------

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)  # type: ignore[arg-type]

    def _engine_id_of(self, ar: Any) -> int | None:
        metadata = {}
        with contextlib.suppress(Exception):
            metadata = ar._metadata[0]
        engine_id = metadata.get("engine_id")
        if engine_id is None:  # a dead engine's id is already forgotten by the client
            engine_id = self._engine_ids_by_uuid.get(metadata.get("engine_uuid"))
        return engine_id

    def _translate(self, exc: BaseException, ar: Any, future: _EngineFuture) -> BaseException:
        engine_id = self._engine_id_of(ar)
        return translate_engine_error(
            exc, f"ipyparallel engine {engine_id}", rank=engine_id, lost=future._lost
        )

    def _on_registration_event(self, event: dict) -> None:
        """Runs in the client's IO thread when an engine registers or unregisters."""
        if event.get("event") == "register":
            self._engine_ids_by_uuid[event.get("uuid")] = event.get("id")
        if event.get("event") != "unregister":
            return
        logger.warning("ipyparallel engine %s unregistered (died or stopped)", event.get("id"))
        if self.client.ids or self._shutdown:
            return
        # No engine left: calls waiting in the scheduler would wait forever.
        self._all_engines_lost = True
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            if not future.done():
                future._finish(exception=future._lost("every ipyparallel engine died"))


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
        remote_tb = getattr(exc, "traceback", None) or ""
        if isinstance(remote_tb, list):
            remote_tb = "".join(remote_tb)
        translated = RemoteEvaluationError(
            f"{exc.ename} on {where}: {exc.evalue}",
            rank=rank,
            type_name=str(exc.ename),
            remote_message=str(exc.evalue),
            remote_traceback=str(remote_tb),
        )
    else:
        return exc
    translated.__cause__ = exc
    return translated


def _find_connection_file(
    profile: str | None,
    cluster_id: str | None,
    profile_dir: str | os.PathLike | None,
    timeout: float,
) -> str:
    """The client connection file of a running cluster; waits up to ``timeout`` for it to
    appear (a cluster may still be starting), then raises ``ValueError`` naming the clusters
    that do exist there."""
    from IPython.core.profiledir import ProfileDir, ProfileDirError
    from IPython.paths import get_ipython_dir

    where = f"profile={profile!r}, cluster_id={cluster_id!r}, profile_dir={profile_dir!r}"
    try:
        if profile_dir is not None:
            found = ProfileDir.find_profile_dir(str(profile_dir))
        else:
            found = ProfileDir.find_profile_dir_by_name(get_ipython_dir(), profile or "default")
    except ProfileDirError as exc:
        raise ValueError(
            f"no IPython profile directory for {where} ({exc}); pass the profile_dir of the "
            "running cluster, or omit profile=/cluster_id= to start a local cluster"
        ) from exc
    security = Path(found.security_dir)
    name = f"ipcontroller-{cluster_id}-client.json" if cluster_id else "ipcontroller-client.json"
    path = security / name
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if path.exists():
        return str(path)
    running = sorted(
        f.name[len("ipcontroller-") : -len("-client.json")] or "(no id)"
        for f in security.glob("ipcontroller-*client.json")
    )
    raise ValueError(
        f"no running ipyparallel cluster found for {where}: {path} did not appear within "
        f"{timeout} s. Cluster ids with a connection file there: {running or 'none'}. Start one "
        "with `ipcluster start -n N [--cluster-id=ID]`, or omit profile=/cluster_id= to start a "
        "local cluster"
    )


def _weak_callback(method: Callable[[dict], None]) -> Callable[[dict], None]:
    ref = weakref.WeakMethod(method)

    def callback(event: dict) -> None:
        bound = ref()
        if bound is not None:
            bound(event)

    return callback


def _cluster_processes(cluster: Any) -> list:
    """``psutil.Process`` objects of a started cluster's launchers and all their descendants."""
    import psutil

    roots = []
    launchers = [cluster.controller, *cluster.engines.values()]
    for engine_set in cluster.engines.values():
        launchers.extend(getattr(engine_set, "launchers", {}).values())
    for launcher in launchers:
        process = getattr(launcher, "process", None)
        if isinstance(process, psutil.Process):
            roots.append(process)
    found: dict[int, Any] = {}
    for root in roots:
        with contextlib.suppress(psutil.Error):
            for process in [root, *root.children(recursive=True)]:
                found.setdefault(process.pid, process)
    return list(found.values())


def _running(process: Any) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(processes: list, grace: float = 0.2) -> None:
    """Kill whichever of ``processes`` still run ``grace`` seconds after the cluster stopped.

    These are the engines' nannies, which would otherwise linger for ~3 s trying to tell the
    stopped controller that their engine exited. Zombies count as gone (their parent may be an
    init process that reaps late).
    """
    import psutil

    deadline = time.monotonic() + grace
    while any(_running(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.02)
    leftovers = [p for p in processes if _running(p)]
    for process in leftovers:
        with contextlib.suppress(psutil.Error):
            process.kill()
    deadline = time.monotonic() + 5
    while any(_running(p) for p in leftovers) and time.monotonic() < deadline:
        time.sleep(0.02)
    if leftovers:
        logger.debug("killed %d leftover ipyparallel processes", len(leftovers))


def _startup_report(cluster: Any) -> str:
    """Exit codes and the last lines of output of a starting cluster's engines (and of its
    controller if that stopped), for the error raised when the engines do not start."""
    parts = []
    launchers = [(f"engine set {key}", es) for key, es in getattr(cluster, "engines", {}).items()]
    controller = getattr(cluster, "controller", None)
    if controller is not None and getattr(controller, "state", None) == "after":
        launchers.append(("controller", controller))
    for name, launcher in launchers:
        stop_data = getattr(launcher, "stop_data", None) or {}
        exit_code = stop_data.get("exit_code") if isinstance(stop_data, dict) else None
        try:
            output = launcher.get_output() or ""
        except Exception as exc:  # e.g. a remote launcher that cannot fetch its output
            output = f"(could not read its output: {exc})"
        lines = output.strip().splitlines()[-_OUTPUT_LINES:]
        status = "running" if exit_code is None else f"exit code {exit_code}"
        text = "\n".join(f"    {line}" for line in lines) if lines else "    (no output)"
        parts.append(f"{name} ({status}), last lines of output:\n{text}")
    return "\n".join(parts)


def _stop_cluster(cluster: Any, client: Any, profile_dir: str | None, processes: list) -> None:
    """Close a client, stop a cluster, reap its processes and delete a throwaway profile
    directory. Runs once, from ``shutdown()``, garbage collection or exit."""
    if client is not None:
        with contextlib.suppress(Exception):
            client.close(linger=0)
    t0 = time.perf_counter()
    stopped = cluster is not None and (cluster.controller is not None or bool(cluster.engines))
    if stopped:
        try:
            cluster.stop_cluster_sync()
        except Exception:
            logger.warning("stopping ipyparallel cluster %s failed", cluster, exc_info=True)
    _reap(processes)
    if profile_dir is not None:
        shutil.rmtree(profile_dir, ignore_errors=True)
    if stopped:
        logger.info(
            "stopped ipyparallel cluster %s in %.1f s", cluster.cluster_id, time.perf_counter() - t0
        )
