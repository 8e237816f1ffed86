"""The state of one fit: its executor or owned pool, staged evaluations, history, progress bar.

A :class:`FitSession` is created when a fit starts (``Fitter.init`` or a ``fit_*`` method) and
ends with it. Evaluations are *staged* as they finish and turned into
:class:`~chemfit.fitting.results.EvaluationRecord` s when their step is told (*flushed*). A
resumed fit (``fit_nevergrad(resume=True)``) starts its session from the previous result: the
history holds the earlier records, and new records continue their index, step and time.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from chemfit.execution.executor_utils import map_with_context
from chemfit.fitting.parameter_space import float_tree
from chemfit.fitting.results import EvaluationRecord, FitHistory, FitResult

__all__ = ["FitSession", "PendingEvaluation", "in_jupyter_kernel", "open_pool", "progress_bar"]


def _copy_meta(meta: Any) -> Any:
    """A deep copy of ``meta`` (an empty dict without ``deepcopy``'s 2 us per call)."""
    return {} if type(meta) is dict and not meta else copy.deepcopy(meta)


@dataclass
class PendingEvaluation:
    """An evaluation that finished but whose step has not been told yet.

    Examples
    --------
    >>> PendingEvaluation({"x": 1.0}, 0, 2.0, 2.0, False, None, {}).loss
    2.0
    """

    parameters: dict
    worker: int
    loss: float
    raw_loss: float | None
    penalised: bool
    error: str | None
    meta: dict | None


@dataclass
class FitSession:
    """The state of one fit.

    Examples
    --------
    >>> from chemfit.fitting.fitter_context import FitterEvaluateContext, FitterObjectiveFunctor
    >>> session = FitSession(1, None, None, None, "ask-tell", "", None, None, True,
    ...                      time.perf_counter())
    >>> contexts = [FitterEvaluateContext()]
    >>> session.evaluate_batch(FitterObjectiveFunctor(lambda p, c: p["x"]), contexts, [{"x": 2}])
    [2.0]
    >>> session.flush(0, [])
    >>> [(record.step, record.loss) for record in session.history]
    [(0, 2.0)]

    A session that continues ``previous`` starts with its history, step and best loss:

    >>> session = FitSession.continuing(
    ...     FitResult({"x": 2.0}, {"x": 2.0}, 2.0, {}, n_evals=1, wall_time=5.0,
    ...               history=session.history),
    ...     num_workers=1, executor=None, owned_executor=None, finalizer=None,
    ...     backend="ask-tell", optimizer="", mode=None, seed=None, record_meta=True)
    >>> session.evaluate_batch(FitterObjectiveFunctor(lambda p, c: p["x"]), contexts, [{"x": 1}])
    [1.0]
    >>> session.flush(session.step, [])
    >>> [(record.index, record.step, record.time > 5.0) for record in session.history]
    [(0, 0, False), (1, 1, True)]
    """

    num_workers: int
    executor: Any
    owned_executor: ThreadPoolExecutor | None
    finalizer: weakref.finalize | None
    backend: str
    optimizer: str
    mode: str | None
    seed: int | None
    record_meta: bool
    t0: float
    step: int = 0
    n_observations: int = 0
    converged: bool | None = None
    stopped: bool = False
    best_told: float = math.inf
    bar: Any = None
    pending: list[PendingEvaluation] = field(default_factory=list)
    history: FitHistory = field(default_factory=FitHistory)
    previous: FitResult | None = None
    n_resumed: int = 0
    best_observed: tuple[float, dict, dict] | None = None

    @classmethod
    def continuing(cls, previous: FitResult | None, **kwargs: Any) -> FitSession:
        """A session that continues ``previous`` (or a fresh one for ``None``).

        Its history starts as a copy of the previous history, so new records continue its
        ``index``; ``step`` continues after the last record's step, ``time`` after the
        previous ``wall_time``; the previous best (which may be an observation) is the best
        observed so far.
        ``kwargs`` are the other fields (``t0`` defaults to now).
        """
        kwargs.setdefault("t0", time.perf_counter())
        if previous is None:
            return cls(**kwargs)
        history = previous.history
        kwargs["t0"] -= previous.wall_time
        best = None
        if math.isfinite(previous.best_loss):
            best = (
                previous.best_loss,
                copy.deepcopy(previous.best_parameters),
                copy.deepcopy(previous.best_meta),
            )
        return cls(
            **kwargs,
            step=history[-1].step + 1 if len(history) else 0,
            best_told=previous.best_loss,
            history=FitHistory(history),
            previous=previous,
            best_observed=best,
        )

    @property
    def n_evals(self) -> int:
        """Evaluations recorded by this session (a resumed result's records excluded)."""
        return len(self.history) - (len(self.previous.history) if self.previous else 0)

    def observe(self, loss: float, parameters: dict, meta: dict) -> None:
        """Count an unpenalised observation (not an evaluation of this fit) for the best."""
        if self.best_observed is None or loss < self.best_observed[0]:
            self.best_observed = (loss, parameters, meta)

    def best(self) -> tuple[float, dict, dict | None] | None:
        """``(loss, parameters, meta)`` of the best unpenalised record or observation.

        The history is the one source: the workers may still finish evaluations that an
        interrupt left untold. Ties keep the earlier one; ``meta`` is ``None`` for a record
        kept without meta (``record_meta=False``).
        """
        best = self.best_observed
        for record in self.history:
            if not record.penalised and (best is None or record.loss < best[0]):
                best = (record.loss, record.parameters, record.meta)
        return best

    def evaluate_batch(
        self, objective: Callable[..., Any], contexts: Sequence[Any], params_list: list[dict]
    ) -> list[float]:
        """Evaluate ``params_list`` in ``contexts[:n]`` (reset first, R6) and stage the results.

        Runs on the session's executor through ``map_with_context``, or serially without one.
        """
        if not params_list:
            return []
        ctxs = contexts[: len(params_list)]
        for ctx in ctxs:
            ctx.reset()
        try:
            if self.executor is None:
                losses = [objective(p, c) for p, c in zip(params_list, ctxs)]
            else:
                losses = map_with_context(self.executor, objective, params_list, ctxs=ctxs)
        except BaseException:  # an error or an interrupt
            # The evaluations that did finish are real results: keep them for the history.
            for index, (params, ctx) in enumerate(zip(params_list, ctxs)):
                if getattr(ctx, "last_evaluation", None) is not None:
                    self.stage(ctx, params, index, ctx.loss)
            raise
        for index, (params, loss) in enumerate(zip(params_list, losses)):
            self.stage(contexts[index], params, index, loss)
        return [float(loss) for loss in losses]

    def stage(self, ctx: Any, parameters: dict, worker: int, loss: Any) -> None:
        """Remember an evaluation, made in ``ctx`` by ``worker``, until it is told."""
        info = getattr(ctx, "last_evaluation", None) or {}
        self.pending.append(
            PendingEvaluation(
                parameters=float_tree(parameters),
                worker=worker,
                loss=float(loss),
                raw_loss=info.get("raw_loss", float(loss)),
                penalised=bool(info.get("penalised", False)),
                error=info.get("error"),
                meta=_copy_meta(ctx.meta) if self.record_meta else None,
            )
        )

    def flush(self, step: int, callbacks: Iterable[Callable[[EvaluationRecord], None]]) -> None:
        """Turn the staged evaluations into records of ``step`` and run the evaluation callbacks.

        Every record is in the history before the first callback runs, so a callback that
        raises loses none of the step's results.
        """
        pending, self.pending = self.pending, []
        records = []
        for item in pending:
            record = EvaluationRecord(
                index=len(self.history),
                step=step,
                worker=item.worker,
                parameters=item.parameters,
                loss=item.loss,
                raw_loss=item.raw_loss,
                penalised=item.penalised,
                error=item.error,
                meta=item.meta,
                time=time.perf_counter() - self.t0,
            )
            self.history._append(record)
            if not item.penalised and item.loss < self.best_told:
                self.best_told = item.loss
                if self.bar is not None:  # the postfix changes only with the best
                    self.bar.set_postfix(best=f"{self.best_told:.6g}", refresh=False)
            if self.bar is not None:
                self.bar.update(1)
            records.append(record)
        for record in records:
            for callback in callbacks:
                callback(record)

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
    progress: bool | None, total: int | None, desc: str, *, initial: int = 0, best: float = math.inf
) -> Any:
    """A progress bar counting evaluations, with the best loss as postfix, or ``None``.

    In a Jupyter kernel's main thread the bar is ``tqdm.auto``'s (a widget when ipywidgets is
    installed); elsewhere it is a ``tqdm.std`` bar on stderr. ``progress=None`` shows it in a
    Jupyter kernel's main thread and when stderr is a terminal, so a fit in a background
    thread (a dashboard) stays silent unless asked. ``initial`` evaluations are already
    counted (a resumed fit) and ``best`` is the best loss so far.

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
    if math.isfinite(best):
        bar.set_postfix(best=f"{best:.6g}", refresh=False)
    return bar
