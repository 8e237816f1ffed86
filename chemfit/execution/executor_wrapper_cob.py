"""Evaluate the terms of a combined objective on an executor.

:class:`ExecutorWrapperCOB` splits the terms of a
:class:`~chemfit.core.combined.CombinedObjectiveFunction` into tasks, runs them on an executor
(threads, processes, loky, Dask, ipyparallel, ...) and rebuilds the serial result on the
caller:

* the caller runs :meth:`~chemfit.core.combined.CombinedObjectiveFunction.prepare_context` and
  the child-context configurator (absolute term indices), so the children's ``config`` travels
  to the workers already configured;
* each task runs ``cob.evaluate_term`` for its terms, **exception handler included**, where the
  terms run; the children's result states come back and are applied to the caller's children;
* the caller filters and reduces the terms in term order, so the value is bitwise the serial
  one (R20) and ``ctx.meta`` has the serial structure.

Cheap terms are grouped: ``terms_per_task="auto"`` measures the term times of each call and
packs terms under about 5 ms into at most one task per worker. On a pool of this machine
(threads, a process pool, loky) it also times the grouped calls against a call evaluated in
the calling thread: when sending the terms costs more than it gains (two calls in a row
slower, or one 1.5 times slower), it evaluates them in the calling thread and tries the
executor again after 4, 8, ... 64 calls. While the executor wins narrowly, the inline time is
measured again now and then.

For executors in other processes the combined objective is pickled once per call and cached in
each worker process by a content hash, so a worker unpickles it only when it changed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from chemfit.core.context import EvaluateContext, ExecutorLike
from chemfit.core.exceptions import NotPicklableError
from chemfit.core.objectives import ObjectiveFunctor, ensure_context
from chemfit.execution.context_tasks import dumps_for_workers, loads_in_worker, rebuild_context
from chemfit.execution.executors import SerialExecutor, as_executor
from chemfit.execution.task_errors import (
    attach_worker_traceback,
    describe_object,
    portable_exception,
    translate_task_error,
)
from chemfit.execution.task_submission import (
    cancel_all,
    is_local_pool,
    is_loky_executor,
    is_stdlib_process_pool,
    runs_in_process,
    submit_all,
)
from chemfit.execution.worker_marks import MarkedCall, current_task_executor

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

_COB_METHODS = ("n_terms", "prepare_context", "evaluate_term", "filter_terms", "apply_reduction")


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


def _ship(cob: Any, executor: Any) -> Any:
    """What a task carries to name the objective: a :class:`_ShippedCOB`, or ``cob`` itself.

    The objective is pickled as :func:`~chemfit.execution.context_tasks.dumps_for_workers`
    does (``__main__`` definitions by value with cloudpickle). A failure raises
    :class:`NotPicklableError` before anything is submitted (R18) for process pools and loky;
    any other executor is handed the objective as it is, since it may have a serializer of its
    own.
    """
    try:
        data = dumps_for_workers(cob, executor)
    except NotPicklableError:
        if is_stdlib_process_pool(executor) or is_loky_executor(executor):
            raise
        logger.debug(
            "could not pre-pickle %r; handing it to %s as it is",
            cob,
            type(executor).__name__,
            exc_info=True,
        )
        return cob
    label = f"the combined objective ({describe_object(cob)})"
    return _ShippedCOB(hashlib.blake2b(data, digest_size=16).digest(), data, label)


class _PackedChildren:
    """Freshly configured child contexts in a compact form for another process.

    Carries what ``EvaluateContext.__getstate__`` would (parameters, config and meta of each
    child, and the ``shared`` namespace once), in fewer objects, which pickles faster.
    """

    __slots__ = ("items", "shared")

    def __init__(self, shared: Any, items: list[tuple]) -> None:
        self.shared = shared
        self.items = items

    def __reduce__(self):
        return (_PackedChildren, (self.shared, self.items))

    @classmethod
    def pack(cls, children: list[EvaluateContext]) -> _PackedChildren | list[EvaluateContext]:
        """Packed children, or ``children`` as they are when they are not plain contexts."""
        shared = children[0].shared
        if any(type(c) is not EvaluateContext or c.shared is not shared for c in children):
            return children
        return cls(shared, [(c.parameters, c.config, c.meta) for c in children])

    def unpack(self) -> list[EvaluateContext]:
        shared = self.shared
        return [
            rebuild_context(params, config, shared, meta) for params, config, meta in self.items
        ]


# -- the task -------------------------------------------------------------------------------------


def _evaluate_chunk(
    cob: Any,
    parameters: dict,
    indices: Sequence[int],
    children: Sequence[EvaluateContext] | _PackedChildren,
    remote: bool,
) -> tuple[list, list | None, list[float], tuple | None] | None:
    """Evaluate the terms ``indices`` in their child contexts, in order.

    Returns ``None`` when ``cob`` is a hash this worker process does not know, else
    ``(values, states, seconds, failure)``. ``states`` holds the result state of every
    term attempted (``None`` when the task runs in the caller's process, where the children are
    the caller's own objects). ``failure`` is ``None`` or ``(position, exception, traceback
    text)`` for a term whose exception handler raised; the terms after it are not run, as in a
    serial call.
    """
    if isinstance(cob, _ShippedCOB):
        cob = cob.load()
        if cob is None:
            return None
    if isinstance(children, _PackedChildren):
        children = children.unpack()
    values: list = []
    states: list | None = [] if remote else None
    seconds: list[float] = []
    failure = None
    clock = time.perf_counter
    for position, (idx, child) in enumerate(zip(indices, children)):
        start = clock()
        try:
            value = cob.evaluate_term(parameters, idx, child)
        except Exception as exc:
            seconds.append(clock() - start)
            exception, text = portable_exception(exc) if remote else (exc, None)
            failure = (position, exception, text)
        else:
            seconds.append(clock() - start)
            values.append(value)
        if states is not None:
            states.append(child.to_result_state())
        if failure is not None:
            break
    return values, states, seconds, failure


# -- planning ------------------------------------------------------------------------------------


def _worker_count(executor: Any) -> int:
    """How many tasks ``executor`` runs at once (a guess for unknown executors)."""
    if isinstance(executor, SerialExecutor):
        return 1
    for name in ("_max_workers", "max_workers", "_n_workers", "n_workers"):
        value = getattr(executor, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return os.cpu_count() or 1


def _fixed_chunks(n_terms: int, terms_per_task: int) -> list[list[int]]:
    return [
        list(range(start, min(start + terms_per_task, n_terms)))
        for start in range(0, n_terms, terms_per_task)
    ]


def _split_balanced(indices: list[int], seconds: Sequence[float], n_groups: int) -> list[list[int]]:
    """Cut ``indices`` into ``n_groups`` contiguous, non-empty groups of similar total time."""
    total = sum(seconds[i] for i in indices)
    groups: list[list[int]] = []
    current: list[int] = []
    elapsed = 0.0
    for position, idx in enumerate(indices):
        current.append(idx)
        elapsed += seconds[idx]
        groups_left = n_groups - len(groups) - 1
        items_left = len(indices) - position - 1
        if groups_left > 0 and (
            elapsed >= total * (len(groups) + 1) / n_groups or items_left == groups_left
        ):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


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
        """Median of the recent times of each term, or ``None`` until every term was timed."""
        with self._lock:
            if len(self._samples) != n_terms or not all(self._samples):
                return None
            return [sorted(s)[len(s) // 2] for s in self._samples]

    def record(self, n_terms: int, indices: Sequence[int], seconds: Sequence[float]) -> None:
        with self._lock:
            if len(self._samples) != n_terms:
                self._samples = [deque(maxlen=_N_TIME_SAMPLES) for _ in range(n_terms)]
            for idx, value in zip(indices, seconds):
                self._samples[idx].append(value)


class _InlineChooser:
    """Whether ``terms_per_task="auto"`` sends a call's terms to the executor or keeps them inline.

    Grouped calls on the executor are timed against calls that evaluated every term inline
    (the median of the last few); the first planned call runs inline to measure that. After
    ``_SLOW_CALLS_BEFORE_INLINE`` slower executor calls in a row, or one slower by
    ``_CLEAR_LOSS_RATIO`` or more, the terms run inline; every so many inline calls one call
    goes to the executor again (a retry), and the wait doubles each time the retry loses too.

    The inline time is measured again while the executor wins narrowly (by less than
    ``_CLEAR_LOSS_RATIO``): after 4 such wins one call runs inline (a probe), then after 8,
    ... up to 64. A first inline call slowed down by the machine would otherwise keep a losing
    executor for good. A different executor starts afresh. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: int | None = None
        self._inline_seconds: deque[float] = deque(maxlen=_N_TIME_SAMPLES)
        self._reset(None)

    def _reset(self, key: int | None) -> None:
        self._key = key
        self._back_on_executor()
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
            if not self._inline_seconds:
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

    def serial_seconds(self) -> float | None:
        """The median time of the recent inline calls (of two, the lower: noise only slows a
        call down), ``None`` before the first."""
        with self._lock:
            times = sorted(self._inline_seconds)
            return times[(len(times) - 1) // 2] if times else None

    def record(self, key: int, parallel_seconds: float) -> bool:
        """Record a grouped call on the executor; ``True`` when this switches to inline."""
        serial_seconds = self.serial_seconds()
        with self._lock:
            if key != self._key or serial_seconds is None:
                return False
            if parallel_seconds <= serial_seconds:
                self._back_on_executor()
                if _CLEAR_LOSS_RATIO * parallel_seconds > serial_seconds:
                    self._narrow_wins += 1
                    if self._narrow_wins >= self._probe_after:
                        self._narrow_wins = 0
                        self._probe_due = True
                        self._probe_after = min(2 * self._probe_after, _MAX_RETRY_AFTER)
                return False
            if self.inline:  # a retry that did not pay off: wait longer for the next one
                self._retry_after = min(2 * self._retry_after, _MAX_RETRY_AFTER)
                self._calls_to_retry = self._retry_after
                return False
            self._slow_calls += 1
            clear_loss = parallel_seconds >= _CLEAR_LOSS_RATIO * serial_seconds
            if self._slow_calls < _SLOW_CALLS_BEFORE_INLINE and not clear_loss:
                return False
            self.inline = True
            self._calls_to_retry = self._retry_after
            return True


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
    if missing or not hasattr(cob, "child_context_configurator"):
        raise TypeError(
            f"cob must be a CombinedObjectiveFunction, got {type(cob).__name__} "
            f"(missing: {', '.join(missing) or 'child_context_configurator'}); wrap your "
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
        pay. It times one call in the calling thread first; then, when the plan is a single
        task, or when two grouped calls in a row took longer than that (or one took 1.5 times
        as long), it evaluates the terms there. It tries the executor again after 4 inline
        calls, then 8, ... up to 64 while that stays true. While the executor wins by less
        than 1.5 times, it times a call in the calling thread again now and then (after 4,
        8, ... 64 such wins).

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
    * **Same result as the COB (R20).** The configurator runs here with absolute indices; each
      child's ``to_result_state()`` is applied to the caller's child; the reduction runs here
      in term order. Value and ``ctx.meta`` equal those of ``cob(parameters, ctx)``.
    * **Exception handlers** run in the task, next to the term that raised, exactly as
      ``cob.evaluate_term`` does serially; what they write into the child context comes back.
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

    def _choose_executor(self, ctx: EvaluateContext) -> Any:
        executor = as_executor(getattr(ctx, "executor", None))
        if executor is None:
            executor = as_executor(self.executor)
        return self._pool() if executor is None else executor

    # -- evaluation --------------------------------------------------------------------------

    def __call__(self, parameters: dict, ctx: EvaluateContext | None = None) -> float:
        ctx = ensure_context(ctx)
        cob = self.cob
        executor = self._choose_executor(ctx)
        if executor is current_task_executor():
            self._log_inline(executor)
            self.last_tasks = 0
            return cob(parameters, ctx)
        ctx = cob.prepare_context(parameters, ctx)
        n_terms = cob.n_terms()
        chunks, judged = self._plan(n_terms, executor)
        with ctx.child_contexts(n_terms, cob.child_context_configurator) as children:
            start = time.perf_counter()
            if chunks is None:
                self.last_tasks = 0
                terms = self._run_inline(parameters, children, n_terms)
                self._chooser.record_inline(time.perf_counter() - start)
            else:
                self.last_tasks = len(chunks)
                remote = not runs_in_process(executor)
                shipped = _ship(cob, executor) if remote else cob
                terms = self._run(executor, shipped, parameters, chunks, children, remote, n_terms)
                if judged:
                    self._judge(executor, time.perf_counter() - start)
        kept = cob.filter_terms(terms, ctx)
        ctx.loss = cob.apply_reduction(kept, ctx)
        return ctx.loss

    def _run_inline(
        self, parameters: dict, children: list[EvaluateContext], n_terms: int
    ) -> list[float | None]:
        """Evaluate every term in this thread, timed as on the executor (``"auto"`` chose it)."""
        indices = list(range(n_terms))
        values, _, seconds, failure = _evaluate_chunk(
            self.cob, parameters, indices, children, remote=False
        )
        self._times.record(n_terms, indices[: len(seconds)], seconds)
        if failure is not None:
            raise failure[1]
        return values

    def _judge(self, executor: Any, parallel_seconds: float) -> None:
        if not self._chooser.record(id(executor), parallel_seconds):
            return
        serial_seconds = self._chooser.serial_seconds() or 0.0
        with self._lock:
            first, self._auto_inline_logged = not self._auto_inline_logged, True
        logger.log(
            logging.INFO if first else logging.DEBUG,
            "%s(terms_per_task='auto'): on %s the grouped terms took %.3g ms per call against "
            "%.3g ms evaluated in this thread; evaluating them here from now on, and trying "
            "the executor again from time to time (an int terms_per_task always uses the "
            "executor)%s",
            type(self).__name__,
            type(executor).__name__,
            1e3 * parallel_seconds,
            1e3 * serial_seconds,
            " (logged once)" if first else "",
        )

    def _log_inline(self, executor: Any) -> None:
        with self._lock:
            if self._inline_logged:
                return
            self._inline_logged = True
        logger.info(
            "%s: the executor %s is already running this task; evaluating the terms inline "
            "in this thread to avoid a deadlock (logged once)",
            type(self).__name__,
            type(executor).__name__,
        )

    def _plan(self, n_terms: int, executor: Any) -> tuple[list[list[int]] | None, bool]:
        """The chunks of term indices to submit (``None``: evaluate inline), and whether to
        time the call against inline calls."""
        terms_per_task = self.terms_per_task
        if terms_per_task != "auto":
            return _fixed_chunks(n_terms, terms_per_task), False
        seconds = self._times.estimates(n_terms)
        if seconds is None:
            return _fixed_chunks(n_terms, 1), False
        chunks = _auto_chunks(seconds, _worker_count(executor))
        if not is_local_pool(executor):  # remote workers may see files, programs this one lacks
            return chunks, False
        if len(chunks) == 1 or not self._chooser.use_executor(id(executor)):
            return None, False  # one task cannot beat this thread, it only adds the round trip
        return chunks, True

    def _run(
        self,
        executor: Any,
        shipped: Any,
        parameters: dict,
        chunks: list[list[int]],
        children: list[EvaluateContext],
        remote: bool,
        n_terms: int,
    ) -> list[float | None]:
        task = MarkedCall(_evaluate_chunk, executor)
        first = shipped
        if isinstance(shipped, _ShippedCOB):
            with self._lock:
                if self._shipped_to == (id(executor), shipped.token):
                    first = shipped.without_data()

        def task_args(chunk: list[int], cob: Any) -> tuple:
            chunk_children = [children[i] for i in chunk]
            if remote:
                chunk_children = _PackedChildren.pack(chunk_children)
            return (cob, parameters, chunk, chunk_children, remote)

        futures = submit_all(executor, task, [task_args(chunk, first) for chunk in chunks])
        pending = deque(zip(chunks, futures))
        terms: list[float | None] = [None] * n_terms
        failures: list[tuple[int, BaseException]] = []
        finished = False
        try:
            while pending:
                chunk, future = pending.popleft()
                try:
                    output = future.result()
                except Exception as exc:
                    failures.append((chunk[0], self._translate(exc, chunk, parameters, executor)))
                    continue
                if output is None:  # that worker lacks the objective: send it this time
                    logger.debug("resending terms %s with the objective's data", chunk)
                    (retry,) = submit_all(executor, task, [task_args(chunk, shipped)])
                    futures.append(retry)
                    pending.append((chunk, retry))
                    continue
                values, states, seconds, failure = output
                if states is not None:
                    for idx, state in zip(chunk, states):
                        children[idx].apply_result_state(state)
                for idx, value in zip(chunk, values):
                    terms[idx] = value
                self._times.record(n_terms, chunk, seconds)
                if failure is not None:
                    position, exception, text = failure
                    failures.append((chunk[position], attach_worker_traceback(exception, text)))
            finished = True
        finally:
            if not finished:  # KeyboardInterrupt and the like: drop what has not started
                cancel_all(futures)
        if isinstance(shipped, _ShippedCOB) and not failures:
            with self._lock:
                self._shipped_to = (id(executor), shipped.token)
        if failures:
            raise min(failures, key=lambda item: item[0])[1]
        return terms

    def _translate(
        self, exc: BaseException, chunk: list[int], parameters: dict, executor: Any
    ) -> BaseException:
        """A task's own failure (not a term's): WorkerLostError, NotPicklableError or as is."""
        return translate_task_error(
            exc,
            executor,
            index=chunk[0],
            parameters=parameters,
            subject=f"terms {chunk[0]}..{chunk[-1]}",
            lost_detail="",
            lost_tail="; create a new executor to continue",
            pickled_what="the parameters, the child contexts or the results",
        )
