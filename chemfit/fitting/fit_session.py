"""The state of one fit: its executor or owned pool, staged evaluations, history, progress bar.

A :class:`FitSession` is created when a fit starts (``Fitter.init`` or a ``fit_*`` method) and
ends with it. Evaluations are *staged* as they finish and turned into
:class:`~chemfit.fitting.results.EvaluationRecord` s when their step is told (*flushed*).
"""

from __future__ import annotations

import copy
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from chemfit.execution.executor_utils import map_with_context
from chemfit.fitting.parameter_space import float_tree
from chemfit.fitting.results import EvaluationRecord, FitHistory

__all__ = ["FitSession", "PendingEvaluation", "open_pool", "progress_bar"]


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
    ...                      time.perf_counter(), [0])
    >>> contexts = [FitterEvaluateContext()]
    >>> session.evaluate_batch(FitterObjectiveFunctor(lambda p, c: p["x"]), contexts, [{"x": 2}])
    [2.0]
    >>> session.flush(0, [])
    >>> [(record.step, record.loss) for record in session.history]
    [(0, 2.0)]
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
    start_evals: list[int]
    step: int = 0
    n_observations: int = 0
    converged: bool | None = None
    stopped: bool = False
    best_told: float = math.inf
    bar: Any = None
    pending: list[PendingEvaluation] = field(default_factory=list)
    history: FitHistory = field(default_factory=FitHistory)

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
        except Exception:
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
            if self.bar is not None:
                self.bar.set_postfix(best=f"{self.best_told:.6g}", refresh=False)
                self.bar.update(1)
            records.append(record)
        for record in records:
            for callback in callbacks:
                callback(record)

    def evaluations_since_start(self, contexts: Iterable[Any]) -> int:
        """Evaluations counted in ``contexts`` since the session started (observations included)."""
        return sum(c.n_evals for c in contexts) - sum(self.start_evals)

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


def progress_bar(progress: bool | None, total: int | None, desc: str) -> Any:
    """A ``tqdm.std`` bar on stderr, or ``None``; ``progress=None`` shows it on a terminal.

    Examples
    --------
    >>> progress_bar(False, 10, "fit") is None
    True
    """
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None
    from tqdm.std import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="eval", leave=True)
