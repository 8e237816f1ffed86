"""A second objective on held-out data, evaluated for each new best of a fit.

``Fitter(objective, initial_params, validation=held_out)`` evaluates ``held_out`` at the
parameters of every record that becomes the fit's best (``FitHistory.improvements()``), on the
fit's executor, through the one submission primitive
(:class:`~chemfit.execution.submission.ContextSubmitter`): the objective is packed for the
workers once per fit, and an objective defined in ``__main__`` travels by value. The fit loop
does not wait for these evaluations: :class:`ValidationMonitor` submits them when the records are
told (``FitSession.notify``) and takes each result, in record order, once it is there; the fit
waits for the last ones when it finishes. A fit without an executor evaluates them in its own
thread.

Each validation loss is kept as ``(record index, loss)`` in ``FitHistory.validation`` (hence
``FitResult.validation`` and ``FitResult.best_validation_loss``), in ``FitResult.to_dict()``
under ``"validation"``, and as a line ``{"index": i, "validation": loss}`` in a
:class:`~chemfit.fitting.callbacks.JSONLinesHistory` file: an evaluation callback that has an
``on_validation(index, loss)`` method (or is a bound method of an object that has one, as a
live plot's) is told each one. With ``validation_patience=N`` the fit
is stopped (``fitter.request_stop()``, ``result.stopped``) once the validation loss has not
improved for ``N`` consecutive improvements of the training loss.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent import futures as cf
from typing import TYPE_CHECKING, Any

from chemfit.core.context import EvaluateContext
from chemfit.core.objectives import ObjectiveFunctor
from chemfit.core.wrapping import WrappedObjectiveFunctor
from chemfit.execution.submission import TIMEOUT_ERRORS, ContextSubmitter
from chemfit.fitting.fitter_context import describe_bad_loss
from chemfit.fitting.jsonl import float_from_json, json_float

if TYPE_CHECKING:
    from chemfit.fitting.fit_session import FitSession
    from chemfit.fitting.results import EvaluationRecord, FitHistory

__all__ = [
    "ValidationMonitor",
    "check_validation",
    "is_validation_line",
    "parse_history_line",
    "validation_from_json",
    "validation_line",
    "validation_to_json",
]

logger = logging.getLogger(__name__)

#: The key of a validation line in a JSON-lines history (beside ``"index"``).
VALIDATION_KEY = "validation"


def check_validation(validation: Any, patience: Any) -> tuple[ObjectiveFunctor | None, int | None]:
    """``(objective, patience)`` as the fitter keeps them, after checking both.

    A plain callable is wrapped like the fitter's objective (``f(parameters)``, or
    ``f(parameters, ctx=ctx)`` when it has a ``ctx`` parameter).

    Raises
    ------
    TypeError
        When ``validation`` is not callable, or ``patience`` is not an int.
    ValueError
        When ``patience`` is below 1, or given without a validation objective.

    Examples
    --------
    >>> objective, patience = check_validation(lambda p: p["x"] ** 2, 3)
    >>> objective({"x": 2.0}), patience
    (4.0, 3)
    >>> check_validation("held-out.xyz", None)
    Traceback (most recent call last):
    ...
    TypeError: validation must be an objective evaluated on held-out data (a callable objective(parameters) or objective(parameters, ctx), or an ObjectiveFunctor), got 'held-out.xyz' (str)
    >>> check_validation(None, 5)
    Traceback (most recent call last):
    ...
    ValueError: validation_patience=5 needs a validation objective: pass Fitter(..., validation=objective)
    """
    if patience is not None:
        if isinstance(patience, bool) or not isinstance(patience, int):
            raise TypeError(
                f"validation_patience must be an int >= 1 or None, got {patience!r} "
                f"({type(patience).__name__})"
            )
        if patience < 1:
            raise ValueError(
                f"validation_patience must be >= 1 (improvements of the training loss without "
                f"a better validation loss), got {patience}"
            )
    if validation is None:
        if patience is not None:
            raise ValueError(
                f"validation_patience={patience} needs a validation objective: pass "
                "Fitter(..., validation=objective)"
            )
        return None, None
    if isinstance(validation, ObjectiveFunctor):
        return validation, patience
    if not callable(validation):
        raise TypeError(
            "validation must be an objective evaluated on held-out data (a callable "
            "objective(parameters) or objective(parameters, ctx), or an ObjectiveFunctor), "
            f"got {validation!r:.80} ({type(validation).__name__})"
        )
    from chemfit.fitting.fitter import _accepts_ctx  # the fitter's rule for plain callables

    return WrappedObjectiveFunctor(validation, pass_ctx=_accepts_ctx(validation)), patience


# -- the JSON forms --------------------------------------------------------------------------


def validation_line(index: int, loss: float) -> dict:
    """The JSON-lines form of the validation loss of record ``index``.

    Examples
    --------
    >>> validation_line(7, 0.25), validation_line(8, float("nan"))
    ({'index': 7, 'validation': 0.25}, {'index': 8, 'validation': 'nan'})
    """
    return {"index": int(index), VALIDATION_KEY: json_float(loss)}


def is_validation_line(data: Any) -> bool:
    """Whether one line of a JSON-lines history is a validation loss (not a record).

    Examples
    --------
    >>> is_validation_line({"index": 7, "validation": 0.25})
    True
    >>> is_validation_line({"index": 7, "parameters": {"x": 1.0}, "loss": 2.0})
    False
    """
    return isinstance(data, Mapping) and VALIDATION_KEY in data and "parameters" not in data


def _pair(index: Any, loss: Any) -> tuple[int, float]:
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError(f"a validation loss needs an int record index, got {index!r}")
    value = float_from_json(loss, "a validation loss")
    return int(index), math.nan if value is None else value


def parse_history_line(data: Any) -> EvaluationRecord | tuple[int, float]:
    """One line of a JSON-lines history: an ``EvaluationRecord``, or ``(index, loss)`` for a
    validation line (see :func:`validation_line`).

    Examples
    --------
    >>> parse_history_line({"index": 3, "validation": "inf"})
    (3, inf)
    >>> parse_history_line({"index": 3, "parameters": {"x": 1}, "loss": 2.0}).loss
    2.0
    """
    if is_validation_line(data):
        return _pair(data.get("index"), data[VALIDATION_KEY])
    from chemfit.fitting.results import EvaluationRecord

    return EvaluationRecord.from_dict(data)


def validation_to_json(pairs: Iterable[tuple[int, float]]) -> list[list]:
    """``(index, loss)`` pairs as strict-JSON data (``FitResult.to_dict()["validation"]``).

    Examples
    --------
    >>> validation_to_json([(0, 1.5), (4, float("nan"))])
    [[0, 1.5], [4, 'nan']]
    """
    return [[int(index), json_float(loss)] for index, loss in pairs]


def validation_from_json(data: Any) -> list[tuple[int, float]]:
    """The inverse of :func:`validation_to_json` (``None`` or missing: no validation).

    Examples
    --------
    >>> validation_from_json([[0, 1.5], [4, "nan"]]), validation_from_json(None)
    ([(0, 1.5), (4, nan)], [])
    """
    if data is None:
        return []
    pairs = []
    for item in data:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"a validation entry must be [record index, loss], got {item!r}")
        pairs.append(_pair(*item))
    return pairs


def best_validation_loss(pairs: Iterable[tuple[int, float]]) -> float | None:
    """The lowest finite validation loss of ``pairs``, or ``None``.

    Examples
    --------
    >>> best_validation_loss([(0, 2.0), (3, float("nan")), (5, 1.0)]), best_validation_loss([])
    (1.0, None)
    """
    finite = [loss for _, loss in pairs if math.isfinite(loss)]
    return min(finite) if finite else None


# -- during a fit ----------------------------------------------------------------------------


def _done_future(call: Callable[[], Any]) -> cf.Future:
    """A finished future holding ``call()``'s value or exception (a serial fit's evaluation)."""
    future: cf.Future = cf.Future()
    try:
        future.set_result(call())
    except Exception as exc:
        future.set_exception(exc)
    return future


def _on_validation(callback: Any) -> Callable[[int, float], Any] | None:
    """The ``on_validation`` method of an evaluation callback, or of the object whose bound
    method it is (``register_evaluation_callback(plot.on_evaluation)``), else ``None``."""
    for owner in (callback, getattr(callback, "__self__", None)):
        method = getattr(owner, "on_validation", None)
        if callable(method):
            return method
    return None


class ValidationMonitor:
    """Evaluates the validation objective for each new best record of one fit.

    Created by the fitter for each fit (``FitSession.validation``); the session calls
    :meth:`update` after it told records, the fitter :meth:`finish` before it builds the
    result (or :meth:`abandon` when the fit ends with an exception).

    Parameters
    ----------
    objective : ObjectiveFunctor
        The validation objective, ``objective(parameters, ctx)``.
    session : FitSession
        The fit: its history, executor, fault policy and evaluation callbacks.
    patience : int or None
        Stop the fit after this many improvements of the training loss without a better
        validation loss.
    request_stop : callable
        Called (once) to stop the fit: ``Fitter.request_stop``.
    swallow_exceptions : bool
        Record a validation evaluation that raises as NaN (with a WARNING) instead of ending
        the fit; also done when the fit records failed evaluations (``on_error="record"``,
        ``retries`` or ``evaluation_timeout``).

    Examples
    --------
    >>> from chemfit.fitting.fitter import Fitter
    >>> fitter = Fitter(lambda p: (p["x"] - 1.0) ** 2, {"x": 0.0},
    ...                 validation=lambda p: (p["x"] - 2.0) ** 2)
    >>> fitter.init()
    >>> fitter.ask({"x": 0.5}), fitter.ask({"x": 0.75})
    (0.25, 0.0625)
    >>> fitter.tell()
    >>> fitter.history.validation
    [(0, 2.25), (1, 1.5625)]
    """

    def __init__(
        self,
        objective: Callable[..., Any],
        session: FitSession,
        *,
        patience: int | None = None,
        request_stop: Callable[[], None] | None = None,
        swallow_exceptions: bool = False,
    ) -> None:
        self.objective = objective
        self.session = session
        self.patience = patience
        self.request_stop = request_stop
        self.swallow_exceptions = swallow_exceptions
        self.pending: deque[tuple[int, Any]] = deque()  # (record index, future), in order
        self.stop_reason: str | None = None
        self._submitter: ContextSubmitter | None = None
        self._info: Any = None
        history = session.history
        self.n_seen = len(history.improvements())  # a resumed fit's were validated before
        self.best = math.inf
        self.since_best = 0  # validated improvements since the best validation loss
        for _, loss in history.validation:
            self._count(loss)

    @classmethod
    def for_fitter(cls, fitter: Any, session: FitSession) -> ValidationMonitor:
        """The monitor of ``fitter``'s validation objective for the fit ``session``."""
        return cls(
            fitter.validation,
            session,
            patience=fitter.validation_patience,
            request_stop=fitter.request_stop,
            swallow_exceptions=bool(fitter.objective_function.swallow_exceptions),
        )

    # -- submitting ---------------------------------------------------------------------------

    def update(self) -> None:
        """Submit the validation of every new best record; record the results that are in."""
        history = self.session.history
        improvements = history.improvements()
        for position in improvements[self.n_seen :]:
            self._start(history[position])
        self.n_seen = len(improvements)
        self._collect(wait=False)

    def _start(self, record: EvaluationRecord) -> None:
        parameters, index = record.parameters, record.index
        info = self.session.executor
        if info is None:  # a serial fit: evaluate here, now
            future = _done_future(lambda: self.objective(parameters, EvaluateContext()))
        else:
            try:
                future = self._submitter_for(info).submit(
                    parameters, EvaluateContext(), index=index
                )
            except Exception as exc:  # e.g. a pool that broke: settled as a failed evaluation
                future = cf.Future()
                future.set_exception(exc)
        self.pending.append((index, future))

    def _submitter_for(self, info: Any) -> ContextSubmitter:
        """One submitter per executor (a recovered fit may switch to a new one)."""
        if self._submitter is None or self._info is not info:
            self._submitter = ContextSubmitter(info, self.objective)
            self._info = info
        return self._submitter

    # -- results ------------------------------------------------------------------------------

    def _collect(self, wait: bool, timeout: float | None = None) -> None:
        """Record the finished evaluations at the front of the queue (all, with ``wait``)."""
        pending = self.pending
        while pending and (wait or pending[0][1].done()):
            index, future = pending[0]
            loss = self._loss(index, future, timeout if wait else 0)
            pending.popleft()
            self._record(index, loss)

    def _tolerant(self) -> bool:
        faults = getattr(self.session, "faults", None)
        return self.swallow_exceptions or bool(getattr(faults, "tolerant", False))

    def _loss(self, index: int, future: Any, timeout: float | None) -> float:
        """The validation loss in ``future`` (NaN, with a WARNING, for an unusable one)."""
        try:
            value = future.result(timeout)
        except TIMEOUT_ERRORS:
            abandon = getattr(future, "abandon", None)
            if callable(abandon):
                abandon()
            logger.warning(
                "the validation of record %d ran longer than evaluation_timeout=%gs; recorded "
                "as NaN",
                index,
                timeout,
            )
            return math.nan
        except Exception as exc:
            if not self._tolerant():
                logger.error(
                    "the validation objective raised for the parameters of record %d: %s: %s "
                    "(pass Fitter(swallow_exceptions=True) or fit_nevergrad(on_error='record') "
                    "to record it as NaN and go on)",
                    index,
                    type(exc).__name__,
                    exc,
                )
                raise
            logger.warning(
                "the validation objective raised for the parameters of record %d (%s: %s); "
                "recorded as NaN",
                index,
                type(exc).__name__,
                exc,
            )
            return math.nan
        reason = describe_bad_loss(value)
        loss = math.nan if reason is not None else float(value)
        if reason is not None or not math.isfinite(loss):
            logger.warning(
                "the validation objective returned %s for the parameters of record %d",
                reason or f"the non-finite value {loss}",
                index,
            )
        return loss

    def _record(self, index: int, loss: float) -> None:
        """Keep ``(index, loss)`` in the history, tell the callbacks, check the early stop."""
        session = self.session
        session.history.validation.append((index, loss))
        logger.debug("record %d: validation loss %.6g", index, loss)
        for callback in list(session.evaluation_callbacks):
            on_validation = _on_validation(callback)
            if on_validation is not None:
                on_validation(index, loss)
        self._count(loss)
        if self.patience is not None and self.since_best >= self.patience:
            self._stop(index)

    def _count(self, loss: float) -> None:
        if loss < self.best:
            self.best, self.since_best = loss, 0
        else:
            self.since_best += 1

    def _stop(self, index: int) -> None:
        if self.stop_reason is not None or self.request_stop is None:
            return
        self.stop_reason = (
            f"the validation loss has not improved for {self.since_best} improvements of the "
            f"training loss (best validation loss {self.best:.6g}; validation_patience="
            f"{self.patience})"
        )
        logger.info("stopping the fit at record %d: %s", index, self.stop_reason)
        self.request_stop()

    # -- the end of the fit ---------------------------------------------------------------------

    def finish(self) -> None:
        """Wait for the validations still running and record them (the fit has ended: no
        stop is requested any more). Each waits at most the fit's ``evaluation_timeout``."""
        self.request_stop = None
        timeout = getattr(getattr(self.session, "faults", None), "timeout", None)
        self._collect(wait=True, timeout=timeout)

    def abandon(self) -> None:
        """The fit ends with an exception: record the validations already finished, cancel
        the others. Never raises."""
        self.request_stop = None
        try:
            while self.pending and self.pending[0][1].done():
                index, future = self.pending.popleft()
                try:
                    loss = float(future.result(0))
                except Exception:
                    logger.debug("the validation of record %d failed", index, exc_info=True)
                    loss = math.nan
                self.session.history.validation.append((index, loss))
        except Exception:
            logger.debug("keeping the finished validations failed", exc_info=True)
        for _, future in self.pending:
            future.cancel()
        self.pending.clear()


def renumbered(history: FitHistory) -> list[tuple[int, float]]:
    """``history.validation`` with each record index turned into the record's position
    (0-based), for a copy of the records numbered from 0 (as the live plot keeps them).

    Examples
    --------
    >>> from chemfit.fitting.results import EvaluationRecord, FitHistory
    >>> history = FitHistory(EvaluationRecord(i, 0, 0, {"x": 1.0}, 1.0, 1.0, False, None,
    ...                                       None, 0.0) for i in range(10, 13))
    >>> history.validation = [(10, 0.5), (12, 0.25)]
    >>> renumbered(history)
    [(0, 0.5), (2, 0.25)]
    """
    validation = list(getattr(history, "validation", ()))
    if not validation or not len(history):
        return validation
    first = history[0].index
    return [(index - first, loss) for index, loss in validation]
