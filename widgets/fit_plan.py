"""What one click of the dashboard's Start (or New fit) runs, checked before anything starts."""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable
from dataclasses import dataclass

from chemfit.core.exceptions import UnknownOptimizerError
from chemfit.fitting.fault_policy import FaultPolicy
from chemfit.fitting.optimizer_lookup import nevergrad_optimizer_class

__all__ = ["LogCollector", "Plan", "make_plan"]


@dataclass(frozen=True)
class Plan:
    """What one click of Start (or New fit) runs."""

    total: int  #: the budget: evaluations of the whole fit
    new_evals: int  #: evaluations this run adds
    optimizer: str
    mode: str
    resume: bool  #: continue the dashboard's fit (``fit_nevergrad(resume=True)``)
    retries: int = 0  #: times a lost evaluation is submitted again
    on_error: str = "raise"  #: ``"record"``: an objective that raises is recorded as failed
    evaluation_timeout: float | None = None  #: seconds before an evaluation is abandoned

    def fault_options(self) -> dict:
        """The ``fit_nevergrad`` keywords of what to do when evaluations fail."""
        return {
            "retries": self.retries,
            "on_error": self.on_error,
            "evaluation_timeout": self.evaluation_timeout,
        }


def make_plan(
    total: object,
    optimizer: object,
    mode: object,
    resume: bool,
    done: int,
    *,
    retries: object = 0,
    on_error: object = "raise",
    evaluation_timeout: object = None,
) -> Plan:
    """Check the settings and decide what to run; raises ``ValueError`` for a bad one.

    Parameters
    ----------
    total : int
        The budget: evaluations of the whole fit.
    optimizer : str
        A nevergrad optimizer name.
    mode : {"batch", "async"}
    resume : bool
        Continue the fit shown (``done`` evaluations so far).
    done : int
        Evaluations of the fit shown.
    retries, on_error, evaluation_timeout
        As for ``fit_nevergrad``; an ``evaluation_timeout`` of 0 means none (the dashboard's
        field).

    Examples
    --------
    >>> make_plan(50, "OnePlusOne", "batch", True, 20, on_error="record").fault_options()
    {'retries': 0, 'on_error': 'record', 'evaluation_timeout': None}
    >>> make_plan(50, "OnePlusOne", "batch", True, 20).new_evals
    30
    >>> make_plan(0, "OnePlusOne", "batch", False, 0)
    Traceback (most recent call last):
    ...
    ValueError: the budget must be a whole number of evaluations >= 1, got 0
    """
    if isinstance(total, bool) or not isinstance(total, numbers.Integral) or total < 1:
        raise ValueError(f"the budget must be a whole number of evaluations >= 1, got {total!r}")
    if not isinstance(optimizer, str) or not optimizer.strip():
        raise ValueError("choose an optimizer, e.g. NgIohTuned or OnePlusOne")
    try:
        nevergrad_optimizer_class(optimizer.strip())
    except UnknownOptimizerError as exc:  # it names the closest ones; say it in UI words
        raise UnknownOptimizerError(str(exc).replace("optimizer_str", "the optimizer")) from None
    if mode not in ("batch", "async"):
        raise ValueError(f"mode must be 'batch' or 'async', got {mode!r}")
    done = done if resume else 0
    if total <= done:
        raise ValueError(
            f"all {total} evaluations of the budget are done ({done} so far). The budget "
            "counts every evaluation of this fit: raise it to continue, or click New fit "
            "to start over"
        )
    if evaluation_timeout == 0:
        evaluation_timeout = None
    policy = FaultPolicy(retries, evaluation_timeout, on_error)  # type: ignore[arg-type]
    return Plan(
        int(total),
        int(total - done),
        optimizer.strip(),
        str(mode),
        resume,
        retries=policy.retries,
        on_error=policy.on_error,
        evaluation_timeout=policy.timeout,
    )


class LogCollector(logging.Handler):
    """Passes on the chemfit WARNING/ERROR messages of a fit (text only, never tracebacks).

    Examples
    --------
    >>> seen = []
    >>> logger = logging.getLogger("chemfit.example")
    >>> collector = LogCollector(seen.append)
    >>> logger.addHandler(collector)
    >>> logger.warning("the objective   raised")
    >>> logger.removeHandler(collector)
    >>> seen
    ['warning: the objective raised']
    """

    def __init__(self, on_message: Callable[[str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self.on_message = on_message

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
        except Exception:  # a bad log call must not break the fit
            return
        self.on_message(f"{record.levelname.lower()}: {text[:300]}")
