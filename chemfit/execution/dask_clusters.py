"""An executor over Dask workers: a ``LocalCluster``, dask-jobqueue's ``SLURMCluster``, or a
running scheduler.

:class:`DaskClusterExecutor` is what ``make_executor("dask", ...)`` returns: a
``concurrent.futures`` executor (a ``distributed`` ``ClientExecutor``) that owns the cluster and
client it started and closes them on :meth:`~DaskClusterExecutor.shutdown`.

* ``cluster="local"``: ``max_workers`` worker processes on this machine, one thread each.
* ``cluster="slurm"``: ``max_workers`` workers, each its own Slurm job (batch options as for
  :class:`~chemfit.execution.slurm_batch.SlurmBatchOptions`). ``sbatch --test-only`` checks
  the job script first, so that a bad partition or time limit is reported in plain words; the
  jobs are watched, and when every one has ended (cancelled, failed, timed out) the pending
  calls fail with an error naming the jobs instead of waiting for workers that never come.
* ``address="tcp://host:8786"``: connect to a running scheduler; ``shutdown()`` only
  disconnects.

The scheduler's dashboard listens on ``127.0.0.1`` by default (``dashboard_address=``), and
:attr:`~DaskClusterExecutor.dashboard_link` is the link to show in a notebook: through
jupyter-server-proxy (``{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status``) when JupyterLab runs
under JupyterHub, or as ``dashboard_link_template`` says.

dask, distributed and dask-jobqueue are imported when an executor is created.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, InvalidStateError
from typing import Any
from urllib.parse import urlparse

from chemfit.core.exceptions import WorkerLostError
from chemfit.execution.slurm_batch import (
    BATCH_OPTION_NAMES,
    SlurmBatchOptions,
    dask_jobqueue_options,
    explain_sbatch_error,
    host_address,
)
from chemfit.execution.slurm_engines import cluster_directory
from chemfit.execution.slurm_jobs import SlurmJobWatcher, job_processes_running, scancel

__all__ = ["DaskClusterExecutor", "dashboard_link"]

logger = logging.getLogger(__name__)

_CLUSTERS = ("local", "slurm")


def dashboard_link(
    link: str | None, template: str | None = None, environ: Any = None
) -> str | None:
    """The dashboard link to show in a notebook.

    Parameters
    ----------
    link : str or None
        The dashboard's own link, e.g. ``"http://127.0.0.1:8787/status"``.
    template : str, optional
        A link with ``{host}``, ``{port}`` and any environment variable as fields, e.g.
        ``"https://hub.example.org{JUPYTERHUB_SERVICE_PREFIX}proxy/{port}/status"``.
    environ : mapping, optional
        The environment (``os.environ``).

    Returns
    -------
    str or None
        With ``template``: it, filled in. Under JupyterHub (``JUPYTERHUB_SERVICE_PREFIX`` set):
        the path through jupyter-server-proxy, ``{prefix}proxy/{port}/status``. Otherwise
        ``link`` itself.

    Examples
    --------
    >>> dashboard_link("http://127.0.0.1:8787/status", environ={})
    'http://127.0.0.1:8787/status'
    >>> dashboard_link("http://127.0.0.1:8787/status",
    ...                environ={"JUPYTERHUB_SERVICE_PREFIX": "/user/ada/"})
    '/user/ada/proxy/8787/status'
    >>> dashboard_link("http://127.0.0.1:8787/status", "/lab/proxy/{port}/status", {})
    '/lab/proxy/8787/status'
    """
    if not link:
        return None
    environ = os.environ if environ is None else environ
    parsed = urlparse(link)
    fields = {**environ, "host": parsed.hostname or "", "port": parsed.port or ""}
    if template:
        return template.format(**fields)
    prefix = environ.get("JUPYTERHUB_SERVICE_PREFIX")
    if prefix:
        return f"{prefix.rstrip('/')}/proxy/{parsed.port}{parsed.path or '/status'}"
    return link


def _require_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise ImportError(
            "make_executor('dask') needs the optional dependency distributed; install it with: "
            "pip install 'chemfit[dask]'"
        ) from exc
    return distributed


_import_lock = threading.Lock()


def _require_jobqueue() -> Any:
    try:
        with _import_lock:
            return _import_jobqueue()
    except ImportError as exc:
        raise ImportError(
            "make_executor('dask', cluster='slurm') needs dask-jobqueue; install it with: "
            "pip install 'chemfit[slurm]'"
        ) from exc


def _import_jobqueue() -> Any:
    """``import dask_jobqueue`` without its module-level ``signal.signal(SIGINT, sys.exit)``
    (dask_jobqueue.runner), which fails outside the main thread (the picker starts clusters in
    a thread) and would turn a notebook's "Interrupt kernel" into an exit."""
    import importlib
    import signal

    if "dask_jobqueue" in sys.modules:
        return sys.modules["dask_jobqueue"]
    original = signal.signal

    def keep_handler(signum: Any, handler: Any) -> Any:
        logger.debug("dask_jobqueue's import wanted a handler for signal %s: ignored", signum)
        return signal.getsignal(signum)

    signal.signal = keep_handler  # type: ignore[assignment]
    try:
        return importlib.import_module("dask_jobqueue")
    finally:
        signal.signal = original


def _base_executor_class() -> type:
    from distributed.cfexecutor import ClientExecutor

    return ClientExecutor


class _DaskFuture(Future):
    """A ``concurrent.futures.Future`` fed by a Dask future."""

    def __init__(self, dask_future: Any) -> None:
        super().__init__()
        self.dask_future = dask_future

    def cancel(self) -> bool:
        if self.done():
            return False
        with contextlib.suppress(Exception):
            self.dask_future.cancel()
        return super().cancel()

    def settle(self, *, result: Any = None, exception: BaseException | None = None) -> None:
        with contextlib.suppress(InvalidStateError, RuntimeError):
            if not self.set_running_or_notify_cancel():
                return
        with contextlib.suppress(InvalidStateError):
            if exception is not None:
                self.set_exception(exception)
            else:
                self.set_result(result)

    def from_dask(self, dask_future: Any) -> None:
        """Runs in a thread of the Dask client when the Dask future is done."""
        if self.done():
            return
        status = dask_future.status
        if status == "finished":
            try:
                self.settle(result=dask_future.result())
            except BaseException as exc:  # e.g. a result that does not unpickle here
                self.settle(exception=exc)
        elif status == "cancelled":
            super().cancel()
        else:
            self.settle(exception=dask_future.exception())
        # Its result is here now: the cluster need not keep it (nor compute it again when the
        # worker holding it dies).
        self.dask_future = None


def _make_executor_class() -> type:
    base = _base_executor_class()

    class DaskClusterExecutor(base):  # type: ignore[misc, valid-type]
        __doc__ = _DOC

        def __init__(
            self,
            max_workers: int | None = None,
            *,
            cluster: str | None = None,
            address: str | None = None,
            timeout: float = 60,
            queue_timeout: float | None = None,
            dashboard_address: str = "127.0.0.1:0",
            dashboard_link_template: str | None = None,
            scheduler_host: str | None = None,
            cluster_options: dict | None = None,
            on_status: Callable[[dict], Any] | None = None,
            **batch_options: Any,
        ) -> None:
            distributed = _require_distributed()
            if address is not None and cluster is not None:
                raise TypeError("pass cluster= to start workers or address= to connect, not both")
            if address is None and cluster is None:
                cluster = "local"
            if cluster is not None and cluster not in _CLUSTERS:
                raise ValueError(f"unknown cluster={cluster!r}; choose 'local' or 'slurm'")
            unknown = sorted(set(batch_options) - set(BATCH_OPTION_NAMES))
            if unknown:
                raise TypeError(
                    f"make_executor('dask') got unexpected options {unknown}; the batch options "
                    f"of cluster='slurm' are {list(BATCH_OPTION_NAMES)}"
                )
            if cluster == "slurm" and max_workers is None:
                raise ValueError(
                    "cluster='slurm' needs the number of workers to request from Slurm (one job "
                    "each): pass max_workers, e.g. make_executor('dask', 4, cluster='slurm', "
                    "partition=...)"
                )
            if batch_options and cluster != "slurm":
                raise TypeError(f"{sorted(batch_options)} apply only to cluster='slurm'")
            self.cluster_kind = cluster or "connected"
            self.cluster: Any = None
            self.batch_script: str | None = None
            self.log_directory: str | None = None
            self.dashboard_link_template = dashboard_link_template
            self._pending: weakref.WeakSet = weakref.WeakSet()
            self._lock = threading.Lock()
            self._lost_reason: str | None = None
            self._watcher: SlurmJobWatcher | None = None
            self._ended_jobs: dict[str, str] = {}
            self._known_jobs: set[str] = set()
            self._dashboard_address = dashboard_address
            self._start_time = time.monotonic()
            n = max_workers or (os.cpu_count() or 1) if cluster == "local" else max_workers or 1
            client = None
            try:
                if address is not None:
                    client = distributed.Client(address, timeout=timeout)
                    if max_workers:
                        client.wait_for_workers(max_workers, timeout=timeout)
                elif cluster == "local":
                    options = {"dashboard_address": dashboard_address, **(cluster_options or {})}
                    self.cluster = distributed.LocalCluster(
                        n_workers=n, threads_per_worker=1, processes=True, **options
                    )
                    client = distributed.Client(self.cluster, timeout=timeout)
                    client.wait_for_workers(n, timeout=timeout)
                else:
                    batch = SlurmBatchOptions(**batch_options)
                    # The workers' output, private (0700), where compute nodes see it.
                    self.log_directory = tempfile.mkdtemp(prefix="dask-", dir=cluster_directory())
                    options = {"log_directory": self.log_directory, **(cluster_options or {})}
                    self.cluster = _slurm_cluster(batch, dashboard_address, scheduler_host, options)
                    self.batch_script = self.cluster.job_script()
                    _check_job_script(self.batch_script)
                    client = distributed.Client(self.cluster, timeout=timeout)
                    super().__init__(client, pure=False)
                    self._watcher = SlurmJobWatcher(self._on_job_end)
                    self.cluster.scale(n)
                    self._wait_for_slurm_workers(n, timeout, queue_timeout, on_status)
            except BaseException:
                self._close(client)
                if self.log_directory is not None and not os.listdir(self.log_directory):
                    os.rmdir(self.log_directory)  # nothing to read: no job ran
                raise
            super().__init__(client, pure=False)
            self.ready_seconds = time.monotonic() - self._start_time
            logger.info("%r ready in %.1f s", self, self.ready_seconds)

        # -- state ----------------------------------------------------------------------------

        @property
        def client(self) -> Any:
            """The ``distributed.Client``."""
            return self._client

        @property
        def n_workers(self) -> int:
            """Workers connected now."""
            with contextlib.suppress(Exception):
                return len(self._client.scheduler_info(n_workers=-1)["workers"])
            return 0

        @property
        def job_ids(self) -> list[str]:
            """The Slurm job ids of the workers (``cluster="slurm"``)."""
            if self.cluster_kind != "slurm" or self.cluster is None:
                return []
            jobs = [getattr(w, "job_id", None) for w in list(self.cluster.workers.values())]
            self._known_jobs.update(str(j) for j in jobs if j)
            return sorted(self._known_jobs, key=int)

        @property
        def job_states(self) -> dict[str, str]:
            """The workers' Slurm jobs and their states: last polled, or RUNNING once the job's
            worker connected (the scheduler can know that before the next poll of Slurm)."""
            if self._watcher is None:
                return {}
            states = {
                job_id: self._watcher.states.get(job_id, "PENDING") for job_id in self.job_ids
            }
            for job_id in self._jobs_with_a_connected_worker():
                if states.get(job_id) == "PENDING":
                    states[job_id] = "RUNNING"
            return states

        def _jobs_with_a_connected_worker(self) -> set[str]:
            names: set[str] = set()
            with contextlib.suppress(Exception):
                workers = self._client.scheduler_info(n_workers=-1)["workers"].values()
                names = {str(w.get("name")) for w in workers}
            if self.cluster is None:
                return set()
            # A job with several worker processes names them "<job's name>-<i>".
            return {
                str(job.job_id)
                for name, job in list(self.cluster.workers.items())
                if getattr(job, "job_id", None)
                and any(w == str(name) or w.startswith(f"{name}-") for w in names)
            }

        @property
        def dashboard_link(self) -> str | None:
            """The scheduler's dashboard, as a notebook should link it (see
            :func:`~chemfit.execution.dask_clusters.dashboard_link`)."""
            raw = None
            with contextlib.suppress(Exception):
                raw = (self.cluster or self._client).dashboard_link
            if raw and self.cluster is not None and self._dashboard_address.startswith("127."):
                # Dask names the scheduler's host; the dashboard listens on this host only.
                parsed = urlparse(raw)
                raw = parsed._replace(netloc=f"127.0.0.1:{parsed.port}").geturl()
            return dashboard_link(raw, self.dashboard_link_template)

        @property
        def owns_cluster(self) -> bool:
            """Whether :meth:`shutdown` stops the workers (this executor started them)."""
            return self.cluster is not None

        def _repr_html_(self) -> str:
            link = self.dashboard_link
            dash = f' — <a href="{link}" target="_blank">dashboard</a>' if link else ""
            return f"<code>{self!r}</code>{dash}"

        def __repr__(self) -> str:
            state = "shut down" if self._shutdown else f"{self.n_workers} workers"
            jobs = ""
            if self.cluster_kind == "slurm":
                states = self.job_states
                jobs = ", Slurm jobs " + ", ".join(f"{j} {s}" for j, s in states.items())
            return f"DaskClusterExecutor({state}, {self.cluster_kind}{jobs})"

        # -- executor API ---------------------------------------------------------------------

        def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
            """Run ``fn(*args, **kwargs)`` on a Dask worker (every call runs: ``pure=False``)."""
            if self._shutdown:
                raise RuntimeError("cannot submit to a DaskClusterExecutor after shutdown()")
            if self._lost_reason is not None:
                raise WorkerLostError(f"{self._lost_reason}; no call can run. {_RESTART}")
            dask_future = self._client.submit(fn, *args, pure=False, **kwargs)
            future = _DaskFuture(dask_future)
            with self._lock:
                self._pending.add(future)
            dask_future.add_done_callback(future.from_dask)
            return future

        def map(
            self,
            fn: Callable[..., Any],
            *iterables: Iterable[Any],
            timeout: float | None = None,
            chunksize: int = 1,
        ) -> Iterator[Any]:
            """Like ``Executor.map`` (results in order; ``chunksize`` is ignored)."""
            return Executor.map(self, fn, *iterables, timeout=timeout)

        def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
            """Close the client; stop the cluster (and cancel its Slurm jobs) if it started it.

            Calling it again does nothing.
            """
            if self._shutdown:
                return
            self._shutdown = True
            with self._lock:
                pending = [f for f in self._pending if not f.done()]
            if cancel_futures or not wait:
                for future in pending:
                    future.cancel()
            elif pending:
                from concurrent.futures import wait as wait_futures

                wait_futures(pending)
            self._close(self._client)
            if self.log_directory is not None:
                shutil.rmtree(self.log_directory, ignore_errors=True)

        def kill_worker_of(self, future: Future) -> str | None:
            """Kill the Dask worker that runs the call of ``future`` (a future of
            :meth:`submit`); its nanny starts a new one.

            What :meth:`~chemfit.execution.submission.ContextFuture.abandon` uses for a call
            that runs too long. The call is cancelled first (so that Dask does not run it again
            elsewhere), then the worker's process is killed: with ``SIGKILL`` when it runs on
            this host, else by ``Client.restart_workers``. A call that is not running on a
            worker is only cancelled.

            Returns
            -------
            str or None
                What was done, for messages; ``None`` when nothing was (the call finished, or
                is not one of this executor's).
            """
            dask_future = getattr(future, "dask_future", None)
            if dask_future is None or future.done() or dask_future.done():
                return None
            where = None
            with contextlib.suppress(Exception):
                where = self._client.run_on_scheduler(_processing_on, key=dask_future.key)
            with contextlib.suppress(Exception):
                self._client.cancel([dask_future])
            future.cancel()
            if where is None:
                return "it was cancelled before it started on a worker"
            address, pid, host = where
            if pid and host in _local_hosts():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            else:
                self._client.restart_workers([address], raise_for_error=False)
            logger.warning("killed Dask worker %s (process %s) to abandon its call", address, pid)
            return f"the Dask worker {address} (process {pid}), which ran it, was killed"

        # -- internals ------------------------------------------------------------------------

        def _close(self, client: Any) -> None:
            self._shutdown = True
            if self._watcher is not None:
                self._watcher.stop()
            job_ids = self.job_ids
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close(timeout=10)
            if self.cluster is not None:
                try:
                    self.cluster.close(timeout=30)
                except Exception:
                    logger.warning("closing the Dask cluster failed", exc_info=True)
            if job_ids:
                scancel(job_ids)  # what cluster.close() did not cancel
                deadline = time.monotonic() + 15
                while any(job_processes_running(j) for j in job_ids):
                    if time.monotonic() > deadline:
                        logger.warning("Slurm jobs %s still run after scancel", job_ids)
                        break
                    time.sleep(0.2)

        def _wait_for_slurm_workers(
            self,
            n: int,
            timeout: float,
            queue_timeout: float | None,
            on_status: Callable[[dict], Any] | None,
        ) -> None:
            running_since = None
            watcher = self._watcher

            def report() -> tuple[dict[str, str], float]:
                for job_id in self.job_ids:
                    watcher.watch(job_id)  # type: ignore[union-attr]
                states = self.job_states
                waited = max((watcher.waited(j) for j in states), default=0.0)  # type: ignore[union-attr]
                if on_status is not None:
                    on_status(
                        {
                            "job_id": ",".join(states),
                            "state": _summary(states),
                            "waited": waited,
                            "engines": self.n_workers,
                            "n": n,
                            "text": f"Slurm jobs {_describe(states, waited)}",
                        }
                    )
                return states, waited

            while self.n_workers < n:
                states, waited = report()
                if self._lost_reason is not None:
                    raise RuntimeError(
                        f"{self._lost_reason} before {n} Dask workers connected; their output "
                        f"is in {self.log_directory}"
                    )
                if states and all(s == "PENDING" for s in states.values()):
                    if queue_timeout is not None and waited > queue_timeout:
                        raise TimeoutError(
                            f"the Dask workers' Slurm jobs {list(states)} waited {waited:.0f} s "
                            f"in the queue, longer than queue_timeout={queue_timeout}; they were "
                            "cancelled"
                        )
                elif states:
                    running_since = running_since or time.monotonic()
                    if time.monotonic() - running_since > timeout:
                        raise TimeoutError(
                            f"only {self.n_workers} of {n} Dask workers connected within "
                            f"{timeout} s of their Slurm jobs starting ({_describe(states, 0)}); "
                            "workers on compute nodes must reach the scheduler at "
                            f"{self.cluster.scheduler_address}: pass scheduler_host= an address "
                            "of this host that they reach"
                        )
                time.sleep(0.25)
            report()  # the last word: the jobs and all their workers, however fast they came

        def _on_job_end(self, job_id: str, state: str) -> None:
            """Runs in the watcher's thread when a worker's Slurm job ends."""
            if self._shutdown:
                return
            self._ended_jobs[job_id] = state
            alive = [j for j in self.job_ids if j not in self._ended_jobs]
            if alive:
                logger.warning(
                    "Slurm job %s of a Dask worker ended (%s); %d jobs left",
                    job_id,
                    state,
                    len(alive),
                )
                return
            ended = ", ".join(f"{j} ({s})" for j, s in self._ended_jobs.items())
            self._lost_reason = f"every Slurm job of the Dask workers ended: {ended}"
            with self._lock:
                pending = [f for f in self._pending if not f.done()]
            for future in pending:
                future.settle(
                    exception=WorkerLostError(
                        f"{self._lost_reason}; that evaluation was lost. {_RESTART}"
                    )
                )
                with contextlib.suppress(Exception):
                    future.dask_future.cancel()

    return DaskClusterExecutor


_RESTART = "Start new workers (a new executor) and resume"


def _processing_on(dask_scheduler: Any, key: Any) -> tuple[str, int, str] | None:
    """On the scheduler: ``(address, pid, host)`` of the worker running task ``key``."""
    task = dask_scheduler.tasks.get(key)
    worker = getattr(task, "processing_on", None)
    if worker is None:
        return None
    return worker.address, worker.pid, worker.host


def _local_hosts() -> set[str]:
    import socket

    hosts = {"127.0.0.1", "localhost", socket.gethostname()}
    with contextlib.suppress(OSError):
        hosts.add(socket.gethostbyname(socket.gethostname()))
    return hosts


def _summary(states: dict[str, str]) -> str:
    values = set(states.values())
    return values.pop() if len(values) == 1 else "MIXED" if values else "PENDING"


def _describe(states: dict[str, str], waited: float) -> str:
    text = ", ".join(f"{j} {s}" for j, s in states.items()) or "(not submitted yet)"
    if states and all(s == "PENDING" for s in states.values()):
        text += (
            f": waiting {waited:.0f} s in the queue for free nodes, which is normal on a busy "
            "cluster"
        )
    return text


def _slurm_cluster(
    batch: SlurmBatchOptions, dashboard_address: str, scheduler_host: str | None, options: dict
) -> Any:
    jobqueue = _require_jobqueue()
    kwargs = dask_jobqueue_options(batch)
    # The scheduler listens on an address of this host that compute nodes reach; its dashboard
    # only where this host (and jupyter-server-proxy) reaches it.
    kwargs["scheduler_options"] = {
        "host": scheduler_host or host_address(),
        "dashboard_address": dashboard_address,
    }
    kwargs.update(_tls_options(options.get("log_directory")))
    kwargs.update(options)
    return jobqueue.SLURMCluster(**kwargs)


def _tls_options(private_directory: str | None) -> dict:
    """TLS between the client, the scheduler and the workers, with a certificate made for this
    cluster (``Security.temporary()``), kept as files (0600) in ``private_directory`` (0700,
    where compute nodes read it, removed when the executor closes). The scheduler listens on an
    address other hosts reach, so without TLS anyone there could connect and run code. Needs
    ``cryptography`` (in the ``slurm`` extra); ``cluster_options={"security": None}`` turns it
    off.
    """
    try:
        from distributed.security import Security

        made = Security.temporary()
    except ImportError:
        logger.warning(
            "the Dask scheduler for Slurm workers listens without TLS (anyone who reaches this "
            "host could connect): install cryptography (pip install 'chemfit[slurm]') to "
            "encrypt and authenticate its connections"
        )
        return {}
    if private_directory is None:
        return {"security": made}
    cert = _write_private(os.path.join(private_directory, "tls-cert.pem"), made.tls_ca_file)
    key = _write_private(os.path.join(private_directory, "tls-key.pem"), made.tls_worker_key)
    files = {}
    for role in ("client", "scheduler", "worker"):
        files.update({f"tls_{role}_cert": cert, f"tls_{role}_key": key})
    return {"security": Security(require_encryption=True, tls_ca_file=cert, **files)}


def _write_private(path: str, text: str) -> str:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    return path


def _check_job_script(script: str) -> None:
    """``sbatch --test-only`` on the workers' job script: a refused job in plain words."""
    from chemfit.execution.slurm_engines import SlurmSubmitError

    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as handle:
        handle.write(script)
    try:
        done = subprocess.run(
            ["sbatch", "--test-only", handle.name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError as exc:
        raise SlurmSubmitError(
            "cluster='slurm' needs Slurm's sbatch, which is not on PATH: run this on a login node "
            "of a Slurm cluster (or start a test Slurm with .ci/slurm-up)"
        ) from exc
    finally:
        os.unlink(handle.name)
    if done.returncode != 0:
        raise SlurmSubmitError(explain_sbatch_error(done.stderr or done.stdout))


_DOC = """Run calls on Dask workers it starts (locally or as Slurm jobs) or connects to.

    Create it with ``make_executor("dask", ...)`` (see the module docs of
    :mod:`chemfit.execution.dask_clusters`).

    Parameters
    ----------
    max_workers : int, optional
        Workers to start (``cluster="local"``: ``os.cpu_count()`` by default; ``"slurm"``: 1),
        or to wait for when connecting.
    cluster : {"local", "slurm"}, optional
        Start a ``LocalCluster`` or a dask-jobqueue ``SLURMCluster`` (default ``"local"``).
    address : str, optional
        Connect to the running scheduler at this address instead.
    timeout : float
        Seconds for the workers to connect (for Slurm: once their jobs run).
    queue_timeout : float, optional
        Seconds the Slurm jobs may wait in the queue (``None``: as long as it takes).
    dashboard_address : str
        Where the scheduler's dashboard listens (default ``127.0.0.1:0``: this host only, a
        free port).
    dashboard_link_template : str, optional
        How to link the dashboard (see :func:`dashboard_link`).
    scheduler_host : str, optional
        The address the Slurm cluster's scheduler listens on (default: this host's address that
        compute nodes reach).
    cluster_options : dict, optional
        More keyword arguments for ``LocalCluster`` / ``SLURMCluster``.
    on_status : callable, optional
        ``on_status(dict)`` while Slurm workers start: ``job_id``, ``state``, ``waited``,
        ``engines`` (workers connected), ``n`` and ``text``.
    **batch_options
        ``partition``, ``time``, ``cores``, ``memory``, ``account``, ``extra_directives``, ...
        (:class:`~chemfit.execution.slurm_batch.SlurmBatchOptions`), for ``cluster="slurm"``.

    Attributes
    ----------
    client : distributed.Client
    cluster : LocalCluster, SLURMCluster or None
        What it started (``None`` when connected).
    batch_script : str or None
        The job script of each Slurm worker.
    log_directory : str or None
        Where the Slurm workers write their output (private; deleted by :meth:`shutdown`,
        kept when they fail to start).
    dashboard_link : str or None
    job_ids, job_states
        The workers' Slurm jobs and their states.
    """


_executor_class: type | None = None


def DaskClusterExecutor(*args: Any, **kwargs: Any) -> Any:
    """Create the executor (the class is built on first use, so that distributed is imported
    only then); see :data:`_DOC`."""
    global _executor_class
    if _executor_class is None:
        _require_distributed()
        _executor_class = _make_executor_class()
    return _executor_class(*args, **kwargs)


DaskClusterExecutor.__doc__ = _DOC
