"""Evaluate the terms of a combined objective on an executor.

:class:`ExecutorWrapperCOB` splits the terms of a
:class:`~chemfit.core.combined.CombinedObjectiveFunction` into tasks, runs them on an executor
(threads, processes, loky, Dask, ipyparallel, ...) and rebuilds the serial result on the
caller:

* the combined objective's own recipe runs on the caller
  (:meth:`~chemfit.core.combined.CombinedObjectiveFunction.evaluate`): it prepares the context,
  runs the child-context configurator (absolute term indices), so the children's ``config``
  travels to the workers already configured, and filters and reduces the terms in term order,
  so the value is bitwise the serial one (R20) and ``ctx.meta`` is the serial one;
* the wrapper supplies only how the terms run (``run_terms``): each task runs ``cob.run_term``
  for its terms, **exception handler included**, where the terms run; the children's result
  states (with the children's own sub-evaluations collected) come back and are applied to the
  caller's children.

Cheap terms are grouped: ``terms_per_task="auto"`` measures the term times of each call and
packs terms under about 5 ms into at most one task per worker. On a pool of this machine
(threads, a process pool, loky) it also times the grouped calls against what the terms cost in
the calling thread (on a process pool the sum of the term times its workers measured, on a
thread pool a call evaluated inline): when sending the terms costs more than it gains (two
calls in a row slower, or one 1.5 times slower), it evaluates them in the calling thread and
tries the executor again after 4, 8, ... 64 calls. On a thread pool, while the executor wins
narrowly, the inline time is measured again now and then.

For executors in other processes the combined objective is pickled once per call and cached in
each worker process by a content hash, so a worker unpickles it only when it changed.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import logging
import math
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from chemfit.core.context import EvaluateContext, ExecutorLike
from chemfit.core.objectives import ObjectiveFunctor, ensure_context
from chemfit.execution.context_tasks import dumps_for_workers, loads_in_worker
from chemfit.execution.executor_info import ExecutorInfo, executor_info
from chemfit.execution.executors import as_executor
from chemfit.execution.submission import ContextFuture, ContextSubmitter
from chemfit.execution.task_errors import describe_object, translate_task_error
from chemfit.execution.worker_marks import current_task_executor

if TYPE_CHECKING:
    from typing_extensions import Self

    from chemfit.core.combined import CombinedObjectiveFunction

__all__ = ["ExecutorWrapperCOB"]

logger = logging.getLogger(__name__)

#: Terms faster than this (seconds) are grouped by ``terms_per_task="auto"``.
CHEAP_TERM_SECONDS = 5e-3
#: ``"auto"`` does not split cheap terms into tasks shorter than this (seconds) ...
_MIN_TASK_SECONDS = 1e-3
#: ... and estimates a term's time as the median of its last few measurements.
_N_TIME_SAMPLES = 3
#: ``"auto"`` goes inline after this many grouped calls in a row slower than serial, or after
#: one that took this many times the serial estimate (a clear loss, not noise), ...
_SLOW_CALLS_BEFORE_INLINE = 2
_CLEAR_LOSS_RATIO = 1.5
#: ... and tries the executor again after this many inline calls, doubling up to the maximum.
_FIRST_RETRY_AFTER = 4
_MAX_RETRY_AFTER = 64

_COB_METHODS = ("n_terms", "evaluate", "run_term")


# -- shipping the objective to worker processes --------------------------------------------------

_WORKER_CACHE_SIZE = 4
_worker_cache: OrderedDict[bytes, Any] = OrderedDict()
_worker_cache_lock = threading.Lock()


class _ShippedCOB:
    """A pickled combined objective (or only its content hash) for worker processes.

    A worker process unpickles it once and keeps it (a few per process) under its hash, so
    later tasks and later calls with an unchanged objective reuse the same object, including
    any caches its terms hold. Once an executor has received an objective, tasks carry only
    the hash (``data=None``); a worker that does not have it answers with a miss and the task
    is sent again with the data. A worker that cannot unpickle it raises
    :class:`NotPicklableError` naming it (``label``).
    """

    __slots__ = ("data", "label", "token")

    def __init__(self, token: bytes, data: bytes | None, label: str = "the combined objective"):
        self.token = token
        self.data = data
        self.label = label

    def __reduce__(self):
        return (_ShippedCOB, (self.token, self.data, self.label))

    def without_data(self) -> _ShippedCOB:
        return _ShippedCOB(self.token, None, self.label)

    def load(self) -> Any:
        """The objective from this process's cache, else unpickled; ``None`` on a miss."""
        with _worker_cache_lock:
            cob = _worker_cache.get(self.token)
            if cob is not None:
                _worker_cache.move_to_end(self.token)
                return cob
        if self.data is None:
            return None
        cob = loads_in_worker(self.data, self.label)
        with _worker_cache_lock:
            _worker_cache[self.token] = cob
            while len(_worker_cache) > _WORKER_CACHE_SIZE:
                _worker_cache.popitem(last=False)
        return cob


class _ObjectiveMissing(Exception):
    """A worker process lacks the objective that a task names by its hash only."""


class _ShippedTerms:
    """The task function for other processes: ``run_term`` of a shipped objective.

    Called as ``fn(parameters, idx, child)`` in the worker; raises :class:`_ObjectiveMissing`
    when the worker does not have the objective and the task carries only its hash.
    """

    __slots__ = ("_cob", "shipped")

    def __init__(self, shipped: _ShippedCOB) -> None:
        self.shipped = shipped
        self._cob: Any = None

    def __reduce__(self):
        return (_ShippedTerms, (self.shipped,))

    def __call__(self, parameters: dict, idx: int, child: EvaluateContext) -> float | None:
        cob = self._cob
        if cob is None:
            cob = self._cob = self.shipped.load()
            if cob is None:
                raise _ObjectiveMissing("the combined objective is not in this worker's cache")
        return cob.run_term(parameters, idx, child)


def _ship(cob: Any, info: ExecutorInfo) -> _ShippedCOB:
    """The objective pickled for the workers of ``info``, named by a content hash.

    Pickled as :func:`~chemfit.execution.context_tasks.dumps_for_workers` does (``__main__``
    definitions by value with cloudpickle); a failure raises :class:`NotPicklableError`
    before anything is submitted (R18).
    """
    data = dumps_for_workers(cob, info)
    label = f"the combined objective ({describe_object(cob)})"
    return _ShippedCOB(hashlib.blake2b(data, digest_size=16).digest(), data, label)


# -- planning ------------------------------------------------------------------------------------


def _fixed_chunks(n_terms: int, terms_per_task: int) -> list[list[int]]:
    return [
        list(range(start, min(start + terms_per_task, n_terms)))
        for start in range(0, n_terms, terms_per_task)
    ]


def _split_balanced(indices: list[int], seconds: Sequence[float], n_groups: int) -> list[list[int]]:
    """Cut ``indices`` into ``n_groups`` contiguous, non-empty groups of similar total time.

    Each cut goes where the running total comes closest to its share of the total, so equal
    terms split evenly (a cut made only once a share is exceeded leaves one group a term
    longer: 5 and 3 of 8 equal terms when the times wobble).
    """
    n_groups = max(1, min(n_groups, len(indices)))
    running = list(itertools.accumulate((seconds[i] for i in indices), initial=0.0))
    total = running[-1]
    cuts = [0]
    for group in range(1, n_groups):
        target = total * group / n_groups
        # the cut after position `cut`: at least one item per group before and after it
        low, high = cuts[-1] + 1, len(indices) - (n_groups - group)
        cut = min(max(bisect.bisect_left(running, target, low, high + 1), low), high)
        if cut > low and target - running[cut - 1] <= running[cut] - target:
            cut -= 1
        cuts.append(cut)
    cuts.append(len(indices))
    return [indices[start:end] for start, end in itertools.pairwise(cuts)]


def _auto_chunks(seconds: Sequence[float], n_workers: int) -> list[list[int]]:
    """Expensive terms alone; cheap terms in at most ``n_workers`` contiguous groups.

    The tasks are ordered by decreasing estimated time, so the longest start first.
    """
    expensive = [[i] for i, s in enumerate(seconds) if s >= CHEAP_TERM_SECONDS]
    cheap = [i for i, s in enumerate(seconds) if s < CHEAP_TERM_SECONDS]
    chunks = expensive
    if cheap:
        cheap_total = sum(seconds[i] for i in cheap)
        n_groups = max(1, min(n_workers, len(cheap), math.floor(cheap_total / _MIN_TASK_SECONDS)))
        chunks = expensive + _split_balanced(cheap, seconds, n_groups)
    chunks.sort(key=lambda chunk: -sum(seconds[i] for i in chunk))
    return chunks


class _TermTimes:
    """The recent wall times of each term, for ``terms_per_task="auto"``; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._samples: list[deque] = []

    def estimates(self, n_terms: int) -> list[float] | None:
        """Median of the recent times of each term (of two, the lower: a term slowed down once
        by the machine is not taken for an expensive one), or ``None`` until every term was
        timed."""
        with self._lock:
            if len(self._samples) != n_terms or not all(self._samples):
                return None
            return [_low_median(s) for s in self._samples]

    def record(self, n_terms: int, indices: Sequence[int], seconds: Sequence[float]) -> None:
        with self._lock:
            if len(self._samples) != n_terms:
                self._samples = [deque(maxlen=_N_TIME_SAMPLES) for _ in range(n_terms)]
            for idx, value in zip(indices, seconds):
                self._samples[idx].append(value)


class _InlineChooser:
    """Whether ``terms_per_task="auto"`` sends a call's terms to the executor or keeps them inline.

    Grouped calls on the executor are timed against what the terms cost in the calling thread:
    the median of the last few calls that evaluated every term inline and, on a process pool
    (stdlib or loky), the sum of the term times its workers measured (the median of the last
    few calls): a worker process runs a term as fast as this thread would, so no inline call is
    needed to know it, and a fresh figure comes with every call. Of the two, the lower counts
    (load only slows a call down). On a thread pool the workers' times are no guide (threads
    that hold the GIL slow each other down), so the first planned call runs inline to measure.

    After ``_SLOW_CALLS_BEFORE_INLINE`` slower executor calls in a row, or one slower by
    ``_CLEAR_LOSS_RATIO`` or more (when the median of the last few executor calls is too: one
    call held up by the machine is not a clear loss), the terms run inline; every so many
    inline calls one call goes to the executor again (a retry), and the wait doubles each time
    the retry loses too.

    Without the workers' times, the inline time is measured again while the executor wins
    narrowly (by less than ``_CLEAR_LOSS_RATIO``): after 4 such wins in a row one call runs
    inline (a probe), then after 8, ... up to 64. A first inline call slowed down by the machine
    would otherwise keep a losing executor for good. A clear win ends the streak, so a few
    calls slowed by the machine do not make one. A different executor starts afresh.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: int | None = None
        self._inline_seconds: deque[float] = deque(maxlen=_N_TIME_SAMPLES)
        self._worker_seconds: deque[float] = deque(maxlen=_N_TIME_SAMPLES)
        self._parallel_seconds: deque[float] = deque(maxlen=_N_TIME_SAMPLES)
        self._reset(None)

    def _reset(self, key: int | None) -> None:
        self._key = key
        self._back_on_executor()
        self._worker_seconds.clear()
        self._parallel_seconds.clear()
        self._narrow_wins = 0
        self._probe_after = _FIRST_RETRY_AFTER
        self._probe_due = False

    def _back_on_executor(self) -> None:
        self.inline = False
        self._slow_calls = 0
        self._retry_after = _FIRST_RETRY_AFTER
        self._calls_to_retry = 0

    def use_executor(self, key: int) -> bool:
        """Whether the next call goes to the executor identified by ``key``."""
        with self._lock:
            if key != self._key:
                self._reset(key)
            if not self._inline_seconds and not self._worker_seconds:
                return False  # first measure what an inline call costs
            if self._probe_due:
                self._probe_due = False
                return False  # measure it again
            if not self.inline or self._calls_to_retry <= 0:
                return True
            self._calls_to_retry -= 1
            return False

    def record_inline(self, seconds: float) -> None:
        """Record the time of a call that evaluated every term inline."""
        with self._lock:
            self._inline_seconds.append(seconds)

    def record_worker_seconds(self, key: int, seconds: float) -> None:
        """Record the summed term times that the worker processes of ``key`` measured in a call."""
        with self._lock:
            if key != self._key:
                self._reset(key)
            self._worker_seconds.append(seconds)

    def record_unjudged(self, key: int, parallel_seconds: float) -> None:
        """Record a call on the executor made before there was anything to judge it by (one
        task per term, before the terms were timed): a reference for later calls."""
        with self._lock:
            if key != self._key:
                self._reset(key)
            self._parallel_seconds.append(parallel_seconds)

    def serial_seconds(self) -> float | None:
        """What the terms of a call cost inline: the lower of the median of the recent inline
        calls and that of the workers' summed term times (of two, the lower: noise only slows a
        call down); ``None`` before either is known."""
        with self._lock:
            return self._serial_seconds()

    def _serial_seconds(self) -> float | None:
        estimates = [
            _low_median(samples)
            for samples in (self._inline_seconds, self._worker_seconds)
            if samples
        ]
        return min(estimates) if estimates else None

    def record(self, key: int, parallel_seconds: float) -> bool:
        """Record a grouped call on the executor; ``True`` when this switches to inline."""
        with self._lock:
            serial_seconds = self._serial_seconds()
            if key != self._key or serial_seconds is None:
                return False
            self._parallel_seconds.append(parallel_seconds)
            if parallel_seconds <= serial_seconds:
                self._back_on_executor()
                self._count_narrow_win(_CLEAR_LOSS_RATIO * parallel_seconds > serial_seconds)
                return False
            self._narrow_wins = 0
            if self.inline:  # a retry that did not pay off: wait longer for the next one
                self._retry_after = min(2 * self._retry_after, _MAX_RETRY_AFTER)
                self._calls_to_retry = self._retry_after
                return False
            self._slow_calls += 1
            # a clear loss by the recent calls too, not one call that the machine held up
            recent = min(parallel_seconds, _low_median(self._parallel_seconds))
            clear_loss = recent >= _CLEAR_LOSS_RATIO * serial_seconds
            if self._slow_calls < _SLOW_CALLS_BEFORE_INLINE and not clear_loss:
                return False
            self.inline = True
            self._calls_to_retry = self._retry_after
            return True

    def _count_narrow_win(self, narrow: bool) -> None:
        if not narrow or self._worker_seconds:  # the workers' times keep the estimate fresh
            self._narrow_wins = 0
            return
        self._narrow_wins += 1
        if self._narrow_wins >= self._probe_after:
            self._narrow_wins = 0
            self._probe_due = True
            self._probe_after = min(2 * self._probe_after, _MAX_RETRY_AFTER)


def _low_median(samples: Sequence[float]) -> float:
    """The median of ``samples``; of an even number, the lower middle one."""
    ordered = sorted(samples)
    return ordered[(len(ordered) - 1) // 2]


# -- the wrapper ---------------------------------------------------------------------------------


def _check_terms_per_task(value: Any) -> int | Literal["auto"]:
    if isinstance(value, str):
        if value == "auto":
            return value
        raise ValueError(
            f"terms_per_task must be a positive int or 'auto', got {value!r}; "
            "use 'auto' to group cheap terms, or 1 for one task per term"
        )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"terms_per_task must be a positive int or 'auto', got {value!r} "
            f"({type(value).__name__}); use 'auto' or e.g. 1"
        )
    if value < 1:
        raise ValueError(f"terms_per_task must be >= 1, got {value}; use 1 for one task per term")
    return value


def _check_cob(cob: Any) -> None:
    missing = [name for name in _COB_METHODS if not callable(getattr(cob, name, None))]
    if missing:
        raise TypeError(
            f"cob must be a CombinedObjectiveFunction, got {type(cob).__name__} "
            f"(missing: {', '.join(missing)}); wrap your "
            "objective functions in CombinedObjectiveFunction([...]) first"
        )


def _shutdown_pool(pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=False)


class ExecutorWrapperCOB(ObjectiveFunctor):
    """Evaluates the terms of a combined objective on an executor, with the serial result.

    Parameters
    ----------
    cob : CombinedObjectiveFunction
        The combined objective; its terms, weights, configurator, reduction and exception
        handler are used as they are at each call.
    executor : ExecutorLike, optional
        Where the terms run, unless the context passed to a call has an ``executor``. Anything
        :func:`~chemfit.execution.executors.as_executor` accepts.
    terms_per_task : int or "auto", default "auto"
        Number of contiguous terms in one task; ``1`` is one task per term, and every term
        goes to the executor. ``"auto"`` starts with one task per term, then uses the measured
        term times: a term of 5 ms or more gets its own task and the cheaper terms are packed
        into at most one task per worker. On a pool of this machine (threads, a process pool,
        loky), ``"auto"`` also keeps the terms in the calling thread when the executor does not
        pay. What the terms cost there is the sum of the term times the workers measured (a
        process pool), or the time of a call evaluated in the calling thread (a thread pool,
        whose threads share the GIL; its first planned call runs inline to measure it). When
        the plan is a single task, or when two grouped calls in a row took longer than that (or
        one took 1.5 times as long), it evaluates the terms there. It tries the executor again
        after 4 inline calls, then 8, ... up to 64 while that stays true. On a thread pool,
        while the executor wins by less than 1.5 times, it times a call in the calling thread
        again now and then (after 4, 8, ... 64 such wins in a row).

    Attributes
    ----------
    cob : CombinedObjectiveFunction
    executor : ExecutorLike or None
    terms_per_task : int or "auto"
    last_tasks : int or None
        How many tasks the last call submitted; ``0`` when it evaluated the terms in the
        calling thread, ``None`` before the first call.

    Notes
    -----
    * **Which executor.** ``ctx.executor``, else :attr:`executor`, else a thread pool the
      wrapper creates on first use and reuses (R12); :meth:`close`, leaving a ``with`` block,
      or garbage collection shuts that pool down. A user's executor is never shut down.
    * **No deadlock on a shared pool (R11).** When the chosen executor is the one running the
      current task (for instance the Fitter's pool, or the same pool for a nested wrapper), the
      terms are evaluated inline in this thread and an INFO line says so once.
    * **Same result as the COB (R20).** The wrapper calls ``cob.evaluate(parameters, ctx,
      run_terms=...)``: the configurator runs here with absolute indices; each child's
      ``to_result_state()`` (its own sub-evaluations collected) is applied to the caller's
      child; the reduction runs here in term order. Value and ``ctx.meta`` equal those of
      ``cob(parameters, ctx)``.
    * **Exception handlers** run in the task, next to the term that raised, exactly as
      ``cob.run_term`` does serially; what they write into the child context comes back.
      When a handler re-raises, the other tasks still finish, their children are applied, and
      the exception of the lowest term index is raised (with the worker's traceback as its
      ``__cause__`` when it came from another process). A handler's log lines (e.g. the
      WARNING of ``nan_exception_handler``) are emitted in the process that ran the term.
    * **Other processes.** The objective is pickled once per call and each worker process
      keeps the last few it received under their content hash; once an executor has the
      current objective, tasks carry only the hash. A changed objective (new weights, terms,
      ...) has another hash, so workers never use a stale copy.
    * **Pickling.** The wrapper is picklable; the executor and the pool are dropped, so an
      unpickled copy uses ``ctx.executor`` or its own thread pool. A process pool (stdlib or
      loky) that cannot pickle the objective raises
      :class:`~chemfit.core.exceptions.NotPicklableError` before anything is submitted (R18);
      a dead worker process raises :class:`~chemfit.core.exceptions.WorkerLostError`.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> from chemfit.core.combined import CombinedObjectiveFunction
    >>> cob = CombinedObjectiveFunction(
    ...     [lambda p: p["x"], lambda p: 2 * p["x"], lambda p: 3 * p["x"]], weights=[1.0, 0.5, 2.0]
    ... )
    >>> ctx = EvaluateContext()
    >>> with ThreadPoolExecutor(2) as pool, ExecutorWrapperCOB(cob, pool) as wrapped:
    ...     wrapped({"x": 1.0}, ctx)
    8.0
    >>> cob({"x": 1.0}), ctx.meta["n_terms"], [c["loss"] for c in ctx.meta["children"]]
    (8.0, 3, [1.0, 2.0, 3.0])
    """

    def __init__(
        self,
        cob: CombinedObjectiveFunction,
        executor: ExecutorLike | None = None,
        *,
        terms_per_task: int | Literal["auto"] = "auto",
    ) -> None:
        _check_cob(cob)
        self.cob = cob
        self.executor = as_executor(executor)
        self.terms_per_task = terms_per_task
        self._init_runtime_state()

    @property
    def terms_per_task(self) -> int | Literal["auto"]:
        """Terms per task: a positive int, or ``"auto"``; checked on assignment.

        Examples
        --------
        >>> from chemfit.core.combined import CombinedObjectiveFunction
        >>> wrapped = ExecutorWrapperCOB(CombinedObjectiveFunction([lambda p: 1.0]))
        >>> wrapped.terms_per_task = 4
        >>> wrapped.terms_per_task = 0
        Traceback (most recent call last):
        ...
        ValueError: terms_per_task must be >= 1, got 0; use 1 for one task per term
        """
        return self._terms_per_task

    @terms_per_task.setter
    def terms_per_task(self, value: int | Literal["auto"]) -> None:
        self._terms_per_task = _check_terms_per_task(value)

    def _init_runtime_state(self) -> None:
        self._lock = threading.Lock()
        self._own_pool: ThreadPoolExecutor | None = None
        self._finalizer: weakref.finalize | None = None
        self._inline_logged = False
        self._auto_inline_logged = False
        self._times = _TermTimes()
        self._chooser = _InlineChooser()
        self.last_tasks: int | None = None
        self._info: ExecutorInfo | None = None  # of the executor last chosen
        # (id(executor), hash) of the objective last sent with its data: a hint that the
        # workers have it, so tasks can carry the hash alone
        self._shipped_to: tuple[int, bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Shut down the thread pool this wrapper created, if any; never a user's executor.

        A later call creates a new pool.

        Examples
        --------
        >>> from chemfit.core.combined import CombinedObjectiveFunction
        >>> wrapped = ExecutorWrapperCOB(CombinedObjectiveFunction([lambda p: 1.0]))
        >>> wrapped({})
        1.0
        >>> wrapped.close()
        """
        with self._lock:
            pool, self._own_pool = self._own_pool, None
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        if pool is not None:
            pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"cob": self.cob, "terms_per_task": self.terms_per_task}

    def __setstate__(self, state: dict) -> None:
        self.cob = state["cob"]
        self._terms_per_task = state["terms_per_task"]
        self.executor = None
        self._init_runtime_state()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(cob={self.cob!r}, executor={self.executor!r}, "
            f"terms_per_task={self.terms_per_task!r})"
        )

    def _pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._own_pool is None:
                pool = ThreadPoolExecutor(thread_name_prefix="chemfit-ExecutorWrapperCOB")
                self._own_pool = pool
                self._finalizer = weakref.finalize(self, _shutdown_pool, pool)
                logger.debug("%s created its thread pool %r", type(self).__name__, pool)
            return self._own_pool

    def _choose_executor(self, ctx: EvaluateContext) -> ExecutorInfo:
        """``ctx.executor``, else :attr:`executor`, else the own pool; worked out once."""
        executor = as_executor(getattr(ctx, "executor", None))
        if executor is None:
            executor = as_executor(self.executor)
        if executor is None:
            executor = self._pool()
        info = self._info
        # an executor chemfit does not know may turn out to run in this process: ask again
        if info is None or info.executor is not executor or info.kind == "other":
            info = self._info = executor_info(executor, owned=executor is self._own_pool)
        return info

    # -- evaluation --------------------------------------------------------------------------

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        info = self._choose_executor(ctx)
        if info.executor is current_task_executor():
            self._log_inline(info)
            self.last_tasks = 0
            return self.cob(parameters, ctx)
        return self.cob.evaluate(
            parameters,
            ctx,
            run_terms=lambda params, children: self._run_terms(info, params, children),
        )

    def _run_terms(
        self, info: ExecutorInfo, parameters: dict, children: list[EvaluateContext]
    ) -> list[float | None]:
        """The ``run_terms`` of one call: inline, or in tasks on the executor."""
        chunks, judged = self._plan(len(children), info)
        start = time.perf_counter()
        if chunks is None:
            self.last_tasks = 0
            terms = self._run_inline(parameters, children)
            self._chooser.record_inline(time.perf_counter() - start)
            return terms
        self.last_tasks = len(chunks)
        terms = self._run(info, parameters, chunks, children)
        if judged:
            self._judge(info, time.perf_counter() - start)
        elif self.terms_per_task == "auto" and info.on_this_machine:
            self._chooser.record_unjudged(id(info.executor), time.perf_counter() - start)
        return terms

    def _run_inline(self, parameters: dict, children: list[EvaluateContext]) -> list[float | None]:
        """Evaluate every term in this thread, timed as on the executor (``"auto"`` chose it)."""
        cob = self.cob
        clock = time.perf_counter
        terms: list[float | None] = []
        seconds: list[float] = []
        try:
            for idx, child in enumerate(children):
                start = clock()
                try:
                    terms.append(cob.run_term(parameters, idx, child))
                finally:
                    seconds.append(clock() - start)
        finally:
            self._times.record(len(children), range(len(seconds)), seconds)
        return terms

    def _judge(self, info: ExecutorInfo, parallel_seconds: float) -> None:
        if not self._chooser.record(id(info.executor), parallel_seconds):
            return
        serial_seconds = self._chooser.serial_seconds() or 0.0
        with self._lock:
            first, self._auto_inline_logged = not self._auto_inline_logged, True
        logger.log(
            logging.INFO if first else logging.DEBUG,
            "%s(terms_per_task='auto'): on %s the grouped terms took %.3g ms per call against "
            "%.3g ms for the terms in this thread; evaluating them here from now on, and trying "
            "the executor again from time to time (an int terms_per_task always uses the "
            "executor)%s",
            type(self).__name__,
            info.name,
            1e3 * parallel_seconds,
            1e3 * serial_seconds,
            " (logged once)" if first else "",
        )

    def _log_inline(self, info: ExecutorInfo) -> None:
        with self._lock:
            if self._inline_logged:
                return
            self._inline_logged = True
        logger.info(
            "%s: the executor %s is already running this task; evaluating the terms inline "
            "in this thread to avoid a deadlock (logged once)",
            type(self).__name__,
            info.name,
        )

    def _plan(self, n_terms: int, info: ExecutorInfo) -> tuple[list[list[int]] | None, bool]:
        """The chunks of term indices to submit (``None``: evaluate inline), and whether to
        time the call against inline calls."""
        terms_per_task = self.terms_per_task
        if terms_per_task != "auto":
            return _fixed_chunks(n_terms, terms_per_task), False
        seconds = self._times.estimates(n_terms)
        if seconds is None:
            return _fixed_chunks(n_terms, 1), False
        chunks = _auto_chunks(seconds, info.n_workers)
        if not info.on_this_machine:  # remote workers may see files, programs this one lacks
            return chunks, False
        if len(chunks) == 1 or not self._chooser.use_executor(id(info.executor)):
            return None, False  # one task cannot beat this thread, it only adds the round trip
        return chunks, True

    def _task_function(self, info: ExecutorInfo) -> tuple[Any, _ShippedCOB | None]:
        """What the tasks run as ``fn(parameters, idx, child)``, and the shipped objective.

        In this process the objective's own ``run_term``; elsewhere a :class:`_ShippedTerms`
        that carries the objective's data, or only its hash once this executor received it.
        """
        if info.in_process:
            return self.cob.run_term, None
        shipped = _ship(self.cob, info)
        with self._lock:
            known = self._shipped_to == (id(info.executor), shipped.token)
        return _ShippedTerms(shipped.without_data() if known else shipped), shipped

    def _run(
        self,
        info: ExecutorInfo,
        parameters: dict,
        chunks: list[list[int]],
        children: list[EvaluateContext],
    ) -> list[float | None]:
        """Run ``chunks`` of terms as tasks; apply their states; raise the first failure."""
        fn, shipped = self._task_function(info)
        translate = _task_error_translator(info, parameters)
        submitter = ContextSubmitter(info, fn, stop_at_first_error=True, translate=translate)
        resender: ContextSubmitter | None = None  # with the objective's data, after a miss

        def group(chunk: list[int]) -> tuple[list[tuple], int]:
            return [(parameters, idx, children[idx]) for idx in chunk], chunk[0]

        futures = submitter.submit_all([group(chunk) for chunk in chunks])
        pending: deque[tuple[list[int], ContextFuture]] = deque(zip(chunks, futures))
        timed = self.terms_per_task == "auto"  # only "auto" plans from the term times
        worker_seconds = 0.0  # the sum of the term times measured in the workers
        terms: list[float | None] = [None] * len(children)
        failures: list[tuple[int, BaseException]] = []
        finished = False
        try:
            while pending:
                chunk, future = pending.popleft()
                try:
                    values, errors = future.settle()
                except Exception as exc:  # the task as a whole: a lost worker, pickling
                    failures.append((chunk[0], exc))
                    continue
                if errors and isinstance(errors.get(0), _ObjectiveMissing):
                    logger.debug("resending terms %s with the objective's data", chunk)
                    if resender is None:
                        resender = ContextSubmitter(
                            info,
                            _ShippedTerms(shipped),
                            stop_at_first_error=True,
                            translate=translate,
                        )
                    (retry,) = resender.submit_all([group(chunk)])
                    futures.append(retry)
                    pending.append((chunk, retry))
                    continue
                if timed:
                    seconds = [outcome.seconds for outcome in future.outcomes()]
                    self._times.record(len(children), chunk, seconds)
                    worker_seconds += sum(seconds)
                for idx, value in zip(chunk, values):
                    terms[idx] = value
                if errors:
                    failures.extend((chunk[position], error) for position, error in errors.items())
            finished = True
        finally:
            if not finished:  # KeyboardInterrupt and the like: drop what has not started
                for future in futures:
                    future.cancel()
        if shipped is not None and not failures:
            with self._lock:
                self._shipped_to = (id(info.executor), shipped.token)
        if timed and info.local_pool and not failures:  # what the terms cost inline, unmeasured
            self._chooser.record_worker_seconds(id(info.executor), worker_seconds)
        if failures:
            raise min(failures, key=lambda item: item[0])[1]
        return terms


def _task_error_translator(info: ExecutorInfo, parameters: dict) -> Any:
    """A term's own error is raised as it is (from another process: the original exception
    caused by a ``RemoteEvaluationError`` with the worker's traceback); a task that failed as
    a whole (terms ``index..last``) becomes WorkerLostError, NotPicklableError or stays."""

    def translate(exc: BaseException, index: int, last: int | None) -> BaseException:
        if last is None or isinstance(exc, _ObjectiveMissing):
            return exc
        return translate_task_error(
            exc,
            info,
            index=index,
            parameters=parameters,
            subject=f"terms {index}..{last}",
            lost_detail="",
            lost_tail="; create a new executor to continue",
            pickled_what="the parameters, the child contexts or the results",
        )

    return translate
