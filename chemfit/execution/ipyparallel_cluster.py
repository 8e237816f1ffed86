"""Starting, connecting to and stopping the ipyparallel clusters of an ``IPyParallelExecutor``.

:func:`start_cluster` starts a local cluster (``mpi=True``: engines launched by the venv's
``mpiexec``, one MPI world) in a throwaway profile directory unless one is given;
:func:`connect_to_cluster` finds a running one by ``profile``, ``cluster_id`` and/or
``profile_dir``. Both return a :class:`ClusterConnection` whose :meth:`~ClusterConnection.close`
(also run on garbage collection and at exit) disconnects, and for a started cluster stops it,
reaps what its processes leave behind and deletes the throwaway directory.
:func:`survey_engines` prepares the engines and asks each where it runs.

Nothing is printed, also in IPython and notebooks: ipyparallel's progress bar is off and its
own messages go to the logger ``chemfit.execution.ipyparallel_executor.cluster``.

ipyparallel is used through its public API (``Cluster``, ``Client``, ``DirectView``,
``AsyncResult.metadata``) except in two places, each marked ``PRIVATE ipyparallel``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chemfit.execution.ipyparallel_engine import engine_info

__all__ = [
    "ClusterConnection",
    "connect_to_cluster",
    "require_ipyparallel",
    "start_cluster",
    "survey_engines",
    "watch_engines",
    "world_size",
]

# The names users know (IPyParallelExecutor's Notes): chemfit's messages about clusters and
# ipyparallel's own stay on the executor module's loggers.
logger = logging.getLogger("chemfit.execution.ipyparallel_executor")
# ipyparallel's own messages about the clusters chemfit starts ("Starting 2 engines with ...",
# "Stopping controller", the output of an engine that exited with an error). In an IPython
# session ipyparallel would write them to sys.stdout.
cluster_logger = logging.getLogger("chemfit.execution.ipyparallel_executor.cluster")

# A 0.5 s heartbeat instead of the default 3 s registers engines (and notices dead ones) sooner.
_HEARTBEAT_MS = 500
_EXTRA_HINT = "install it with: pip install 'chemfit[ipyparallel]'"
# Lines of each engine's (and a failed controller's) output quoted when engines do not start.
_OUTPUT_LINES = 40


class ClusterLog(logging.LoggerAdapter):
    """The ``log`` of a cluster chemfit starts: ``cluster_logger`` at the cluster's ``log_level``.

    Its effective level is never DEBUG or lower, so that ipyparallel's launchers do not copy the
    engines' output to ``sys.stderr`` (it stays in the cluster's log files).

    Parameters
    ----------
    level : int
        The lowest level passed on (the cluster's ``log_level``).

    Examples
    --------
    >>> log = ClusterLog(logging.ERROR)
    >>> log.isEnabledFor(logging.INFO), log.getEffectiveLevel() > logging.DEBUG
    (False, True)
    """

    def __init__(self, level: int) -> None:
        super().__init__(cluster_logger, {})
        self._level = level

    def isEnabledFor(self, level: int) -> bool:
        return level >= self._level and self.logger.isEnabledFor(level)

    def getEffectiveLevel(self) -> int:
        return max(self._level, self.logger.getEffectiveLevel(), logging.DEBUG + 1)


def require_ipyparallel() -> Any:
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


# -- what a connection holds and how it is let go -----------------------------------------------


@dataclass(eq=False)
class _Held:
    """What :func:`_release` lets go of; kept apart so that the finalizer does not keep the
    :class:`ClusterConnection` alive."""

    client: Any = None
    cluster: Any = None  # started by chemfit: stopped on release
    owned_profile_dir: str | None = None  # deleted on release
    # The controller, launcher, engine and engine-nanny processes of a started cluster, reaped
    # after stopping it (the nannies otherwise linger for seconds).
    processes: list = field(default_factory=list)


class ClusterConnection:
    """A client connected to an ipyparallel cluster, and what to stop when letting it go.

    Created by :func:`start_cluster` and :func:`connect_to_cluster`.

    Attributes
    ----------
    client : ipyparallel.Client
        The connected client (``None`` until a starting cluster accepts connections).
    cluster : ipyparallel.Cluster or None
        The cluster chemfit started, ``None`` for a running cluster it connected to.
    profile_dir : str
        The cluster's profile directory.
    cluster_id : str or None
        The cluster's id (``None``: the cluster has none).
    """

    def __init__(self, held: _Held, profile_dir: str, cluster_id: str | None) -> None:
        self._held = held
        self.profile_dir = profile_dir
        self.cluster_id = cluster_id
        # Runs once: from close(), on garbage collection or at exit.
        self._finalizer = weakref.finalize(self, _release, held)

    @property
    def client(self) -> Any:
        return self._held.client

    @property
    def cluster(self) -> Any:
        return self._held.cluster

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (the client is closed)."""
        return not self._finalizer.alive

    def close(self) -> None:
        """Close the client; stop a started cluster and delete its throwaway profile directory.

        Calling it again does nothing.
        """
        self._finalizer()


def _release(held: _Held) -> None:
    """Close a client, stop a started cluster, reap its processes and delete a throwaway
    profile directory."""
    if held.client is not None:
        with contextlib.suppress(Exception):
            held.client.close(linger=0)
    cluster = held.cluster
    t0 = time.perf_counter()
    stopped = cluster is not None and (cluster.controller is not None or bool(cluster.engines))
    if stopped:
        try:
            cluster.stop_cluster_sync()
        except Exception:
            logger.warning("stopping ipyparallel cluster %s failed", cluster, exc_info=True)
    _reap(held.processes)
    if held.owned_profile_dir is not None:
        shutil.rmtree(held.owned_profile_dir, ignore_errors=True)
    if stopped:
        logger.info(
            "stopped ipyparallel cluster %s in %.1f s", cluster.cluster_id, time.perf_counter() - t0
        )


# -- starting a cluster -------------------------------------------------------------------------


def start_cluster(
    ipp: Any,
    n: int,
    *,
    mpi: bool,
    profile_dir: str | os.PathLike | None,
    timeout: float,
    options: dict,
) -> ClusterConnection:
    """Start a local cluster of ``n`` engines and connect to it once they have registered.

    Parameters
    ----------
    ipp : module
        ipyparallel (from :func:`require_ipyparallel`).
    n : int
        Number of engines.
    mpi : bool
        Launch the engines with the ``mpiexec`` next to ``sys.executable`` (one MPI world).
    profile_dir : str or Path, optional
        The cluster's profile directory (kept); ``None``: a throwaway one.
    timeout : float
        Seconds to wait for the engines to register.
    options : dict
        Extra keyword arguments for ``ipyparallel.Cluster``.

    Raises
    ------
    TimeoutError, RuntimeError
        When the engines do not register in time, or exit while starting; the message gives
        their exit codes and last lines of output. Nothing is left running.
    """
    owned = None
    if profile_dir is None:
        profile_dir = owned = tempfile.mkdtemp(prefix="chemfit-ipp-")
    try:
        cluster = ipp.Cluster(**_cluster_kwargs(n, mpi, str(profile_dir), timeout, options))
    except BaseException:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise
    held = _Held(cluster=cluster, owned_profile_dir=owned)
    connection = ClusterConnection(held, str(profile_dir), cluster.cluster_id)
    kind = "MPI" if mpi else "local"
    logger.info("starting an ipyparallel cluster of %d %s engines in %s", n, kind, profile_dir)
    t0 = time.perf_counter()
    try:
        _run_start(cluster, held, n, timeout)
    except Exception as exc:
        error = _start_error(held, exc, n, kind, timeout)
        connection.close()
        if error is exc:
            raise
        raise error from exc
    except BaseException:
        connection.close()
        raise
    held.processes.extend(_cluster_processes(cluster))
    logger.info(
        "started %d %s engines in %.1f s (ipyparallel cluster %s)",
        n,
        kind,
        time.perf_counter() - t0,
        cluster.cluster_id,
    )
    return connection


def _cluster_kwargs(n: int, mpi: bool, profile_dir: str, timeout: float, options: dict) -> dict:
    """Keyword arguments for ``ipyparallel.Cluster``: quiet, quick, pinned to this venv."""
    from traitlets.config import Config

    config = Config()
    # Pin the launcher to this environment's mpiexec: a different MPI on PATH would start
    # n singletons of size 1 instead of one world.
    config.MPIEngineSetLauncher.mpi_cmd = [str(Path(sys.executable).parent / "mpiexec")]
    # mpiexec takes ~3 s to exit after SIGTERM; kill it after 1 s instead (whatever it
    # leaves behind is reaped by _release).
    config.MPIEngineSetLauncher.stop_seconds_until_kill = 1
    kwargs = {
        "n": n,
        "engines": "mpi" if mpi else "local",
        "profile_dir": profile_dir,
        "log_level": logging.ERROR,
        "controller_args": [f"--HeartMonitor.period={_HEARTBEAT_MS}"],
        "engine_timeout": max(1, math.ceil(timeout)),
        "config": config,
        # The connection's finalizer stops the cluster at exit; ipyparallel's own exit hook
        # would print "Stopping cluster ..." to stderr.
        "shutdown_atexit": False,
    }
    kwargs.update(options)
    # In an IPython session ipyparallel's default log writes to sys.stdout.
    kwargs.setdefault("log", ClusterLog(kwargs["log_level"]))
    return kwargs


def _run_start(cluster: Any, held: _Held, n: int, timeout: float) -> None:
    """Run :func:`_start_and_connect` as ``Cluster.start_and_connect_sync()`` runs itself: in
    the cluster's own event loop, a background one when a loop already runs (a notebook)."""
    # PRIVATE ipyparallel: Cluster._synchronize is how every `*_sync` method of a Cluster runs
    # its coroutine. The public start_and_connect_sync() does these steps but shows a progress
    # bar in IPython (tqdm on stdout, a widget in a notebook), and running the steps as
    # separate `*_sync` calls gives each its own loop, closed on return, so that engines which
    # exit while starting are noticed only at the timeout, without their exit codes.
    synchronize = getattr(cluster, "_synchronize", None)
    if synchronize is not None:
        synchronize(_start_and_connect, cluster, held, n, timeout)
        return
    # An ipyparallel without it: the same steps, but dead engines show only at the timeout.
    cluster.start_cluster_sync(n=n)
    held.client = cluster.connect_client_sync()
    held.client.wait_for_engines(n, timeout=timeout, interactive=False, widget=False)


async def _start_and_connect(cluster: Any, held: _Held, n: int, timeout: float) -> None:
    """``Cluster.start_and_connect`` without its progress bar.

    The wait runs in the same event loop as the start, so that engines that exit while
    starting fail it at once instead of after ``timeout``.
    """
    import asyncio

    await cluster.start_cluster(n=n)
    held.client = await cluster.connect_client()
    await asyncio.wrap_future(
        held.client.wait_for_engines(
            n, timeout=timeout, block=False, interactive=False, widget=False
        )
    )


def _start_error(held: _Held, exc: Exception, n: int, kind: str, timeout: float) -> Exception:
    """The error to raise when the engines of a started cluster did not come up.

    A timeout stays a ``TimeoutError`` and engines that exited become a ``RuntimeError``;
    both name the engines' exit codes and quote the last lines of their output (which the
    clean-up deletes with a throwaway profile directory). Other errors are kept as they are.
    """
    if isinstance(exc, TimeoutError):
        registered = len(held.client.ids) if held.client is not None else 0
        reason = f"only {registered} of them registered within {timeout} s"
        hint = "pass a longer timeout= if the engines are only slow to start"
        error_type: type[Exception] = TimeoutError
    elif type(exc).__name__ == "EngineError":
        reason = "they exited while starting"
        hint = "fix the engines' environment (see their output above)"
        error_type = RuntimeError
    else:
        return exc
    report = _startup_report(held.cluster)
    return error_type(
        f"{n} {kind} ipyparallel engines did not start: {reason} ({exc}).\n"
        f"{report or 'The engines printed nothing.'}\n{hint}"
    )


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


# -- processes of a started cluster -------------------------------------------------------------


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
    if not processes:
        return
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


# -- connecting to a running cluster ------------------------------------------------------------


def connect_to_cluster(
    ipp: Any,
    *,
    profile: str | None,
    cluster_id: str | None,
    profile_dir: str | os.PathLike | None,
    min_engines: int,
    timeout: float,
) -> ClusterConnection:
    """Connect to a running cluster and wait for ``min_engines`` engines.

    Raises
    ------
    ValueError
        When no connection file of such a cluster appears within ``timeout`` (it names the
        cluster ids that do have one there).
    TimeoutError
        When fewer than ``min_engines`` engines register within ``timeout``.
    """
    connection_file = find_connection_file(profile, cluster_id, profile_dir, timeout)
    held = _Held(client=ipp.Client(connection_file, timeout=timeout))
    connection = ClusterConnection(held, str(Path(connection_file).parent.parent), cluster_id)
    try:
        held.client.wait_for_engines(min_engines, timeout=timeout, interactive=False, widget=False)
    except BaseException:
        connection.close()
        raise
    logger.info("connected to an ipyparallel cluster with %d engines", len(held.client.ids))
    return connection


def find_connection_file(
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


# -- the engines of a connected client ----------------------------------------------------------


def survey_engines(
    client: Any, *, use_cloudpickle: bool, timeout: float
) -> tuple[dict[int, dict], dict[str, int]]:
    """Prepare the engines and ask each where it runs.

    Parameters
    ----------
    client : ipyparallel.Client
        A connected client.
    use_cloudpickle : bool
        Switch the engines (and the client) to cloudpickle.
    timeout : float
        Seconds to wait for the engines' answers.

    Returns
    -------
    engines : dict[int, dict]
        Per engine id: ``pid``, ``host`` and, for MPI engines, ``mpi_rank`` and ``mpi_size``.
    ids_by_uuid : dict[str, int]
        Engine id per engine uuid (a dead engine's task results name only its uuid).
    """
    everywhere = client[:]
    if use_cloudpickle:
        everywhere.use_cloudpickle().get(timeout=timeout)
    asked = everywhere.apply_async(engine_info)
    engines = dict(zip(everywhere.targets, asked.get(timeout=timeout)))
    metadata = asked.metadata  # one dict per engine (a dict alone for a single result)
    metadata = [metadata] if isinstance(metadata, dict) else metadata
    ids_by_uuid = {md["engine_uuid"]: md["engine_id"] for md in metadata}
    return engines, ids_by_uuid


def world_size(engines: dict[int, dict]) -> int | None:
    """The MPI world size when the engines are exactly the ranks of one world, else ``None``.

    Examples
    --------
    >>> world_size({0: {"mpi_rank": 0, "mpi_size": 2}, 1: {"mpi_rank": 1, "mpi_size": 2}})
    2
    >>> world_size({0: {"mpi_rank": 0, "mpi_size": 2}}) is None   # rank 1 is missing
    True
    """
    sizes = {info.get("mpi_size") for info in engines.values()}
    ranks = sorted(info.get("mpi_rank", -1) for info in engines.values())
    if len(sizes) != 1 or None in sizes or ranks != list(range(len(engines))):
        return None
    size = sizes.pop()
    return size if size == len(engines) else None


def watch_engines(client: Any, method: Callable[[dict], None]) -> None:
    """Call the bound ``method(event)`` when an engine registers or unregisters.

    ``event`` has ``"event"`` (``"register"`` or ``"unregister"``), ``"id"`` and ``"uuid"``.
    It runs in the client's IO thread. Only a weak reference to ``method``'s object is kept,
    so that the client does not keep it alive.
    """
    ref = weakref.WeakMethod(method)

    def callback(event: dict) -> None:
        bound = ref()
        if bound is not None:
            bound(event)

    # PRIVATE ipyparallel: Client has no public hook for engine (un)registration;
    # Client.wait_for_engines uses this same list. Without it, calls queued in the scheduler
    # would wait forever once the last engine is gone.
    client._registration_callbacks.append(callback)
