"""The state of one fit: its executor or owned pool, contexts, callbacks, history, progress bar.

A :class:`FitSession` is created when a fit starts (``Fitter.init`` or a ``fit_*`` method) and
ends with it. It is what a fit loop works with: it evaluates candidates (a batch through
``map_with_context``, one at a time through ``submit_with_context``), turns each told
evaluation into its :class:`~chemfit.fitting.results.EvaluationRecord` once, appends it to the
:class:`~chemfit.fitting.results.FitHistory` (the one source of the fit's progress: best,
counts, records), and runs the fitter's evaluation and step callbacks. A resumed fit
(``fit_nevergrad(resume=True)``) starts its session from the previous result: the history holds
the earlier records, and new records continue their index, step and time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent import futures as cf
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from chemfit.execution.executor_info import ExecutorInfo
from chemfit.execution.submission import ContextFuture, ContextSubmitter
from chemfit.execution.task_errors import is_lost_worker
from chemfit.fitting.fault_policy import FaultPolicy, Flight, Outcome
from chemfit.fitting.parameter_space import float_tree
from chemfit.fitting.results import EvaluationRecord, FitHistory, FitResult

__all__ = ["FitSession", "in_jupyter_kernel", "open_pool", "progress_bar"]


def _copy_meta(meta: Any) -> Any:
    """A deep copy of ``meta`` (an empty dict without ``deepcopy``'s 2 us per call)."""
    return {} if type(meta) is dict and not meta else copy.deepcopy(meta)


@dataclass
class FitSession:
    """The state of one fit.

    Examples
    --------
    >>> from chemfit.fitting.fitter_context import FitterEvaluateContext, FitterObjectiveFunctor
    >>> session = FitSession(1, None, None, None, "ask-tell", "", None, None, True,
    ...                      time.perf_counter(), [FitterEvaluateContext()],
    ...                      FitterObjectiveFunctor(lambda p, c: p["x"]))
    >>> session.evaluate_batch([{"x": 2}], step=0)
    [2.0]
    >>> [(record.step, record.loss) for record in session.history], session.contexts[0].n_evals
    ([(0, 2.0)], 1)

    A session that continues ``previous`` starts with its history, step and best loss:

    >>> session = FitSession.continuing(
    ...     FitResult({"x": 2.0}, {"x": 2.0}, 2.0, {}, n_evals=1, wall_time=5.0,
    ...               history=session.history),
    ...     num_workers=1, executor=None, owned_executor=None, finalizer=None,
    ...     backend="ask-tell", optimizer="", mode=None, seed=None, record_meta=True,
    ...     contexts=[FitterEvaluateContext()],
    ...     objective=FitterObjectiveFunctor(lambda p, c: p["x"]))
    >>> session.evaluate_batch([{"x": 1}], step=session.step)
    [1.0]
    >>> [(record.index, record.step, record.time > 5.0) for record in session.history]
    [(0, 0, False), (1, 1, True)]
    """

    num_workers: int
    executor: ExecutorInfo | None  # None: evaluate serially in this thread
    owned_executor: ThreadPoolExecutor | None
    finalizer: weakref.finalize | None
    backend: str
    optimizer: str
    mode: str | None
    seed: int | None
    record_meta: bool
    t0: float
    contexts: Sequence[Any]
    objective: Callable[..., Any]
    step_callbacks: list = field(default_factory=list)
    evaluation_callbacks: list = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    step: int = 0
    converged: bool | None = None
    stopped: bool = False
    bar: Any = None
    history: FitHistory = field(default_factory=FitHistory)
    previous: FitResult | None = None
    untold: list[tuple[EvaluationRecord, Any, Any]] = field(default_factory=list)
    n_notified: int = 0  # the index of the first record the evaluation callbacks have not seen
    first_index: int = 0  # the index of the history's first record (see next_index)
    faults: FaultPolicy = field(default_factory=FaultPolicy)  # failed, lost, overdue evaluations
    _submitter: ContextSubmitter | None = field(default=None, repr=False)
    validation: Any = None  # a ValidationMonitor (Fitter(validation=...)), fed by notify()

    def __post_init__(self) -> None:
        for worker, ctx in enumerate(self.contexts):
            ctx._bind(self.history, worker)

    @classmethod
    def continuing(cls, previous: FitResult | None, **kwargs: Any) -> FitSession:
        """A session that continues ``previous`` (or a fresh one for ``None``).

        Its history starts as a copy of the previous history, so new records continue its
        ``index``; ``step`` continues after the last record's step, ``time`` after the
        previous ``wall_time``; the previous best (which may be an observation) competes for
        the best. ``kwargs`` are the other fields (``t0`` defaults to now).
        """
        kwargs.setdefault("t0", time.perf_counter())
        if previous is None:
            return cls(**kwargs)
        if len(previous.history):  # new records go on after both, never reusing a number
            at_least = kwargs.get("first_index", 0) - len(previous.history)
            kwargs["first_index"] = max(previous.history[0].index, at_least)
        history = FitHistory(previous.history)
        best = history.best()
        if math.isfinite(previous.best_loss) and (best is None or previous.best_loss < best.loss):
            history._observe(
                copy.deepcopy(previous.best_parameters),
                previous.best_loss,
                copy.deepcopy(previous.best_meta),
                count=False,
            )
        kwargs["t0"] -= previous.wall_time
        last = previous.history[-1] if len(previous.history) else None
        return cls(
            **kwargs,
            step=last.step + 1 if last is not None else 0,
            history=history,
            previous=previous,
            n_notified=last.index + 1 if last is not None else 0,
        )

    @property
    def next_index(self) -> int:
        """The index of the next record: after the history's records and, for a fit that
        continues a JSON-lines file (``initial_observations=load_observations(path)``), after
        the file's records (``first_index``), so that no two records share an index."""
        return self.first_index + len(self.history)

    @property
    def n_evals(self) -> int:
        """Evaluations recorded by this session (a resumed result's records excluded)."""
        return len(self.history) - (len(self.previous.history) if self.previous else 0)

    def stop_requested(self) -> bool:
        """Whether a stop was requested (then ``stopped`` is set)."""
        if self.stop.is_set():
            self.stopped = True
        return self.stopped

    # -- evaluations become records ---------------------------------------------------------

    def _new_record(
        self,
        ctx: Any,
        parameters: dict,
        worker: int,
        loss: Any,
        step: int,
        index: int,
        outcome: Outcome | None = None,
    ):
        loss = float(loss)
        if outcome is not None and outcome.status != "ok":  # failed or lost: told as bad
            raw_loss, penalised, error = None, True, outcome.error
            status, traceback = outcome.status, outcome.traceback
        else:
            info = getattr(ctx, "last_evaluation", None) or {}
            raw_loss, penalised = info.get("raw_loss", loss), bool(info.get("penalised", False))
            error = info.get("error")  # an exception swallowed by swallow_exceptions
            status, traceback = ("ok" if error is None else "failed"), None
        return EvaluationRecord(
            index=index,
            step=step,
            worker=worker,
            parameters=float_tree(parameters),
            loss=loss,
            raw_loss=raw_loss,
            penalised=penalised,
            error=error,
            meta=_copy_meta(ctx.meta) if self.record_meta else None,
            time=time.perf_counter() - self.t0,
            status=status,
            tries=1 if outcome is None else outcome.tries,
            traceback=traceback,
        )

    def _append(self, record: EvaluationRecord, ctx: Any, quantities: Any, meta: Any) -> None:
        """Append ``record``; when it is its context's new best, the context keeps what the
        record lacks (``quantities``, and ``meta`` when records keep none)."""
        history = self.history
        history.append(record)
        if history.best(record.worker) is record and hasattr(ctx, "_note_best"):
            ctx._note_best(record, quantities, None if self.record_meta else meta)
        if self.bar is not None:
            if history.best() is record:  # the postfix changes only with the best
                self.bar.set_postfix(best=f"{record.loss:.6g}", refresh=False)
            self.bar.update(1)

    def record(
        self,
        ctx: Any,
        parameters: dict,
        worker: int,
        loss: Any,
        step: int,
        outcome: Outcome | None = None,
    ) -> None:
        """Record the evaluation of ``parameters`` made in ``ctx`` by ``worker``, told now
        (``loss``); ``outcome`` gives its status and tries (default: ok, one try)."""
        record = self._new_record(ctx, parameters, worker, loss, step, self.next_index, outcome)
        self._append(record, ctx, ctx.quantities, ctx.meta)

    def stage(
        self, ctx: Any, parameters: dict, worker: int, loss: Any, outcome: Outcome | None = None
    ) -> None:
        """Keep a hand-driven evaluation (``Fitter.ask``) until the next :meth:`tell_untold`."""
        index = self.next_index + len(self.untold)
        record = self._new_record(ctx, parameters, worker, loss, self.step, index, outcome)
        best = self.history.best(worker)
        if record.penalised or (best is not None and not record.loss < best.loss):
            self.untold.append((record, None, None))  # cannot become its context's best
            return
        meta = None if self.record_meta else _copy_meta(ctx.meta)
        self.untold.append((record, copy.deepcopy(ctx.quantities), meta))

    def tell_untold(self, step: int) -> None:
        """Record the staged evaluations as evaluations of ``step`` (nothing else runs)."""
        untold, self.untold = self.untold, []
        for record, quantities, meta in untold:
            if record.step != step:
                record = dataclasses.replace(record, step=step)
            self._append(record, self.contexts[record.worker], quantities, meta)

    # -- callbacks --------------------------------------------------------------------------

    def notify(self) -> None:
        """Run the evaluation callbacks on the records they have not seen, in tell order.

        Every record is in the history before the first callback runs, so a callback that
        raises loses none of the step's results.
        """
        records = self.history.records_since(self.n_notified)
        if not records:
            return
        self.n_notified = records[-1].index + 1
        for record in records:
            for callback in list(self.evaluation_callbacks):  # one may remove itself
                callback(record)
        if self.validation is not None:  # validate the new best records
            self.validation.update()

    def end_step(self, step: int) -> None:
        """Run the step callbacks of ``step`` (``func(step, contexts)`` when ``step % n == 0``)."""
        for func, n_steps in list(self.step_callbacks):
            if step % n_steps == 0:
                func(step, self.contexts)
        self.step = step + 1

    # -- evaluating -------------------------------------------------------------------------

    def evaluate_batch(self, params_list: list[dict], step: int | None) -> list[float]:
        """Evaluate ``params_list`` in ``contexts[:n]`` (reset first, R6) and record them as
        evaluations of ``step`` (``None``: staged until :meth:`tell_untold`); returns the
        values told.

        Runs on the session's executor (each candidate submitted with :meth:`submit`), or
        serially without one; each evaluation ends as :attr:`faults` decides (failed, lost and
        retried evaluations; see :class:`~chemfit.fitting.fault_policy.FaultPolicy`). As
        ``map_with_context``: every evaluation is waited for and the first error in input
        order raised; the evaluations that finished are recorded also then. An interrupt
        cancels what has not started.
        """
        if not params_list:
            return []
        ctxs = self.contexts[: len(params_list)]
        keep = self.stage if step is None else lambda *a, **k: self.record(*a, step, **k)
        outcomes: list[Outcome | None] = [None] * len(params_list)
        try:
            if self.executor is None:
                self._run_serially(params_list, ctxs, outcomes)
            else:
                self._run_batch(params_list, outcomes)
        finally:  # also after an error or an interrupt: what finished is kept
            for worker, (params, outcome) in enumerate(zip(params_list, outcomes)):
                if outcome is not None:
                    keep(ctxs[worker], params, worker, outcome.value, outcome=outcome)
        return [float(outcome.value) for outcome in outcomes]

    def _run_serially(self, params_list: list[dict], ctxs: Sequence[Any], outcomes: list) -> None:
        """Evaluate ``params_list`` in this thread, one after the other, into ``outcomes``."""
        faults, bad = self.faults, self.objective.value_bad_params
        faults.warn_no_executor()
        for ctx in ctxs:
            ctx.reset()
        for position, (params, ctx) in enumerate(zip(params_list, ctxs)):
            try:
                value = self.objective(params, ctx)
            except Exception as exc:
                if faults.on_error != "record":
                    raise
                outcomes[position] = faults.failed(exc, self.next_index + position, params, bad)
                continue
            outcomes[position] = Outcome(value)

    def _run_batch(self, params_list: list[dict], outcomes: list) -> None:
        """Submit ``params_list`` to ``contexts[:n]`` and wait for all, each settled by
        :attr:`faults` into ``outcomes``; raise the first error in input order."""
        faults = self.faults
        pending: list[Flight] = []
        errors: dict[int, Exception] = {}
        try:
            first = self.next_index + len(self.untold)
            for worker, params in enumerate(params_list):
                pending.append(self.start(params, worker, first + worker))
            while pending:
                for flight in sorted(faults.wait(pending), key=lambda f: f.number):
                    try:
                        outcome = faults.settle(flight, self)
                    except Exception as exc:
                        errors[flight.worker] = exc
                        if faults.fatal is not None:  # no worker left: record, wait for none
                            self._give_up(pending, outcomes)
                            pending.clear()
                            break
                        pending.remove(flight)
                        continue
                    if outcome is not None:
                        outcomes[flight.worker] = outcome
                        pending.remove(flight)
        except BaseException:
            for flight in pending:
                flight.future.cancel()
            for flight in pending:  # the states of the finished ones, for the history
                if flight.future.done() and not flight.future.cancelled():
                    with contextlib.suppress(Exception):
                        outcomes[flight.worker] = Outcome(
                            flight.future.result(0), tries=flight.tries
                        )
            raise
        if errors:
            raise errors[min(errors)]

    def _give_up(self, flights: list[Flight], outcomes: list) -> None:
        """No worker is left: the flights not settled end now (finished, or lost)."""
        bad = self.objective.value_bad_params
        for flight in flights:
            outcomes[flight.worker] = self.faults.unfinished(flight, bad)
            flight.future.cancel()

    def start(self, params: dict, worker: int, index: int, candidate: Any = None) -> Flight:
        """:meth:`submit` the evaluation number ``index``: its :class:`Flight` (all tries).

        A pool that broke before this submission (its ``submit`` raises, e.g.
        ``BrokenProcessPool``) gives a flight whose future holds the ``WorkerLostError`` of
        this evaluation, which the fault policy handles as any other lost evaluation.
        """
        try:
            future = self.submit(params, worker, index)
        except Exception as exc:
            if not is_lost_worker(exc) or self._submitter is None:
                raise
            failed: cf.Future = cf.Future()
            failed.set_exception(exc)
            call = (params, self.contexts[worker])
            future = ContextFuture(self._submitter, failed, [call], index, True)
        return Flight(index, params, worker, future, candidate)

    def recover(self, error: BaseException) -> None:
        """Make the executor usable after ``error`` lost an evaluation: ``recover_executor``
        keeps it (workers are left), or rebuilds a pool chemfit can rebuild; it raises
        ``WorkerLostError`` when no worker is left."""
        from chemfit.execution.recovery import recover_executor

        info = recover_executor(self.executor, error)
        if info is not self.executor:  # a new executor (loky's reusable one is replaced)
            self.executor = info
            submitter = self._submitter
            if submitter is not None and submitter.executor is not info.executor:
                try:
                    submitter.switch_to(info.executor)  # what was packed is kept
                except ValueError:  # another kind: pack the objective for it
                    self._submitter = None

    def submit_again(self, flight: Flight) -> ContextFuture:
        """The future of the next try of ``flight``: the same parameters, context and number."""
        return self.submit(flight.params, flight.worker, flight.number)

    def submit(self, params: dict, worker: int, index: int) -> ContextFuture:
        """Start evaluating ``params`` in ``contexts[worker]`` (reset first) on the executor;
        the future's ``result()`` is the loss, with the call's state applied to the context.
        ``index`` numbers the evaluation in error messages (e.g. a lost worker's).

        The objective is packed for the workers once per fit (a ``ContextSubmitter``)."""
        if self._submitter is None:
            self._submitter = ContextSubmitter(self.executor, self.objective)
        ctx = self.contexts[worker]
        ctx.reset()
        return self._submitter.submit(params, ctx, index=index)

    def shutdown_pool(self, wait_for_tasks: bool) -> None:
        """Shut down the owned pool (cancelling pending tasks) and close the progress bar."""
        pool, self.owned_executor = self.owned_executor, None
        if self.finalizer is not None:
            self.finalizer.detach()
            self.finalizer = None
        if pool is not None:
            pool.shutdown(wait=wait_for_tasks, cancel_futures=True)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def open_pool(
    owner: object, num_workers: int, executor: Any
) -> tuple[Any, ThreadPoolExecutor | None, weakref.finalize | None]:
    """``(executor to use, owned pool, finalizer)`` for a fit with ``num_workers`` workers.

    Without an executor and with more than one worker, a ``ThreadPoolExecutor`` is created; it
    is shut down when ``owner`` is garbage collected, so a hand-driven fit that is never
    finished still releases its threads.

    Examples
    --------
    >>> class Owner: ...
    >>> owner = Owner()
    >>> executor, pool, finalizer = open_pool(owner, 2, None)
    >>> executor is pool, type(pool).__name__
    (True, 'ThreadPoolExecutor')
    >>> finalizer()
    >>> open_pool(owner, 1, None)
    (None, None, None)
    """
    if executor is not None or num_workers <= 1:
        return executor, None, None
    owned = ThreadPoolExecutor(num_workers, thread_name_prefix="chemfit-fitter")
    finalizer = weakref.finalize(owner, owned.shutdown, wait=False, cancel_futures=True)
    return owned, owned, finalizer


def _importable(name: str) -> bool:
    """Whether ``import name`` would find the module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent is no package; a module without a spec
        return False


def in_jupyter_kernel() -> bool:
    """Whether this code runs in a Jupyter kernel (an IPython ``ZMQInteractiveShell``).

    Looks only at modules already imported: nothing from Jupyter is imported here. An
    ipyparallel engine, whose shell is also a ``ZMQInteractiveShell``, does not count.

    Examples
    --------
    >>> in_jupyter_kernel()
    False
    """
    if "ipykernel" not in sys.modules:
        return False
    get_ipython = getattr(sys.modules.get("IPython"), "get_ipython", None)
    shell = get_ipython() if callable(get_ipython) else None
    if shell is None or not any(
        cls.__name__ == "ZMQInteractiveShell" for cls in type(shell).__mro__
    ):
        return False
    kernel = getattr(shell, "kernel", None)
    return not type(kernel).__module__.startswith("ipyparallel")


def progress_bar(
    progress: bool | None,
    total: int | None,
    desc: str,
    *,
    initial: int = 0,
    best: EvaluationRecord | None = None,
) -> Any:
    """A progress bar counting evaluations, with the best loss as postfix, or ``None``.

    In a Jupyter kernel's main thread the bar is ``tqdm.auto``'s (a widget when ipywidgets is
    installed); elsewhere it is a ``tqdm.std`` bar on stderr. ``progress=None`` shows it in a
    Jupyter kernel's main thread and when stderr is a terminal, so a fit in a background
    thread (a dashboard) stays silent unless asked. ``initial`` evaluations are already
    counted (a resumed fit) and ``best`` is the best record so far (``FitHistory.best()``).

    Examples
    --------
    >>> progress_bar(False, 10, "fit") is None
    True
    >>> progress_bar(None, 10, "fit") is None  # not a terminal, not a notebook
    True
    """
    notebook = in_jupyter_kernel() and threading.current_thread() is threading.main_thread()
    show = (notebook or sys.stderr.isatty()) if progress is None else bool(progress)
    if not show:
        return None
    options: dict[str, Any] = {"desc": desc, "unit": "eval", "leave": True}
    if total is not None:
        options.update(total=total + initial, initial=initial)
    if notebook and _importable("ipywidgets"):
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm

        options["file"] = sys.stderr
    bar = tqdm(**options)
    if best is not None:
        bar.set_postfix(best=f"{best.loss:.6g}", refresh=False)
    return bar
