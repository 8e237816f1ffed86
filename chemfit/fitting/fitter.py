"""The :class:`Fitter`: drives nevergrad, scipy or a hand-written loop over an objective.

The fitter keeps one :class:`FitterEvaluateContext` per worker. Each evaluation runs in a freshly
reset context (R6); the context's result state carries the evaluation count and the best point
seen, so the best-so-far survives thread, process and remote workers (R1). Every told evaluation
becomes an :class:`~chemfit.fitting.results.EvaluationRecord`, and each fit leaves a
:class:`~chemfit.fitting.results.FitResult` in ``fitter.result`` - also when an exception or a
``KeyboardInterrupt`` ends it, before that propagates.

nevergrad and ``scipy.optimize`` are imported on first use.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import math
import numbers
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal

from chemfit.core.context import EvaluateContext, ExecutorLike
from chemfit.core.exceptions import UnknownOptimizerError
from chemfit.core.flatdict import flatten_dict, unflatten_dict
from chemfit.core.objectives import ObjectiveFunctor
from chemfit.core.utils import check_params_near_bounds
from chemfit.core.wrapping import WrappedObjectiveFunctor
from chemfit.execution.executor_utils import map_with_context
from chemfit.execution.executors import as_executor
from chemfit.fitting.results import EvaluationRecord, FitHistory, FitResult

__all__ = ["Fitter", "FitterEvaluateContext", "FitterObjectiveFunctor"]

logger = logging.getLogger(__name__)

_OPT_FIELDS = ("n_evals", "opt_loss", "opt_params", "opt_meta", "opt_quantities")

# scipy.optimize.minimize methods that ignore bounds (scipy only warns about them).
_SCIPY_NO_BOUNDS = {"cg", "bfgs", "newton-cg", "dogleg", "trust-ncg", "trust-exact", "trust-krylov"}

Callback = Callable[[int, list], None]
EvaluationCallback = Callable[[EvaluationRecord], None]


# -- contexts and the objective wrapper -------------------------------------------------------


class FitterEvaluateContext(EvaluateContext):
    """An evaluation context that also tracks the evaluation count and the best point seen.

    Parameters
    ----------
    config, shared, executor
        As for :class:`~chemfit.core.context.EvaluateContext`.

    Attributes
    ----------
    n_evals : int
        Evaluations (and replayed observations) counted in this context.
    opt_loss : float or None
        The lowest unpenalised loss seen.
    opt_params, opt_meta, opt_quantities : dict or None
        Deep copies of the parameters, meta and quantities of that evaluation.
    last_evaluation : dict or None
        ``{"raw_loss", "penalised", "error"}`` of the last evaluation; cleared by ``reset()``.

    The five tracking fields travel to workers (pickling) and back (result state, R1), and
    :meth:`reset` keeps them.

    Examples
    --------
    >>> import pickle
    >>> ctx = FitterEvaluateContext()
    >>> ctx.n_evals, ctx.opt_loss = 3, 0.5
    >>> copy_ = pickle.loads(pickle.dumps(ctx))
    >>> copy_.n_evals, copy_.opt_loss
    (3, 0.5)
    >>> other = FitterEvaluateContext()
    >>> other.apply_result_state(ctx.to_result_state())
    >>> other.reset()
    >>> other.n_evals, other.opt_loss
    (3, 0.5)
    """

    def __init__(
        self,
        config: SimpleNamespace | None = None,
        shared: SimpleNamespace | None = None,
        executor: ExecutorLike | None = None,
    ) -> None:
        super().__init__(config=config, shared=shared, executor=executor)
        self.n_evals: int = 0
        self.opt_loss: float | None = None
        self.opt_params: dict | None = None
        self.opt_meta: dict | None = None
        self.opt_quantities: dict | None = None

    def _clear_evaluation_state(self) -> None:
        super()._clear_evaluation_state()
        self.last_evaluation: dict | None = None

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for name in _OPT_FIELDS:
            state[name] = getattr(self, name)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.n_evals = state.get("n_evals", 0)
        for name in _OPT_FIELDS[1:]:
            setattr(self, name, state.get(name))

    def to_result_state(self) -> dict:
        """The base result state plus the five tracking fields and ``last_evaluation``."""
        state = super().to_result_state()
        for name in _OPT_FIELDS:
            state[name] = getattr(self, name)
        state["last_evaluation"] = self.last_evaluation
        return state

    def apply_result_state(self, state: dict) -> None:
        """Apply a worker's result state, including the tracking fields when present."""
        super().apply_result_state(state)
        for name in (*_OPT_FIELDS, "last_evaluation"):
            if name in state:
                setattr(self, name, state[name])


def _describe_bad_loss(value: Any) -> str | None:
    """Why ``value`` cannot be told as a loss (R3), or ``None`` when it is a real number."""
    if isinstance(value, numbers.Real):
        return None
    ndim = getattr(value, "ndim", None)
    if ndim == 0 and getattr(getattr(value, "dtype", None), "kind", "") in "biuf":
        return None
    if ndim is not None and ndim >= 1:
        return f"an array of shape {tuple(value.shape)}"
    return f"a value of type {type(value).__name__} ({value!r:.60})"


def _sanitise_loss(value: Any, value_bad_params: float, parameters: Any) -> tuple[float, bool]:
    """``(told value, penalised)`` for a loss, logging a WARNING when it is replaced (R3, R4)."""
    reason = _describe_bad_loss(value)
    if reason is None:
        loss = float(value)
        if math.isfinite(loss):
            return loss, False
        reason = f"the non-finite value {loss}"
    logger.warning(
        "the objective returned %s for parameters %s; telling value_bad_params=%g instead",
        reason,
        parameters,
        value_bad_params,
    )
    return float(value_bad_params), True


def _raw_float(value: Any) -> float | None:
    return float(value) if _describe_bad_loss(value) is None else None


class FitterObjectiveFunctor(ObjectiveFunctor):
    """Wraps an objective for the fitter: counts evaluations, sanitises losses, tracks the best.

    Parameters
    ----------
    wrap_me : callable
        The objective, called as ``wrap_me(parameters, ctx)``.
    swallow_exceptions : bool
        Tell ``value_bad_params`` instead of re-raising an ``Exception`` from the objective.
    log_exceptions : bool
        Log the traceback of an ``Exception`` from the objective.
    value_bad_params : float
        The penalty told for failed evaluations and for non-numeric or non-finite losses.

    Examples
    --------
    >>> objective = FitterObjectiveFunctor(lambda p, ctx: p["x"] ** 2)
    >>> ctx = FitterEvaluateContext()
    >>> objective({"x": 2.0}, ctx), objective({"x": 1.0}, ctx)
    (4.0, 1.0)
    >>> ctx.n_evals, ctx.opt_loss, ctx.opt_params
    (2, 1.0, {'x': 1.0})
    """

    def __init__(
        self,
        wrap_me: Callable[..., Any],
        swallow_exceptions: bool = False,
        log_exceptions: bool = True,
        value_bad_params: float = 1e5,
    ) -> None:
        self.wrap_me = wrap_me
        self.swallow_exceptions = swallow_exceptions
        self.log_exceptions = log_exceptions
        self.value_bad_params = value_bad_params

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        if ctx is None:
            ctx = FitterEvaluateContext()
        try:
            value = self.wrap_me(parameters, ctx)
        except Exception as exc:
            if self.log_exceptions:
                logger.exception("the objective raised for parameters %s", parameters)
            if not self.swallow_exceptions:
                raise
            if ctx.parameters is None:
                ctx.parameters = parameters
            loss = self._post_process(parameters, None, ctx, f"{type(exc).__name__}: {exc}")
            ctx.loss = loss
            return loss
        return self._post_process(parameters, value, ctx, None)

    def post_process_return_value(self, parameters: dict, value: Any, ctx: Any) -> float:
        """Count the evaluation, turn ``value`` into the loss to tell and update ``opt_*``.

        Numbers (Python, numpy scalars, 0-d arrays) are told as ``float(value)``; anything else,
        and NaN or infinity, becomes ``value_bad_params`` with a WARNING (R3, R4). A penalised
        value is never recorded as the best.

        Examples
        --------
        >>> import numpy as np
        >>> objective = FitterObjectiveFunctor(None, value_bad_params=99.0)
        >>> ctx = FitterEvaluateContext()
        >>> objective.post_process_return_value({}, np.array(2.5), ctx)
        2.5
        >>> objective.post_process_return_value({}, float("nan"), ctx)
        99.0
        >>> ctx.n_evals, ctx.opt_loss
        (2, 2.5)
        """
        return self._post_process(parameters, value, ctx, None)

    def _post_process(self, parameters: dict, value: Any, ctx: Any, error: str | None) -> float:
        ctx.n_evals = getattr(ctx, "n_evals", 0) + 1
        if error is not None:
            loss, penalised = float(self.value_bad_params), True
        else:
            loss, penalised = _sanitise_loss(value, self.value_bad_params, parameters)
        ctx.last_evaluation = {
            "raw_loss": None if error is not None else _raw_float(value),
            "penalised": penalised,
            "error": error,
        }
        best = getattr(ctx, "opt_loss", None)
        if not penalised and (best is None or loss < best):
            # opt_loss last: a callback reading another thread's context sees a consistent best.
            ctx.opt_params = copy.deepcopy(parameters)
            ctx.opt_meta = copy.deepcopy(ctx.meta)
            ctx.opt_quantities = copy.deepcopy(ctx.quantities)
            ctx.opt_loss = loss
        return loss


# -- parameters and bounds --------------------------------------------------------------------


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _float_tree(nested: Any) -> Any:
    """A copy of nested parameters with every leaf as a Python ``float`` where possible."""
    if isinstance(nested, Mapping):
        return {key: _float_tree(value) for key, value in nested.items()}
    if _is_real(nested) or _describe_bad_loss(nested) is None:
        return float(nested)
    return copy.deepcopy(nested)


def _validate_parameters(
    initial_params: Any, bounds: Any
) -> tuple[dict[str, float], dict[str, tuple[float | None, float | None]]]:
    """Flat initial values and flat bounds, or the ``TypeError``/``ValueError`` the contract names."""
    if not isinstance(initial_params, Mapping):
        raise TypeError(
            f"initial_params must be a (nested) dict of numbers, got "
            f"{type(initial_params).__name__}: {initial_params!r:.80}"
        )
    flat = flatten_dict(initial_params)
    if not flat:
        raise ValueError("initial_params is empty; give at least one parameter to fit")
    values: dict[str, float] = {}
    for key, value in flat.items():
        if not _is_real(value):
            raise TypeError(
                f"initial_params[{key!r}] must be a real number, got {value!r} "
                f"({type(value).__name__}); use a float"
            )
        if not math.isfinite(value):
            raise ValueError(f"initial_params[{key!r}] is {value}; give a finite start value")
        values[key] = float(value)

    if bounds is None:
        bounds = {}
    if not isinstance(bounds, Mapping):
        raise TypeError(
            f"bounds must be a (nested) dict of (lower, upper) pairs or None, got "
            f"{type(bounds).__name__}: {bounds!r:.80}"
        )
    flat_bounds: dict[str, tuple[float | None, float | None]] = {}
    for key, pair in flatten_dict(bounds).items():
        if key not in values:
            raise ValueError(
                f"bounds key {key!r} is not a parameter; the parameters are {list(values)}. "
                "Nest the bounds like initial_params"
            )
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (Sequence, Iterable)):
            raise TypeError(
                f"bounds[{key!r}] must be a (lower, upper) pair, got {pair!r}; "
                "use None for a missing side"
            )
        sides = list(pair)
        if len(sides) != 2:
            raise ValueError(
                f"bounds[{key!r}] must be a (lower, upper) pair, got {pair!r} with "
                f"{len(sides)} entries; use None for a missing side"
            )
        lower, upper = (_bound_side(key, side, name) for side, name in zip(sides, "lu"))
        if lower is not None and upper is not None and lower >= upper:
            raise ValueError(f"bounds[{key!r}] = {pair!r} has lower >= upper; give lower < upper")
        value = values[key]
        if (lower is not None and value < lower) or (upper is not None and value > upper):
            raise ValueError(
                f"the initial value of {key!r} is {value}, outside its bounds "
                f"({lower}, {upper}); move it inside the bounds or widen them"
            )
        flat_bounds[key] = (lower, upper)
    return values, flat_bounds


def _bound_side(key: str, side: Any, which: str) -> float | None:
    name = "lower" if which == "l" else "upper"
    if side is None:
        return None
    if not _is_real(side):
        raise TypeError(
            f"the {name} bound of {key!r} must be a real number or None, got {side!r} "
            f"({type(side).__name__})"
        )
    side = float(side)
    if math.isnan(side):
        raise ValueError(f"the {name} bound of {key!r} is NaN; use a number or None")
    if math.isinf(side):
        return None  # an infinite side is no bound
    return side


def _outside_bounds(
    flat: Mapping[str, float], flat_bounds: Mapping[str, tuple[float | None, float | None]]
) -> str | None:
    for key, (lower, upper) in flat_bounds.items():
        value = flat[key]
        if (lower is not None and value < lower) or (upper is not None and value > upper):
            return f"{key}={value} is outside ({lower}, {upper})"
    return None


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


def _optimizer_class(name: Any) -> Any:
    import nevergrad as ng

    registry = ng.optimizers.registry
    if not isinstance(name, str):
        raise TypeError(
            f"optimizer_str must be the name of a nevergrad optimizer, got {name!r} "
            f"({type(name).__name__})"
        )
    if name in registry:
        return registry[name]
    names = list(registry)
    by_case = [n for n in names if n.lower() == name.lower()]
    close = by_case + [
        n for n in difflib.get_close_matches(name, names, n=5, cutoff=0.5) if n not in by_case
    ]
    suggestion = (
        f"closest names: {', '.join(close)}"
        if close
        else "common choices: NgIohTuned, NGOpt, OnePlusOne, CMA, TwoPointsDE"
    )
    raise UnknownOptimizerError(
        f"optimizer_str {name!r} is not in nevergrad.optimizers.registry ({suggestion}); "
        "pass one of its keys"
    )


def _scipy_ignores_bounds(method: Any) -> bool:
    if not isinstance(method, str):
        return False  # a custom minimizer: it receives bounds and decides itself
    name = method.lower()
    if name in _SCIPY_NO_BOUNDS:
        return True
    import scipy

    major_minor = tuple(int(part) for part in scipy.__version__.split(".")[:2])
    return (name == "cobyla" and major_minor < (1, 11)) or (
        name == "nelder-mead" and major_minor < (1, 7)
    )


# -- one fit session --------------------------------------------------------------------------


@dataclass
class _Pending:
    parameters: dict
    worker: int
    loss: float
    raw_loss: float | None
    penalised: bool
    error: str | None
    meta: dict | None


@dataclass
class _Session:
    """The state of one fit (created by ``init`` or a ``fit_*`` method)."""

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
    best_told: float = math.inf
    bar: Any = None
    pending: list[_Pending] = field(default_factory=list)
    history: FitHistory = field(default_factory=FitHistory)


def _progress_bar(progress: bool | None, total: int | None, desc: str) -> Any:
    show = sys.stderr.isatty() if progress is None else bool(progress)
    if not show:
        return None
    from tqdm.std import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, unit="eval", leave=True)


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
        if not _is_real(value_bad_params):
            raise TypeError(
                f"value_bad_params must be a real number, got {value_bad_params!r}; e.g. 1e5"
            )
        if near_bound_tol is not None and not _is_real(near_bound_tol):
            raise TypeError(
                f"near_bound_tol must be a real number or None, got {near_bound_tol!r}; e.g. 0.01"
            )
        _validate_parameters(initial_params, bounds)
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
        self._session: _Session | None = None

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
    ) -> _Session:
        num_workers = _check_count("num_workers", num_workers)
        if contexts is None:
            ctx_list = [FitterEvaluateContext() for _ in range(num_workers)]
        else:
            ctx_list = list(contexts)
            if len(ctx_list) != num_workers:
                raise ValueError(
                    f"contexts must hold num_workers={num_workers} contexts, got "
                    f"{len(ctx_list)}; pass one FitterEvaluateContext per worker or None"
                )
            for index, ctx in enumerate(ctx_list):
                if not isinstance(ctx, FitterEvaluateContext):
                    raise TypeError(
                        f"contexts[{index}] must be a FitterEvaluateContext, got "
                        f"{type(ctx).__name__}"
                    )
        resolved = as_executor(executor)
        self.close()  # a session left open by init() without finish()
        owned = finalizer = None
        if resolved is None and num_workers > 1:
            owned = ThreadPoolExecutor(num_workers, thread_name_prefix="chemfit-fitter")
            # A hand-driven fit that is never finished still releases its threads.
            finalizer = weakref.finalize(self, owned.shutdown, wait=False, cancel_futures=True)
            resolved = owned
        if num_workers > 1 and getattr(self.objective_function.wrap_me, "serialises_calls", False):
            logger.info(
                "%s evaluates one candidate at a time: the %d workers' candidates are serialised",
                type(self.objective_function.wrap_me).__name__,
                num_workers,
            )
        self.contexts = ctx_list
        self._hook_pre_fit()
        self._session = _Session(
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
            start_evals=[ctx.n_evals for ctx in ctx_list],
        )
        return self._session

    def _require_session(self, method: str) -> _Session:
        if self._session is None:
            raise RuntimeError(
                f"fitter.{method}() needs a running fit; call fitter.init() first (or use "
                "fit_nevergrad / fit_scipy)"
            )
        return self._session

    def _shutdown_pool(self, session: _Session, wait_for_tasks: bool) -> None:
        pool, session.owned_executor = session.owned_executor, None
        if session.finalizer is not None:
            session.finalizer.detach()
            session.finalizer = None
        if pool is not None:
            pool.shutdown(wait=wait_for_tasks, cancel_futures=True)
        if session.bar is not None:
            session.bar.close()
            session.bar = None

    def close(self) -> None:
        """Shut down the thread pool the fitter created, if any. A user's executor is kept.

        Examples
        --------
        >>> fitter = Fitter(lambda p: p["x"] ** 2, {"x": 1.0})
        >>> fitter.init(num_workers=2)
        >>> fitter.close()
        """
        if self._session is not None:
            self._shutdown_pool(self._session, wait_for_tasks=True)

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
        _validate_parameters(self.initial_parameters, self.bounds)
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
            self._stage(session, parameters, context_index % n, loss)
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
        return self._evaluate_batch(session, list(parameters))

    def _evaluate_batch(self, session: _Session, params_list: list[dict]) -> list[float]:
        if not params_list:
            return []
        ctxs = self.contexts[: len(params_list)]
        for ctx in ctxs:
            ctx.reset()
        if session.executor is None:
            losses = [self.objective_function(p, c) for p, c in zip(params_list, ctxs)]
        else:
            losses = map_with_context(
                session.executor, self.objective_function, params_list, ctxs=ctxs
            )
        for index, (params, loss) in enumerate(zip(params_list, losses)):
            self._stage(session, params, index, loss)
        return [float(loss) for loss in losses]

    def _stage(self, session: _Session, parameters: dict, worker: int, loss: Any) -> None:
        """Remember an evaluation until it is told."""
        ctx = self.contexts[worker]
        info = getattr(ctx, "last_evaluation", None) or {}
        session.pending.append(
            _Pending(
                parameters=_float_tree(parameters),
                worker=worker,
                loss=float(loss),
                raw_loss=info.get("raw_loss", float(loss)),
                penalised=bool(info.get("penalised", False)),
                error=info.get("error"),
                meta=copy.deepcopy(ctx.meta) if session.record_meta else None,
            )
        )

    def _flush(self, session: _Session, step: int) -> None:
        """Turn the staged evaluations into records and run the evaluation callbacks."""
        pending, session.pending = session.pending, []
        for item in pending:
            record = EvaluationRecord(
                index=len(session.history),
                step=step,
                worker=item.worker,
                parameters=item.parameters,
                loss=item.loss,
                raw_loss=item.raw_loss,
                penalised=item.penalised,
                error=item.error,
                meta=item.meta,
                time=time.perf_counter() - session.t0,
            )
            session.history._append(record)
            if not item.penalised and item.loss < session.best_told:
                session.best_told = item.loss
            if session.bar is not None:
                session.bar.set_postfix(best=f"{session.best_told:.6g}", refresh=False)
                session.bar.update(1)
            for callback in self.evaluation_callbacks:
                callback(record)

    def _dispatch_step(self, session: _Session, step: int) -> None:
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
        self._flush(session, int(step))
        self._dispatch_step(session, int(step))

    def _best_context(self) -> FitterEvaluateContext | None:
        evaluated = [c for c in self.contexts if getattr(c, "opt_loss", None) is not None]
        return min(evaluated, key=lambda c: c.opt_loss) if evaluated else None

    def finish(self, opt_params: dict | None = None) -> dict:
        """End the fit: set ``result``, log near-bound warnings and shut down an owned pool.

        Returns ``opt_params``, or the best evaluated parameters when it is ``None``, as a
        nested dict of floats.
        """
        session = self._require_session("finish")
        try:
            if session.pending:
                self._flush(session, session.step)
            if opt_params is None:
                best = self._best_context()
                if best is not None:
                    opt_params = best.opt_params
                elif sum(c.n_evals for c in self.contexts) > sum(session.start_evals):
                    logger.warning(
                        "every evaluation was penalised; returning the initial parameters"
                    )
                    opt_params = self.initial_parameters
                else:
                    raise RuntimeError(
                        "finish() found no evaluation; call ask() before finish() or pass "
                        "opt_params"
                    )
            params = _float_tree(opt_params)
            self._hook_post_fit(params)
            self.result = self._build_result(session, params)
        except BaseException as exc:
            self._abort(session, exc)
            raise
        self._shutdown_pool(session, wait_for_tasks=True)
        self._session = None
        return params

    def _build_result(
        self,
        session: _Session,
        params: dict,
        *,
        interrupted: bool = False,
        error: str | None = None,
    ) -> FitResult:
        best = self._best_context()
        if best is not None:
            best_params = _float_tree(best.opt_params)
            best_loss = float(best.opt_loss)
            best_meta = copy.deepcopy(best.opt_meta) if best.opt_meta is not None else {}
        else:
            best_params, best_loss, best_meta = copy.deepcopy(params), math.inf, {}
        n_evals = sum(c.n_evals for c in self.contexts) - sum(session.start_evals)
        end = self.time_fit_end if self.time_fit_end is not None else time.time()
        return FitResult(
            parameters=params,
            best_parameters=best_params,
            best_loss=best_loss,
            best_meta=best_meta,
            n_evals=n_evals - session.n_observations,
            n_observations=session.n_observations,
            wall_time=end - (self.time_fit_start or end),
            history=session.history,
            backend=session.backend,
            optimizer=session.optimizer,
            mode=session.mode,
            seed=session.seed,
            converged=session.converged,
            interrupted=interrupted,
            error=error,
            problematic_params=list(self.problematic_params),
        )

    def _abort(self, session: _Session, exc: BaseException) -> None:
        """Keep the best so far in ``result`` and release the owned pool (R13)."""
        try:
            self.time_fit_end = time.time()
            best = self._best_context()
            if best is not None:
                params = _float_tree(best.opt_params)
            else:
                params = _float_tree(self.initial_parameters)
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.result = self._build_result(
                session,
                params,
                interrupted=interrupted,
                error=None if interrupted else f"{type(exc).__name__}: {exc}",
            )
        finally:
            self._shutdown_pool(session, wait_for_tasks=False)
            self._session = None

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
        mode : {"batch", "async"}
            ``"batch"``: ask ``num_workers`` candidates, evaluate, tell all, run callbacks.
            ``"async"``: keep ``num_workers`` evaluations in flight, tell each as it arrives.
        seed : int, optional
            Seeds the parametrization's random state (reproducible batch fits).
        progress : bool, optional
            Show a progress bar on stderr; ``None`` shows it when stderr is a terminal.
        record_meta : bool
            Keep a deep copy of each evaluation's meta in its record.

        Examples
        --------
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0}, bounds={"x": (-3, 3)})
        >>> params = fitter.fit_nevergrad(budget=30, optimizer_str="OnePlusOne", seed=0)
        >>> fitter.result.n_evals, abs(params["x"] - 1.0) < 0.3
        (30, True)
        """
        budget = _check_count("budget", budget)
        num_workers = _check_count("num_workers", num_workers)
        if mode not in ("batch", "async"):
            raise ValueError(f"mode must be 'batch' or 'async', got {mode!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise TypeError(f"seed must be an int or None, got {seed!r} ({type(seed).__name__})")
        flat, flat_bounds = _validate_parameters(self.initial_parameters, self.bounds)
        optimizer_cls = _optimizer_class(optimizer_str)
        observations = list(initial_observations) if initial_observations is not None else []

        session = self._start_session(
            num_workers,
            contexts,
            executor,
            backend="nevergrad",
            optimizer=optimizer_str,
            mode=mode,
            seed=None if seed is None else int(seed),
            record_meta=record_meta,
        )
        try:
            session.bar = _progress_bar(progress, budget, f"nevergrad {optimizer_str}")
            parametrization = self._parametrization(flat, flat_bounds)
            if seed is not None:
                parametrization.random_state.seed(int(seed))
            replay = self._usable_observations(observations, flat, flat_bounds)
            optimizer = optimizer_cls(
                parametrization=parametrization,
                budget=budget + len(replay),
                num_workers=num_workers,
            )
            self._replay(session, optimizer, replay)
            optimizer.suggest(dict(flat))
            if mode == "async" and num_workers > 1:
                self._run_async(session, optimizer, budget)
            else:
                self._run_batches(session, optimizer, budget)
            recommendation = optimizer.provide_recommendation().value
            opt_params = unflatten_dict({k: float(v) for k, v in recommendation.items()})
        except BaseException as exc:
            self._abort(session, exc)
            raise
        return self.finish(opt_params)

    @staticmethod
    def _parametrization(flat: dict[str, float], flat_bounds: dict) -> Any:
        import nevergrad as ng

        scalars = {}
        for key, value in flat.items():
            lower, upper = flat_bounds.get(key, (None, None))
            # Two-sided bounds also set sigma to a sixth of the width; one-sided ones only bound.
            scalars[key] = ng.p.Scalar(init=value, lower=lower, upper=upper)
        return ng.p.Dict(**scalars)

    def _usable_observations(
        self, observations: list, flat: dict[str, float], flat_bounds: dict
    ) -> list[tuple[dict[str, float], Any]]:
        usable = []
        for number, item in enumerate(observations):
            try:
                params, loss = item
            except (TypeError, ValueError):
                raise ValueError(
                    f"initial_observations[{number}] must be a (parameters, loss) pair, got "
                    f"{item!r:.80}"
                ) from None
            if not isinstance(params, Mapping):
                raise TypeError(
                    f"initial_observations[{number}] parameters must be a dict, got "
                    f"{type(params).__name__}"
                )
            obs_flat = flatten_dict(params)
            if set(obs_flat) != set(flat):
                logger.warning(
                    "skipping initial observation %d: its parameters %s differ from the "
                    "fitted ones %s",
                    number,
                    sorted(obs_flat),
                    sorted(flat),
                )
                continue
            if not all(_is_real(v) and math.isfinite(v) for v in obs_flat.values()):
                logger.warning(
                    "skipping initial observation %d: non-numeric or non-finite parameter "
                    "values %s",
                    number,
                    obs_flat,
                )
                continue
            values = {key: float(obs_flat[key]) for key in flat}
            outside = _outside_bounds(values, flat_bounds)
            if outside is not None:
                logger.warning("skipping initial observation %d: %s", number, outside)
                continue
            usable.append((values, loss))
        return usable

    def _replay(self, session: _Session, optimizer: Any, replay: list) -> None:
        """Tell earlier observations: counted in ``contexts[0]``, no objective call, no callback."""
        ctx = self.contexts[0]
        bad = float(self.value_bad_params)
        for values, loss in replay:
            if loss is None:
                told, penalised = bad, True
            else:
                told, penalised = _sanitise_loss(loss, bad, values)
                penalised = penalised or told == bad
            optimizer.suggest(values)
            candidate = optimizer.ask()
            optimizer.tell(candidate, told)
            ctx.n_evals += 1
            session.n_observations += 1
            if not penalised and (ctx.opt_loss is None or told < ctx.opt_loss):
                ctx.opt_params = unflatten_dict(dict(values))
                ctx.opt_meta = {}
                ctx.opt_quantities = None
                ctx.opt_loss = told
        if replay:
            logger.info("told %d initial observations", len(replay))

    @staticmethod
    def _candidate_params(candidate: Any) -> dict:
        return unflatten_dict({key: float(v) for key, v in candidate.value.items()})

    def _run_batches(self, session: _Session, optimizer: Any, budget: int) -> None:
        remaining, step = budget, 0
        while remaining > 0:
            n = min(session.num_workers, remaining)
            candidates = [optimizer.ask() for _ in range(n)]
            losses = self._evaluate_batch(session, [self._candidate_params(c) for c in candidates])
            for candidate, loss in zip(candidates, losses):
                optimizer.tell(candidate, loss)
            self._flush(session, step)
            self._dispatch_step(session, step)
            remaining -= n
            step += 1

    def _evaluate_slot(self, executor: Any, params: dict, ctx: FitterEvaluateContext) -> float:
        """Runs in a driver thread: one evaluation on the executor, state applied to ``ctx``."""
        return map_with_context(executor, self.objective_function, [params], ctxs=[ctx])[0]

    def _run_async(self, session: _Session, optimizer: Any, budget: int) -> None:
        """Steady state: up to ``num_workers`` evaluations in flight, each told on arrival.

        Driver threads wait on the executor (through ``map_with_context``, so error handling
        and context states are those of a batch); nevergrad is only touched here, on the main
        thread.
        """
        n_workers = session.num_workers
        drivers = ThreadPoolExecutor(n_workers, thread_name_prefix="chemfit-async")
        in_flight: dict[Any, tuple[int, Any, dict, int]] = {}
        free = list(range(n_workers))
        asked = told = step = 0
        try:
            while told < budget:
                while free and asked < budget:
                    slot = free.pop(0)
                    candidate = optimizer.ask()
                    params = self._candidate_params(candidate)
                    ctx = self.contexts[slot]
                    ctx.reset()
                    future = drivers.submit(self._evaluate_slot, session.executor, params, ctx)
                    in_flight[future] = (asked, candidate, params, slot)
                    asked += 1
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                for future in sorted(done, key=lambda f: in_flight[f][0]):
                    _, candidate, params, slot = in_flight.pop(future)
                    loss = float(future.result())
                    optimizer.tell(candidate, loss)
                    self._stage(session, params, slot, loss)
                    self._flush(session, step)
                    told += 1
                    free.append(slot)
                    if told % n_workers == 0 or told == budget:
                        self._dispatch_step(session, step)
                        step += 1
        finally:
            for future in in_flight:
                future.cancel()
            drivers.shutdown(wait=False, cancel_futures=True)

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

        Examples
        --------
        >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 3.0}, bounds={"x": (0, None)})
        >>> round(fitter.fit_scipy(method="Nelder-Mead")["x"], 3)
        1.0
        >>> fitter.fit_scipy(method="BFGS")
        Traceback (most recent call last):
        ...
        ValueError: method 'BFGS' ignores bounds, but the fitter has bounds for ['x']; use a method that supports them (L-BFGS-B, TNC, SLSQP, Powell, Nelder-Mead, trust-constr, COBYLA) or remove the bounds
        """
        for name, fix in (("bounds", "Fitter(bounds=...)"), ("callback", "register_callback")):
            if name in kwargs:
                raise TypeError(
                    f"fit_scipy() does not accept {name}=; the fitter passes its own. "
                    f"Use {fix} instead"
                )
        flat, flat_bounds = _validate_parameters(self.initial_parameters, self.bounds)
        bounded = [k for k, (lo, hi) in flat_bounds.items() if lo is not None or hi is not None]
        if bounded and _scipy_ignores_bounds(method):
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
        scipy_bounds = [flat_bounds.get(key, (None, None)) for key in keys] if bounded else None

        session = self._start_session(
            1,
            None if ctx is None else [ctx],
            None,
            backend="scipy",
            optimizer=method if isinstance(method, str) else getattr(method, "__name__", "custom"),
            record_meta=record_meta,
        )

        def objective(x: Any) -> float:
            params = unflatten_dict({key: float(v) for key, v in zip(keys, x)})
            loss = self._evaluate_batch(session, [params])[0]
            self._flush(session, session.step)
            return loss

        def on_iteration(*_: Any) -> None:
            self._dispatch_step(session, session.step)

        try:
            session.bar = _progress_bar(progress, None, f"scipy {session.optimizer}")
            res = minimize(
                objective, x0, method=method, bounds=scipy_bounds, callback=on_iteration, **kwargs
            )
            session.converged = bool(res.success)
            if not res.success:
                logger.warning("scipy %s did not converge: %s", session.optimizer, res.message)
            opt_params = unflatten_dict({key: float(v) for key, v in zip(keys, res.x)})
        except BaseException as exc:
            self._abort(session, exc)
            raise
        return self.finish(opt_params)
