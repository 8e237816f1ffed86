"""A widget to choose and start where a fit runs: threads, processes, loky, ipyparallel, MPI.

:class:`ExecutorPicker` offers the executor kinds of :func:`chemfit.executors.make_executor`
plus MPI engines (ipyparallel engines started by ``mpiexec``, one MPI world), a connection to
a running ``ipcluster`` (by profile or cluster id), ipyparallel engines started as a Slurm job
and Dask workers on Slurm (with the batch options as fields; while the job waits in the queue
the status line says so, with the time waited, and an ``sbatch`` refusal is said in plain
words). Clusters start and stop in a background
thread, so the kernel stays free; the status line shows the engines that are up, the MPI world
size and, in plain words, why something failed. A pool whose workers died or a cluster whose
engines died shows as broken, and the next start builds a new one. ``picker.executor`` is the
executor to pass to ``Fitter.fit_nevergrad(executor=...)``; closing the widget stops what it
started.

The settings (``kind``, ``workers``, ``engines``, ``profile``, ``cluster_id``, ``profile_dir``,
``timeout``) are traitlets linked to the controls. A running pool stays editable: changing its
settings stops it, and the next start builds the new one. While a cluster runs, or a fit runs on
the executor (``locked``), the controls are disabled and say how to unlock them.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from chemfit.execution.executor_info import ExecutorInfo, executor_info
from chemfit.execution.executors import make_executor

from ._jupyter import close_children, require_ipywidgets
from .executor_health import executor_problem, mpi_problem
from .messages import describe_error, status_html

widgets = require_ipywidgets()
import traitlets  # noqa: E402  (ipywidgets depends on it)

__all__ = ["KINDS", "ExecutorPicker", "executor_problem", "mpi_problem"]

logger = logging.getLogger(__name__)

#: Kind -> label shown in the drop-down.
KINDS: dict[str, str] = {
    "serial": "Serial (in this kernel)",
    "thread": "Threads",
    "process": "Processes (stdlib)",
    "loky": "Processes (loky)",
    "ipyparallel": "ipyparallel engines",
    "mpi": "MPI engines (ipyparallel)",
    "connect": "Running ipcluster",
    "slurm": "Slurm engines (ipyparallel)",
    "dask-slurm": "Dask on Slurm",
}
_POOL_KINDS = ("serial", "thread", "process", "loky")
_SLURM_KINDS = ("slurm", "dask-slurm")
_CLUSTER_KINDS = ("ipyparallel", "mpi", "connect", *_SLURM_KINDS)
_WATCHED_KINDS = ("process", "loky", *_CLUSTER_KINDS)  # executors that can break while idle
_BUSY = ("starting", "stopping")
_WORKER_NOUNS = {
    "thread": ("thread", "threads"),
    "process": ("worker process", "worker processes"),
    "loky": ("loky worker process", "loky worker processes"),
}
_BATCH_SETTINGS = ("partition", "time_limit", "cores", "memory", "account", "extra_directives")
_SETTINGS = (
    "kind",
    "workers",
    "engines",
    "profile",
    "cluster_id",
    "profile_dir",
    "timeout",
    *_BATCH_SETTINGS,
)
#: Tooltips of settings while they can be changed (a locked one says why it is locked).
_TIPS = {
    "timeout": "Seconds to wait for the engines or workers to start (or for a running cluster "
    "to answer); a Slurm job waiting in the queue is waited for as long as it takes",
}


class ExecutorPicker(widgets.VBox):
    """Choose, start and stop the executor a fit runs on.

    Parameters
    ----------
    kind : str
        One of :data:`KINDS`: ``"serial"``, ``"thread"``, ``"process"``, ``"loky"``,
        ``"ipyparallel"`` (local engines), ``"mpi"`` (local MPI engines) or ``"connect"`` (a
        running ``ipcluster``).
    workers : int
        Pool size for threads and processes (candidates evaluated at once).
    engines : int
        Engines to start (``"ipyparallel"``, ``"mpi"``), or to wait for (``"connect"``).
    profile, cluster_id, profile_dir : str
        Where to find a running cluster (``"connect"``); empty means not given.
    partition, time_limit, cores, memory, account, extra_directives
        The batch options of ``"slurm"`` (ipyparallel engines as one Slurm job) and
        ``"dask-slurm"`` (Dask workers as Slurm jobs): see
        :class:`~chemfit.execution.slurm_batch.SlurmBatchOptions`; ``extra_directives`` is
        ``"--qos=short; --constraint=x"``. Empty means Slurm's default. While the job waits in
        the queue the status line says so, with the time waited.
    timeout : float
        Seconds to wait for engines to start or connect.

    Attributes
    ----------
    kind, workers, engines, profile, cluster_id, profile_dir, timeout, partition, ...
        The settings, as traitlets linked to the controls. Changing one while a pool runs
        stops the pool (the next start builds the new one); while a cluster runs or a fit
        uses the executor, changing them raises ``RuntimeError`` (stop them first).
    state : str
        ``"idle"``, ``"starting"``, ``"running"``, ``"stopping"``, ``"stopped"`` or ``"error"``
        (a traitlet: ``picker.observe(handler, names="state")``). A broken executor is
        ``"error"`` until the next start rebuilds it.
    message : str
        The status line in plain words (also a traitlet).
    locked : bool
        Set while a fit runs on the executor (by the dashboard): the controls are disabled.
    error : BaseException or None
        The last error, for code; the page shows only ``message``.

    Examples
    --------
    >>> picker = ExecutorPicker("thread", workers=2)
    >>> picker.state, picker.num_workers
    ('idle', 2)
    >>> ex = picker.executor          # pools start on first use
    >>> picker.state, list(ex.map(abs, [-1, -2]))
    ('running', [1, 2])
    >>> picker.workers = 3            # a running pool stays editable: it is stopped ...
    >>> picker.state
    'idle'
    >>> picker.executor._max_workers  # ... and built again on first use
    3
    >>> picker.close()                # stops the pool it started
    >>> picker.state
    'stopped'
    """

    kind = traitlets.Unicode("thread")
    workers = traitlets.Int(2)
    engines = traitlets.Int(2)
    profile = traitlets.Unicode("")
    cluster_id = traitlets.Unicode("")
    profile_dir = traitlets.Unicode("")
    timeout = traitlets.Float(60.0)
    # Batch options of "slurm" and "dask-slurm" (empty: Slurm's default).
    partition = traitlets.Unicode("")
    time_limit = traitlets.Unicode("")
    cores = traitlets.Int(1)
    memory = traitlets.Unicode("")
    account = traitlets.Unicode("")
    extra_directives = traitlets.Unicode("")
    state = traitlets.Unicode("idle")
    message = traitlets.Unicode("")
    locked = traitlets.Bool(False)
    _initialised = False

    def __init__(
        self,
        kind: str = "thread",
        workers: int = 2,
        engines: int = 2,
        *,
        profile: str = "",
        cluster_id: str = "",
        profile_dir: str = "",
        timeout: float = 60.0,
        partition: str = "",
        time_limit: str = "",
        cores: int = 1,
        memory: str = "",
        account: str = "",
        extra_directives: str = "",
        **box_kwargs: Any,
    ) -> None:
        self._lock = threading.RLock()
        self._executor: Any = None
        self._info: ExecutorInfo | None = None  # executor_info(self._executor), once
        self._executor_kind: str | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._monitor_stop = threading.Event()
        self._broken = ""  # why the executor is broken (see check)
        self._rebuilt = ""  # why the last start replaced a broken executor
        self.error: BaseException | None = None
        super().__init__(children=self._make_controls(), **box_kwargs)
        self.add_class("chemfit-executor-picker")
        settings = dict(kind=kind, workers=workers, engines=engines, profile=profile)
        settings.update(cluster_id=cluster_id, profile_dir=profile_dir, timeout=timeout)
        settings.update(partition=partition, time_limit=time_limit, cores=cores, memory=memory)
        settings.update(account=account, extra_directives=extra_directives)
        for name, value in settings.items():
            setattr(self, name, value)
        self._link_controls()
        self.observe(self._on_setting_change, names=list(_SETTINGS))
        self.observe(self._on_state_change, names=["state", "message", "locked"])
        self._show_fields()
        self._set_state("idle", self._idle_message())
        self._initialised = True

    # -- controls -----------------------------------------------------------------------------

    def _make_controls(self) -> list:
        """Create the controls; returns the rows of the widget."""
        w = widgets
        style = {"description_width": "90px"}

        def item() -> Any:  # one Layout per widget: a shared one would hide them together
            return w.Layout(width="210px")

        self.kind_dropdown = w.Dropdown(
            options=[(label, key) for key, label in KINDS.items()],
            description="Run on",
            style=style,
            layout=w.Layout(width="300px"),
        )
        self.workers_input = w.BoundedIntText(
            min=1, max=1024, description="Workers", style=style, layout=item()
        )
        self.engines_input = w.BoundedIntText(
            min=1, max=1024, description="Engines", style=style, layout=item()
        )
        self.profile_input = w.Text(
            description="Profile", placeholder="default", style=style, layout=item()
        )
        self.cluster_id_input = w.Text(description="Cluster id", style=style, layout=item())
        self.profile_dir_input = w.Text(
            description="Profile dir", placeholder="(optional)", style=style, layout=item()
        )
        self.timeout_input = w.BoundedFloatText(
            min=0.1, max=3600, description="Start timeout (s)",
            style={"description_width": "115px"}, layout=w.Layout(width="235px"),
        )  # fmt: skip
        self.partition_input = w.Text(
            description="Partition", placeholder="(default)", style=style, layout=item()
        )
        self.time_input = w.Text(
            description="Time limit", placeholder="e.g. 1:00:00", style=style, layout=item()
        )
        self.cores_input = w.BoundedIntText(
            min=1, max=1024, description="Cores each", style=style, layout=item()
        )
        self.memory_input = w.Text(
            description="Memory each", placeholder="e.g. 2GB", style=style, layout=item()
        )
        self.account_input = w.Text(
            description="Account", placeholder="(default)", style=style, layout=item()
        )
        self.extra_input = w.Text(
            description="#SBATCH", placeholder="--qos=short; --constraint=x", style=style,
            layout=w.Layout(width="320px"),
        )  # fmt: skip
        self.start_button = w.Button(
            description="Launch", icon="play", button_style="success",
            layout=w.Layout(width="100px"),
        )  # fmt: skip
        self.stop_button = w.Button(
            description="Shut down", icon="stop", button_style="warning",
            layout=w.Layout(width="110px"),
        )  # fmt: skip
        self.status = w.HTML(layout=w.Layout(min_width="200px"))
        #: Why the controls are disabled and how to unlock them (empty while they are editable).
        self.hint = w.HTML()
        for widget, name in (
            (self.kind_dropdown, "chemfit-picker-kind"),
            (self.workers_input, "chemfit-picker-workers"),
            (self.engines_input, "chemfit-picker-engines"),
            (self.partition_input, "chemfit-picker-partition"),
            (self.time_input, "chemfit-picker-time"),
            (self.start_button, "chemfit-picker-start"),
            (self.stop_button, "chemfit-picker-stop"),
            (self.status, "chemfit-picker-status"),
            (self.hint, "chemfit-picker-hint"),
        ):
            widget.add_class(name)
        self.start_button.on_click(lambda _button: self.start(block=False))
        self.stop_button.on_click(lambda _button: self.stop(block=False))

        def row(children: list) -> Any:
            return w.HBox(children, layout=w.Layout(flex_flow="row wrap", align_items="center"))

        return [
            row([self.kind_dropdown, self.workers_input, self.engines_input, self.hint]),
            row([self.profile_input, self.cluster_id_input, self.profile_dir_input]),
            row([self.partition_input, self.time_input, self.cores_input, self.memory_input,
                 self.account_input, self.extra_input]),
            row([self.timeout_input, self.start_button, self.stop_button, self.status]),
        ]  # fmt: skip

    def _controls(self) -> dict[str, Any]:
        """Setting name -> its control."""
        return {
            "kind": self.kind_dropdown,
            "workers": self.workers_input,
            "engines": self.engines_input,
            "profile": self.profile_input,
            "cluster_id": self.cluster_id_input,
            "profile_dir": self.profile_dir_input,
            "timeout": self.timeout_input,
            "partition": self.partition_input,
            "time_limit": self.time_input,
            "cores": self.cores_input,
            "memory": self.memory_input,
            "account": self.account_input,
            "extra_directives": self.extra_input,
        }

    def _link_controls(self) -> None:
        for name, control in self._controls().items():
            widgets.link((self, name), (control, "value"))

    # -- settings -----------------------------------------------------------------------------

    @traitlets.validate(*_SETTINGS)
    def _validate_setting(self, proposal: Any) -> Any:
        name, value = proposal["trait"].name, proposal["value"]
        if name == "kind" and value not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {value!r}")
        if name in ("workers", "engines", "cores") and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
        if name == "timeout" and not value > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {value}")
        reason = self._lock_reason() if self._initialised else None
        if reason is not None and value != getattr(self, name):
            raise RuntimeError(f"cannot change {name} now: {reason}")
        return value

    def _on_setting_change(self, change: Any) -> None:
        name = change["name"]
        if name == "kind":
            self._show_fields()
        if self._affects_executor(name):
            # A running pool no longer matches its settings: stop it; the next start builds it.
            self.stop(block=True)
        if self.state in ("idle", "stopped") or (self.state == "error" and not self._executor):
            self._set_state("idle", self._idle_message())

    def _affects_executor(self, name: str) -> bool:
        """Whether changing setting ``name`` makes the running pool out of date."""
        kind = self._executor_kind
        if kind not in _POOL_KINDS or self.state not in ("running", "error"):
            return False
        return name == "kind" or (name == "workers" and kind != "serial")

    @property
    def num_workers(self) -> int:
        """How many candidates a fit should evaluate at once on this executor.

        The pool size for pools, 1 for serial, and the engines up (or requested) for clusters.
        """
        kind = self._executor_kind or self.kind
        if kind == "serial":
            return 1
        if kind in _POOL_KINDS:
            return int(self.workers)
        executor = self._executor
        n_up = getattr(executor, "n_engines", getattr(executor, "n_workers", 0)) if executor else 0
        return int(n_up or self.engines)

    @property
    def is_cluster(self) -> bool:
        """Whether the chosen kind runs on ipyparallel engines."""
        return self.kind in _CLUSTER_KINDS

    def _show_fields(self) -> None:
        kind = self.kind
        show = {
            self.workers_input: kind in ("thread", "process", "loky"),
            self.engines_input: kind in _CLUSTER_KINDS,
            self.profile_input: kind == "connect",
            self.cluster_id_input: kind == "connect",
            self.profile_dir_input: kind == "connect",
            self.timeout_input: kind in _CLUSTER_KINDS,
        }
        for widget, visible in show.items():
            widget.layout.display = None if visible else "none"
        self.children[1].layout.display = None if kind == "connect" else "none"
        self.children[2].layout.display = None if kind in _SLURM_KINDS else "none"
        names = {"connect": "Min engines", "dask-slurm": "Workers"}
        self.engines_input.description = names.get(kind, "Engines")

    def _idle_message(self) -> str:
        kind = self.kind
        if kind in _POOL_KINDS:
            return f"{KINDS[kind]}: created when a fit starts (or click Launch)"
        if kind == "connect":
            return "Not connected: fill in the profile or cluster id, then click Launch"
        return f"Not running: click Launch (or Start fit) to start {self.engines} engines"

    # -- state --------------------------------------------------------------------------------

    def _set_state(self, state: str, message: str) -> None:
        with self._lock:
            self.message = message
            self.state = state

    def _lock_reason(self) -> str | None:
        """Why the settings cannot change now, with how to unlock them; ``None``: they can."""
        if self.locked:
            return "A fit is running on this executor: click the dashboard's Stop to change it"
        if self.state == "starting":
            return "Starting: wait until it is up, then click Shut down to change it"
        if self.state == "stopping":
            return "Stopping: the settings unlock once it has stopped"
        if self._executor is not None and self._executor_kind == "connect":
            return "Connected to a cluster: click Shut down (it disconnects) to change it"
        if self._executor is not None and self._executor_kind in _CLUSTER_KINDS:
            return "The engines are running: click Shut down to change where to run"
        return None

    def _on_state_change(self, _change: Any = None) -> None:
        level = {
            "starting": "busy",
            "stopping": "busy",
            "running": "ok",
            "error": "error",
        }.get(self.state, "info")
        self.status.value = status_html(self.message, level)
        reason = self._lock_reason()
        for name, control in self._controls().items():
            control.disabled = reason is not None
            control.tooltip = reason or _TIPS.get(name)
        self.hint.value = (
            f'<span style="font-size: 0.85em; opacity: 0.8">Locked. {reason}</span>'
            if reason
            else ""
        )
        self._update_buttons(reason)

    def _update_buttons(self, reason: str | None) -> None:
        busy = self.state in _BUSY
        running = self.state == "running"
        stoppable = busy or running or (self.state == "error" and self._executor is not None)
        launch_off = busy or running or self.locked
        self.start_button.disabled = launch_off
        self.start_button.tooltip = (
            (reason or "Already running") if launch_off else "Start it now (Start fit also does)"
        )
        self.stop_button.disabled = self.locked or not stoppable
        if self.locked:
            self.stop_button.tooltip = reason
        else:
            self.stop_button.tooltip = "Stop what this picker started" if stoppable else None

    # -- health -------------------------------------------------------------------------------

    def check(self) -> bool:
        """Whether the executor is running and can still run tasks.

        A broken one (a pool whose worker died, a cluster whose engines died) is reported in
        the status line (state ``"error"``); the next :meth:`start` (or a dashboard's Start)
        shuts it down and builds a new one.
        """
        with self._lock:
            if self.state != "running" or self._executor is None:
                return self.state == "running"
            problem = executor_problem(self._info)
            if problem is None:
                return True
            self._broken = problem
            self._set_state("error", self._broken_message(problem))
            return False

    def _broken_message(self, problem: str) -> str:
        kind = self._executor_kind or self.kind
        if kind == "connect":
            again = "connects again"
        elif kind in _CLUSTER_KINDS:
            again = "starts new engines"
        else:
            again = "builds a new pool"
        return f"Broken: {problem}. Start fit (or Launch) {again}"

    def _monitor(self, executor: Any, stop: threading.Event, interval: float = 1.0) -> None:
        """Keep the status line live: engines that die, a pool that breaks."""
        while not stop.wait(interval):
            with self._lock:
                if self._executor is not executor or not self.check():
                    return
                if self._executor_kind in _CLUSTER_KINDS:
                    text = self._running_message()
                    if text != self.message:
                        self.message = text

    # -- starting -----------------------------------------------------------------------------

    @property
    def executor(self) -> Any:
        """The running executor, for ``fit_nevergrad(executor=...)``.

        Pools (threads, processes, loky) are created on first use, and built again when the
        previous one broke; ``"serial"`` gives ``None`` (the fitter then evaluates in its own
        thread). Clusters must be started first.

        Raises
        ------
        RuntimeError
            When a cluster is not running (click Launch, or call :meth:`start`).
        """
        with self._lock:
            if self.check():
                return self._executor
            if self.kind in _POOL_KINDS and self.state not in _BUSY:
                self.start(block=True)
                if self.state == "running":
                    return self._executor
        if self.state == "starting":
            raise RuntimeError(
                "the cluster is still starting; wait for it (picker.wait_ready()) and try again"
            )
        if self.state == "error":
            raise RuntimeError(f"no executor: {self.message}")
        raise RuntimeError(
            f"no executor: the {KINDS[self.kind]} are not running; click Launch (or call "
            "picker.start()) first"
        )

    def start(self, block: bool = True) -> None:
        """Create the chosen executor (pools at once; clusters in a background thread).

        A broken executor (see :meth:`check`) is shut down first and replaced.

        Parameters
        ----------
        block : bool
            Wait until a cluster is up (or failed). Errors are shown in the widget and kept in
            :attr:`error`; they are not raised.
        """
        self._join_worker_thread("stopping")
        self.check()
        with self._lock:
            if self.state == "running":
                return
            if self.state != "starting":
                self._begin_start()
        if block:
            self._join_worker_thread("starting")

    def _begin_start(self) -> None:
        """Start creating the executor (call with the lock held, not while starting)."""
        kind = self.kind
        old = (self._info, self._executor_kind) if self._info is not None else None
        self._rebuilt = self._broken if old else ""
        self._executor = self._info = None
        self._monitor_stop.set()  # the old executor's monitor ends
        self._monitor_stop = threading.Event()
        self.error = None
        self._ready.clear()
        self._executor_kind = kind
        self._set_state("starting", self._starting_message(kind))
        if kind in _POOL_KINDS:
            self._create(kind, old)
            return
        self._thread = threading.Thread(
            target=self._create, args=(kind, old), name="chemfit-picker-start", daemon=True
        )
        self._thread.start()

    def _join_worker_thread(self, state: str) -> None:
        """Wait for the background start or stop while the picker is in ``state``."""
        thread = self._thread
        if self.state == state and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _starting_message(self, kind: str) -> str:
        n = self.engines
        new = " new" if self._rebuilt else ""
        if kind == "ipyparallel":
            return f"Starting {n}{new} ipyparallel engines..."
        if kind == "mpi":
            return f"Starting {n}{new} MPI engines (one MPI world)..."
        if kind == "connect":
            return "Connecting to the running cluster..."
        if kind == "slurm":
            return f"Submitting a Slurm job for {n}{new} ipyparallel engines..."
        if kind == "dask-slurm":
            return f"Submitting {n}{new} Slurm jobs for Dask workers..."
        return f"Creating{new} {KINDS[kind].lower()}..."

    def batch_options(self) -> dict:
        """The batch options of the Slurm kinds, as ``make_executor`` takes them.

        Examples
        --------
        >>> picker = ExecutorPicker("slurm", partition="debug", time_limit="10")
        >>> picker.batch_options()
        {'cores': 1, 'partition': 'debug', 'time': '10'}
        >>> picker.close()
        """
        options: dict[str, Any] = {"cores": int(self.cores)}
        for name, key in (("partition", "partition"), ("time_limit", "time")):
            if getattr(self, name).strip():
                options[key] = getattr(self, name).strip()
        for name in ("memory", "account"):
            if getattr(self, name).strip():
                options[name] = getattr(self, name).strip()
        extra = [part.strip() for part in self.extra_directives.split(";") if part.strip()]
        if extra:
            options["extra_directives"] = extra
        return options

    def _on_slurm_status(self, status: dict) -> None:
        """Called while the Slurm job waits and its engines register (the starting thread)."""
        state, waited = status.get("state"), status.get("waited", 0.0)
        noun = "workers" if self._executor_kind == "dask-slurm" else "engines"
        job = f"Slurm job {status.get('job_id') or '(submitting)'}"
        if state == "PENDING":
            text = (
                f"Waiting in the Slurm queue: {job} pending for {waited:.0f} s (normal on a busy "
                f"cluster); {status.get('engines', 0)} of {status.get('n')} {noun} up"
            )
        else:
            up, n = status.get("engines", 0), status.get("n")
            text = f"{job} {state}: {up} of {n} {noun} registered{'...' if up != n else ''}"
        if text != self.message:
            self.message = text

    def _options(self, kind: str) -> tuple[int | None, dict]:
        timeout = float(self.timeout)
        if kind in ("thread", "process", "loky"):
            return int(self.workers), {}
        if kind == "ipyparallel":
            return int(self.engines), {"timeout": timeout}
        if kind == "mpi":
            return int(self.engines), {"mpi": True, "timeout": timeout}
        if kind == "slurm":
            options = {"engines": "slurm", "timeout": timeout, "on_status": self._on_slurm_status}
            return int(self.engines), {**options, **self.batch_options()}
        if kind == "dask-slurm":
            options = {"cluster": "slurm", "timeout": timeout, "on_status": self._on_slurm_status}
            return int(self.engines), {**options, **self.batch_options()}
        connect = {
            "profile": self.profile.strip() or None,
            "cluster_id": self.cluster_id.strip() or None,
            "profile_dir": self.profile_dir.strip() or None,
        }
        if connect["profile"] is None and connect["cluster_id"] is None:
            raise ValueError(
                "to connect to a running cluster, give its profile (e.g. 'default') or its "
                "cluster id (ipcluster start --cluster-id=ID)"
            )
        options = {k: v for k, v in connect.items() if v is not None}
        options["timeout"] = timeout
        return int(self.engines), options

    def _create(self, kind: str, old: tuple[Any, str | None] | None) -> None:
        doing = "Connecting" if kind == "connect" else "Starting"
        if old is not None:  # a broken executor: release its workers first
            self._shutdown_quietly(*old)
        try:
            if kind == "mpi":
                problem = mpi_problem()
                if problem is not None:
                    raise ImportError(problem)
            if kind == "serial":
                executor = None
            else:
                max_workers, options = self._options(kind)
                kind_name = "dask" if kind == "dask-slurm" else kind
                kind_name = "ipyparallel" if kind_name in _CLUSTER_KINDS else kind_name
                executor = make_executor(kind_name, max_workers, **options)
        except BaseException as exc:
            logger.debug("starting a %s executor failed", kind, exc_info=True)
            self.error = exc
            self._set_state("error", self._error_message(kind, exc, doing))
            self._ready.set()
            if not isinstance(exc, Exception):
                raise
            return
        with self._lock:
            self._executor = executor
            # What the executor is, worked out once (None for "serial": no executor).
            self._info = executor_info(executor) if executor is not None else None
            self._set_state("running", self._running_message())
        self._ready.set()
        if kind in _WATCHED_KINDS:
            threading.Thread(
                target=self._monitor,
                args=(executor, self._monitor_stop),
                name="chemfit-picker-status",
                daemon=True,
            ).start()

    def _error_message(self, kind: str, exc: BaseException, doing: str) -> str:
        what = "the cluster" if kind in _CLUSTER_KINDS else f"the {KINDS[kind].lower()}"
        if type(exc).__name__ == "SlurmSubmitError":  # already in plain words
            return f"{doing} {what} failed: {' '.join(str(exc).split())}"
        if isinstance(exc, TimeoutError) and kind in _CLUSTER_KINDS:
            detail = str(exc).strip().rstrip(".")
            return (
                f"{doing} {what} failed: the engines did not come up within "
                f"{self.timeout:g} s ({detail}). Raise the timeout, or start fewer engines"
            )
        return describe_error(exc, f"{doing} {what}")

    def _running_message(self) -> str:
        kind, executor = self._executor_kind, self._executor
        if kind == "serial":
            text = "Ready: evaluations run one at a time in the fit's thread"
        elif kind in ("thread", "process", "loky"):
            one, many = _WORKER_NOUNS[kind]
            text = f"Ready: {self.workers} {one if self.workers == 1 else many}"
        else:
            text = self._cluster_status(executor)
        if self._rebuilt:
            what = "new engines" if kind in _CLUSTER_KINDS else "a new pool"
            text += f" ({what}: the previous one broke)"
        return text

    def _cluster_status(self, executor: Any) -> str:
        if self._executor_kind == "dask-slurm":
            jobs = ", ".join(f"{j} {s}" for j, s in executor.job_states.items())
            return f"Running: {executor.n_workers} Dask workers up (Slurm jobs {jobs})"
        n_up, n_started = executor.n_engines, len(executor.engines)
        if n_up < n_started:
            text = f"Running: {n_up} of {n_started} engines up ({n_started - n_up} stopped or died)"
        else:
            text = f"Running: {n_up} engine{'s' if n_up != 1 else ''} up"
            if executor.mpi_size:
                text += f", MPI world size {executor.mpi_size}"
            elif self._executor_kind == "mpi":
                text += ", not one MPI world"
        if getattr(executor, "job_id", None):
            text += f", Slurm job {executor.job_id} {executor.job_state}"
        elif executor.cluster_id:
            text += f" (cluster id {executor.cluster_id})"
        return text

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until a start finished (running or error); returns whether it is running."""
        self._ready.wait(timeout)
        return self.state == "running"

    def ensure_executor(self) -> Any:
        """Start the chosen executor if needed (again, if it broke), wait and return it.

        Raises
        ------
        RuntimeError
            With the plain-words reason when it could not start.
        """
        if not self.check():
            if self.state == "starting":
                self.wait_ready()
            else:
                self.start(block=True)
        if self.state != "running":
            raise RuntimeError(self.message) from self.error
        return self._executor

    # -- stopping -----------------------------------------------------------------------------

    def stop(self, block: bool = True) -> None:
        """Stop what this picker started (a connected cluster is only disconnected).

        Parameters
        ----------
        block : bool
            Wait until it has stopped; otherwise a cluster stops in a background thread.
        """
        if self.state == "starting":  # let the start finish, then stop what it started
            self.message = "Waiting for the start to finish before stopping..."
            self._join_worker_thread("starting")
        if self.state == "stopping":
            if block:
                self._join_worker_thread("stopping")
            return
        with self._lock:
            info, kind = self._info, self._executor_kind
            self._monitor_stop.set()
            self._executor = self._info = None
            self._rebuilt = ""
            if info is None:  # nothing started, or "serial"
                if self.state == "running":
                    self._set_state("stopped", "Stopped")
                return
            verb = "Disconnecting" if kind == "connect" else "Stopping"
            self._set_state("stopping", f"{verb}...")
            if not (kind in _POOL_KINDS or block):
                self._thread = threading.Thread(
                    target=self._shutdown,
                    args=(info, kind),
                    name="chemfit-picker-stop",
                    daemon=True,
                )
                self._thread.start()
                return
        self._shutdown(info, kind)

    @staticmethod
    def _shutdown_executor(info: ExecutorInfo) -> None:
        if info.kind == "loky":
            info.executor.shutdown(wait=True, kill_workers=True)
        else:
            info.executor.shutdown(wait=True, cancel_futures=True)

    def _shutdown_quietly(self, info: ExecutorInfo, kind: str | None) -> None:
        """Shut down a broken executor before replacing it; failures are only logged."""
        try:
            self._shutdown_executor(info)
        except Exception:
            logger.debug("shutting down the broken %s executor failed", kind, exc_info=True)

    def _shutdown(self, info: ExecutorInfo, kind: str | None) -> None:
        try:
            self._shutdown_executor(info)
        except Exception as exc:
            logger.debug("stopping the executor failed", exc_info=True)
            self.error = exc
            self._set_state("error", describe_error(exc, "Stopping"))
            return
        done = "Disconnected; the cluster keeps running" if kind == "connect" else "Stopped"
        self._set_state("stopped", done)

    def close(self) -> None:
        """Stop what the picker started, then close the widget."""
        if not self._initialised:  # __init__ failed; ipywidgets still calls close()
            super().close()
            return
        self.stop(block=True)
        close_children(self)
        super().close()

    def __repr__(self) -> str:
        return f"ExecutorPicker(kind={self.kind!r}, state={self.state!r}, message={self.message!r})"
