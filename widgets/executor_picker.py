"""A widget to choose and start where a fit runs: threads, processes, loky, ipyparallel, MPI.

:class:`ExecutorPicker` offers the executor kinds of :func:`chemfit.executors.make_executor`
plus MPI engines (ipyparallel engines started by ``mpiexec``, one MPI world) and a connection to
a running ``ipcluster`` (by profile or cluster id). Clusters start and stop in a background
thread, so the kernel stays free; the status line shows the engines that are up, the MPI world
size and, in plain words, why something failed. ``picker.executor`` is the executor to pass to
``Fitter.fit_nevergrad(executor=...)``; closing the widget stops what it started.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

from chemfit.execution.executors import make_executor

from ._jupyter import close_children, require_ipywidgets
from .messages import describe_error, status_html

widgets = require_ipywidgets()
import traitlets  # noqa: E402  (ipywidgets depends on it)

__all__ = ["KINDS", "ExecutorPicker", "mpi_problem"]

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
}
_POOL_KINDS = ("serial", "thread", "process", "loky")
_CLUSTER_KINDS = ("ipyparallel", "mpi", "connect")
_BUSY = ("starting", "stopping")


def mpi_problem() -> str | None:
    """Why MPI engines cannot start in this environment, or ``None`` when they can.

    Checks that mpi4py is installed and that an ``mpiexec`` sits next to this Python (the one
    the engines are launched with), without initialising MPI in the kernel.

    Examples
    --------
    >>> mpi_problem() is None or mpi_problem().startswith("MPI is not installed")
    True
    """
    fix = (
        "Install it with: pip install 'chemfit[mpi]' (mpi4py and the mpich wheel), then restart "
        "the kernel"
    )
    try:
        spec = importlib.util.find_spec("mpi4py")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return f"MPI is not installed: the Python package mpi4py is missing. {fix}."
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        found = shutil.which("mpiexec")
        where = f" (the one on PATH, {found}, may be a different MPI)" if found else ""
        return f"MPI is not installed: there is no mpiexec next to {sys.executable}{where}. {fix}."
    return None


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
    timeout : float
        Seconds to wait for engines to start or connect.

    Attributes
    ----------
    state : str
        ``"idle"``, ``"starting"``, ``"running"``, ``"stopping"``, ``"stopped"`` or ``"error"``
        (a traitlet: ``picker.observe(handler, names="state")``).
    message : str
        The status line in plain words (also a traitlet).
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
    >>> picker.close()                # stops the pool it started
    >>> picker.state
    'stopped'
    """

    state = traitlets.Unicode("idle")
    message = traitlets.Unicode("")
    #: While True (e.g. a dashboard fit runs on the executor) the controls and buttons are off.
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
        **box_kwargs: Any,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        w = widgets
        style = {"description_width": "90px"}

        def item() -> Any:  # one Layout per widget: a shared one would hide them together
            return w.Layout(width="210px")

        self.kind_dropdown = w.Dropdown(
            options=[(label, key) for key, label in KINDS.items()],
            value=kind,
            description="Run on",
            style=style,
            layout=w.Layout(width="300px"),
        )
        self.workers_input = w.BoundedIntText(
            value=workers, min=1, max=1024, description="Workers", style=style, layout=item()
        )
        self.engines_input = w.BoundedIntText(
            value=engines, min=1, max=1024, description="Engines", style=style, layout=item()
        )
        self.profile_input = w.Text(
            value=profile, description="Profile", placeholder="default", style=style, layout=item()
        )
        self.cluster_id_input = w.Text(
            value=cluster_id, description="Cluster id", style=style, layout=item()
        )
        self.profile_dir_input = w.Text(
            value=profile_dir,
            description="Profile dir",
            placeholder="(optional)",
            style=style,
            layout=item(),
        )
        self.timeout_input = w.BoundedFloatText(
            value=timeout, min=0.1, max=3600, description="Timeout (s)", style=style, layout=item()
        )
        self.start_button = w.Button(
            description="Launch",
            icon="play",
            button_style="success",
            layout=w.Layout(width="100px"),
        )
        self.stop_button = w.Button(
            description="Shut down",
            icon="stop",
            button_style="warning",
            layout=w.Layout(width="110px"),
        )
        self.status = w.HTML(layout=w.Layout(min_width="200px"))
        self.start_button.add_class("chemfit-picker-start")
        self.stop_button.add_class("chemfit-picker-stop")
        self.status.add_class("chemfit-picker-status")

        def wrap() -> Any:
            return w.Layout(flex_flow="row wrap", align_items="center")

        super().__init__(
            children=[
                w.HBox([self.kind_dropdown, self.workers_input, self.engines_input], layout=wrap()),
                w.HBox(
                    [self.profile_input, self.cluster_id_input, self.profile_dir_input],
                    layout=wrap(),
                ),
                w.HBox(
                    [self.timeout_input, self.start_button, self.stop_button, self.status],
                    layout=wrap(),
                ),
            ],
            **box_kwargs,
        )
        self.add_class("chemfit-executor-picker")
        self._lock = threading.RLock()
        self._executor: Any = None
        self._executor_kind: str | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._monitor_stop = threading.Event()
        self.error: BaseException | None = None

        self.kind_dropdown.observe(self._on_kind_change, names="value")
        self.start_button.on_click(lambda _button: self.start(block=False))
        self.stop_button.on_click(lambda _button: self.stop(block=False))
        self.observe(self._on_state_change, names=["state", "message", "locked"])
        self._on_kind_change()
        self._set_state("idle", self._idle_message())
        self._initialised = True

    # -- settings -----------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The chosen kind (a key of :data:`KINDS`)."""
        return self.kind_dropdown.value

    @kind.setter
    def kind(self, value: str) -> None:
        if value not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {value!r}")
        if value != self.kind and (self.state in ("running", *_BUSY) or self.locked):
            raise RuntimeError(
                f"cannot change the kind while the {KINDS[self.kind].lower()} are "
                f"{self.state}; stop them first (picker.stop())"
            )
        self.kind_dropdown.value = value

    @property
    def num_workers(self) -> int:
        """How many candidates a fit should evaluate at once on this executor.

        The pool size for pools, 1 for serial, and the engines up (or requested) for clusters.
        """
        kind = self._executor_kind or self.kind
        if kind == "serial":
            return 1
        if kind in _POOL_KINDS:
            return int(self.workers_input.value)
        n_up = getattr(self._executor, "n_engines", 0) if self._executor is not None else 0
        return int(n_up or self.engines_input.value)

    @property
    def is_cluster(self) -> bool:
        """Whether the chosen kind runs on ipyparallel engines."""
        return self.kind in _CLUSTER_KINDS

    def _on_kind_change(self, _change: Any = None) -> None:
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
        self.engines_input.description = "Min engines" if kind == "connect" else "Engines"
        if self.state in ("idle", "stopped"):
            self._set_state(self.state, self._idle_message())

    def _idle_message(self) -> str:
        kind = self.kind
        if kind in _POOL_KINDS:
            return f"{KINDS[kind]}: created when a fit starts (or click Launch)"
        if kind == "connect":
            return "Not connected: fill in the profile or cluster id, then click Launch"
        return f"Not running: click Launch to start {self.engines_input.value} engines"

    # -- state --------------------------------------------------------------------------------

    def _set_state(self, state: str, message: str) -> None:
        with self._lock:
            self.message = message
            self.state = state

    def _on_state_change(self, _change: Any = None) -> None:
        level = {
            "starting": "busy",
            "stopping": "busy",
            "running": "ok",
            "error": "error",
        }.get(self.state, "info")
        self.status.value = status_html(self.message, level)
        busy = self.state in _BUSY
        running = self.state == "running"
        stoppable = busy or running or (self.state == "error" and self._executor is not None)
        self.start_button.disabled = busy or running or self.locked
        self.stop_button.disabled = self.locked or not stoppable
        for control in (
            self.kind_dropdown,
            self.workers_input,
            self.engines_input,
            self.profile_input,
            self.cluster_id_input,
            self.profile_dir_input,
            self.timeout_input,
        ):
            control.disabled = busy or running or self.locked

    # -- starting -----------------------------------------------------------------------------

    @property
    def executor(self) -> Any:
        """The running executor, for ``fit_nevergrad(executor=...)``.

        Pools (threads, processes, loky) are created on first use; ``"serial"`` gives ``None``
        (the fitter then evaluates in its own thread). Clusters must be started first.

        Raises
        ------
        RuntimeError
            When a cluster is not running (click Launch, or call :meth:`start`).
        """
        with self._lock:
            if self.state == "running":
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

        Parameters
        ----------
        block : bool
            Wait until a cluster is up (or failed). Errors are shown in the widget and kept in
            :attr:`error`; they are not raised.
        """
        self._join_worker_thread("stopping")
        if self._executor is not None and self.state == "error":  # e.g. every engine died
            self.stop(block=True)
        with self._lock:
            if self.state == "running":
                return
            if self.state != "starting":
                kind = self.kind
                self.error = None
                self._ready.clear()
                self._monitor_stop.clear()
                self._executor_kind = kind
                self._set_state("starting", self._starting_message(kind))
                if kind in _POOL_KINDS:
                    self._create(kind)
                    return
                self._thread = threading.Thread(
                    target=self._create, args=(kind,), name="chemfit-picker-start", daemon=True
                )
                self._thread.start()
        if block:
            self._join_worker_thread("starting")

    def _join_worker_thread(self, state: str) -> None:
        """Wait for the background start or stop while the picker is in ``state``."""
        thread = self._thread
        if self.state == state and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _starting_message(self, kind: str) -> str:
        n = self.engines_input.value
        if kind == "ipyparallel":
            return f"Starting {n} ipyparallel engines..."
        if kind == "mpi":
            return f"Starting {n} MPI engines (one MPI world)..."
        if kind == "connect":
            return "Connecting to the running cluster..."
        return f"Creating {KINDS[kind].lower()}..."

    def _options(self, kind: str) -> tuple[int | None, dict]:
        timeout = float(self.timeout_input.value)
        if kind in ("thread", "process", "loky"):
            return int(self.workers_input.value), {}
        if kind == "ipyparallel":
            return int(self.engines_input.value), {"timeout": timeout}
        if kind == "mpi":
            return int(self.engines_input.value), {"mpi": True, "timeout": timeout}
        connect = {
            "profile": self.profile_input.value.strip() or None,
            "cluster_id": self.cluster_id_input.value.strip() or None,
            "profile_dir": self.profile_dir_input.value.strip() or None,
        }
        if connect["profile"] is None and connect["cluster_id"] is None:
            raise ValueError(
                "to connect to a running cluster, give its profile (e.g. 'default') or its "
                "cluster id (ipcluster start --cluster-id=ID)"
            )
        options = {k: v for k, v in connect.items() if v is not None}
        options["timeout"] = timeout
        return int(self.engines_input.value), options

    def _create(self, kind: str) -> None:
        doing = "Connecting" if kind == "connect" else "Starting"
        try:
            if kind == "mpi":
                problem = mpi_problem()
                if problem is not None:
                    raise ImportError(problem)
            if kind == "serial":
                executor = None
            else:
                max_workers, options = self._options(kind)
                kind_name = "ipyparallel" if kind in _CLUSTER_KINDS else kind
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
            self._set_state("running", self._running_message())
        self._ready.set()
        if kind in _CLUSTER_KINDS:
            threading.Thread(
                target=self._monitor, args=(executor,), name="chemfit-picker-status", daemon=True
            ).start()

    def _error_message(self, kind: str, exc: BaseException, doing: str) -> str:
        what = "the cluster" if kind in _CLUSTER_KINDS else f"the {KINDS[kind].lower()}"
        if isinstance(exc, TimeoutError) and kind in _CLUSTER_KINDS:
            detail = str(exc).strip().rstrip(".")
            return (
                f"{doing} {what} failed: the engines did not come up within "
                f"{self.timeout_input.value:g} s ({detail}). Raise the timeout, or start fewer "
                "engines"
            )
        return describe_error(exc, f"{doing} {what}")

    def _running_message(self) -> str:
        kind, executor = self._executor_kind, self._executor
        if kind == "serial":
            return "Ready: evaluations run one at a time in the fit's thread"
        if kind in ("thread", "process", "loky"):
            return f"Ready: {self.workers_input.value} {KINDS[kind].lower()} workers"
        return self._cluster_status(executor)

    def _cluster_status(self, executor: Any) -> str:
        n_up, n_started = executor.n_engines, len(executor.engines)
        if n_up < n_started:
            text = f"Running: {n_up} of {n_started} engines up ({n_started - n_up} stopped or died)"
        else:
            text = f"Running: {n_up} engine{'s' if n_up != 1 else ''} up"
            if executor.mpi_size:
                text += f", MPI world size {executor.mpi_size}"
            elif self._executor_kind == "mpi":
                text += ", not one MPI world"
        if executor.cluster_id:
            text += f" (cluster id {executor.cluster_id})"
        return text

    def _monitor(self, executor: Any, interval: float = 1.0) -> None:
        """Keep the status line live while a cluster runs (engines that die show up)."""
        while not self._monitor_stop.wait(interval):
            with self._lock:
                if self._executor is not executor or self.state != "running":
                    return
                try:
                    n_up = executor.n_engines
                except Exception:  # the client went away under us
                    n_up = 0
                n_started = len(executor.engines)
                if n_up == 0:
                    self._set_state(
                        "error",
                        "Every engine has stopped or died; click Shut down, then Launch to start "
                        "new ones",
                    )
                    return
                if n_up < n_started and executor.mpi_size:
                    self._set_state(
                        "error",
                        f"{n_started - n_up} of {n_started} MPI engines stopped or died, so their "
                        "MPI world is broken; click Shut down, then Launch to start new ones",
                    )
                    return
                text = self._cluster_status(executor)
                if text != self.message:
                    self.message = text

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until a start finished (running or error); returns whether it is running."""
        self._ready.wait(timeout)
        return self.state == "running"

    def ensure_executor(self) -> Any:
        """Start the chosen executor if needed, wait for it and return it (blocking).

        Raises
        ------
        RuntimeError
            With the plain-words reason when it could not start.
        """
        if self.state != "running":
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
            executor, kind = self._executor, self._executor_kind
            self._monitor_stop.set()
            self._executor = None
            if executor is None:  # nothing started, or "serial"
                if self.state == "running":
                    self._set_state("stopped", "Stopped")
                return
            verb = "Disconnecting" if kind == "connect" else "Stopping"
            self._set_state("stopping", f"{verb}...")
            if not (kind in _POOL_KINDS or block):
                self._thread = threading.Thread(
                    target=self._shutdown,
                    args=(executor, kind),
                    name="chemfit-picker-stop",
                    daemon=True,
                )
                self._thread.start()
                return
        self._shutdown(executor, kind)

    def _shutdown(self, executor: Any, kind: str | None) -> None:
        try:
            if type(executor).__module__.startswith("loky"):
                executor.shutdown(wait=True, kill_workers=True)
            else:
                executor.shutdown(wait=True, cancel_futures=True)
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
