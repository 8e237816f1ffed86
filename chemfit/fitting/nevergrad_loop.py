"""The loops that drive a nevergrad optimizer: replayed observations, batch mode, async mode.

A loop works on the fit's :class:`~chemfit.fitting.fit_session.FitSession` (evaluations,
records, callbacks, stop request) and the optimizer; nevergrad is only touched on the calling
thread.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from chemfit.core.flatdict import unflatten_dict
from chemfit.fitting.fault_policy import Flight, Outcome, wait_first
from chemfit.fitting.fit_session import FitSession
from chemfit.fitting.fitter_context import sanitise_loss
from chemfit.fitting.parameter_space import nested_floats

__all__ = [
    "NevergradLoop",
    "TellOverlap",
    "candidate_params",
    "quiet_cma_injections",
    "wait_first",
]

logger = logging.getLogger(__name__)

# cma's own spelling; the warning is cma.evolution_strategy.InjectionWarning (a UserWarning).
_CMA_ORPHAN = "orphanated injected solution"


@contextmanager
def quiet_cma_injections() -> Iterator[None]:
    """Count cma's "orphanated injected solution" warnings instead of printing them.

    nevergrad's CMA wrapper tells cma the genotype recomputed from each candidate's value,
    which differs from the sampled one by round-off (~1e-16). cma finds its injected
    selective mirrors (used when its population is below 6, as in fully bounded fits of up
    to 7 parameters) by their exact bytes, misses some and warns every few generations,
    with or without workers, suggestions or replayed observations. The solutions are told
    all the same; only their negative (active) weight is not zeroed. One INFO line reports
    the count. Other warnings are shown as before.

    ``catch_warnings`` swaps process-wide state, so enter and leave this once per fit, on
    the main thread, while no evaluation runs (not around each ``tell``: every swap also
    resets the "default"/"once" registries, so warnings shown once would be shown again).

    Examples
    --------
    >>> import warnings
    >>> with quiet_cma_injections():
    ...     warnings.warn_explicit(_CMA_ORPHAN + " {}", UserWarning, "es.py", 1,
    ...                            module="cma.evolution_strategy")
    """
    count = 0
    with warnings.catch_warnings():
        show = warnings.showwarning

        def hook(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            nonlocal count
            if issubclass(category, UserWarning) and str(message).startswith(_CMA_ORPHAN):
                count += 1
            else:
                show(message, category, *args, **kwargs)

        warnings.showwarning = hook
        warnings.filterwarnings(
            "always", message=_CMA_ORPHAN, category=UserWarning, module=r"cma\."
        )
        try:
            yield
        finally:
            if count:
                logger.info(
                    "cma warned %d times of an orphaned injected solution: round-off in "
                    "nevergrad's CMA wrapper, harmless",
                    count,
                )


def candidate_params(candidate: Any) -> dict:
    """The nested float parameters of a candidate asked from a ``ng.p.Dict`` parametrization.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> candidate_params(SimpleNamespace(value={"a.b": 1}))
    {'a': {'b': 1.0}}
    """
    return nested_floats(candidate.value.items())


@dataclass
class TellOverlap:
    """Whether a freed worker starts its next evaluation before the optimizer is told its last
    one (async mode, more than one worker).

    Telling first keeps the worker idle through ``tell`` and the next ``ask``; asking first lets
    ``tell`` run while the worker evaluates, but the new candidate cannot use that result (as
    if one more worker were in flight; the number in flight stays ``num_workers``), which costs
    some optimizers (CMA) quality. So it asks first only where that buys throughput, judged
    from running means of the three durations:

    * ``tell`` costs more than ``share`` of an evaluation (else there is little to overlap),
    * and an evaluation outlasts the optimizer's work for the other workers
      (``evaluation > (num_workers - 1) * (tell + ask)``); otherwise the loop waits on the
      optimizer either way.

    With NgIohTuned (ask + tell ~8 ms) and ~10 ms evaluations on 2 workers it asks first;
    with evaluations of a second, or of microseconds, it never does.

    Examples
    --------
    >>> overlap = TellOverlap()
    >>> overlap.ask_first(2)  # nothing measured yet
    False
    >>> overlap.note(tell=0.006, ask=0.0025, evaluation=0.010)
    >>> overlap.ask_first(2)
    True
    >>> TellOverlap(0.006, 0.0025, 30.0).ask_first(2)  # a long evaluation: tell is noise
    False
    >>> TellOverlap(0.006, 0.0025, 0.0001).ask_first(2)  # a cheap one: bound by the optimizer
    False
    """

    tell: float = 0.0
    ask: float = 0.0
    evaluation: float = 0.0
    share: float = 0.05
    weight: float = 0.25  # of the newest measurement in the running means

    def note(self, tell: float, ask: float, evaluation: float) -> None:
        """Add the seconds of one ``tell``, one ``ask`` and one evaluation (start to result)."""
        if self.evaluation == 0.0:
            self.tell, self.ask, self.evaluation = tell, ask, evaluation
            return
        self.tell += self.weight * (tell - self.tell)
        self.ask += self.weight * (ask - self.ask)
        self.evaluation += self.weight * (evaluation - self.evaluation)

    def ask_first(self, n_workers: int) -> bool:
        """Whether to start the next evaluation before telling the last one."""
        optimizer = (n_workers - 1) * (self.tell + self.ask)
        return (
            n_workers > 1
            and self.share * self.evaluation < self.tell
            and optimizer < (self.evaluation)
        )


@dataclass
class NevergradLoop:
    """Drives ``optimizer`` for one fit (its :class:`FitSession`): replay, batches, steady state.

    Every told evaluation is recorded in ``session.history`` as it is told; the evaluation
    callbacks see it at once (async, scipy) or when its batch was told (batch), and a step ends
    with the session's step callbacks. A stop request (``session.stop``) is polled before each
    ask: no new candidate is asked, the evaluations in flight are told, and the loop returns
    with ``session.stopped`` set. nevergrad is only touched on the calling thread.

    Examples
    --------
    >>> import nevergrad as ng
    >>> from chemfit.fitting.fitter_context import FitterEvaluateContext, FitterObjectiveFunctor
    >>> steps = []
    >>> session = FitSession(1, None, None, None, "nevergrad", "OnePlusOne", "batch", None, True,
    ...                      0.0, [FitterEvaluateContext()],
    ...                      FitterObjectiveFunctor(lambda p, c: p["x"] ** 2),
    ...                      step_callbacks=[(lambda step, ctxs: steps.append(step), 1)])
    >>> optimizer = ng.optimizers.OnePlusOne(ng.p.Dict(x=ng.p.Scalar(0.0)), budget=3)
    >>> NevergradLoop(session, optimizer).run_batches(budget=3)
    >>> steps, len(session.history)
    ([0, 1, 2], 3)
    """

    session: FitSession
    optimizer: Any
    _ask: float = field(default=0.0, init=False, repr=False)  # seconds of the last ask
    _finished: dict = field(default_factory=dict, init=False, repr=False)  # number -> time

    def replay(
        self,
        observations: list[tuple[dict[str, float], Any]],
        bad: float,
        *,
        tell: bool = True,
        n_resumed: int = 0,
    ) -> None:
        """Tell earlier observations: no objective call, no callback, no record.

        A ``None`` loss, or one that sanitises to ``bad`` (``value_bad_params``), is told as
        ``bad`` and never becomes the best. The others count for ``session.history.best()``
        (as ``contexts[0]``'s). The first ``n_resumed`` are a resumed fit's own records, which
        the history holds already: they are only told. With ``tell=False`` nothing is told
        (for optimizers that cannot take points they did not propose).
        """
        history = self.session.history
        optimizer = self.optimizer
        for number, (values, loss) in enumerate(observations):
            if loss is None:
                told, penalised = bad, True
            else:
                told, penalised = sanitise_loss(loss, bad, values)
                penalised = penalised or told == bad
            if tell:
                optimizer.suggest(values)
                optimizer.tell(optimizer.ask(), told)
            if number < n_resumed:
                continue
            if penalised:
                history._count_penalised_observation()
            else:
                history._observe(unflatten_dict(dict(values)), told)
        if observations and tell:
            logger.info("told %d initial observations", len(observations))

    def run_batches(self, budget: int) -> None:
        """Batch mode: ask ``num_workers`` candidates, evaluate, tell all; one step per batch."""
        session, optimizer = self.session, self.optimizer
        remaining, step = budget, session.step
        while remaining > 0 and not session.stop_requested():
            n = min(session.num_workers, remaining)
            candidates = [optimizer.ask() for _ in range(n)]
            params = [candidate_params(c) for c in candidates]
            try:
                losses = session.evaluate_batch(params, step)
            except Exception:
                session.notify()  # the finished evaluations of a failed batch
                raise
            session.notify()
            for candidate, loss in zip(candidates, losses):
                optimizer.tell(candidate, loss)
            session.end_step(step)
            remaining -= n
            step += 1

    def run_async(self, budget: int) -> None:
        """Steady state: up to ``num_workers`` evaluations in flight, each told on arrival.

        One submit-and-wait loop: each candidate is submitted with ``FitSession.start``, the
        loop waits for the first to finish, settles it with the session's fault policy (a lost
        one may be submitted again and stays in flight), tells and records it and submits the
        next. A step ends every ``num_workers`` tells. After a failure the evaluations in
        flight are waited for and recorded; after an interrupt, or when no worker is left,
        only those already finished.
        """
        session, optimizer = self.session, self.optimizer
        faults = session.faults
        n_workers = session.num_workers
        in_flight: list[Flight] = []
        free = list(range(n_workers))
        overlap = TellOverlap()
        asked = told = 0
        step, first = session.step, session.next_index
        try:
            while told < asked or (asked < budget and not session.stop_requested()):
                while free and asked < budget and not session.stop_requested():
                    in_flight.append(self._start(free.pop(0), first + asked))
                    asked += 1
                done = faults.wait(in_flight, wait_first)
                now = time.monotonic()
                error: Exception | None = None
                try:
                    for flight in sorted(done, key=lambda f: f.number):
                        try:
                            outcome = faults.settle(flight, session)
                        except Exception as exc:
                            error = error or exc
                            if faults.fatal is not None:
                                break  # it stays in flight: recorded as lost with the others
                            in_flight.remove(flight)
                            continue
                        if outcome is None:
                            continue  # submitted again: still in flight
                        in_flight.remove(flight)
                        seconds = self._finished.pop(flight.number, now) - flight.started
                        loss = self._record(flight, outcome, step)
                        if (
                            overlap.ask_first(n_workers)
                            and asked < budget
                            and not session.stop_requested()
                        ):
                            in_flight.append(self._start(flight.worker, first + asked))
                            asked += 1
                        else:
                            free.append(flight.worker)
                        started_tell = time.perf_counter()
                        optimizer.tell(flight.candidate, loss)
                        if seconds > 0:  # a retried try has no arrival time of its own
                            overlap.note(time.perf_counter() - started_tell, self._ask, seconds)
                        session.notify()
                        told += 1
                        if told % n_workers == 0 or told == budget:
                            session.end_step(step)
                            step += 1
                except Exception:  # a callback raised: keep what finished and what is running
                    self._record_in_flight(in_flight, step, quiet=True)
                    raise
                if faults.fatal is not None:  # no worker left: wait for nothing
                    self._give_up(in_flight, step)
                    raise error
                if error is not None:
                    self._record_in_flight(in_flight, step)
                    raise error
            if session.stopped and told % n_workers:
                session.end_step(step)  # the last, partial step of a stopped fit
        except KeyboardInterrupt:  # keep what already finished; wait for nothing
            self._record_in_flight(in_flight, step, quiet=True, wait_running=False)
            raise
        finally:
            for flight in in_flight:
                flight.future.cancel()

    def _start(self, worker: int, number: int) -> Flight:
        """Ask a candidate and start evaluating it in ``contexts[worker]``."""
        started = time.perf_counter()
        candidate = self.optimizer.ask()
        self._ask = time.perf_counter() - started
        flight = self.session.start(candidate_params(candidate), worker, number, candidate)
        finished = self._finished  # when the result arrived, not when the loop got to it
        flight.future.add_done_callback(
            lambda _future: finished.setdefault(number, time.monotonic())
        )
        return flight

    def _record(self, flight: Flight, outcome: Any, step: int) -> float:
        """Record a settled evaluation (before its context is reused); the loss to tell."""
        session = self.session
        loss = float(outcome.value)
        worker = flight.worker
        session.record(session.contexts[worker], flight.params, worker, loss, step, outcome)
        return loss

    def _give_up(self, in_flight: list[Flight], step: int) -> None:
        """No worker is left: record every evaluation still in flight (finished, or lost) and
        tell none of them; the fit ends."""
        session, faults = self.session, self.session.faults
        bad = session.objective.value_bad_params
        for flight in sorted(in_flight, key=lambda f: f.number):
            outcome = faults.unfinished(flight, bad)
            flight.future.cancel()
            worker = flight.worker
            session.record(
                session.contexts[worker], flight.params, worker, outcome.value, step, outcome
            )
        in_flight.clear()
        try:
            session.notify()
        except Exception:
            logger.debug("an evaluation callback failed on the last records", exc_info=True)

    def _record_in_flight(
        self,
        in_flight: list[Flight],
        step: int,
        *,
        quiet: bool = False,
        wait_running: bool = True,
    ) -> None:
        """After a failure: wait for the evaluations still running and record those that
        finish (nothing evaluated is lost); each one handled leaves ``in_flight``. With
        ``quiet``, an evaluation callback that raises again is only logged (the caller is
        already raising the first error). With ``wait_running=False`` (an interrupt: the user
        wants out), only the evaluations already finished are kept; the others stay in
        ``in_flight`` to be cancelled."""
        session = self.session
        for flight in sorted(in_flight, key=lambda f: f.number):
            if not flight.future.done() and not wait_running:
                continue
            outcome = None
            try:
                loss = flight.future.result()  # an interrupt while waiting propagates
            except Exception:
                loss = None  # a failed (or cancelled) evaluation has nothing to keep
                if session.faults.tolerant:  # unless every evaluation is to be recorded
                    outcome = session.faults.unfinished(flight, session.objective.value_bad_params)
            in_flight.remove(flight)
            if outcome is not None:
                worker = flight.worker
                session.record(
                    session.contexts[worker], flight.params, worker, outcome.value, step, outcome
                )
            elif loss is not None:
                worker = flight.worker
                session.record(
                    session.contexts[worker],
                    flight.params,
                    worker,
                    loss,
                    step,
                    Outcome(loss, tries=flight.tries),
                )
        try:
            session.notify()
        except Exception:
            if not quiet:
                raise
            logger.debug("an evaluation callback failed again on the last records", exc_info=True)
