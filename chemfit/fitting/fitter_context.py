"""The fitter's evaluation context and objective wrapper.

:class:`FitterEvaluateContext` reports the evaluation count and the best point seen: in a fit
they are read from the fit's history, elsewhere kept on the context and carried across workers
(R1). :class:`FitterObjectiveFunctor` wraps an objective: it turns its return value into the
loss to tell (R3, R4) and, outside a fit, counts the evaluation and records the best (R7).
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any

from chemfit.core.context import EvaluateContext, ExecutorLike
from chemfit.core.objectives import ObjectiveFunctor

__all__ = [
    "OPT_FIELDS",
    "FitterEvaluateContext",
    "FitterObjectiveFunctor",
    "describe_bad_loss",
    "raw_float",
    "sanitise_loss",
    "worker_contexts",
]

logger = logging.getLogger(__name__)

#: The tracking fields of a :class:`FitterEvaluateContext`, in the order they travel.
OPT_FIELDS = ("n_evals", "opt_loss", "opt_params", "opt_meta", "opt_quantities")


class _Tracked:
    """A tracking field of :class:`FitterEvaluateContext` (see ``_tracked``)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, ctx: Any, owner: type | None = None) -> Any:
        return self if ctx is None else ctx._tracked(self.name)

    def __set__(self, ctx: Any, value: Any) -> None:
        ctx._set_tracked(self.name, value)


class FitterEvaluateContext(EvaluateContext):
    """An evaluation context that also reports the evaluation count and the best point seen.

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

    Notes
    -----
    A context of a fit (``fitter.contexts[i]``) reads these five fields from the fit's
    :class:`~chemfit.fitting.results.FitHistory` (``fitter.history.count(i)`` and
    ``fitter.history.best(i)``; ``contexts[0]`` also counts the initial observations): the
    history is their one source, and they cannot be set. Outside a fit they are plain
    attributes that :class:`FitterObjectiveFunctor` updates. Either way they travel to workers
    (pickling) and :meth:`reset` keeps them; a context outside a fit also brings them back
    (result state, R1).

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
        self._own: dict[str, Any] = dict.fromkeys(OPT_FIELDS)
        self._own["n_evals"] = 0
        self._fit: tuple[Any, int] | None = None  # (FitHistory, worker index) in a fit
        self._in_fit = False  # a fit's context or a worker's copy of one: the fit counts
        self._best_extras: tuple[Any, Any, Any] | None = None  # (record, quantities, meta)

    def _clear_evaluation_state(self) -> None:
        super()._clear_evaluation_state()
        self.last_evaluation: dict | None = None

    # -- the fit's view ---------------------------------------------------------------------

    def _bind(self, history: Any, worker: int) -> None:
        """Read the tracking fields from ``history`` (this context evaluates as ``worker``)."""
        self._fit = (history, worker)
        self._in_fit = True
        self._best_extras = None

    def _note_best(self, record: Any, quantities: Any, meta: Any) -> None:
        """Keep what a record lacks of this context's new best: its quantities, and its meta
        when records keep none (deep copies)."""
        self._best_extras = (record, copy.deepcopy(quantities), copy.deepcopy(meta))

    def _tracked(self, name: str) -> Any:
        """A tracking field: derived from the fit's history, else the context's own value."""
        if self._fit is None:
            return self._own[name]
        history, worker = self._fit
        if name == "n_evals":
            return history.count(worker)
        record = history.best(worker)
        if record is None:
            return None
        if name == "opt_loss":
            return record.loss
        if name == "opt_params":
            return copy.deepcopy(record.parameters)
        extras = self._best_extras if self._best_extras and self._best_extras[0] is record else None
        if name == "opt_quantities":
            return None if extras is None else copy.deepcopy(extras[1])
        if record.meta is not None:
            return copy.deepcopy(record.meta)
        return None if extras is None or extras[2] is None else copy.deepcopy(extras[2])

    def _set_tracked(self, name: str, value: Any) -> None:
        if self._fit is not None:
            raise AttributeError(
                f"{name} of a fitter's context is derived from fitter.history and cannot be "
                "set; read fitter.history (or use a FitterEvaluateContext outside a fit)"
            )
        self._own[name] = value

    n_evals = _Tracked()
    opt_loss = _Tracked()
    opt_params = _Tracked()
    opt_meta = _Tracked()
    opt_quantities = _Tracked()

    # -- travel -----------------------------------------------------------------------------

    def _snapshot(self) -> dict:
        """The five tracking fields as values (no copies: pickling copies them)."""
        if self._fit is None:
            return dict(self._own)
        history, worker = self._fit
        record = history.best(worker)
        return {
            "n_evals": history.count(worker),
            "opt_loss": None if record is None else record.loss,
            "opt_params": None if record is None else record.parameters,
            "opt_meta": None if record is None else record.meta,
            "opt_quantities": None,
        }

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.update(self._snapshot())
        if self._in_fit:
            state["in_fit"] = True
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._own = {name: state.get(name) for name in OPT_FIELDS}
        self._own["n_evals"] = state.get("n_evals", 0)
        self._fit = None
        self._in_fit = bool(state.get("in_fit", False))
        self._best_extras = None

    def to_result_state(self) -> dict:
        """The base result state plus ``last_evaluation``, and outside a fit the five tracking
        fields (a fit counts its evaluations in its history)."""
        state = super().to_result_state()
        if not self._in_fit:
            state.update(self._own)
        state["last_evaluation"] = self.last_evaluation
        return state

    def apply_result_state(self, state: dict) -> None:
        """Apply a worker's result state, including the tracking fields when present (outside a
        fit; a fit's context reads them from its history)."""
        super().apply_result_state(state)
        if "last_evaluation" in state:
            self.last_evaluation = state["last_evaluation"]
        if self._fit is None:
            for name in OPT_FIELDS:
                if name in state:
                    self._own[name] = state[name]


def describe_bad_loss(value: Any) -> str | None:
    """Why ``value`` cannot be told as a loss (R3), or ``None`` when it is a real number.

    Python numbers, numpy scalars and 0-d arrays of bool, int or float are real numbers.

    Examples
    --------
    >>> import numpy as np
    >>> describe_bad_loss(np.float32(1.5)) is None, describe_bad_loss(np.zeros(2))
    (True, 'an array of shape (2,)')
    """
    if type(value) is float or isinstance(value, numbers.Real):
        return None
    ndim = getattr(value, "ndim", None)
    if ndim == 0 and getattr(getattr(value, "dtype", None), "kind", "") in "biuf":
        return None
    if ndim is not None and ndim >= 1:
        return f"an array of shape {tuple(value.shape)}"
    return f"a value of type {type(value).__name__} ({value!r:.60})"


def sanitise_loss(value: Any, value_bad_params: float, parameters: Any) -> tuple[float, bool]:
    """``(told value, penalised)`` for a loss, logging a WARNING when it is replaced (R3, R4).

    Non-numeric and non-finite values are replaced by ``value_bad_params``.

    Examples
    --------
    >>> sanitise_loss(2, 99.0, {"x": 1.0})
    (2.0, False)
    >>> sanitise_loss(float("inf"), 99.0, {"x": 1.0})
    (99.0, True)
    """
    reason = describe_bad_loss(value)
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


def raw_float(value: Any) -> float | None:
    """``float(value)`` for a real number (NaN and infinity included), else ``None``.

    Examples
    --------
    >>> raw_float(float("nan")), raw_float("1.0")
    (nan, None)
    """
    return float(value) if describe_bad_loss(value) is None else None


class FitterObjectiveFunctor(ObjectiveFunctor):
    """Wraps an objective for the fitter: sanitises losses, counts evaluations, tracks the best.

    In a fit (a context of ``fitter.contexts``, or a worker's copy of one) the fit's history
    counts and keeps the best, so the functor only sanitises the loss and notes
    ``ctx.last_evaluation``; with any other context it also updates ``n_evals`` and ``opt_*``.

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
        if error is not None:
            loss, penalised = float(self.value_bad_params), True
        else:
            loss, penalised = sanitise_loss(value, self.value_bad_params, parameters)
        ctx.last_evaluation = {
            "raw_loss": None if error is not None else raw_float(value),
            "penalised": penalised,
            "error": error,
        }
        if getattr(ctx, "_in_fit", False):
            return loss  # the fit records it: fitter.history counts and keeps the best
        ctx.n_evals = getattr(ctx, "n_evals", 0) + 1
        best = getattr(ctx, "opt_loss", None)
        if not penalised and (best is None or loss < best):
            # opt_loss last: a callback reading another thread's context sees a consistent best.
            ctx.opt_params = copy.deepcopy(parameters)
            ctx.opt_meta = copy.deepcopy(ctx.meta)
            ctx.opt_quantities = copy.deepcopy(ctx.quantities)
            ctx.opt_loss = loss
        return loss


def worker_contexts(
    num_workers: int, contexts: Iterable[FitterEvaluateContext] | None
) -> list[FitterEvaluateContext]:
    """One :class:`FitterEvaluateContext` per worker: fresh ones, or the given ones checked.

    Raises
    ------
    ValueError
        When ``contexts`` does not hold exactly ``num_workers`` contexts.
    TypeError
        When one of them is not a :class:`FitterEvaluateContext`.

    Examples
    --------
    >>> len(worker_contexts(2, None))
    2
    >>> worker_contexts(2, [FitterEvaluateContext()])
    Traceback (most recent call last):
    ...
    ValueError: contexts must hold num_workers=2 contexts, got 1; pass one FitterEvaluateContext per worker or None
    """
    if contexts is None:
        return [FitterEvaluateContext() for _ in range(num_workers)]
    ctx_list = list(contexts)
    if len(ctx_list) != num_workers:
        raise ValueError(
            f"contexts must hold num_workers={num_workers} contexts, got "
            f"{len(ctx_list)}; pass one FitterEvaluateContext per worker or None"
        )
    for index, ctx in enumerate(ctx_list):
        if not isinstance(ctx, FitterEvaluateContext):
            raise TypeError(
                f"contexts[{index}] must be a FitterEvaluateContext, got {type(ctx).__name__}"
            )
    return ctx_list
