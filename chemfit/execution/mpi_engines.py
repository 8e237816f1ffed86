"""Run an :class:`~chemfit.execution.mpi_wrapper_cob.MPIWrapperCOB` job on ipyparallel MPI
engines, from a notebook, and stream its progress back while it runs.

The engines of an ipyparallel cluster started with ``engines="mpi"`` form one MPI world. An
:class:`MPIEngineJob` sends the same task to every engine: each builds the combined objective
with ``build_objective()`` and wraps it in ``MPIWrapperCOB``; the engine of **rank 0** then runs
a *driver* ``driver(objective, publish)`` (for example a fit, see
:class:`chemfit.fitting.mpi_engine_fit.MPIEngineFit`) while the other ranks serve it in
``worker_loop()``. Everything the driver passes to ``publish(record)`` reaches the notebook
while the job runs (through ipyparallel's data publication channel): :meth:`MPIEngineJob.poll`
collects it and calls the ``on_record`` callbacks, in a background thread by default.

``start()`` returns once the task is submitted; ``wait()`` returns rank 0's result or raises
its error (the original exception, chained from a
:class:`~chemfit.core.exceptions.RemoteEvaluationError` with the remote traceback); ``stop()``
aborts: it stops a cluster the job started (no engine or ``mpiexec`` is left behind), or
interrupts rank 0 on a cluster it connected to.

ipyparallel and mpi4py are imported on first use, not at module import.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError
from typing import Any

from chemfit.core.exceptions import WorkerLostError
from chemfit.core.utils import check_timeout
from chemfit.execution.context_tasks import PickledCallable
from chemfit.execution.executor_info import ExecutorInfo
from chemfit.execution.ipyparallel_engine import (
    OK,
    RemoteCall,
    translate_engine_error,
)
from chemfit.execution.ipyparallel_executor import IPyParallelExecutor
from chemfit.execution.task_errors import RemoteFailure

__all__ = ["MPIEngineJob", "RecordPublisher"]

logger = logging.getLogger(__name__)

RecordCallback = Callable[[dict], Any]
Driver = Callable[[Any, Callable[[dict], None]], Any]

_TOPIC = "chemfit-record-"
#: The key of the error rank 0 publishes before ``MPI_Abort`` ends every engine of the job.
_FAILURE_KEY = "chemfit-failure"
#: Seconds for published data to leave an engine (its IO thread sends it) before it ends.
_PUBLISH_GRACE = 0.5


class RecordPublisher:
    """Engine side: publish one record dict to the notebook (ipyparallel ``publish_data``).

    Each record gets its own numbered key, so none is overwritten before the notebook reads
    it. Outside an ipyparallel engine the records are only counted (and logged at DEBUG).

    Parameters
    ----------
    topic : str
        Prefix of the keys.

    Examples
    --------
    >>> publish = RecordPublisher()
    >>> publish({"loss": 1.0})    # not on an engine: counted only
    >>> publish.count
    1
    """

    def __init__(self, topic: str = _TOPIC) -> None:
        self.topic = topic
        self.count = 0
        self._publish_data: Callable[[dict], None] | None = None
        self._on_engine: bool | None = None

    def _resolve(self) -> bool:
        if self._on_engine is None:
            # An engine's kernel is ipyparallel's; a notebook kernel has data_pub too (ipykernel 7).
            get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
            shell = get_ipython() if callable(get_ipython) else None
            kernel = getattr(shell, "kernel", None)
            on_engine = type(kernel).__module__.startswith("ipyparallel")
            if on_engine:
                from ipyparallel.datapub import publish_data

                self._publish_data = publish_data
            self._on_engine = on_engine
        return self._on_engine

    def __call__(self, record: dict) -> None:
        key = f"{self.topic}{self.count:09d}"
        self.count += 1
        if self._resolve():
            self._publish_data({key: record})  # type: ignore[misc]
        else:
            logger.debug("record %s (not on an ipyparallel engine): %r", key, record)

    def last_words(self, error: BaseException) -> None:
        """Publish the error that ends this engine (the notebook raises it), and let it leave."""
        if self._resolve():
            self._publish_data({_FAILURE_KEY: RemoteFailure.capture(error)})  # type: ignore[misc]
            time.sleep(_PUBLISH_GRACE)


def _run_on_rank(
    build_objective: Callable[[], Any],
    driver: Driver,
    mpi_debug_log: bool,
    rank_timeout: float | None = None,
) -> dict:
    """The task every engine runs (engine side)."""
    from mpi4py import MPI

    from chemfit.execution.mpi_wrapper_cob import MPIWrapperCOB

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    try:
        if isinstance(driver, PickledCallable):
            driver = driver.load()  # NotPicklableError naming it when this engine cannot
        objective, failure = build_objective(), None
    except Exception as exc:
        objective, failure = None, exc
    # Agree before the wrapper's first collective, or ranks that built it would wait forever.
    failed = [r for r, f in enumerate(world.allgather(failure is not None)) if f]
    if failure is not None:
        raise failure
    if failed:
        return {"rank": rank, "status": "peer_failed", "failed_ranks": failed, "value": None}
    with MPIWrapperCOB(objective, mpi_debug_log=mpi_debug_log, timeout=rank_timeout) as wrapper:
        if rank == 0:
            publish = RecordPublisher()
            try:
                value = driver(wrapper, publish)
            finally:
                if wrapper.broken is not None:  # leaving the block ends every engine
                    publish.last_words(wrapper.broken)
            return {"rank": 0, "status": "ok", "value": value}
        wrapper.worker_loop()
    return {"rank": rank, "status": "ok", "value": None}


class MPIEngineJob:
    """Run ``driver`` on rank 0 of an MPI world of ipyparallel engines, the others serving it.

    Parameters
    ----------
    build_objective : callable
        ``build_objective() -> CombinedObjectiveFunction``, run on **every** engine; each must
        build the same objective (same terms in the same order). Pickled by chemfit
        (:class:`~chemfit.execution.context_tasks.PickledCallable`), so a function defined in
        the notebook, and the decorated models and lambdas it uses, travel by value.
    driver : callable
        ``driver(objective, publish) -> result``, run on rank 0 with the ``MPIWrapperCOB``
        objective; ``publish(dict)`` streams a record to the notebook. The result must be
        picklable (plain data is best).
    n_engines : int
        Size of the MPI world when the job starts a cluster.
    executor : IPyParallelExecutor, optional
        Run on the MPI engines of this executor (created with ``mpi=True``; its
        :class:`~chemfit.execution.executor_info.ExecutorInfo` is accepted too); the job never
        shuts it down, so one cluster can serve several jobs.
    profile, cluster_id, profile_dir : optional
        Connect to a running cluster of MPI engines (``ipcluster start --engines=mpi``); see
        :class:`~chemfit.execution.ipyparallel_executor.IPyParallelExecutor`. Without these and
        without ``executor`` the job starts its own cluster of ``n_engines`` MPI engines and
        stops it in :meth:`stop`.
    on_record : callable or list of callables, optional
        Called as ``on_record(record)`` for every published record, in order.
    background : bool
        Poll for records in a background thread (callbacks then run in that thread). With
        ``False`` call :meth:`poll` yourself, e.g. in a loop that redraws a figure.
    poll_interval : float
        Seconds between polls of the background thread and of :meth:`wait`.
    timeout : float
        Seconds to wait for the engines to start or connect.
    rank_timeout : float, optional
        Seconds rank 0 waits for another rank's answer to one call (``MPIWrapperCOB``'s
        ``timeout``); default: for ever. A rank that does not answer in time (hanging, or
        computing for longer) ends the job: every engine of the MPI world is aborted, and
        :meth:`wait` raises :class:`~chemfit.exceptions.RankTimeoutError` naming
        the rank and its terms, with the records received so far kept. Restart the engines
        to go on.
    mpi_debug_log : bool
        Passed on to ``MPIWrapperCOB``.

    Notes
    -----
    With ``background=True`` the callbacks run in the job's polling thread: a failing callback
    is logged (ERROR, with its traceback) and the job goes on. For a live ipympl figure, update
    the artists there and call ``fig.canvas.draw_idle()``. :meth:`poll` raises a callback's
    exception in the calling thread instead.

    Attributes
    ----------
    executor : IPyParallelExecutor or None
        The executor whose engines run the job (after :meth:`start`).
    records : list[dict]
        The records received so far.

    Examples
    --------
    Starting engines takes seconds, so this is not run as a doctest::

        def build():
            return CombinedObjectiveFunction([term_a, term_b])

        def driver(objective, publish):
            losses = []
            for x in (0.0, 0.5, 1.0):
                losses.append(objective({"x": x}))
                publish({"x": x, "loss": losses[-1]})
            return losses

        with MPIEngineJob(build, driver, n_engines=2, on_record=print) as job:
            losses = job.wait()

    >>> MPIEngineJob(dict, print, n_engines=2).state
    'created'
    """

    def __init__(
        self,
        build_objective: Callable[[], Any],
        driver: Driver,
        *,
        n_engines: int = 2,
        executor: IPyParallelExecutor | ExecutorInfo | None = None,
        profile: str | None = None,
        cluster_id: str | None = None,
        profile_dir: str | os.PathLike | None = None,
        on_record: RecordCallback | Iterable[RecordCallback] | None = None,
        background: bool = True,
        poll_interval: float = 0.1,
        timeout: float = 60,
        rank_timeout: float | None = None,
        mpi_debug_log: bool = False,
    ) -> None:
        if not callable(build_objective):
            raise TypeError(
                f"build_objective must be a zero-argument callable that returns the combined "
                f"objective, got {type(build_objective).__name__}"
            )
        if not callable(driver):
            raise TypeError(
                f"driver must be a callable driver(objective, publish), got {type(driver).__name__}"
            )
        if isinstance(n_engines, bool) or not isinstance(n_engines, int) or n_engines < 1:
            raise ValueError(f"n_engines must be a positive int, got {n_engines!r}")
        if executor is not None and (profile is not None or cluster_id is not None):
            raise TypeError("pass either executor= or profile=/cluster_id= (to connect), not both")
        if isinstance(executor, ExecutorInfo):
            executor = executor.executor
        if executor is not None and not isinstance(executor, IPyParallelExecutor):
            raise TypeError(
                f"executor must be an IPyParallelExecutor with MPI engines, got "
                f"{type(executor).__name__}; create it with IPyParallelExecutor(n, mpi=True)"
            )
        if not isinstance(poll_interval, (int, float)) or poll_interval <= 0:
            raise ValueError(f"poll_interval must be a positive number, got {poll_interval!r}")
        self.build_objective = build_objective
        self.driver = driver
        self.n_engines = n_engines
        self.executor: IPyParallelExecutor | None = executor
        self._owns_executor = executor is None
        self._connect = {"profile": profile, "cluster_id": cluster_id, "profile_dir": profile_dir}
        if callable(on_record):
            self._callbacks: list[RecordCallback] = [on_record]
        else:
            self._callbacks = list(on_record or [])
        for callback in self._callbacks:
            if not callable(callback):
                raise TypeError(f"on_record callbacks must be callable, got {callback!r}")
        self.background = bool(background)
        self.poll_interval = float(poll_interval)
        self.timeout = timeout
        self.rank_timeout = check_timeout(rank_timeout, "rank_timeout")
        self.mpi_debug_log = mpi_debug_log
        self._last_words: RemoteFailure | None = None
        self.records: list[dict] = []
        self.state = "created"
        self._lock = threading.RLock()
        self._async_results: dict[int, Any] = {}  # engine id -> AsyncResult
        self._packed: tuple = ()  # build_objective and driver, pickled by start()
        self._ranks: dict[int, int] = {}  # engine id -> MPI rank
        self._root_engine: int | None = None
        self._finished = threading.Event()
        self._stop_requested = threading.Event()
        self._monitor: threading.Thread | None = None
        self._outcome: tuple[str, Any] | None = None
        self.start_time: float | None = None
        self.end_time: float | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def add_callback(self, on_record: RecordCallback) -> None:
        """Call ``on_record(record)`` for every record from now on."""
        if not callable(on_record):
            raise TypeError(f"on_record must be callable, got {on_record!r}")
        with self._lock:
            self._callbacks.append(on_record)

    def start(self) -> MPIEngineJob:
        """Start (or connect to) the engines and submit the job; returns without waiting for it.

        Starting a new cluster takes a few seconds; the job itself then runs in the background.
        """
        with self._lock:
            if self.state != "created":
                raise RuntimeError(f"the job was already started (state {self.state!r})")
            self.state = "starting"
        try:
            # Pickled once, by chemfit (notebook definitions by value), before any engine
            # starts: a failure raises NotPicklableError here, and an engine that cannot
            # rebuild them says which.
            self._packed = tuple(
                PickledCallable.pack(fn, "the ipyparallel MPI engines")
                for fn in (self.build_objective, self.driver)
            )
            self._ensure_executor()
            self._submit()
        except BaseException as exc:
            self.state = "failed"
            self._outcome = ("error", exc)
            self._finished.set()
            self._release_executor()
            raise
        self.state = "running"
        if self.background:
            self._monitor = threading.Thread(
                target=self._monitor_loop, name="chemfit-mpi-engine-job", daemon=True
            )
            self._monitor.start()
        return self

    def _ensure_executor(self) -> None:
        if self.executor is None:
            connect = {k: v for k, v in self._connect.items() if v is not None}
            connecting = "profile" in connect or "cluster_id" in connect
            self.executor = IPyParallelExecutor(
                None if connecting else self.n_engines, mpi=True, timeout=self.timeout, **connect
            )
        executor = self.executor
        ranks = {eid: info.get("mpi_rank") for eid, info in executor.engines.items()}
        if executor.mpi_size is None or sorted(ranks.values()) != list(range(executor.mpi_size)):
            raise ValueError(
                f"the engines do not form one MPI world (engine id -> rank: {ranks}); start them "
                "with IPyParallelExecutor(n, mpi=True) or `ipcluster start --engines=mpi`"
            )
        self._ranks = ranks
        self._root_engine = next(eid for eid, rank in ranks.items() if rank == 0)

    def _submit(self) -> None:
        client = self.executor.client  # type: ignore[union-attr]
        task = RemoteCall(_run_on_rank)
        build, driver = self._packed
        self.start_time = time.monotonic()
        # Rank 0 last: the others are then already waiting for it in the collectives.
        for eid in sorted(self._ranks, key=lambda e: -self._ranks[e]):
            self._async_results[eid] = client[eid].apply_async(
                task, build, driver, self.mpi_debug_log, self.rank_timeout
            )
        logger.info(
            "MPI engine job submitted to %d engines (rank 0 = engine %s)",
            len(self._ranks),
            self._root_engine,
        )

    def _monitor_loop(self) -> None:
        while not self._stop_requested.is_set():
            try:
                self._poll(raise_callback_errors=False)
            except Exception:  # pragma: no cover - _poll already guards callbacks
                logger.exception("polling the MPI engine job failed")
            if self._finished.is_set():
                return
            self._stop_requested.wait(self.poll_interval)

    # -- progress -----------------------------------------------------------------------------

    def poll(self) -> list[dict]:
        """Collect the records published since the last poll and run the callbacks on them.

        Returns
        -------
        list[dict]
            The new records, in publication order.
        """
        return self._poll(raise_callback_errors=True)

    def _poll(self, raise_callback_errors: bool) -> list[dict]:
        with self._lock:
            if self._root_engine is None or self._outcome is not None:
                return []
            root = self._async_results.get(self._root_engine)
            all_done = all(ar.done() for ar in self._async_results.values())
            if all_done:
                # Data messages may trail the result; the output is complete at 'idle'.
                with contextlib.suppress(Exception):
                    root.wait_for_output(timeout=5)
            new = self._take_records(root)
            self.records.extend(new)
            callbacks = list(self._callbacks)
            for record in new:
                for callback in callbacks:
                    try:
                        callback(record)
                    except Exception:
                        if raise_callback_errors:
                            raise
                        logger.exception("on_record callback %r failed", callback)
            if all_done:
                self._settle()
            return new

    def _take_records(self, ar: Any) -> list[dict]:
        try:
            # The dict that ipyparallel's IO thread fills with what rank 0 publishes.
            data = ar.metadata["data"]
        except (AttributeError, IndexError, KeyError, TypeError):
            return []
        if _FAILURE_KEY in data:
            self._last_words = data.pop(_FAILURE_KEY)
        new = []
        while True:
            key = f"{_TOPIC}{len(self.records) + len(new):09d}"
            if key not in data:
                return new
            new.append(data.pop(key))

    def _settle(self) -> None:
        """Record the job's outcome once every engine's task is done."""
        outcomes = {}
        for eid, ar in self._async_results.items():
            outcomes[eid] = self._engine_outcome(eid, ar)
        root = outcomes[self._root_engine]
        failures = [
            outcomes[eid]
            for eid in sorted(outcomes, key=lambda e: self._ranks[e])
            if outcomes[eid][0] == "error"
        ]
        if self._last_words is not None:  # rank 0 said why before every engine was aborted
            where = f"MPI rank 0 (ipyparallel engine {self._root_engine})"
            self._outcome = ("error", self._last_words.to_exception(where, rank=0))
        elif failures:
            # The lowest failing rank is the cause; rank 0 may only report a peer's failure.
            self._outcome = failures[0]
        elif root[0] == "ok" and root[1].get("status") == "peer_failed":  # pragma: no cover
            self._outcome = ("error", RuntimeError(f"ranks {root[1]['failed_ranks']} failed"))
        else:
            self._outcome = ("ok", root[1]["value"])
        self.end_time = time.monotonic()
        if self.state == "running":
            self.state = "failed" if self._outcome[0] == "error" else "done"
        self._finished.set()
        logger.info("MPI engine job %s after %d records", self.state, len(self.records))

    def _engine_outcome(self, eid: int, ar: Any) -> tuple[str, Any]:
        rank = self._ranks[eid]
        where = f"MPI rank {rank} (ipyparallel engine {eid})"
        try:
            status, value = ar.result()
        except BaseException as exc:
            return "error", translate_engine_error(
                exc,
                where,
                rank=rank,
                lost=lambda reason: WorkerLostError(
                    f"{reason}: the MPI engine job was lost, with {len(self.records)} records "
                    "received (job.records). Restart the cluster and resume"
                ),
            )
        if status == OK:
            return "ok", value
        return "error", value.to_exception(where, rank=rank)

    # -- results ------------------------------------------------------------------------------

    def done(self) -> bool:
        """Whether the job has finished (successfully or not) or was stopped."""
        if self.state in ("done", "failed", "stopped"):
            return True
        if self.state == "running" and not self.background:
            self._poll(raise_callback_errors=True)
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """Wait for the job and return rank 0's result.

        Parameters
        ----------
        timeout : float, optional
            Seconds to wait; ``None`` waits as long as it takes.

        Raises
        ------
        TimeoutError
            When the job is still running after ``timeout`` seconds (it keeps running).
        concurrent.futures.CancelledError
            When the job was stopped before it finished.
        Exception
            The error that ended the job on an engine (see the module docs), or
            :class:`~chemfit.core.exceptions.WorkerLostError` when an engine died.
        """
        if self.state == "created":
            raise RuntimeError("call start() before wait()")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished.is_set() and self.state != "stopped":
            if not self.background:
                self._poll(raise_callback_errors=True)
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(
                    f"the MPI engine job is still running after {timeout} s "
                    f"({len(self.records)} records so far); call wait() again or stop()"
                )
            step = self.poll_interval if remaining is None else min(self.poll_interval, remaining)
            self._finished.wait(step)
        if self._outcome is None:
            raise CancelledError("the MPI engine job was stopped before it finished")
        kind, value = self._outcome
        if kind == "error":
            raise value
        return value

    result = wait

    # -- stopping -----------------------------------------------------------------------------

    def stop(self, timeout: float = 30) -> None:
        """Abort the job if it still runs, and release what the job started.

        A cluster the job started is stopped (engines, controller and ``mpiexec`` end). On a
        cluster it connected to, or on a given ``executor``, rank 0 is interrupted
        (``SIGINT``, so a fit ends as interrupted and releases its workers) and the engines are
        left running; this waits up to ``timeout`` seconds for the task to end. Idempotent.
        """
        with self._lock:
            running = self.state in ("starting", "running") and not self._finished.is_set()
            if running or self.state == "created":
                self.state = "stopped"
        self._stop_requested.set()
        executor = self.executor
        kills_cluster = self._owns_executor and executor is not None and executor.owns_cluster
        if running and executor is not None and not kills_cluster:
            self._interrupt_root(timeout)
        monitor = self._monitor
        if monitor is not None and monitor is not threading.current_thread():
            monitor.join(timeout=5)
        self._release_executor()
        self._finished.set()

    close = stop

    def _interrupt_root(self, timeout: float) -> None:
        client = self.executor.client  # type: ignore[union-attr]
        logger.info("interrupting rank 0 (engine %s) of the MPI engine job", self._root_engine)
        with contextlib.suppress(Exception):
            client.send_signal(signal.SIGINT, targets=[self._root_engine], block=True)
        deadline = time.monotonic() + timeout
        for ar in self._async_results.values():
            with contextlib.suppress(Exception):
                ar.wait(max(0.0, deadline - time.monotonic()))
        if not all(ar.done() for ar in self._async_results.values()):
            logger.warning(
                "the MPI engine job's tasks did not end within %s s after the interrupt", timeout
            )

    def _release_executor(self) -> None:
        if self._owns_executor and self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> MPIEngineJob:
        if self.state == "created":
            self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(state={self.state!r}, records={len(self.records)}, "
            f"n_engines={len(self._ranks) or self.n_engines})"
        )
