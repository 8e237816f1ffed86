"""What a fit does when an evaluation fails, is lost or runs too long: one policy, both loops.

Both nevergrad loops (batch and async) submit every evaluation with ``FitSession.submit`` and
turn each finished :class:`~chemfit.execution.submission.ContextFuture` into an
:class:`Outcome` with :meth:`FaultPolicy.settle`, after waiting with :meth:`FaultPolicy.wait`:

* the objective returned: status ``"ok"``;
* the objective raised: with ``on_error="record"`` status ``"failed"`` (``"Type: message"``, the
  (remote) traceback, the tries) and the optimizer is told ``value_bad_params``; with
  ``on_error="raise"`` the exception ends the fit, as it always did;
* the evaluation was lost (:class:`~chemfit.core.exceptions.WorkerLostError`: its worker,
  engine or process died, or it ran past ``evaluation_timeout`` and was abandoned): the
  executor is recovered (``recover_executor``: the same one while workers are left, a rebuilt
  pool for pools chemfit can rebuild) and the same parameters are submitted again to the same
  context, up to ``retries`` times; then it is recorded with status ``"lost"``;
* no worker is left, or the executor cannot be recovered: the fit stops with a clear
  ``WorkerLostError`` (:attr:`FaultPolicy.fatal`).

With the defaults (``retries=0``, no timeout, ``on_error="raise"``) every failure ends the fit
exactly as before.
"""

from __future__ import annotations

import logging
import numbers
import time
import traceback as tb
from collections.abc import Callable, Iterable
from concurrent import futures as cf
from dataclasses import dataclass, field
from typing import Any

from chemfit.core.exceptions import NotPicklableError, RemoteEvaluationError, WorkerLostError
from chemfit.core.utils import check_timeout
from chemfit.execution.task_errors import short_repr

__all__ = ["FaultPolicy", "Flight", "Outcome", "check_on_error", "describe_error", "wait_first"]

logger = logging.getLogger(__name__)

ON_ERROR = ("raise", "record")


def check_on_error(on_error: Any) -> str:
    """``on_error`` when it is one of :data:`ON_ERROR`; otherwise a ``ValueError`` that says
    what ``"record"`` does.

    Examples
    --------
    >>> check_on_error("record")
    'record'
    >>> check_on_error("ignore")
    Traceback (most recent call last):
    ...
    ValueError: on_error must be 'raise' or 'record', got 'ignore'; 'record' records an evaluation whose objective raised as failed and goes on
    """
    if on_error not in ON_ERROR:
        raise ValueError(
            f"on_error must be 'raise' or 'record', got {on_error!r}; 'record' records an "
            "evaluation whose objective raised as failed and goes on"
        )
    return on_error


def wait_first(
    futures: Iterable[Any], poll: float = 0.005, timeout: float | None = None
) -> list[Any]:
    """The finished ones of ``futures`` (``ContextFuture`` s), once at least one finished.

    Waits with ``concurrent.futures.wait(FIRST_COMPLETED)`` on the executors' futures; for
    executors whose futures it cannot wait on (e.g. Dask), it polls every ``poll`` seconds.
    After ``timeout`` seconds without one finished, returns ``[]``.

    Examples
    --------
    >>> from chemfit.core.context import EvaluateContext
    >>> from chemfit.execution.submission import submit_with_context
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> with ThreadPoolExecutor(1) as pool:
    ...     future = submit_with_context(pool, lambda x, ctx: x, 1, EvaluateContext())
    ...     wait_first([future]) == [future]
    True
    """
    futures = list(futures)
    inner = {id(f.future): f for f in futures if isinstance(f.future, cf.Future)}
    if len(inner) == len(futures):
        done, _ = cf.wait(
            [f.future for f in futures], timeout=timeout, return_when=cf.FIRST_COMPLETED
        )
        return [inner[id(f)] for f in done]
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        done = [f for f in futures if f.done()]
        if done or (end is not None and time.monotonic() >= end):
            return done
        time.sleep(poll)


@dataclass(eq=False)
class Flight:
    """One evaluation of a fit on its way, over all its tries.

    Attributes
    ----------
    number : int
        The fit's evaluation number: the index its record gets (in messages).
    params : dict
        Its parameters (the same on every try).
    worker : int
        The context slot (``fitter.contexts[worker]``) it is evaluated in.
    future : ContextFuture
        The future of its current try.
    candidate : Any
        The optimizer's candidate (the async loop tells it).
    tries : int
        Submissions that counted so far (the first one included).
    """

    number: int
    params: dict
    worker: int
    future: Any
    candidate: Any = None
    tries: int = 1
    started: float = field(default_factory=time.monotonic)  # of the current try
    seen_running: bool = False
    free_retry: bool = False  # lost because chemfit killed another evaluation: not counted
    unkillable: bool = False  # abandon() could not stop it: no deadline any more

    def restart(self, future: Any, *, counted: bool) -> None:
        """The flight's next try runs as ``future``."""
        self.future = future
        self.tries += counted
        self.started = time.monotonic()
        self.seen_running = False
        self.free_retry = False


@dataclass(frozen=True)
class Outcome:
    """How an evaluation ended: its value to tell and, for a fault, what to record.

    ``value`` is the objective's return value (status ``"ok"``) or ``value_bad_params``.
    """

    value: Any
    status: str = "ok"
    error: str | None = None
    traceback: str | None = None
    tries: int = 1


def describe_error(exc: BaseException) -> tuple[str, str | None]:
    """``("Type: message", traceback text)`` of an objective's exception.

    For an exception raised in another process or engine, the type, message and traceback
    are the remote ones (kept by its ``RemoteEvaluationError`` cause).

    Examples
    --------
    >>> try:
    ...     1 / 0
    ... except ZeroDivisionError as exc:
    ...     text, trace = describe_error(exc)
    >>> text, "ZeroDivisionError" in trace
    ('ZeroDivisionError: division by zero', True)
    """
    remote = exc if isinstance(exc, RemoteEvaluationError) else exc.__cause__
    if isinstance(remote, RemoteEvaluationError) and remote.remote_traceback:
        if remote is exc:
            return f"{remote.type_name}: {remote.remote_message}", remote.remote_traceback
        return f"{type(exc).__name__}: {exc}", remote.remote_traceback
    text = "".join(tb.format_exception(type(exc), exc, exc.__traceback__))
    return f"{type(exc).__name__}: {exc}", text or None


class FaultPolicy:
    """What a fit does with failed, lost and overdue evaluations (see the module docstring).

    Parameters
    ----------
    retries : int
        How many times a lost evaluation is submitted again.
    evaluation_timeout : float or None
        Seconds an evaluation may run before it is abandoned (its process killed where the
        executor allows); it then counts as lost.
    on_error : {"raise", "record"}
        What an exception of the objective does: end the fit, or be recorded as failed.

    Examples
    --------
    >>> FaultPolicy().tolerant, FaultPolicy(retries=2).tolerant
    (False, True)
    >>> FaultPolicy(on_error="ignore")
    Traceback (most recent call last):
    ...
    ValueError: on_error must be 'raise' or 'record', got 'ignore'; 'record' records an evaluation whose objective raised as failed and goes on
    """

    def __init__(
        self, retries: int = 0, evaluation_timeout: float | None = None, on_error: str = "raise"
    ) -> None:
        if isinstance(retries, bool) or not isinstance(retries, numbers.Integral) or retries < 0:
            raise ValueError(
                f"retries must be an int >= 0, got {retries!r}; it is how many times a lost "
                "evaluation is submitted again"
            )
        timeout = check_timeout(evaluation_timeout, "evaluation_timeout")
        self.retries = int(retries)
        self.timeout = timeout
        self.on_error = check_on_error(on_error)
        #: The error that ended the fit because no worker was left (set by :meth:`settle`).
        self.fatal: WorkerLostError | None = None
        self._warned_unkillable = False

    @property
    def tolerant(self) -> bool:
        """Whether a lost evaluation is recorded and the fit goes on (anything but the
        defaults); with the defaults it ends the fit."""
        return self.retries > 0 or self.timeout is not None or self.on_error == "record"

    def __repr__(self) -> str:
        return (
            f"FaultPolicy(retries={self.retries}, evaluation_timeout={self.timeout}, "
            f"on_error={self.on_error!r})"
        )

    # -- waiting --------------------------------------------------------------------------------

    def wait(self, flights: Iterable[Flight], waiter: Callable[..., list] = wait_first) -> list:
        """The finished ones of ``flights`` (at least one); overdue ones are abandoned first.

        ``waiter(futures, timeout=...)`` is :func:`wait_first` (the loops pass their own name
        for it, so a profiler can wrap it).
        """
        flights = list(flights)
        by_future = {id(flight.future): flight for flight in flights}
        futures = [flight.future for flight in flights]
        if self.timeout is None:
            return [by_future[id(f)] for f in waiter(futures)]
        while True:
            done = waiter(futures, timeout=self._time_left(flights))
            if done:
                return [by_future[id(f)] for f in done]
            abandoned = self._abandon_overdue(flights)
            if abandoned:
                return abandoned

    def _time_left(self, flights: list[Flight]) -> float | None:
        """Seconds until the first deadline (at most 0.25 s while a start is unconfirmed)."""
        now = time.monotonic()
        left = None
        for flight in flights:
            if flight.unkillable:
                continue
            if not flight.seen_running and _running(flight.future):
                flight.seen_running = True
                flight.started = now
            until = max(0.0, flight.started + self.timeout - now)
            if not flight.seen_running:
                until = min(until, 0.25)  # look again whether it started
            left = until if left is None else min(left, until)
        return left

    def _abandon_overdue(self, flights: list[Flight]) -> list[Flight]:
        """Abandon the flights past their deadline; those stopped (now finished) are returned."""
        now = time.monotonic()
        abandoned = []
        for flight in flights:
            if flight.unkillable or now - flight.started < self.timeout:
                continue
            if not flight.seen_running and not _running(flight.future):
                continue  # queued behind other work: its clock has not started
            if flight.future.done():
                abandoned.append(flight)
                continue
            if not _abandon(flight.future, self.timeout):
                flight.unkillable = True
                self._warn_unkillable(flight.future)
                continue
            if _local_pool(flight.future):
                _wait_for_the_break(flight.future)
            logger.warning(
                "evaluation %d (parameters %s) ran longer than evaluation_timeout=%gs: "
                "its worker was stopped and the evaluation counts as lost",
                flight.number,
                short_repr(flight.params, 200),
                self.timeout,
            )
            abandoned.append(flight)
            if _local_pool(flight.future):  # killing a pool's worker fails the others too
                for other in flights:
                    if other is not flight and not other.future.done():
                        other.free_retry = True  # not their fault: a try that does not count
        return abandoned

    def _warn_unkillable(self, future: Any) -> None:
        if self._warned_unkillable:
            return
        self._warned_unkillable = True
        executor = getattr(getattr(future, "_submitter", None), "info", None)
        name = getattr(executor, "name", None) or "this executor"
        logger.warning(
            "evaluation_timeout=%gs cannot stop an evaluation on %s: it runs in this process "
            "(threads or serial) or on an executor chemfit cannot kill tasks on, so nothing "
            "can be killed there. The fit waits for such an evaluation however long it takes; "
            "use make_executor('process', n) or 'loky' to have overdue evaluations killed",
            self.timeout,
            name,
        )

    def warn_no_executor(self) -> None:
        """Say (once) that ``evaluation_timeout`` has no effect on a fit without an executor."""
        if self.timeout is not None and not self._warned_unkillable:
            self._warned_unkillable = True
            logger.warning(
                "evaluation_timeout=%gs cannot stop an evaluation of this fit: it runs in the "
                "fit's own thread (no executor), where nothing can be killed. The fit waits for "
                "each evaluation however long it takes; pass executor=make_executor('process', "
                "n) or 'loky' to have overdue evaluations killed",
                self.timeout,
            )

    # -- settling -------------------------------------------------------------------------------

    def settle(self, flight: Flight, session: Any) -> Outcome | None:
        """How ``flight`` (finished) ended; ``None`` when it was submitted again.

        ``session`` (the :class:`~chemfit.fitting.fit_session.FitSession`) gives
        ``recover(error)``, which makes its executor usable again after a lost evaluation
        (raising ``WorkerLostError`` when no worker is left), ``submit_again(flight)``, the
        future of the next try, and ``objective.value_bad_params``, the value told for a failed
        or lost evaluation.

        Raises
        ------
        Exception
            The objective's exception (``on_error="raise"``), a ``NotPicklableError`` (the
            task cannot even start: never retried), a ``WorkerLostError`` with the defaults,
            or when no worker is left (then also :attr:`fatal`).
        """
        try:
            value = flight.future.result()
        except WorkerLostError as exc:
            return self._lost(flight, exc, session)
        except NotPicklableError:
            raise
        except Exception as exc:
            if self.on_error != "record":
                raise
            bad = session.objective.value_bad_params
            return self.failed(exc, flight.number, flight.params, bad, flight.tries)
        return Outcome(value, tries=flight.tries)

    def failed(
        self, exc: BaseException, number: int, params: dict, bad: float, tries: int = 1
    ) -> Outcome:
        """The outcome of evaluation ``number`` whose objective raised ``exc``
        (``on_error="record"``): failed, told ``bad``."""
        error, trace = describe_error(exc)
        logger.warning(
            "evaluation %d (parameters %s) failed: %s; recorded as failed (on_error='record')",
            number,
            short_repr(params, 200),
            error,
        )
        return Outcome(bad, "failed", error, trace, tries)

    def _lost(self, flight: Flight, exc: WorkerLostError, session: Any) -> Outcome | None:
        if not self.tolerant:
            raise exc  # the defaults: a lost evaluation ends the fit, as it always did
        try:  # the fit goes on: on the workers left, or on a rebuilt pool
            session.recover(exc)
            retry = flight.free_retry or flight.tries <= self.retries
            future = session.submit_again(flight) if retry else None
        except Exception as error:  # no worker left, a pool that cannot be rebuilt or used
            self.fatal = self._fatal_error(flight, error)
            raise self.fatal from error
        if future is not None:
            flight.restart(future, counted=not flight.free_retry)
            logger.warning(
                "evaluation %d (parameters %s) was lost (%s); submitted again (try %d of %d)",
                flight.number,
                short_repr(flight.params, 200),
                _first_line(exc),
                flight.tries,
                self.retries + 1,
            )
            return None
        logger.warning(
            "evaluation %d (parameters %s) was lost after %d tr%s (%s); recorded as lost, the "
            "fit goes on",
            flight.number,
            short_repr(flight.params, 200),
            flight.tries,
            "y" if flight.tries == 1 else "ies",
            _first_line(exc),
        )
        bad = session.objective.value_bad_params
        return Outcome(bad, "lost", f"WorkerLostError: {exc}", None, flight.tries)

    @staticmethod
    def _fatal_error(flight: Flight, cause: BaseException) -> WorkerLostError:
        return WorkerLostError(
            f"evaluation {flight.number} (parameters {short_repr(flight.params, 200)}) was "
            f"lost and the fit cannot go on: {cause}. The history (fitter.result.history and "
            "any JSONLinesHistory file) keeps every evaluation so far; resume with "
            "initial_observations=load_observations(...) on a working executor",
            index=flight.number,
            parameters=flight.params,
        )

    def unfinished(self, flight: Flight, bad: float) -> Outcome:
        """The outcome of ``flight`` when the fit stops without waiting for it (no worker
        left): its result when it finished, else lost."""
        if flight.future.done():
            try:
                return Outcome(flight.future.result(0), tries=flight.tries)
            except Exception as exc:
                if not isinstance(exc, WorkerLostError) and self.on_error == "record":
                    error, trace = describe_error(exc)
                    return Outcome(bad, "failed", error, trace, flight.tries)
        reason = f"WorkerLostError: {self.fatal}" if self.fatal else "WorkerLostError: fit stopped"
        return Outcome(bad, "lost", reason, None, flight.tries)


def _running(future: Any) -> bool:
    """Whether the task of ``future`` (a ContextFuture) started (or finished)."""
    inner = getattr(future, "future", None)
    running = getattr(inner, "running", None)
    if not callable(running):
        return True  # cannot tell: its clock runs from submission
    try:
        return bool(running()) or bool(future.done())
    except Exception:
        return True


def _wait_for_the_break(future: Any, seconds: float = 5.0) -> None:
    """After killing a local pool's worker: wait until the pool noticed (it fails the task's
    future then), so that recovering it sees it broken and a retry goes to a working pool."""
    inner = getattr(future, "future", None)
    if isinstance(inner, cf.Future):
        cf.wait([inner], timeout=seconds)


def _local_pool(future: Any) -> bool:
    """Whether ``future`` runs on a local process pool (stdlib or loky), where one dead
    worker fails every pending task."""
    info = getattr(getattr(future, "_submitter", None), "info", None)
    return bool(getattr(info, "local_pool", False))


def _abandon(future: Any, timeout: float) -> bool:
    abandon = getattr(future, "abandon", None)
    if not callable(abandon):
        return False
    try:
        return bool(abandon(timeout=timeout))
    except Exception:
        logger.warning("could not abandon an overdue evaluation", exc_info=True)
        return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
