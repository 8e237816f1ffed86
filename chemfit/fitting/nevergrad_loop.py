"""The loops that drive a nevergrad optimizer: replayed observations, batch mode, async mode.

Every step ends with ``flush(step)`` (record the told evaluations) and ``dispatch(step)`` (run
the step callbacks), both supplied by the :class:`~chemfit.fitting.fitter.Fitter`. nevergrad
is only touched on the calling (main) thread.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from chemfit.core.flatdict import unflatten_dict
from chemfit.execution.executor_utils import map_with_context
from chemfit.fitting.fit_session import FitSession
from chemfit.fitting.fitter_context import sanitise_loss
from chemfit.fitting.parameter_space import nested_floats

__all__ = ["NevergradLoop", "candidate_params", "quiet_cma_injections"]

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
class NevergradLoop:
    """Drives ``optimizer`` for one fit, evaluating with ``objective`` in ``contexts``.

    Attributes
    ----------
    session : FitSession
        Evaluations are staged in it; it holds the executor.
    optimizer
        A nevergrad optimizer over a ``ng.p.Dict`` of flat keys.
    contexts : sequence of FitterEvaluateContext
        One per worker.
    objective : callable
        The :class:`~chemfit.fitting.fitter_context.FitterObjectiveFunctor`.
    flush, dispatch : callable
        Called with the step index when a step ends: record its evaluations, run callbacks.
    stop_requested : callable, optional
        Polled between evaluations; once it returns true, no new candidate is asked, the
        evaluations in flight are told, and the loop returns (``session.stopped`` is set).
    first_step : int
        The index of the loop's first step (a resumed fit continues the earlier steps).

    Examples
    --------
    >>> import nevergrad as ng
    >>> from chemfit.fitting.fitter_context import FitterEvaluateContext, FitterObjectiveFunctor
    >>> session = FitSession(1, None, None, None, "nevergrad", "OnePlusOne", "batch", None, True,
    ...                      0.0)
    >>> optimizer = ng.optimizers.OnePlusOne(ng.p.Dict(x=ng.p.Scalar(0.0)), budget=3)
    >>> steps = []
    >>> loop = NevergradLoop(session, optimizer, [FitterEvaluateContext()],
    ...                      FitterObjectiveFunctor(lambda p, c: p["x"] ** 2),
    ...                      flush=lambda step: session.flush(step, []), dispatch=steps.append)
    >>> loop.run_batches(budget=3)
    >>> steps, len(session.history)
    ([0, 1, 2], 3)
    """

    session: FitSession
    optimizer: Any
    contexts: Sequence[Any]
    objective: Callable[..., Any]
    flush: Callable[[int], None]
    dispatch: Callable[[int], None]
    stop_requested: Callable[[], bool] = lambda: False
    first_step: int = 0

    def _should_stop(self) -> bool:
        if self.stop_requested():
            self.session.stopped = True
        return self.session.stopped

    def replay(
        self, observations: list[tuple[dict[str, float], Any]], bad: float, *, tell: bool = True
    ) -> None:
        """Tell earlier observations: counted in ``contexts[0]``, no objective call, no callback.

        A ``None`` loss, or one that sanitises to ``bad`` (``value_bad_params``), is told as
        ``bad`` and never becomes the best. With ``tell=False`` they are only counted (for
        optimizers that cannot take points they did not propose).
        """
        ctx = self.contexts[0]
        optimizer = self.optimizer
        for values, loss in observations:
            if loss is None:
                told, penalised = bad, True
            else:
                told, penalised = sanitise_loss(loss, bad, values)
                penalised = penalised or told == bad
            if tell:
                optimizer.suggest(values)
                candidate = optimizer.ask()
                optimizer.tell(candidate, told)
            ctx.n_evals += 1
            self.session.n_observations += 1
            if not penalised:
                self.session.observe(told, unflatten_dict(dict(values)), {})
            if not penalised and (ctx.opt_loss is None or told < ctx.opt_loss):
                ctx.opt_params = unflatten_dict(dict(values))
                ctx.opt_meta = {}
                ctx.opt_quantities = None
                ctx.opt_loss = told
        if observations and tell:
            logger.info("told %d initial observations", len(observations))

    def run_batches(self, budget: int) -> None:
        """Batch mode: ask ``num_workers`` candidates, evaluate, tell all; one step per batch."""
        session, optimizer = self.session, self.optimizer
        remaining, step = budget, self.first_step
        while remaining > 0 and not self._should_stop():
            n = min(session.num_workers, remaining)
            candidates = [optimizer.ask() for _ in range(n)]
            try:
                losses = session.evaluate_batch(
                    self.objective, self.contexts, [candidate_params(c) for c in candidates]
                )
            except Exception:
                self.flush(step)  # the batch's finished evaluations go to the history
                raise
            for candidate, loss in zip(candidates, losses):
                optimizer.tell(candidate, loss)
            self.flush(step)
            self.dispatch(step)
            remaining -= n
            step += 1

    def _evaluate_slot(self, executor: Any, params: dict, ctx: Any) -> float:
        """Runs in a driver thread: one evaluation on the executor, state applied to ``ctx``."""
        return map_with_context(executor, self.objective, [params], ctxs=[ctx])[0]

    def _record_in_flight(
        self,
        in_flight: dict[Any, tuple[int, Any, dict, int]],
        step: int,
        *,
        quiet: bool = False,
        wait_running: bool = True,
    ) -> None:
        """After a failure: wait for the evaluations still running and keep those that finish
        in the history (nothing evaluated is lost); each one handled leaves ``in_flight``.
        With ``quiet``, an evaluation callback that raises again while they are recorded is
        only logged (the caller is already raising the first error). With
        ``wait_running=False`` (an interrupt: the user wants out), only the evaluations
        already finished are kept; the others stay in ``in_flight`` to be cancelled."""
        for future in sorted(in_flight, key=lambda f: in_flight[f][0]):
            if not future.done():
                if not wait_running:
                    continue
                wait([future])  # an interrupt while waiting propagates (the rest stay)
            _, _, params, slot = in_flight.pop(future)
            if future.cancelled() or future.exception() is not None:
                continue  # a failed (or interrupted) evaluation has nothing to keep
            self.session.stage(self.contexts[slot], params, slot, float(future.result()))
        try:
            self.flush(step)
        except Exception:
            if not quiet:
                raise
            logger.debug("an evaluation callback failed again on the last records", exc_info=True)

    def run_async(self, budget: int) -> None:
        """Steady state: up to ``num_workers`` evaluations in flight, each told on arrival.

        Driver threads wait on the executor (through ``map_with_context``, so error handling
        and context states are those of a batch); a step ends every ``num_workers`` tells.
        """
        session, optimizer = self.session, self.optimizer
        n_workers = session.num_workers
        drivers = ThreadPoolExecutor(n_workers, thread_name_prefix="chemfit-async")
        in_flight: dict[Any, tuple[int, Any, dict, int]] = {}
        free = list(range(n_workers))
        asked = told = 0
        step = self.first_step
        try:
            while told < asked or (asked < budget and not self._should_stop()):
                while free and asked < budget and not self._should_stop():
                    slot = free.pop(0)
                    candidate = optimizer.ask()
                    params = candidate_params(candidate)
                    ctx = self.contexts[slot]
                    ctx.reset()
                    future = drivers.submit(self._evaluate_slot, session.executor, params, ctx)
                    in_flight[future] = (asked, candidate, params, slot)
                    asked += 1
                done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                error: Exception | None = None
                try:
                    for future in sorted(done, key=lambda f: in_flight[f][0]):
                        _, candidate, params, slot = in_flight.pop(future)
                        try:
                            loss = float(future.result())
                        except Exception as exc:
                            error = error or exc
                            continue
                        optimizer.tell(candidate, loss)
                        session.stage(self.contexts[slot], params, slot, loss)
                        self.flush(step)
                        told += 1
                        free.append(slot)
                        if told % n_workers == 0 or told == budget:
                            self.dispatch(step)
                            step += 1
                except Exception:  # a callback raised: keep what finished and what is running
                    self._record_in_flight(in_flight, step, quiet=True)
                    raise
                if error is not None:
                    self._record_in_flight(in_flight, step)
                    raise error
            if self.session.stopped and told % n_workers:
                self.dispatch(step)  # the last, partial step of a stopped fit
        except KeyboardInterrupt:  # keep what already finished; wait for nothing
            self._record_in_flight(in_flight, step, quiet=True, wait_running=False)
            raise
        finally:
            for future in in_flight:
                future.cancel()
            drivers.shutdown(wait=False, cancel_futures=True)
