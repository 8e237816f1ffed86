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
Starting, connecting to and stopping clusters lives in
:mod:`chemfit.execution.ipyparallel_cluster`; what runs on the engines and how their answers
and ipyparallel's errors are read back, in :mod:`chemfit.execution.ipyparallel_engine`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future
from concurrent.futures import wait as wait_futures
from functools import partial
from typing import Any

from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import NotPicklableError, WorkerLostError
from chemfit.core.utils import check_timeout
from chemfit.execution.ipyparallel_cluster import (
    ClusterConnection,
    connect_to_cluster,
    require_ipyparallel,
    start_cluster,
    survey_engines,
    watch_engines,
    world_size,
)

# RemoteCall, failure_to_exception and translate_engine_error are re-exported: this module is
# where chemfit 3.x users import them from.
from chemfit.execution.ipyparallel_engine import (
    OK,
    RemoteCall,
    failure_to_exception,
    run_chunk,
    translate_engine_error,
)
from chemfit.execution.task_errors import call_parameters, looks_like_pickling_error, shorten

__all__ = [
    "IPyParallelExecutor",
    "RemoteCall",
    "failure_to_exception",
    "translate_engine_error",
]

logger = logging.getLogger(__name__)


_ENGINE_KINDS = ("local", "mpi", "slurm")
_RESTART_HINT = "Start new engines (a new executor) and resume"
#: Seconds :meth:`IPyParallelExecutor.kill_worker_of` waits to learn which engine runs a call.
_ENGINE_KNOWN_WAIT = 0.5


def _engines_kind(engines: str | None, mpi: bool) -> tuple[str, bool]:
    """``(engines, mpi)`` from the ``engines=`` and ``mpi=`` arguments."""
    if engines is None:
        return ("mpi" if mpi else "local"), bool(mpi)
    if engines not in _ENGINE_KINDS:
        kinds = ", ".join(repr(k) for k in _ENGINE_KINDS)
        raise ValueError(f"unknown engines={engines!r}; choose one of {kinds}")
    if engines == "mpi":
        return "mpi", True
    if engines == "local" and mpi:
        raise ValueError("engines='local' and mpi=True contradict; pass engines='mpi'")
    return engines, bool(mpi)


def _slurm_options(
    engines: str,
    batch_options: dict,
    controller_ip: str | None,
    queue_timeout: float | None,
    on_status: Callable[[dict], Any] | None,
) -> dict | None:
    """The arguments of ``start_slurm_cluster`` for ``engines="slurm"``, else ``None``."""
    from chemfit.execution.slurm_batch import BATCH_OPTION_NAMES, SlurmBatchOptions

    unknown = sorted(set(batch_options) - set(BATCH_OPTION_NAMES))
    if unknown:
        raise TypeError(
            f"IPyParallelExecutor got unexpected options {unknown}; the batch options of "
            f"engines='slurm' are {list(BATCH_OPTION_NAMES)}"
        )
    slurm_only = {
        "controller_ip": controller_ip,
        "queue_timeout": queue_timeout,
        "on_status": on_status,
        **batch_options,
    }
    if engines != "slurm":
        given = sorted(name for name, value in slurm_only.items() if value is not None)
        if given:
            raise TypeError(f"{given} apply only to engines='slurm' (got engines={engines!r})")
        return None
    return {
        "batch": SlurmBatchOptions(**batch_options),
        "controller_ip": controller_ip,
        "queue_timeout": queue_timeout,
        "on_status": on_status,
    }


def _chunks(iterable: Iterable[tuple], size: int) -> Iterator[list[tuple]]:
    iterator = iter(iterable)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _function_name(fn: Any) -> str:
    """The name of the innermost function of wrappers that keep it in ``fn`` or ``func``."""
    for _ in range(5):
        inner = getattr(fn, "fn", None) or getattr(fn, "func", None)
        if inner is None or inner is fn:
            break
        fn = inner
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _call_parameters(args: tuple) -> Any:
    """The parameters of a ``fn(*args, ctx)`` call (``None`` for other calls)."""
    if args and isinstance(args[-1], EvaluateContext):
        return call_parameters(args)
    return None


def _describe_call(fn: Callable[..., Any], args: tuple) -> str:
    parameters = _call_parameters(args)
    if parameters is not None:
        text = f"parameters {parameters!r}"
    else:  # chemfit's own tasks carry bytes: their size says enough
        text = "arguments " + ", ".join(
            f"<{len(a)} bytes>" if isinstance(a, bytes) else repr(a) for a in args
        )
    return f"{_function_name(fn)} with {shorten(text, 200)}"


def _single(metadata: Any) -> dict:
    """The metadata dict of a one-task ``AsyncResult`` (``AsyncResult.metadata``)."""
    if isinstance(metadata, list):
        return metadata[0] if metadata else {}
    return metadata if isinstance(metadata, dict) else {}


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
            # engine and its result is dropped. Not ar.abort(), which waits for the reply.
            with contextlib.suppress(Exception):
                self._executor.client.abort(jobs=ar, block=False)
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
            engine_id = self._executor._engine_id_of(ar)
            where = f"ipyparallel engine {engine_id}"
            self._finish(
                exception=translate_engine_error(exc, where, rank=engine_id, lost=self._lost)
            )
            return
        if status == OK:
            self._finish(result=value)
            return
        engine_id = self._executor._engine_id_of(ar)
        where = f"ipyparallel engine {engine_id}"
        self._finish(exception=value.to_exception(where, rank=engine_id))


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
    engines : {"local", "mpi", "slurm"}, optional
        How to start the engines: local processes (the default), ``mpiexec`` (as
        ``mpi=True``), or one Slurm job whose ``srun`` starts them (with ``mpi=True`` as one MPI
        world, ``srun --mpi=pmi2``). See :mod:`chemfit.execution.slurm_engines`.
    controller_ip : str, optional
        ``engines="slurm"``: the address the controller listens on (default: this host's
        address that compute nodes reach).
    queue_timeout : float, optional
        ``engines="slurm"``: seconds the job may wait in the queue (``None``: as long as it
        takes; ``timeout`` counts from when the job runs).
    on_status : callable, optional
        ``engines="slurm"``: ``on_status(dict)`` while the job waits and the engines register
        (``job_id``, ``state``, ``waited``, ``engines``, ``n``, ``text``).
    **batch_options
        ``engines="slurm"``: ``partition``, ``time``, ``cores``, ``memory``, ``account``,
        ``extra_directives``, ``job_name``, ``prologue``, ``srun_mpi``
        (:class:`~chemfit.execution.slurm_batch.SlurmBatchOptions`).

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
    slurm_job : SlurmEngineJob or None
        ``engines="slurm"``: the engines' job (``job_id``, ``state``, ``batch_script``);
        :attr:`job_id` and :attr:`job_state` read it. :meth:`shutdown` cancels the job and
        waits until Slurm has ended it.

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
        engines: str | None = None,
        controller_ip: str | None = None,
        queue_timeout: float | None = None,
        on_status: Callable[[dict], Any] | None = None,
        **batch_options: Any,
    ) -> None:
        if max_workers is not None and (
            isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
        ):
            raise ValueError(
                f"max_workers must be None or a positive int, got {max_workers!r}; "
                "pass the number of engines, e.g. max_workers=2"
            )
        check_timeout(timeout, allow_none=False)
        engines, mpi = _engines_kind(engines, mpi)
        slurm = _slurm_options(engines, batch_options, controller_ip, queue_timeout, on_status)
        ipp = require_ipyparallel()
        connect = profile is not None or cluster_id is not None
        if engines == "slurm" and max_workers is None and not connect:
            raise ValueError(
                "engines='slurm' needs the number of engines to request from Slurm: pass "
                "max_workers, e.g. make_executor('ipyparallel', 4, engines='slurm', "
                "partition=...)"
            )
        if connect and engines == "slurm":
            raise TypeError(
                "engines='slurm' starts new engines; drop profile=/cluster_id= (which connect to "
                "a running cluster), or drop engines='slurm' to connect"
            )
        if connect and cluster_options:
            raise TypeError(
                "cluster_options only apply when starting a cluster; remove them or drop "
                "profile=/cluster_id= to start a new cluster"
            )
        self._lock = threading.Lock()
        self._pending: set[_EngineFuture] = set()
        self._shutdown = False  # read by chemfit_widgets' ExecutorPicker
        self._all_engines_lost = False
        self._connection: ClusterConnection | None = None
        self.cluster: Any = None
        self.client: Any = None
        self.view: Any = None
        self.engines: dict[int, dict] = {}
        self.mpi_size: int | None = None
        self.profile_dir: str | None = None
        self._mpi = bool(mpi)
        self._engine_ids_by_uuid: dict[str, int] = {}
        self._engines_kind = "connected" if connect else engines
        #: The Slurm job of ``engines="slurm"`` (``job_id``, ``state``, ``batch_script``).
        self.slurm_job: Any = None
        self._lost_reason: str | None = None

        if connect:
            self._connection = connect_to_cluster(
                ipp,
                profile=profile,
                cluster_id=cluster_id,
                profile_dir=profile_dir,
                min_engines=max_workers or 1,
                timeout=timeout,
            )
        elif slurm is not None:
            from chemfit.execution.slurm_engines import start_slurm_cluster

            self._connection, self.slurm_job = start_slurm_cluster(
                ipp,
                max_workers or 1,
                mpi=self._mpi,
                profile_dir=profile_dir,
                timeout=timeout,
                options=cluster_options or {},
                **slurm,
            )
            self.slurm_job.set_on_end(self._on_job_end)
        else:
            n = max_workers if max_workers is not None else (os.cpu_count() or 1)
            self._connection = start_cluster(
                ipp,
                n,
                mpi=self._mpi,
                profile_dir=profile_dir,
                timeout=timeout,
                options=cluster_options or {},
            )
        self.cluster = self._connection.cluster
        self.client = self._connection.client
        self.profile_dir = self._connection.profile_dir
        try:
            self._set_up(use_cloudpickle, timeout)
        except BaseException:
            self._stop()
            raise

    def _set_up(self, use_cloudpickle: bool, timeout: float) -> None:
        self.engines, self._engine_ids_by_uuid = survey_engines(
            self.client, use_cloudpickle=use_cloudpickle, timeout=timeout
        )
        self.mpi_size = world_size(self.engines)
        if self._mpi and self.mpi_size is None:
            raise ValueError(
                f"mpi=True, but the engines do not form one MPI world (engines: {self.engines}); "
                "start the cluster with `ipcluster start --engines=mpi` or pass mpi=False"
            )
        self.view = self.client.load_balanced_view()
        watch_engines(self.client, self._on_registration_event)

    # -- properties ---------------------------------------------------------------------------

    @property
    def n_engines(self) -> int:
        """The number of engines registered now."""
        if self._connection is None or self._connection.closed:
            return 0
        return len(self.client.ids)

    @property
    def owns_cluster(self) -> bool:
        """Whether :meth:`shutdown` stops the cluster (it started it)."""
        return self.cluster is not None

    @property
    def cluster_id(self) -> str | None:
        """The id of the cluster this executor started or connected to (``None``: no id)."""
        return self._connection.cluster_id if self._connection is not None else None

    @property
    def job_id(self) -> str | None:
        """The Slurm job id of ``engines="slurm"`` (``None`` for other engines)."""
        return self.slurm_job.job_id if self.slurm_job is not None else None

    @property
    def job_state(self) -> str | None:
        """The Slurm job's state (``"PENDING"``, ``"RUNNING"``, ``"CANCELLED"``, ...) as last
        polled, ``None`` for engines that are not a Slurm job."""
        return self.slurm_job.state if self.slurm_job is not None else None

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
            if self._lost_reason is not None:
                raise WorkerLostError(f"{self._lost_reason}; no call can run. {_RESTART_HINT}")
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
            partial(run_chunk, fn), _chunks(zip(*iterables), chunksize), timeout=timeout
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
        if self._connection is not None:
            # Closes the client; stops a cluster this executor started. Runs only once.
            self._connection.close()
        if self.slurm_job is not None:
            self.slurm_job.close()  # scancel, and wait until Slurm has ended the job

    def __repr__(self) -> str:
        if self.client is None:
            return "IPyParallelExecutor(not connected)"
        state = "shut down" if self._shutdown else f"{self.n_engines} engines"
        kind = "started" if self.owns_cluster else "connected"
        mpi = f", MPI world of {self.mpi_size}" if self.mpi_size else ""
        job = ""
        if self.slurm_job is not None:
            job = f", Slurm job {self.job_id} {self.job_state or 'state unknown'}"
        return f"IPyParallelExecutor({state}, {kind}{mpi}{job})"

    def kill_worker_of(self, future: Future) -> str | None:
        """Kill the engine that runs the call of ``future`` (a future of :meth:`submit`).

        What :meth:`~chemfit.execution.submission.ContextFuture.abandon` uses for a call that
        runs too long. The engine's process is killed (``SIGKILL``: directly when it runs on
        this host, else through ipyparallel's ``Client.send_signal``); the call's future then
        fails with ``WorkerLostError`` and the other engines go on. A call that has not started
        on an engine is aborted instead.

        Returns
        -------
        str or None
            What was done, for messages; ``None`` when nothing was (the call finished, or is
            not one of this executor's).
        """
        ar = getattr(future, "_async_result", None)
        if ar is None or future.done() or ar.done():
            return None
        engine_id = self._engine_id_of(ar)
        deadline = time.monotonic() + _ENGINE_KNOWN_WAIT
        while engine_id is None and time.monotonic() < deadline and not ar.done():
            time.sleep(0.01)  # its engine is known once it reports that it started
            engine_id = self._engine_id_of(ar)
        if engine_id is None:
            if ar.done():
                return None
            with contextlib.suppress(Exception):
                self.client.abort(jobs=ar, block=False)
            return "it was aborted before it started on an engine"
        info = self.engines.get(engine_id, {})
        pid = info.get("pid")
        if pid and info.get("host") == socket.gethostname():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
        else:
            self.client.send_signal("SIGKILL", targets=[engine_id], block=False)
        process = f" (process {pid})" if pid else ""
        logger.warning("killed ipyparallel engine %s%s to abandon its call", engine_id, process)
        return f"ipyparallel engine {engine_id}{process}, which ran it, was killed"

    # -- internals ----------------------------------------------------------------------------

    def _forget(self, future: Future) -> None:
        with self._lock:
            self._pending.discard(future)  # type: ignore[arg-type]

    def _engine_id_of(self, ar: Any) -> int | None:
        metadata: dict = {}
        with contextlib.suppress(Exception):
            metadata = _single(ar.metadata)
        engine_id = metadata.get("engine_id")
        if engine_id is None:  # a dead engine's id is already forgotten by the client
            engine_id = self._engine_ids_by_uuid.get(metadata.get("engine_uuid"))
        return engine_id

    def _on_job_end(self, job_id: str, state: str) -> None:
        """Runs in the Slurm watcher's thread when the engines' job ends."""
        if self._shutdown:
            return
        self._lost_reason = f"Slurm job {job_id} of the ipyparallel engines ended ({state})"
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            if not future.done():
                future._finish(exception=future._lost(self._lost_reason))

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
