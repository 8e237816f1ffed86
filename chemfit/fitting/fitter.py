"""The :class:`Fitter`: drives nevergrad, scipy or a hand-written loop over an objective.

The fitter keeps one :class:`FitterEvaluateContext` per worker. Each evaluation runs in a freshly
reset context (R6). Every told evaluation becomes, once, an
:class:`~chemfit.fitting.results.EvaluationRecord` in the fit's
:class:`~chemfit.fitting.results.FitHistory` (``fitter.history``), the one source of the fit's
progress: its count and best, the contexts' ``n_evals``/``opt_*``, the progress bar, the
callbacks and the result all read it, wherever the evaluations ran (R1). Each fit leaves a
:class:`~chemfit.fitting.results.FitResult` in ``fitter.result`` - also when an exception or a
``KeyboardInterrupt`` ends it, before that propagates (an interrupt as
:class:`~chemfit.core.exceptions.FitInterrupted`). ``fit_nevergrad(resume=True)`` continues
the previous fit: its result then covers both.

The parts live in small modules: :mod:`~chemfit.fitting.fitter_context` (the context and the
objective wrapper, re-exported here), :mod:`~chemfit.fitting.parameter_space` (parameters and
bounds), :mod:`~chemfit.fitting.optimizer_lookup`, :mod:`~chemfit.fitting.fit_session` (the
state of one fit: evaluating, recording, callbacks) and :mod:`~chemfit.fitting.nevergrad_loop`
(the loops, which work on the session). nevergrad and ``scipy.optimize`` are imported on first
use.
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
from chemfit.execution.executor_info import executor_info
from chemfit.execution.executors import as_executor
from chemfit.fitting.fault_policy import FaultPolicy
from chemfit.fitting.fit_session import FitSession, open_pool, progress_bar
from chemfit.fitting.fitter_context import (
    FitterEvaluateContext,
    FitterObjectiveFunctor,
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
from chemfit.fitting.results import EvaluationRecord, FitHistory, FitResult
from chemfit.fitting.validation import ValidationMonitor, check_validation

__all__ = ["CallbackHandle", "Fitter", "FitterEvaluateContext", "FitterObjectiveFunctor"]

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


class CallbackHandle:
    """What ``register_callback`` and ``register_evaluation_callback`` return: pass it to
    :meth:`Fitter.remove_callback` to remove that registration.

    Attributes
    ----------
    func : callable
        The registered callback.
    n_steps : int or None
        Its step interval; ``None`` for an evaluation callback.

    Examples
    --------
    >>> fitter = Fitter(lambda p: p["x"] ** 2, {"x": 1.0})
    >>> handle = fitter.register_callback(print, n_steps=5)
    >>> handle
    CallbackHandle(print, n_steps=5)
    >>> fitter.remove_callback(handle), fitter.callbacks
    (True, [])
    """

    __slots__ = ("entry", "func", "n_steps")

    def __init__(self, func: Callable[..., Any], n_steps: int | None, entry: Any) -> None:
        self.func = func
        self.n_steps = n_steps
        self.entry = entry  # the object in fitter.callbacks / fitter.evaluation_callbacks

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", None) or repr(self.func)
        kind = "evaluation" if self.n_steps is None else f"n_steps={self.n_steps}"
        return f"CallbackHandle({name}, {kind})"


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
    validation : ObjectiveFunctor or callable, optional
        A second objective on held-out data (same parameters, called like the objective),
        evaluated on the fit's executor for every new best of the training loss; see
        :mod:`chemfit.fitting.validation`. The losses are in ``history.validation``,
        ``result.validation`` and ``result.best_validation_loss``.
    validation_patience : int, optional
        Stop the fit (``result.stopped``) once the validation loss has not improved for this
        many consecutive improvements of the training loss.

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
        validation: ObjectiveFunctor | Callable[..., Any] | None = None,
        validation_patience: int | None = None,
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
        self.validation, self.validation_patience = check_validation(
            validation, validation_patience
        )

    @property
    def value_bad_params(self) -> float:
        """The penalty told for failed or unusable evaluations (shared with the functor)."""
        return self.objective_function.value_bad_params

    @value_bad_params.setter
    def value_bad_params(self, value: float) -> None:
        self.objective_function.value_bad_params = value

    # -- callbacks ----------------------------------------------------------------------------

    def register_callback(self, func: Callback, n_steps: int = 1) -> CallbackHandle:
        """Call ``func(step, contexts)`` after every ``n_steps``-th optimizer step.

        Callbacks run on the fitting thread, in registration order, after the step's results
        were told, whenever ``step % n_steps == 0``. An exception from a callback ends the fit.
        Returns a handle for :meth:`remove_callback`; the progress so far is in
        :attr:`history`.

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
        entry = (func, int(n_steps))
        self.callbacks.append(entry)
        return CallbackHandle(func, int(n_steps), entry)

    def register_evaluation_callback(self, func: EvaluationCallback) -> CallbackHandle:
        """Call ``func(record)`` with an :class:`EvaluationRecord` for every told evaluation.

        Records arrive in tell order, once each is in :attr:`history`; replayed initial
        observations are skipped. Returns a handle for :meth:`remove_callback`.

        Examples
        --------
        >>> fitter = Fitter(lambda p: p["x"] ** 2, {"x": 1.0})
        >>> losses = []
        >>> _ = fitter.register_evaluation_callback(lambda record: losses.append(record.loss))
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
        return CallbackHandle(func, None, func)

    def remove_callback(self, handle_or_func: CallbackHandle | Callable[..., Any]) -> bool:
        """Remove a step or evaluation callback; returns whether one was registered.

        Pass the handle a ``register_*`` method returned (removes that registration) or the
        callback itself (removes every registration of it, of both kinds). Safe during a fit,
        from any thread and from a callback: the callbacks of a step (or of a record) are
        fixed when they start.

        Examples
        --------
        >>> fitter = Fitter(lambda p: p["x"] ** 2, {"x": 1.0})
        >>> _ = fitter.register_evaluation_callback(print)
        >>> fitter.remove_callback(print), fitter.remove_callback(print)
        (True, False)
        """
        if isinstance(handle_or_func, CallbackHandle):
            entries = self.callbacks if handle_or_func.n_steps is not None else None
            target = self.evaluation_callbacks if entries is None else entries
            for i, entry in enumerate(target):
                if entry is handle_or_func.entry:
                    del target[i]
                    return True
            return False
        n_before = len(self.callbacks) + len(self.evaluation_callbacks)
        self.callbacks[:] = [entry for entry in self.callbacks if entry[0] != handle_or_func]
        self.evaluation_callbacks[:] = [f for f in self.evaluation_callbacks if f != handle_or_func]
        return len(self.callbacks) + len(self.evaluation_callbacks) < n_before

    @property
    def history(self) -> FitHistory:
        """The :class:`FitHistory` of the running fit, else of ``result`` (empty before any).

        Records are appended while the fit runs, so another thread can follow it: ``len()``
        counts the evaluations, ``best()`` is the best so far, ``records_since(n)`` the new
        records.

        Examples
        --------
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0})
        >>> len(fitter.history)
        0
        >>> _ = fitter.fit_nevergrad(budget=5, optimizer_str="OnePlusOne")
        >>> len(fitter.history), fitter.history.best().loss == fitter.result.best_loss
        (5, True)
        """
        session = self._session
        if session is not None:
            return session.history
        result = self.result
        return result.history if result is not None else FitHistory()

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
        first_index: int = 0,
    ) -> FitSession:
        """Open the session of a new fit; with ``previous``, one that continues that result.
        Its records are numbered from ``first_index`` on (and after ``previous``'s)."""
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
        # what the executor is, worked out once for the whole fit (None: serial, in this thread)
        info = None if resolved is None else executor_info(resolved, owned=owned is not None)
        self._session = FitSession.continuing(
            previous,
            num_workers=num_workers,
            executor=info,
            owned_executor=owned,
            finalizer=finalizer,
            backend=backend,
            optimizer=optimizer,
            mode=mode,
            seed=seed,
            record_meta=bool(record_meta),
            t0=time.perf_counter(),
            contexts=ctx_list,
            objective=self.objective_function,
            step_callbacks=self.callbacks,
            evaluation_callbacks=self.evaluation_callbacks,
            stop=self._stop,
            first_index=first_index,
        )
        if self.validation is not None:  # the held-out objective, at each new best
            self._session.validation = ValidationMonitor.for_fitter(self, self._session)
        return self._session

    def _require_session(self, method: str) -> FitSession:
        if self._session is None:
            raise RuntimeError(
                f"fitter.{method}() needs a running fit; call fitter.init() first (or use "
                "fit_nevergrad / fit_scipy)"
            )
        return self._session

    def request_stop(self) -> None:
        """Ask the running fit, or the next one, to end early; safe to call from any thread.

        ``fit_nevergrad`` asks no new candidate, waits for the evaluations in flight, tells and
        records them, runs the step callbacks of that last step and returns the optimizer's
        recommendation; ``fit_scipy`` returns the best point evaluated so far. Nothing raises:
        ``result.stopped`` is ``True`` and the history keeps every evaluation. A request made
        while no fit runs stops the next fit before its first evaluation (so a Stop pressed
        while a fit is being started is not lost); every fit consumes the request when it
        ends. A hand-driven fit (:meth:`init`, :meth:`ask`, :meth:`tell`) can poll
        :attr:`stop_requested` itself.

        Examples
        --------
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0})
        >>> def stop_after_step_2(step, contexts):
        ...     if step == 2:
        ...         fitter.request_stop()  # e.g. from a button, in another thread
        >>> handle = fitter.register_callback(stop_after_step_2)
        >>> _ = fitter.fit_nevergrad(budget=100, optimizer_str="OnePlusOne", num_workers=2)
        >>> fitter.result.stopped, fitter.result.n_evals, fitter.stop_requested
        (True, 6, False)

        A request made before a fit stops it before its first evaluation:

        >>> fitter.request_stop()
        >>> params = fitter.fit_scipy(method="Nelder-Mead")
        >>> fitter.result.stopped, fitter.result.n_evals, params
        (True, 0, {'x': 0.0})
        """
        if not self._stop.is_set():
            logger.info("stop requested: the fit ends once the evaluations in flight are told")
        self._stop.set()

    @property
    def stop_requested(self) -> bool:
        """Whether a :meth:`request_stop` is pending (consumed when a fit ends)."""
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
        return session.evaluate_batch(list(parameters), step=None)

    def tell(self, step: int | None = None) -> None:
        """Complete an optimizer step: record the evaluations asked since, then run callbacks.

        ``step`` defaults to the internal counter (0, 1, 2, ...), which continues after it.
        """
        session = self._require_session("tell")
        if step is None:
            step = session.step
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(f"step must be an int >= 0 or None, got {step!r}")
        session.tell_untold(int(step))
        session.notify()
        session.end_step(int(step))

    def finish(self, opt_params: dict | None = None) -> dict:
        """End the fit: set ``result``, log near-bound warnings and shut down an owned pool.

        Returns ``opt_params``, or the best evaluated parameters when it is ``None``, as a
        nested dict of floats.
        """
        session = self._require_session("finish")
        try:
            if session.untold:
                session.tell_untold(session.step)
            session.notify()
            if session.validation is not None:  # the validations still running
                session.validation.finish()
            if opt_params is None:
                best = session.history.best()
                if best is not None:
                    opt_params = best.parameters
                elif session.n_evals > 0:
                    logger.warning(
                        "every evaluation was penalised; returning the initial parameters"
                    )
                    opt_params = self.initial_parameters
                elif session.stopped:
                    logger.info("stopped before any evaluation; returning the initial parameters")
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
        self._end_session()
        return params

    def _end_session(self) -> None:
        """Forget the session; the fit consumes a stop request."""
        self._session = None
        self._stop.clear()

    def _build_result(
        self,
        session: FitSession,
        params: dict,
        *,
        interrupted: bool = False,
        error: str | None = None,
    ) -> FitResult:
        best = session.history.best()
        if best is not None:
            best_loss, best_params = best.loss, float_tree(best.parameters)
            best_meta = copy.deepcopy(self._best_meta(best))
        else:
            best_params, best_loss, best_meta = copy.deepcopy(params), math.inf, {}
        # Counted from the history, the result agrees with it also when an interrupt leaves
        # evaluations untold.
        n_evals = session.n_evals
        n_observations = session.history.n_observations
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

    def _best_meta(self, best: EvaluationRecord) -> dict:
        """The meta of the best record; without one (``record_meta=False``), the meta its
        context kept for it."""
        if best.meta is not None:
            return best.meta
        if 0 <= best.worker < len(self.contexts):
            extras = getattr(self.contexts[best.worker], "_best_extras", None)
            if extras is not None and extras[0] is best and extras[2] is not None:
                return extras[2]
        return {}

    def _abort(self, session: FitSession, exc: BaseException) -> FitInterrupted | None:
        """Keep the best so far in ``result`` and release the owned pool (R13).

        Returns the :class:`FitInterrupted` to raise from ``exc`` when ``exc`` is a plain
        ``KeyboardInterrupt``; any other exception propagates as it is.
        """
        try:
            self.time_fit_end = time.time()
            if session.untold:  # evaluated, not yet told: an interrupt came between the two
                session.tell_untold(session.step)
            try:
                session.notify()
            except Exception:
                logger.debug("an evaluation callback failed on the last records", exc_info=True)
            if session.validation is not None:  # keep the finished validations only
                session.validation.abandon()
            best = session.history.best()
            params = float_tree(best.parameters if best is not None else self.initial_parameters)
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.result = self._build_result(
                session,
                params,
                interrupted=interrupted,
                error=None if interrupted else f"{type(exc).__name__}: {exc}",
            )
        finally:
            session.shutdown_pool(wait_for_tasks=False)
            self._end_session()
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
            record = result.history.best()
            step = record.step if record is not None and record.index >= 0 else None
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
        retries: int = 0,
        evaluation_timeout: float | None = None,
        on_error: Literal["raise", "record"] = "raise",
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
        retries : int
            How many times an evaluation that was lost (its process-pool or loky worker, its
            ipyparallel engine or its Dask worker died, or it ran past ``evaluation_timeout``)
            is submitted again, with the same parameters, to the same context: on the workers
            left, or on a rebuilt pool for pools chemfit can rebuild (``make_executor``'s
            process pool, loky). After the last try it is recorded with status ``"lost"``,
            told ``value_bad_params``, and the fit goes on.
        evaluation_timeout : float, optional
            Seconds an evaluation may run; then it is abandoned (its worker process or engine
            killed where the executor allows) and counts as lost. On threads and serial
            executors nothing can be killed: one WARNING says so and the fit waits.
        on_error : {"raise", "record"}
            ``"raise"``: an exception of the objective ends the fit. ``"record"``: the
            evaluation is recorded with status ``"failed"`` (``error`` is
            ``"Type: message"``, ``traceback`` the remote traceback), the optimizer is told
            ``value_bad_params``, and the fit goes on.

            With the defaults, a lost evaluation ends the fit with ``WorkerLostError``; with
            any of the three set, it is recorded and the fit goes on. The fit stops with a
            clear ``WorkerLostError`` when no worker is left or the executor cannot be
            rebuilt; the history (and a ``JSONLinesHistory`` file) then holds every
            evaluation. ``result.n_failed`` and ``result.n_lost`` count them.

        Raises
        ------
        FitInterrupted
            A ``KeyboardInterrupt`` ended the fit; ``result`` holds the evaluations so far.
        WorkerLostError
            A worker died (with the defaults), or no worker is left.

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
        faults = FaultPolicy(retries, evaluation_timeout, on_error)
        flat, flat_bounds = validate_parameters(self.initial_parameters, self.bounds)
        optimizer_cls = nevergrad_optimizer_class(optimizer_str)
        # records go on after those of the file the observations were loaded from
        first_index = int(getattr(initial_observations, "next_index", 0))
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
            first_index=first_index,
        )
        session.faults = faults
        try:
            session.bar = progress_bar(
                progress,
                budget,
                f"nevergrad {optimizer_str}",
                initial=len(session.history),
                best=session.history.best(),
            )
            resumed = usable_observations(earlier, flat, flat_bounds)
            replay = resumed + usable_observations(observations, flat, flat_bounds)

            def make_optimizer(start: dict, told: int) -> Any:
                parametrization = nevergrad_parametrization(start, flat_bounds)
                if seed is not None:
                    parametrization.random_state.seed(int(seed))
                return optimizer_cls(
                    parametrization=parametrization, budget=budget + told, num_workers=num_workers
                )

            start = dict(flat)
            loop = NevergradLoop(session, make_optimizer(start, len(replay)))
            why_not = self._cannot_learn_from(loop.optimizer) if replay else None
            bad = float(self.value_bad_params)
            if why_not is not None:  # count them, then start from the best point
                loop.replay(replay, bad, tell=False, n_resumed=len(resumed))
                start = self._restart_point(
                    optimizer_str, start, why_not, len(replay), len(resumed)
                )
                loop.optimizer = make_optimizer(start, 0)
            with quiet_cma_injections():
                if why_not is None:
                    loop.replay(replay, bad, n_resumed=len(resumed))
                if not (resumed and why_not is None):  # a told resumed fit goes on from its points
                    loop.optimizer.suggest(start)
                if mode == "async" and num_workers > 1:
                    loop.run_async(budget)
                else:
                    loop.run_batches(budget)
                recommendation = loop.optimizer.provide_recommendation().value
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

    def _restart_point(
        self, optimizer_str: str, start: dict, why_not: str, n_replayed: int, n_resumed: int = 0
    ) -> dict:
        """The best point so far (``history.best()``, the counted observations included),
        where a fit restarts when its optimizer cannot be told the observations (``why_not``
        from :meth:`_cannot_learn_from`). ``n_resumed`` of the ``n_replayed`` are a resumed
        fit's own evaluations."""
        best = self.history.best()
        if best is not None:
            start = {key: float(value) for key, value in flatten_dict(best.parameters).items()}
        if n_resumed == n_replayed:
            # resume=True alone: continuing from the best point is what was asked for.
            logger.info(
                "%s %s, so the %d earlier evaluations are kept but not told: the fit continues "
                "from the best point so far. OnePlusOne, TwoPointsDE or NGOpt can learn from "
                "them.",
                optimizer_str,
                why_not,
                n_resumed,
            )
            return start
        logger.warning(
            "%s %s, so the %d observations are counted but not told: the fit restarts from "
            "the best observed point. Use OnePlusOne, TwoPointsDE or NGOpt to let the "
            "optimizer learn from them.",
            optimizer_str,
            why_not,
            n_replayed,
        )
        return start

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

    # -- how good the fit is (chemfit.fitting.diagnostics) -------------------------------------

    def contributions(self) -> Any:
        """Each term's weight, loss, weighted loss and share at the best parameters (a DataFrame).

        See :func:`chemfit.fitting.diagnostics.contributions.contributions`.

        Examples
        --------
        >>> from chemfit.core.combined import CombinedObjectiveFunction
        >>> fitter = Fitter(CombinedObjectiveFunction([lambda p: p["x"] ** 2]), {"x": 1.0})
        >>> _ = fitter.fit_scipy()
        >>> list(fitter.contributions().columns[:5])
        ['name', 'weight', 'loss', 'weighted_loss', 'share']
        """
        from chemfit.fitting.diagnostics.contributions import contributions

        return contributions(self)

    def profile(
        self,
        parameters: str | Iterable[str] | None = None,
        points: int = 21,
        executor: Any = None,
        **options: Any,
    ) -> dict:
        """The loss along each parameter through the best point: name -> DataFrame (value, loss).

        All points are evaluated at once on ``executor``. See
        :func:`chemfit.fitting.diagnostics.profile.profile` (``span=``, ``ranges=``). Kept in
        ``result.diagnostics["profile"]``.
        """
        from chemfit.fitting.diagnostics.profile import profile

        return profile(self, parameters, points, executor, **options)

    def covariance(self, executor: Any = None, **options: Any) -> Any:
        """The Laplace / Gauss-Newton covariance of the best parameters (a ``Covariance``).

        The finite-difference Hessian's points are evaluated at once on ``executor``. See
        :func:`chemfit.fitting.diagnostics.covariance.covariance` for the scaling convention
        (``cov = 2 * sigma2 * inv(H)``) and ``sigma2=``, ``n_residuals=``, ``step=``. Kept in
        ``result.diagnostics["covariance"]``.
        """
        from chemfit.fitting.diagnostics.covariance import covariance

        return covariance(self, executor, **options)

    def bootstrap(
        self,
        n: int,
        executor: Any = None,
        budget: int = 200,
        seed: int | None = None,
        **options: Any,
    ) -> Any:
        """Refit on ``n`` resamples of the terms, each refit a task on ``executor``.

        Returns a ``BootstrapResult`` (``parameters``, ``std()``, ``corr()``,
        ``interval(fn, level)``). See :func:`chemfit.fitting.diagnostics.bootstrap.bootstrap`
        (``optimizer=``, ``path=`` to continue an interrupted bootstrap, ``progress=``,
        ``resample="points"`` for terms that draw their own data points). The result is kept in
        ``result.diagnostics["bootstrap"]``; an interrupted bootstrap started again continues
        from it also without ``path=``.
        """
        from chemfit.fitting.diagnostics.bootstrap import bootstrap

        return bootstrap(self, n, executor, budget, seed, **options)

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
            if session.stop_requested():
                raise _StopRequested
            try:
                loss = session.evaluate_batch([nested_floats(zip(keys, x))], session.step)[0]
            except Exception:
                session.notify()  # what finished before the failure; an interrupt: _abort
                raise
            session.notify()
            return loss

        def on_iteration(*_: Any) -> None:
            session.end_step(session.step)

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
