"""ipyparallel engines started as a Slurm job, for ``IPyParallelExecutor(engines="slurm")``.

:func:`start_slurm_cluster` starts an ipyparallel controller here, bound to this host's address
(:func:`~chemfit.execution.slurm_batch.host_address`, so that engines on compute nodes reach
it; ``controller_ip=`` chooses another) and submits one batch job whose ``srun`` starts the
engines, through ipyparallel's own ``SlurmEngineSetLauncher`` with chemfit's batch script
(:func:`~chemfit.execution.slurm_batch.engine_script_template`). The engines get the
controller's connection info, with its signing key, in their environment (``--export=ALL``), so
no connection file has to reach the compute nodes; the profile directory holding the key, the
batch script and the engines' log is private to the user (mode 0700).

Before submitting, ``sbatch --test-only`` checks the script, so that a bad partition or time
limit is reported in plain words (:func:`~chemfit.execution.slurm_batch.explain_sbatch_error`).
While the job waits in the queue, ``on_status`` hears its state and the time waited; the
``timeout`` for the engines to register counts from when the job starts running.
:class:`SlurmEngineJob` then watches the job (``squeue`` every second) and, on
:meth:`SlurmEngineJob.close`, cancels it and waits until Slurm has ended it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from chemfit.execution.ipyparallel_cluster import (
    ClusterConnection,
    _cluster_kwargs,
    _cluster_processes,
    _Held,
)
from chemfit.execution.slurm_batch import (
    SlurmBatchOptions,
    engine_script_template,
    explain_sbatch_error,
    host_address,
)
from chemfit.execution.slurm_jobs import (
    ENDED,
    SlurmJobWatcher,
    job_processes_running,
    job_states,
    scancel,
)

__all__ = ["SlurmEngineJob", "SlurmSubmitError", "cluster_directory", "start_slurm_cluster"]

logger = logging.getLogger("chemfit.execution.ipyparallel_executor")

StatusCallback = Callable[[dict], Any]

_SCRIPT_NAME = "slurm_engines.sbatch"


class SlurmSubmitError(RuntimeError):
    """``sbatch`` refused the engines' job; the message says why in plain words."""


def cluster_directory() -> Path:
    """Where throwaway profile directories of Slurm clusters go: ``$CHEMFIT_CLUSTER_DIR`` or
    ``~/.chemfit/clusters``, a directory compute nodes see on a cluster's shared home (the
    engines' log is written there)."""
    base = os.environ.get("CHEMFIT_CLUSTER_DIR") or str(Path.home() / ".chemfit" / "clusters")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


class SlurmEngineJob:
    """The Slurm job of an executor's engines: its id, state, batch script, and cancelling it.

    Attributes
    ----------
    job_id : str or None
        The Slurm job id (``None`` until submitted).
    batch_script : str
        The path of the batch script that was submitted.
    watcher : SlurmJobWatcher
        Polls the job's state.
    """

    def __init__(self, batch_script: str, on_end: Callable[[str, str], None] | None = None):
        self.job_id: str | None = None
        self.batch_script = batch_script
        self.submitted_at: float | None = None
        self.ready_at: float | None = None
        self._on_end = on_end
        self.watcher = SlurmJobWatcher(self._ended)
        self._finalizer = weakref.finalize(self, _cancel_quietly, self.watcher, [])

    def _ended(self, job_id: str, state: str) -> None:
        if self._on_end is not None:
            self._on_end(job_id, state)

    def set_on_end(self, on_end: Callable[[str, str], None]) -> None:
        """Call ``on_end(job_id, state)`` when the job ends while watched."""
        self._on_end = on_end

    def submitted(self, job_id: str) -> None:
        self.job_id = str(job_id)
        self.submitted_at = time.monotonic()
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _cancel_quietly, self.watcher, [self.job_id])
        self.watcher.watch(self.job_id)

    @property
    def state(self) -> str | None:
        """The job's last seen state: ``"PENDING"``, ``"RUNNING"``, ``"CANCELLED"``, ..."""
        return self.watcher.states.get(self.job_id) if self.job_id else None

    @property
    def script_text(self) -> str:
        """The batch script as submitted."""
        return Path(self.batch_script).read_text()

    def describe(self) -> str:
        return self.watcher.describe(self.job_id) if self.job_id else "no Slurm job yet"

    def close(self, wait: float = 15) -> None:
        """Cancel the job and wait up to ``wait`` seconds until Slurm has stopped its processes
        (the engines end at once on Slurm's SIGTERM, see
        :func:`~chemfit.execution.slurm_batch.exit_on_sigterm`)."""
        self._finalizer.detach()
        self.watcher.stop()
        if self.job_id is None:
            return
        scancel([self.job_id])
        deadline = time.monotonic() + wait
        while job_processes_running(self.job_id):
            if time.monotonic() > deadline:
                logger.warning("Slurm job %s still runs %.0f s after scancel", self.job_id, wait)
                break
            time.sleep(0.2)
        state = job_states([self.job_id]).get(self.job_id)
        if state not in (None, "UNKNOWN", "GONE"):
            self.watcher.states[self.job_id] = state


def _cancel_quietly(watcher: SlurmJobWatcher, job_ids: list[str]) -> None:
    watcher.stop()
    scancel(job_ids)


def _check_script(script: str, workdir: str) -> None:
    """``sbatch --test-only``: Slurm checks the job without submitting it."""
    try:
        done = subprocess.run(
            ["sbatch", "--test-only", script],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=workdir,
            check=False,
        )
    except FileNotFoundError as exc:
        raise SlurmSubmitError(
            "engines='slurm' needs Slurm's sbatch, which is not on PATH: run this on a login node "
            "of a Slurm cluster (or start a test Slurm with .ci/slurm-up)"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise SlurmSubmitError(
            "sbatch --test-only did not answer within 30 s: the Slurm controller does not respond"
        ) from exc
    if done.returncode != 0:
        raise SlurmSubmitError(explain_sbatch_error(done.stderr or done.stdout))


def _engine_launcher_config(config: Any, template: str, script: str) -> None:
    config.SlurmEngineSetLauncher.batch_template = template
    # An absolute path: ipyparallel would write it into the current directory.
    config.SlurmEngineSetLauncher.batch_file_name = script


def _private_profile_dir(profile_dir: str | os.PathLike | None) -> tuple[str, str | None]:
    if profile_dir is not None:
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        return str(profile_dir), None
    owned = tempfile.mkdtemp(prefix="ipp-", dir=cluster_directory())  # mode 0700
    return owned, owned


def start_slurm_cluster(
    ipp: Any,
    n: int,
    *,
    mpi: bool,
    batch: SlurmBatchOptions,
    profile_dir: str | os.PathLike | None,
    timeout: float,
    options: dict,
    controller_ip: str | None = None,
    queue_timeout: float | None = None,
    on_status: StatusCallback | None = None,
) -> tuple[ClusterConnection, SlurmEngineJob]:
    """Start a controller here and ``n`` engines as one Slurm job; connect once they registered.

    Parameters
    ----------
    ipp : module
        ipyparallel.
    n : int
        Number of engines (the job's tasks).
    mpi : bool
        ``srun --mpi=<batch.srun_mpi>``: the engines form one MPI world.
    batch : SlurmBatchOptions
        What the job asks for.
    profile_dir : str or Path, optional
        The cluster's profile directory (kept); ``None``: a private throwaway one under
        :func:`cluster_directory`.
    timeout : float
        Seconds for the engines to register once the job runs.
    options : dict
        Extra keyword arguments for ``ipyparallel.Cluster``.
    controller_ip : str, optional
        The address the controller listens on; ``None``: :func:`host_address`.
    queue_timeout : float, optional
        Seconds the job may wait in the queue; ``None``: as long as it takes.
    on_status : callable, optional
        ``on_status(dict)`` while starting, about twice a second: ``job_id``, ``state``,
        ``waited`` (seconds in the queue), ``engines`` (registered) and ``n``. An exception
        it raises aborts the start (the job is cancelled) and is raised again.

    Raises
    ------
    SlurmSubmitError
        When ``sbatch`` refuses the job (the reason in plain words).
    TimeoutError
        When the engines do not register in time (or the job waits longer than
        ``queue_timeout``); the job is cancelled.
    RuntimeError
        When the job ends before the engines registered; names the job and its state.
    """
    profile_dir, owned = _private_profile_dir(profile_dir)
    script = str(Path(profile_dir) / _SCRIPT_NAME)
    template = engine_script_template(batch, mpi=mpi)
    job = SlurmEngineJob(script)
    connection: ClusterConnection | None = None
    try:
        test_script = str(Path(profile_dir) / "sbatch-test.sbatch")
        Path(test_script).write_text(
            template.format(
                n=n, cluster_id="check", output_file="/dev/null", program_and_args="true"
            )
        )
        _check_script(test_script, profile_dir)
        os.unlink(test_script)
        kwargs = _cluster_kwargs(n, False, profile_dir, timeout, {})
        kwargs["engines"] = "slurm"
        kwargs["controller_ip"] = controller_ip or host_address()
        _engine_launcher_config(kwargs["config"], template, script)
        kwargs.update(options)
        cluster = ipp.Cluster(**kwargs)
        held = _Held(cluster=cluster, owned_profile_dir=owned)
        connection = ClusterConnection(held, profile_dir, cluster.cluster_id)
        owned = None  # deleted by the connection from now on
        logger.info(
            "starting an ipyparallel controller on %s and %d Slurm engines (%s)",
            kwargs["controller_ip"],
            n,
            script,
        )
        t0 = time.perf_counter()
        cluster._synchronize(  # PRIVATE ipyparallel: see ipyparallel_cluster._run_start
            _start_and_wait, cluster, held, job, n, timeout, queue_timeout, on_status
        )
        held.processes.extend(_cluster_processes(cluster))
        job.ready_at = time.monotonic()
        logger.info(
            "%d Slurm engines ready in %.1f s (job %s, waited %.1f s in the queue)",
            n,
            time.perf_counter() - t0,
            job.job_id,
            job.watcher.waited(job.job_id) if job.job_id else 0.0,
        )
        return connection, job
    except BaseException:
        job.close()
        if connection is not None:
            connection.close()
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise


async def _start_and_wait(
    cluster: Any,
    held: _Held,
    job: SlurmEngineJob,
    n: int,
    timeout: float,
    queue_timeout: float | None,
    on_status: StatusCallback | None,
) -> None:
    import asyncio

    try:
        await cluster.start_cluster(n=n)
    except Exception as exc:
        raise SlurmSubmitError(_submit_failure(exc)) from exc
    for engine_set in cluster.engines.values():
        job_id = getattr(engine_set, "job_id", None)
        if job_id:
            job.submitted(job_id)
    held.client = await cluster.connect_client()
    running_since: float | None = None
    while len(held.client.ids) < n:
        state = job.state or "PENDING"
        waited = job.watcher.waited(job.job_id) if job.job_id else 0.0
        if on_status is not None:
            on_status(
                {
                    "job_id": job.job_id,
                    "state": state,
                    "waited": waited,
                    "engines": len(held.client.ids),
                    "n": n,
                    "text": job.describe(),
                }
            )
        if state in ENDED:
            raise RuntimeError(
                f"Slurm job {job.job_id} of the ipyparallel engines ended ({state}) before "
                f"{n} engines registered ({len(held.client.ids)} did); its output:\n"
                f"{_job_output(cluster)}"
            )
        if state == "PENDING":
            if queue_timeout is not None and waited > queue_timeout:
                raise TimeoutError(
                    f"Slurm job {job.job_id} waited {waited:.0f} s in the queue, longer than "
                    f"queue_timeout={queue_timeout}; it was cancelled. Ask for fewer resources, "
                    "another partition, or a longer queue_timeout"
                )
        elif running_since is None:
            running_since = time.monotonic()
        elif time.monotonic() - running_since > timeout:
            raise TimeoutError(
                f"only {len(held.client.ids)} of {n} Slurm engines registered within {timeout} "
                f"s of job {job.job_id} starting; it was cancelled. Engines on compute nodes "
                "must reach the controller at "
                f"{cluster.controller_ip}: pass controller_ip= an address of this host that they "
                f"reach. The engines' output:\n{_job_output(cluster)}"
            )
        await asyncio.sleep(0.25)


def _submit_failure(exc: Exception) -> str:
    output = getattr(exc, "output", None) or getattr(exc, "stderr", None) or b""
    if isinstance(output, bytes):
        output = output.decode("utf8", "replace")
    return explain_sbatch_error(output or str(exc))


def _job_output(cluster: Any, lines: int = 30) -> str:
    texts = []
    for engine_set in getattr(cluster, "engines", {}).values():
        path = getattr(engine_set, "output_file", None)
        with contextlib.suppress(OSError, TypeError):
            text = Path(path).read_text(errors="replace")
            texts.extend(text.strip().splitlines()[-lines:])
    return "\n".join(f"    {line}" for line in texts) or "    (none)"
