"""The :class:`Fitter`: drives nevergrad, scipy or a hand-written loop over an objective.

The fitter keeps one :class:`FitterEvaluateContext` per worker. Each evaluation runs in a freshly
reset context (R6); the context's result state carries the evaluation count and the best point
seen, so the best-so-far survives thread, process and remote workers (R1). Every told evaluation
becomes an :class:`~chemfit.fitting.results.EvaluationRecord`, and each fit leaves a
:class:`~chemfit.fitting.results.FitResult` in ``fitter.result`` - also when an exception or a
``KeyboardInterrupt`` ends it, before that propagates (an interrupt as
:class:`~chemfit.core.exceptions.FitInterrupted`). ``fit_nevergrad(resume=True)`` continues
the previous fit: its result then covers both.

The parts live in small modules: :mod:`~chemfit.fitting.fitter_context` (the context and the
objective wrapper, re-exported here), :mod:`~chemfit.fitting.parameter_space` (parameters and
bounds), :mod:`~chemfit.fitting.optimizer_lookup`, :mod:`~chemfit.fitting.fit_session` (the
state of one fit) and :mod:`~chemfit.fitting.nevergrad_loop`. nevergrad and ``scipy.optimize``
are imported on first use.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import numbers
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

from chemfit.core.context import ExecutorLike
from chemfit.core.exceptions import FitInterrupted
from chemfit.core.flatdict import flatten_dict
from chemfit.core.objectives import ObjectiveFunctor
from chemfit.core.utils import check_params_near_bounds
from chemfit.core.wrapping import WrappedObjectiveFunctor
from chemfit.execution.executors import as_executor
from chemfit.fitting.fit_session import FitSession, open_pool, progress_bar
from chemfit.fitting.fitter_context import (
    FitterEvaluateContext,
    FitterObjectiveFunctor,
    best_context,
    worker_contexts,
)
from chemfit.fitting.nevergrad_loop import NevergradLoop, quiet_cma_injections
from chemfit.fitting.optimizer_lookup import (
    check_scipy_method,
    delegates_to_scipy,
    drops_early_tells,
    nevergrad_optimizer_class,
    scipy_ignores_bounds,
    scipy_method_name,
)
from chemfit.fitting.parameter_space import (
    bounded_keys,
    float_tree,
    is_real,
    nested_floats,
    nevergrad_parametrization,
    scipy_bounds,
    usable_observations,
    validate_parameters,
)
from chemfit.fitting.results import EvaluationRecord, FitResult

__all__ = ["Fitter", "FitterEvaluateContext", "FitterObjectiveFunctor"]

logger = logging.getLogger(__name__)

Callback = Callable[[int, list], None]
EvaluationCallback = Callable[[EvaluationRecord], None]


def _check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})"
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _accepts_ctx(func: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False
    param = parameters.get("ctx")
    return param is not None and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)


class _StopRequested(Exception):
    """Raised inside ``fit_scipy``'s objective to leave ``minimize`` after request_stop()."""


class Fitter:
    """Fit the parameters of an objective with nevergrad, scipy or a hand-driven loop.

    Parameters
    ----------
    objective_function : ObjectiveFunctor or callable
        ``objective(parameters, ctx)`` returning the loss. A plain callable is called as
        ``f(parameters)``, or ``f(parameters, ctx=ctx)`` when it has a ``ctx`` parameter.
    initial_params : dict
        Start values; may be nested (flat keys join levels with ``"."``).
    bounds : dict, optional
        ``(lower, upper)`` per parameter, nested like ``initial_params``; either side may be
        ``None``.
    near_bound_tol : float, optional
        After a fit, parameters within this fraction of their bounds' width of a bound are
        listed in ``problematic_params`` and logged.
    value_bad_params : float
        The loss told for failed evaluations and for non-numeric or non-finite losses.
    swallow_exceptions : bool
        Tell ``value_bad_params`` instead of aborting when the objective raises.
    log_exceptions : bool
        Log the traceback when the objective raises.

    Attributes
    ----------
    objective_function : FitterObjectiveFunctor
    initial_parameters, bounds : dict
    contexts : list[FitterEvaluateContext]
        One per worker; replaced by each fit.
    callbacks : list[tuple[callable, int]]
        ``(func, n_steps)``; kept across fits.
    evaluation_callbacks : list[callable]
    time_fit_start, time_fit_end : float or None
    problematic_params : list
    result : FitResult or None
        Set after every fit and by ``finish``, also when a fit ends with an exception.

    Examples
    --------
    >>> fitter = Fitter(lambda p: (p["x"] - 2.0) ** 2, {"x": 0.0}, bounds={"x": (-5.0, 5.0)})
    >>> params = fitter.fit_scipy()
    >>> round(params["x"], 4), fitter.result.backend
    (2.0, 'scipy')
    """

    def __init__(
        self,
        objective_function: ObjectiveFunctor | Callable[..., Any],
        initial_params: dict,
        bounds: dict | None = None,
        near_bound_tol: float | None = None,
        value_bad_params: float = 1e5,
        swallow_exceptions: bool = False,
        log_exceptions: bool = True,
    ) -> None:
        if isinstance(objective_function, ObjectiveFunctor):
            wrapped: Callable[..., Any] = objective_function
        elif callable(objective_function):
            wrapped = WrappedObjectiveFunctor(
                objective_function, pass_ctx=_accepts_ctx(objective_function)
            )
        else:
            raise TypeError(
                f"objective_function must be callable, got {objective_function!r:.80} "
                f"({type(objective_function).__name__})"
            )
        if not is_real(value_bad_params):
            raise TypeError(
                f"value_bad_params must be a real number, got {value_bad_params!r}; e.g. 1e5"
            )
        if near_bound_tol is not None and not is_real(near_bound_tol):
            raise TypeError(
                f"near_bound_tol must be a real number or None, got {near_bound_tol!r}; e.g. 0.01"
            )
        validate_parameters(initial_params, bounds)
        self.objective_function = FitterObjectiveFunctor(
            wrapped,
            swallow_exceptions=swallow_exceptions,
            log_exceptions=log_exceptions,
            value_bad_params=float(value_bad_params),
        )
        self.initial_parameters = initial_params
        self.bounds = bounds if bounds is not None else {}
        self.near_bound_tol = near_bound_tol
        self.contexts: list[FitterEvaluateContext] = []
        self.callbacks: list[tuple[Callback, int]] = []
        self.evaluation_callbacks: list[EvaluationCallback] = []
        self.time_fit_start: float | None = None
        self.time_fit_end: float | None = None
        self.problematic_params: list = []
        self.result: FitResult | None = None
        self._session: FitSession | None = None
        self._stop = threading.Event()

    @property
    def value_bad_params(self) -> float:
        """The penalty told for failed or unusable evaluations (shared with the functor)."""
        return self.objective_function.value_bad_params

    @value_bad_params.setter
    def value_bad_params(self, value: float) -> None:
        self.objective_function.value_bad_params = value

    # -- callbacks ----------------------------------------------------------------------------

    def register_callback(self, func: Callback, n_steps: int = 1) -> None:
        """Call ``func(step, contexts)`` after every ``n_steps``-th optimizer step.

        Callbacks run on the main thread, in registration order, after the step's results were
        told, whenever ``step % n_steps == 0``. An exception from a callback ends the fit.

        Examples
        --------
        >>> fitter = Fitter(lambda p: p["x"] ** 2, {"x": 1.0})
        >>> fitter.register_callback(print, n_steps=0)
        Traceback (most recent call last):
        ...
        ValueError: n_steps must be an int >= 1, got 0; pass how many steps lie between calls
        """
        if not callable(func):
            raise TypeError(f"callback must be callable, got {func!r} ({type(func).__name__})")
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral) or n_steps < 1:
            raise ValueError(
                f"n_steps must be an int >= 1, got {n_steps!r}; pass how many steps lie "
                "between calls"
            )
        self.callbacks.append((func, int(n_steps)))

    def register_evaluation_callback(self, func: EvaluationCallback) -> None:
        """Call ``func(record)`` with an :class:`EvaluationRecord` for every told evaluation.

        Records arrive in tell order; replayed initial observations are skipped.

        Examples
        --------
        >>> fitter = Fitter(lambda p: p["x"] ** 2, {"x": 1.0})
        >>> losses = []
        >>> fitter.register_evaluation_callback(lambda record: losses.append(record.loss))
        >>> fitter.init()
        >>> fitter.ask({"x": 3.0})
        9.0
        >>> fitter.tell()
        >>> losses
        [9.0]
        """
        if not callable(func):
            raise TypeError(
                f"evaluation callback must be callable, got {func!r} ({type(func).__name__})"
            )
        self.evaluation_callbacks.append(func)

    # -- hooks --------------------------------------------------------------------------------

    def _hook_pre_fit(self) -> None:
        """Runs when a fit starts (subclassing point)."""
        logger.info("Start fitting")
        self.time_fit_start = time.time()
        self.time_fit_end = None
        self.problematic_params = []

    def _hook_post_fit(self, opt_params: dict) -> None:
        """Runs when a fit finishes (subclassing point): end time and near-bound warnings."""
        self.time_fit_end = time.time()
        logger.info("End fitting after %.3f s", self.time_fit_end - (self.time_fit_start or 0))
        if self.near_bound_tol is None:
            self.problematic_params = []
            return
        self.problematic_params = check_params_near_bounds(
            opt_params, self.bounds, self.near_bound_tol
        )
        if self.problematic_params:
            logger.warning(
                "parameters near or beyond their bounds (tolerance %.3g of the width):",
                self.near_bound_tol,
            )
            for key, value, lower, upper in self.problematic_params:
                logger.warning(
                    "    parameter = %s, lower = %s, value = %s, upper = %s",
                    key,
                    lower,
                    value,
                    upper,
                )

    # -- session ------------------------------------------------------------------------------

    def _start_session(
        self,
        num_workers: Any,
        contexts: Iterable[FitterEvaluateContext] | None,
        executor: Any,
        *,
        backend: str,
        optimizer: str = "",
        mode: str | None = None,
        seed: int | None = None,
        record_meta: bool = True,
        previous: FitResult | None = None,
    ) -> FitSession:
        """Open the session of a new fit; with ``previous``, one that continues that result."""
        num_workers = _check_count("num_workers", num_workers)
        ctx_list = worker_contexts(num_workers, contexts)
        resolved = as_executor(executor)
        self.close()  # a session left open by init() without finish()
        resolved, owned, finalizer = open_pool(self, num_workers, resolved)
        if num_workers > 1 and getattr(self.objective_function.wrap_me, "serialises_calls", False):
            logger.info(
                "%s evaluates one candidate at a time: the %d workers' candidates are serialised",
                type(self.objective_function.wrap_me).__name__,
                num_workers,
            )
        self.contexts = ctx_list
        self._hook_pre_fit()
        self._stop.clear()  # a request from before this fit does not end it
        self._session = FitSession.continuing(
            previous,
            num_workers=num_workers,
            executor=resolved,
            owned_executor=owned,
            finalizer=finalizer,
            backend=backend,
            optimizer=optimizer,
            mode=mode,
            seed=seed,
            record_meta=bool(record_meta),
            t0=time.perf_counter(),
        )
        return self._session

    def _require_session(self, method: str) -> FitSession:
        if self._session is None:
            raise RuntimeError(
                f"fitter.{method}() needs a running fit; call fitter.init() first (or use "
                "fit_nevergrad / fit_scipy)"
            )
        return self._session

    def request_stop(self) -> None:
        """Ask the running fit to end early; safe to call from any thread.

        ``fit_nevergrad`` asks no new candidate, waits for the evaluations in flight, tells and
        records them, runs the step callbacks of that last step and returns the optimizer's
        recommendation; ``fit_scipy`` returns the best point evaluated so far. Nothing raises:
        ``result.stopped`` is ``True`` and the history keeps every evaluation. Each fit starts
        with the request cleared, so a request made while no fit runs has no effect. A
        hand-driven fit (:meth:`init`, :meth:`ask`, :meth:`tell`) can poll
        :attr:`stop_requested` itself.

        Examples
        --------
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0})
        >>> def stop_after_step_2(step, contexts):
        ...     if step == 2:
        ...         fitter.request_stop()  # e.g. from a button, in another thread
        >>> fitter.register_callback(stop_after_step_2)
        >>> _ = fitter.fit_nevergrad(budget=100, optimizer_str="OnePlusOne", num_workers=2)
        >>> fitter.result.stopped, fitter.result.n_evals
        (True, 6)
        """
        if not self._stop.is_set():
            logger.info("stop requested: the fit ends once the evaluations in flight are told")
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """Whether :meth:`request_stop` was called since the current fit started."""
        return self._stop.is_set()

    def close(self) -> None:
        """Shut down the thread pool the fitter created, if any. A user's executor is kept.

        Examples
        --------
        >>> fitter = Fitter(lambda p: p["x"] ** 2, {"x": 1.0})
        >>> fitter.init(num_workers=2)
        >>> fitter.close()
        """
        if self._session is not None:
            self._session.shutdown_pool(wait_for_tasks=True)

    # -- hand-driven loop ---------------------------------------------------------------------

    def init(
        self,
        num_workers: int = 1,
        contexts: list[FitterEvaluateContext] | None = None,
        executor: ExecutorLike | None = None,
    ) -> None:
        """Start a hand-driven fit: then :meth:`ask`, :meth:`tell` and :meth:`finish`.

        With ``num_workers > 1`` and no executor the fitter owns a ``ThreadPoolExecutor``,
        shut down by :meth:`finish` or :meth:`close`.

        Examples
        --------
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0})
        >>> fitter.init(num_workers=2)
        >>> fitter.ask([{"x": 0.5}, {"x": 2.0}])
        [0.25, 1.0]
        >>> fitter.tell()
        >>> fitter.finish()
        {'x': 0.5}
        """
        validate_parameters(self.initial_parameters, self.bounds)
        self._start_session(num_workers, contexts, executor, backend="ask-tell")

    def ask(self, parameters: dict | list[dict], context_index: int = 0) -> float | list[float]:
        """Evaluate one candidate (a dict) or a batch (a list of at most ``num_workers`` dicts).

        A dict is evaluated in ``contexts[context_index]``; a list in ``contexts[:n]``, in
        parallel on the executor, with results in input order. The evaluations are recorded
        and reach the evaluation callbacks at the next :meth:`tell`.
        """
        session = self._require_session("ask")
        if isinstance(parameters, Mapping):
            n = len(self.contexts)
            if isinstance(context_index, bool) or not isinstance(context_index, int):
                raise TypeError(f"context_index must be an int, got {context_index!r}")
            if not -n <= context_index < n:
                raise ValueError(f"context_index={context_index} is out of range for {n} contexts")
            ctx = self.contexts[context_index]
            ctx.reset()
            loss = self.objective_function(parameters, ctx)
            session.stage(ctx, parameters, context_index % n, loss)
            return loss
        if isinstance(parameters, (str, bytes)) or not isinstance(parameters, Sequence):
            raise TypeError(
                f"parameters must be a dict or a list of dicts, got {type(parameters).__name__}"
            )
        if len(parameters) > session.num_workers:
            raise ValueError(
                f"ask got {len(parameters)} candidates but num_workers={session.num_workers}; "
                "pass at most num_workers dicts or call init() with more workers"
            )
        return session.evaluate_batch(self.objective_function, self.contexts, list(parameters))

    def _dispatch_step(self, session: FitSession, step: int) -> None:
        for func, n_steps in self.callbacks:
            if step % n_steps == 0:
                func(step, self.contexts)
        session.step = step + 1

    def tell(self, step: int | None = None) -> None:
        """Complete an optimizer step: record the evaluations asked since, then run callbacks.

        ``step`` defaults to the internal counter (0, 1, 2, ...), which continues after it.
        """
        session = self._require_session("tell")
        if step is None:
            step = session.step
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0 or None, got {step!r}")
        session.flush(int(step), self.evaluation_callbacks)
        self._dispatch_step(session, int(step))

    def finish(self, opt_params: dict | None = None) -> dict:
        """End the fit: set ``result``, log near-bound warnings and shut down an owned pool.

        Returns ``opt_params``, or the best evaluated parameters when it is ``None``, as a
        nested dict of floats.
        """
        session = self._require_session("finish")
        try:
            if session.pending:
                session.flush(session.step, self.evaluation_callbacks)
            if opt_params is None:
                best = self._best_so_far(session)
                if best is not None:
                    opt_params = best[1]
                elif session.n_evals > 0:
                    logger.warning(
                        "every evaluation was penalised; returning the initial parameters"
                    )
                    opt_params = self.initial_parameters
                else:
                    raise RuntimeError(
                        "finish() found no evaluation; call ask() before finish() or pass "
                        "opt_params"
                    )
            params = float_tree(opt_params)
            self._hook_post_fit(params)
            self.result = self._build_result(session, params)
        except BaseException as exc:
            interrupted = self._abort(session, exc)
            if interrupted is not None:
                raise interrupted from exc
            raise
        session.shutdown_pool(wait_for_tasks=True)
        self._session = None
        return params

    def _build_result(
        self,
        session: FitSession,
        params: dict,
        *,
        interrupted: bool = False,
        error: str | None = None,
    ) -> FitResult:
        best = self._best_so_far(session)
        if best is not None:
            best_loss, best_params, best_meta = best
            best_params, best_meta = float_tree(best_params), copy.deepcopy(best_meta)
        else:
            best_params, best_loss, best_meta = copy.deepcopy(params), math.inf, {}
        # Counted from the history, the result agrees with it also when an interrupt leaves
        # evaluations untold. A resumed result's own evaluations are replayed, not observations.
        n_evals = session.n_evals
        n_observations = session.n_observations - session.n_resumed
        end = self.time_fit_end if self.time_fit_end is not None else time.time()
        wall_time = end - (self.time_fit_start or end)
        previous = session.previous
        if previous is not None:
            n_evals += previous.n_evals
            n_observations += previous.n_observations
            wall_time += previous.wall_time
        return FitResult(
            parameters=params,
            best_parameters=best_params,
            best_loss=best_loss,
            best_meta=best_meta,
            n_evals=n_evals,
            n_observations=n_observations,
            wall_time=wall_time,
            history=session.history,
            backend=session.backend,
            optimizer=session.optimizer,
            mode=session.mode,
            seed=session.seed,
            converged=session.converged,
            interrupted=interrupted,
            error=error,
            problematic_params=list(self.problematic_params),
            stopped=session.stopped,
        )

    def _best_so_far(self, session: FitSession) -> tuple[float, dict, dict] | None:
        """``(loss, parameters, meta)`` of the session's best record or observation; the meta
        comes from the workers' contexts when records keep none (``record_meta=False``)."""
        best = session.best()
        if best is None or best[2] is not None:
            return best
        ctx = best_context(self.contexts)
        meta = ctx.opt_meta if ctx is not None and ctx.opt_loss == best[0] else None
        return best[0], best[1], meta if meta is not None else {}

    def _abort(self, session: FitSession, exc: BaseException) -> FitInterrupted | None:
        """Keep the best so far in ``result`` and release the owned pool (R13).

        Returns the :class:`FitInterrupted` to raise from ``exc`` when ``exc`` is a plain
        ``KeyboardInterrupt``; any other exception propagates as it is.
        """
        try:
            self.time_fit_end = time.time()
            if session.pending:  # evaluated, not yet told: an interrupt came between the two
                try:
                    session.flush(session.step, self.evaluation_callbacks)
                except Exception:
                    logger.debug("an evaluation callback failed on the last records", exc_info=True)
            best = self._best_so_far(session)
            params = float_tree(best[1] if best is not None else self.initial_parameters)
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.result = self._build_result(
                session,
                params,
                interrupted=interrupted,
                error=None if interrupted else f"{type(exc).__name__}: {exc}",
            )
        finally:
            session.shutdown_pool(wait_for_tasks=False)
            self._session = None
        if not isinstance(exc, KeyboardInterrupt) or isinstance(exc, FitInterrupted):
            return None
        return FitInterrupted(self._interrupt_message(), result=self.result)

    def _interrupt_message(self) -> str:
        """One line: how many evaluations the interrupted fit kept, where, and the best loss."""
        result = self.result
        if result is None or result.n_evals == 0:
            return "fit interrupted before any evaluation finished; nothing was evaluated"
        from chemfit.fitting.callbacks import CheckpointBestParameters, JSONLinesHistory

        files = [str(f.path) for f in self.evaluation_callbacks if isinstance(f, JSONLinesHistory)]
        checkpoints = [
            str(f.path) for f, _ in self.callbacks if isinstance(f, CheckpointBestParameters)
        ]
        where = " and ".join(["fitter.result", *files])
        if math.isfinite(result.best_loss):
            step = next(
                (
                    record.step
                    for record in result.history
                    if not record.penalised and record.loss == result.best_loss
                ),
                None,
            )
            at = f" at step {step}" if step is not None else " (an initial observation)"
            best = f"best loss {result.best_loss:.6g}{at}"
        else:
            best = "no finite, unpenalised loss yet"
        if checkpoints:
            best += f"; best parameters checkpointed in {' and '.join(checkpoints)}"
        n = result.n_evals
        return (
            f"fit interrupted after {n} evaluation{'s' if n != 1 else ''}; "
            f"{'they are' if n != 1 else 'it is'} kept in {where} ({best})"
        )

    # -- nevergrad ----------------------------------------------------------------------------

    def fit_nevergrad(
        self,
        budget: int,
        optimizer_str: str = "NgIohTuned",
        num_workers: int = 1,
        contexts: list[FitterEvaluateContext] | None = None,
        executor: Any = None,
        initial_observations: Iterable[tuple[dict, float | None]] | None = None,
        *,
        mode: Literal["batch", "async"] = "batch",
        seed: int | None = None,
        progress: bool | None = None,
        record_meta: bool = True,
        resume: bool = False,
    ) -> dict:
        """Minimise with a nevergrad optimizer; returns its recommendation as nested floats.

        Parameters
        ----------
        budget : int
            Exact number of objective calls; the initial parameters are evaluated first.
        optimizer_str : str
            A key of ``nevergrad.optimizers.registry``.
        num_workers : int
            Candidates evaluated at once.
        contexts : list of FitterEvaluateContext, optional
            One per worker.
        executor : optional
            Anything ``chemfit.executors.as_executor`` accepts. With ``None`` and
            ``num_workers > 1``, the fitter owns a thread pool.
        initial_observations : iterable of (dict, float or None), optional
            Earlier evaluations told before the budget starts (see ``load_observations``).
            With ``resume=True`` they are told after the previous fit's evaluations.
        mode : {"batch", "async"}
            ``"batch"``: ask ``num_workers`` candidates, evaluate, tell all, run callbacks.
            ``"async"``: keep ``num_workers`` evaluations in flight, tell each as it arrives.
        seed : int, optional
            Seeds the parametrization's random state (reproducible batch fits).
        progress : bool, optional
            Show a progress bar with the best loss: a widget in a Jupyter notebook, else on
            stderr. ``None`` shows it in a notebook (unless the fit runs in a background
            thread) and when stderr is a terminal.
        record_meta : bool
            Keep a deep copy of each evaluation's meta in its record.
        resume : bool
            Continue the previous fit of this fitter (``fitter.result``: finished, stopped,
            interrupted or failed; from ``fit_nevergrad``, ``fit_scipy`` or ``finish``). Its
            evaluations are kept and told to the new optimizer like ``initial_observations``
            (where the optimizer can learn from them; otherwise it continues from the best
            point so far). ``budget`` counts the new evaluations; new records continue the
            history's ``index``, ``step`` and ``time``, and the evaluation callbacks see only
            them. ``result`` then covers the whole session: both parts' history, ``n_evals``
            and ``wall_time`` added up, the best over both; ``stopped``, ``interrupted``,
            ``error`` and ``parameters`` describe the new part. Without a previous result it
            is a fresh fit.

        Raises
        ------
        FitInterrupted
            A ``KeyboardInterrupt`` ended the fit; ``result`` holds the evaluations so far.

        Examples
        --------
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0}, bounds={"x": (-3, 3)})
        >>> params = fitter.fit_nevergrad(budget=30, optimizer_str="OnePlusOne", seed=0)
        >>> fitter.result.n_evals, abs(params["x"] - 1.0) < 0.3
        (30, True)
        >>> best = fitter.result.best_loss
        >>> _ = fitter.fit_nevergrad(budget=10, optimizer_str="OnePlusOne", resume=True)
        >>> fitter.result.n_evals, fitter.result.history[-1].index, fitter.result.best_loss <= best
        (40, 39, True)
        """
        budget = _check_count("budget", budget)
        num_workers = _check_count("num_workers", num_workers)
        if mode not in ("batch", "async"):
            raise ValueError(f"mode must be 'batch' or 'async', got {mode!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r} ({type(seed).__name__})")
        if not isinstance(resume, bool):
            raise TypeError(f"resume must be True or False, got {resume!r}")
        flat, flat_bounds = validate_parameters(self.initial_parameters, self.bounds)
        optimizer_cls = nevergrad_optimizer_class(optimizer_str)
        observations = list(initial_observations) if initial_observations is not None else []
        previous = self.result if resume else None
        earlier = self._earlier_evaluations(previous, flat)

        session = self._start_session(
            num_workers,
            contexts,
            executor,
            backend="nevergrad",
            optimizer=optimizer_str,
            mode=mode,
            seed=None if seed is None else int(seed),
            record_meta=record_meta,
            previous=previous,
        )
        try:
            session.bar = progress_bar(
                progress,
                budget,
                f"nevergrad {optimizer_str}",
                initial=len(session.history),
                best=session.best_told,
            )
            resumed = usable_observations(earlier, flat, flat_bounds)
            replay = resumed + usable_observations(observations, flat, flat_bounds)
            session.n_resumed = len(resumed)

            def make_optimizer(start: dict, told: int) -> Any:
                parametrization = nevergrad_parametrization(start, flat_bounds)
                if seed is not None:
                    parametrization.random_state.seed(int(seed))
                return optimizer_cls(
                    parametrization=parametrization, budget=budget + told, num_workers=num_workers
                )

            start = dict(flat)
            optimizer = make_optimizer(start, len(replay))
            why_not = self._cannot_learn_from(optimizer) if replay else None
            tell_replay = why_not is None
            if not tell_replay:
                start = self._restart_point(optimizer_str, replay, start, why_not, len(resumed))
                optimizer = make_optimizer(start, 0)
            loop = NevergradLoop(
                session,
                optimizer,
                self.contexts,
                self.objective_function,
                flush=lambda step: session.flush(step, self.evaluation_callbacks),
                dispatch=lambda step: self._dispatch_step(session, step),
                stop_requested=self._stop.is_set,
                first_step=session.step,
            )
            with quiet_cma_injections():
                loop.replay(replay, float(self.value_bad_params), tell=tell_replay)
                self._carry_best(previous)
                if not (resumed and tell_replay):  # a told resumed fit goes on from its points
                    optimizer.suggest(start)
                if mode == "async" and num_workers > 1:
                    loop.run_async(budget)
                else:
                    loop.run_batches(budget)
                recommendation = optimizer.provide_recommendation().value
            opt_params = nested_floats(recommendation.items())
        except BaseException as exc:
            interrupted = self._abort(session, exc)
            if interrupted is not None:
                raise interrupted from exc
            raise
        return self.finish(opt_params)

    def _earlier_evaluations(
        self, previous: FitResult | None, flat: Mapping[str, float]
    ) -> list[tuple[dict, float | None]]:
        """The evaluations of ``previous`` as ``(parameters, loss)`` observations to replay
        (``None`` for a penalised one), checked against the parameters fitted now."""
        if previous is None or not len(previous.history):
            return []
        fitted = sorted(flatten_dict(previous.history[0].parameters))
        if fitted != sorted(flat):
            raise ValueError(
                f"resume=True continues fitter.result, which fitted the parameters {fitted}, "
                f"but the fitter now fits {sorted(flat)}; pass resume=False to start a new fit"
            )
        return [
            (record.parameters, None if record.penalised else record.loss)
            for record in previous.history
        ]

    def _carry_best(self, previous: FitResult | None) -> None:
        """Start the best so far of a resumed fit's contexts (``contexts[0]``, as the step
        callbacks see it) from the previous result, which covers its observations too."""
        if previous is None or not math.isfinite(previous.best_loss):
            return
        ctx = self.contexts[0]
        if ctx.opt_loss is None or previous.best_loss <= ctx.opt_loss:
            ctx.opt_params = copy.deepcopy(previous.best_parameters)
            ctx.opt_meta = copy.deepcopy(previous.best_meta)
            ctx.opt_quantities = None
            ctx.opt_loss = previous.best_loss

    def _restart_point(
        self,
        optimizer_str: str,
        replay: list[tuple[dict[str, float], Any]],
        start: dict,
        why_not: str,
        n_resumed: int = 0,
    ) -> dict:
        """The best finite observation, where a fit restarts when its optimizer cannot be told
        the observations (``why_not`` from :meth:`_cannot_learn_from`). The first
        ``n_resumed`` of ``replay`` are a resumed fit's own evaluations."""
        finite = [
            (float(loss), values)
            for values, loss in replay
            if loss is not None
            and math.isfinite(float(loss))
            and float(loss) < self.value_bad_params
        ]
        best = dict(min(finite, key=lambda item: item[0])[1]) if finite else start
        if n_resumed == len(replay):
            # resume=True alone: continuing from the best point is what was asked for.
            logger.info(
                "%s %s, so the %d earlier evaluations are kept but not told: the fit continues "
                "from the best point so far. OnePlusOne, TwoPointsDE or NGOpt can learn from "
                "them.",
                optimizer_str,
                why_not,
                n_resumed,
            )
            return best
        logger.warning(
            "%s %s, so the %d observations are counted but not told: the fit restarts from "
            "the best observed point. Use OnePlusOne, TwoPointsDE or NGOpt to let the "
            "optimizer learn from them.",
            optimizer_str,
            why_not,
            len(replay),
        )
        return best

    @staticmethod
    def _cannot_learn_from(optimizer: Any) -> str | None:
        """Why ``optimizer`` cannot be told earlier observations, or ``None`` when it can."""
        if delegates_to_scipy(optimizer):
            return (
                "runs a scipy minimiser that cannot be told earlier observations (nevergrad "
                "hangs on them)"
            )
        if drops_early_tells(optimizer):
            return (
                "runs CMA, which silently drops points told before its first ask (nevergrad "
                "1.0 with cma 4)"
            )
        return None

    # -- scipy --------------------------------------------------------------------------------

    def fit_scipy(
        self,
        method: str = "L-BFGS-B",
        ctx: FitterEvaluateContext | None = None,
        *,
        progress: bool | None = None,
        record_meta: bool = True,
        **kwargs: Any,
    ) -> dict:
        """Minimise with ``scipy.optimize.minimize``; returns its final ``x`` as nested floats.

        The fitter's bounds (one-sided ones too) are passed as ``bounds=``, and each scipy
        iteration is one step for the callbacks. ``kwargs`` go to ``minimize``; ``bounds`` and
        ``callback`` are not accepted there (use ``Fitter(bounds=...)`` and
        ``register_callback``). The best point evaluated is in ``result.best_parameters``.
        ``method`` is checked first: a name (case ignored, as scipy does) of a ``minimize``
        method, a callable (a custom minimizer) or ``None``. An interrupt raises
        :class:`~chemfit.core.exceptions.FitInterrupted` once ``result`` is set.

        Examples
        --------
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 3.0}, bounds={"x": (0, None)})
        >>> round(fitter.fit_scipy(method="Nelder-Mead")["x"], 3)
        1.0
        >>> fitter.fit_scipy(method="BFGS")
        Traceback (most recent call last):
        ...
        ValueError: method 'BFGS' ignores bounds, but the fitter has bounds for ['x']; use a method that supports them (L-BFGS-B, TNC, SLSQP, Powell, Nelder-Mead, trust-constr, COBYLA) or remove the bounds
        >>> fitter.fit_scipy(method="Nelder Mead")
        Traceback (most recent call last):
        ...
        ValueError: method 'Nelder Mead' is not a scipy.optimize.minimize method (closest names: Nelder-Mead); valid methods: Nelder-Mead, Powell, CG, BFGS, Newton-CG, L-BFGS-B, TNC, COBYLA, COBYQA, SLSQP, trust-constr, dogleg, trust-ncg, trust-exact, trust-krylov, or a callable (a custom minimizer)
        """
        check_scipy_method(method)
        for name, fix in (("bounds", "Fitter(bounds=...)"), ("callback", "register_callback")):
            if name in kwargs:
                raise TypeError(
                    f"fit_scipy() does not accept {name}=; the fitter passes its own. "
                    f"Use {fix} instead"
                )
        flat, flat_bounds = validate_parameters(self.initial_parameters, self.bounds)
        bounded = bounded_keys(flat_bounds)
        if bounded and scipy_ignores_bounds(method):
            raise ValueError(
                f"method {method!r} ignores bounds, but the fitter has bounds for {bounded}; "
                "use a method that supports them (L-BFGS-B, TNC, SLSQP, Powell, Nelder-Mead, "
                "trust-constr, COBYLA) or remove the bounds"
            )
        if ctx is not None and not isinstance(ctx, FitterEvaluateContext):
            raise TypeError(
                f"ctx must be a FitterEvaluateContext or None, got {type(ctx).__name__}"
            )
        import numpy as np
        from scipy.optimize import minimize

        keys = list(flat)
        x0 = np.array([flat[key] for key in keys], dtype=float)
        bounds = scipy_bounds(keys, flat_bounds)

        session = self._start_session(
            1,
            None if ctx is None else [ctx],
            None,
            backend="scipy",
            optimizer=scipy_method_name(method),
            record_meta=record_meta,
        )

        def objective(x: Any) -> float:
            if self._stop.is_set():
                raise _StopRequested
            params = nested_floats(zip(keys, x))
            loss = session.evaluate_batch(self.objective_function, self.contexts, [params])[0]
            session.flush(session.step, self.evaluation_callbacks)
            return loss

        def on_iteration(*_: Any) -> None:
            self._dispatch_step(session, session.step)

        try:
            session.bar = progress_bar(progress, None, f"scipy {session.optimizer}")
            try:
                res = minimize(
                    objective, x0, method=method, bounds=bounds, callback=on_iteration, **kwargs
                )
            except _StopRequested:
                session.stopped, session.converged = True, False
                opt_params = None  # the best point evaluated (finish picks it)
            else:
                session.converged = bool(res.success)
                if not res.success:
                    logger.warning("scipy %s did not converge: %s", session.optimizer, res.message)
                opt_params = nested_floats(zip(keys, res.x))
        except BaseException as exc:
            interrupted = self._abort(session, exc)
            if interrupted is not None:
                raise interrupted from exc
            raise
        return self.finish(opt_params)
