"""Watching the Slurm jobs that run an executor's engines or workers.

:func:`job_states` asks ``squeue`` for the state of some jobs; :class:`SlurmJobWatcher` asks
every second in a background thread, keeps the state, how long the job waited in the queue and
when it started, and calls ``on_end(job_id, state)`` once when a job ends (cancelled, failed,
timed out, or gone from the queue) while it is being watched. Executors use it to end a fit
with an error naming the job within seconds instead of waiting on engines that will never
answer.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterable

__all__ = [
    "ENDED",
    "SlurmJobWatcher",
    "job_processes_running",
    "job_states",
    "scancel",
    "squeue_available",
]

logger = logging.getLogger(__name__)

#: Job states after which a job runs no more (``"GONE"``: no longer in ``squeue``;
#: ``"COMPLETING"``: ended, its processes being stopped).
ENDED = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "COMPLETING",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
        "GONE",
    }
)


#: Seconds a COMPLETING job may take to show why it ended before it is reported as it is.
COMPLETING_GRACE = 3.0


def squeue_available() -> bool:
    """Whether ``squeue`` is on ``PATH``."""
    return shutil.which("squeue") is not None


def job_states(job_ids: Iterable[str], timeout: float = 10) -> dict[str, str]:
    """The Slurm state of each job (``"PENDING"``, ``"RUNNING"``, ..., ``"GONE"``).

    A job that ``squeue`` no longer lists (it ended a while ago) is ``"GONE"``. When ``squeue``
    itself fails (Slurm does not answer), the jobs are ``"UNKNOWN"``.

    Examples
    --------
    >>> job_states([])
    {}
    """
    ids = [str(job_id) for job_id in job_ids if job_id]
    if not ids:
        return {}
    try:
        done = subprocess.run(
            ["squeue", "-h", "--states=all", "-o", "%i %T", "-j", ",".join(ids)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.debug("squeue failed: %s", exc)
        return dict.fromkeys(ids, "UNKNOWN")
    if done.returncode != 0 and "Invalid job id" not in done.stderr:
        logger.debug("squeue failed: %s", done.stderr.strip())
        return dict.fromkeys(ids, "UNKNOWN")
    states = dict.fromkeys(ids, "GONE")
    for line in done.stdout.splitlines():
        job_id, _, state = line.strip().partition(" ")
        # Array and heterogeneous jobs list as "123_0" / "123+0": count them under "123".
        base = job_id.split("_")[0].split("+")[0]
        if base in states and states[base] in ("GONE", "COMPLETED"):
            states[base] = state.split()[0] if state else "UNKNOWN"
    for job_id, state in states.items():
        if state == "COMPLETING":  # squeue hides why: CANCELLED, FAILED, TIMEOUT, ...
            states[job_id] = _ending_state(job_id, timeout) or state
    return states


def _ending_state(job_id: str, timeout: float) -> str | None:
    """The state a COMPLETING job ended in (``scontrol show job``'s ``JobState``)."""
    try:
        done = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for word in done.stdout.split():
        if word.startswith("JobState="):
            return word.partition("=")[2] or None
    return None


def job_processes_running(job_id: str) -> bool:
    """Whether Slurm still lists the job as running or stopping its processes."""
    try:
        done = subprocess.run(
            ["squeue", "-h", "-o", "%T", "-j", str(job_id)],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return any(state in done.stdout for state in ("RUNNING", "COMPLETING", "PENDING", "CONFIG"))


def scancel(job_ids: Iterable[str], timeout: float = 10) -> None:
    """Cancel jobs (errors are logged, never raised: used while shutting down)."""
    ids = [str(job_id) for job_id in job_ids if job_id]
    if not ids:
        return
    try:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("scancel %s failed: %s", " ".join(ids), exc)


class SlurmJobWatcher:
    """Poll the state of Slurm jobs in a background thread.

    Parameters
    ----------
    on_end : callable
        ``on_end(job_id, state)``, called once per job that ends while watched (in the
        watcher's thread).
    interval : float
        Seconds between polls.

    Attributes
    ----------
    states : dict[str, str]
        The last state seen of each job.

    Examples
    --------
    >>> watcher = SlurmJobWatcher(lambda job_id, state: None)
    >>> watcher.describe("123")
    'Slurm job 123 (state not known yet)'
    >>> watcher.stop()
    """

    def __init__(self, on_end: Callable[[str, str], None], interval: float = 1.0) -> None:
        self._on_end = on_end
        self.interval = interval
        self.states: dict[str, str] = {}
        self._submitted: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._ended: set[str] = set()
        self._completing: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, job_id: str) -> None:
        """Start watching ``job_id`` (submitted now)."""
        with self._lock:
            self._submitted.setdefault(str(job_id), time.monotonic())
            self.states.setdefault(str(job_id), "PENDING")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="chemfit-slurm-watcher", daemon=True
                )
                self._thread.start()

    def poll(self) -> dict[str, str]:
        """Ask ``squeue`` now; returns the states."""
        with self._lock:
            ids = [job_id for job_id in self._submitted if job_id not in self._ended]
        states = job_states(ids)
        ended = []
        now = time.monotonic()
        with self._lock:
            for job_id, state in states.items():
                if state == "UNKNOWN":
                    continue
                self.states[job_id] = state
                if state not in ("PENDING", "CONFIGURING") and job_id not in self._started:
                    self._started[job_id] = now
                if state == "COMPLETING" and self._completing_too_briefly(job_id, now):
                    continue  # why it ended shows once its processes are gone
                if state in ENDED and job_id not in self._ended:
                    self._ended.add(job_id)
                    ended.append((job_id, state))
            result = dict(self.states)
        for job_id, state in ended:
            if not self._stop.is_set():
                logger.warning("Slurm job %s ended: %s", job_id, state)
                self._on_end(job_id, state)
        return result

    def _completing_too_briefly(self, job_id: str, now: float) -> bool:
        """A job stopping its processes (COMPLETING) is reported once it has ended (CANCELLED,
        FAILED, ...), or after ``COMPLETING_GRACE`` seconds as it is."""
        since = self._completing.setdefault(job_id, now)
        return now - since < COMPLETING_GRACE

    def waited(self, job_id: str) -> float:
        """Seconds the job waited in the queue (so far, while it is pending)."""
        submitted = self._submitted.get(str(job_id))
        if submitted is None:
            return 0.0
        return self._started.get(str(job_id), time.monotonic()) - submitted

    def describe(self, job_id: str) -> str:
        """E.g. ``"Slurm job 123 (PENDING for 12 s: waiting in the queue)"``."""
        state = self.states.get(str(job_id))
        if state is None:
            return f"Slurm job {job_id} (state not known yet)"
        if state == "PENDING":
            return (
                f"Slurm job {job_id} (PENDING for {self.waited(job_id):.0f} s: waiting in the "
                "queue for free nodes, which is normal on a busy cluster)"
            )
        return f"Slurm job {job_id} ({state})"

    def stop(self) -> None:
        """Stop polling (no more ``on_end`` calls)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # pragma: no cover - job_states does not raise
                logger.exception("polling Slurm jobs failed")
