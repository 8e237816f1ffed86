"""Evaluate the terms of a :class:`CombinedObjectiveFunction` across MPI ranks.

Every rank builds the same combined objective and wraps it in :class:`MPIWrapperCOB`. Rank 0
drives: each call runs the combined objective's own recipe
(:meth:`~chemfit.core.combined.CombinedObjectiveFunction.evaluate`), so the child-context
configurator runs for **all** children on rank 0 and the reduction runs there over the terms in
term order: the value is bitwise equal to the serial one and ``ctx.meta`` is the serial one
(R20). The wrapper supplies only how the terms run: it splits them into balanced contiguous
slices over all ranks (rank 0 included), sends each worker rank its slice, evaluates its own
slice, and applies the workers' results (``cob.run_term`` on each rank, sub-evaluations
collected) to the children in term order.

Wire protocol (internal, see ``Signal``): rank 0 sends point-to-point messages to the workers;
each worker answers every ``EVALUATE`` message with exactly one ``RESULT`` message. A message
body is a pickle made by this module, so its size can be counted (R21). A request carries the
wire form of the children of the worker's slice, or, when the objective has no child-context
configurator, only the parent's ``config`` and ``shared``: the worker then spawns those
children itself, exactly as the recipe does on rank 0, and the request goes out before rank 0
starts the recipe, so the worker computes while rank 0 spawns and runs its own slice.

Waiting (``_WaitPolicy``): blocking receives and broadcasts are busy-polling loops in MPICH
that would keep an idle rank at 100 % of a core, so waiting ranks poll with non-blocking
probes instead. A worker polls without sleeping for a short while after each reply, because
the next call of a running fit follows soon, and then sleeps for a growing fraction of its idle
time; rank 0, waiting for replies within a call, spins longer and sleeps at most 1 ms.

A rank that does not answer (``timeout``): rank 0 waits at most ``timeout`` seconds from
sending a worker its terms, then raises :class:`RankTimeoutError` naming the rank and its term
slice. The world cannot be used any more (the rank can neither answer nor be released), so the
wrapper aborts every rank (``MPI_Abort``) as soon as the error has propagated: when the wrapper
is closed (leaving its ``with`` block), called again, or when the program exits. ``MPI_Abort``
ends rank 0 too, so rank 0 first writes the error to stderr (and logs it at CRITICAL where
logging is set up) and flushes stdout, stderr and the logging handlers. A fit's evaluation
callbacks (``JSONLinesHistory``) and checkpoints have run by then, since the error propagated
through the fit first.

Importing this module imports mpi4py; without it the import raises an ``ImportError`` naming
the ``mpi`` extra.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pickle
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

from chemfit.core.combined import CombinedObjectiveFunction
from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import (
    NotPicklableError,
    RankTimeoutError,
    RemoteEvaluationError,
)
from chemfit.core.objectives import ObjectiveFunctor, ensure_context
from chemfit.core.utils import check_timeout
from chemfit.execution.task_errors import RemoteFailure

if TYPE_CHECKING:
    from typing_extensions import Self


def _missing_mpi_message(error: BaseException) -> str:
    """The message of the ``ImportError`` raised when mpi4py (or its MPI library) is missing.

    Examples
    --------
    >>> "chemfit[mpi]" in _missing_mpi_message(ImportError("No module named 'mpi4py'"))
    True
    """
    return (
        "chemfit.mpi_wrapper_cob needs mpi4py and an MPI library, which the 'mpi' extra "
        f"installs: pip install 'chemfit[mpi]' (import failed with: {error})"
    )


try:
    from mpi4py import MPI
except ImportError as _error:  # pragma: no cover - mpi4py is installed in the test venv
    raise ImportError(_missing_mpi_message(_error)) from _error

__all__ = ["MPIWrapperCOB", "RankTimeoutError", "Signal", "slice_up_range"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

_PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL


def slice_up_range(n: int, n_ranks: int) -> Iterator[tuple[int, int]]:
    """Split ``range(n)`` into ``n_ranks`` balanced contiguous slices.

    One ``(start, end)`` pair (``end`` exclusive) is yielded per rank, in rank order. Slice
    sizes differ by at most one; the first ``n % n_ranks`` ranks get the larger ones. With more
    ranks than items the last ranks get empty slices ``(n, n)``.

    Parameters
    ----------
    n : int
        Number of items (terms), ``>= 0``.
    n_ranks : int
        Number of ranks, ``>= 1``.

    Yields
    ------
    tuple[int, int]
        ``(start, end)`` of each rank's slice.

    Raises
    ------
    ValueError
        If ``n`` is negative or ``n_ranks`` is smaller than 1 (or either is not an int).

    Examples
    --------
    >>> list(slice_up_range(10, 4))
    [(0, 3), (3, 6), (6, 8), (8, 10)]
    >>> list(slice_up_range(2, 3))
    [(0, 1), (1, 2), (2, 2)]
    """
    for name, value, lowest in (("n", n, 0), ("n_ranks", n_ranks, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")
    base, extra = divmod(n, n_ranks)
    start = 0
    for rank in range(n_ranks):
        end = start + base + (1 if rank < extra else 0)
        yield (start, end)
        start = end


class Signal(Enum):
    """Kinds of messages of the internal wire protocol (each maps to one MPI tag).

    ``ABORT`` releases a worker from :meth:`MPIWrapperCOB.worker_loop` (as upstream).

    Examples
    --------
    >>> Signal.ABORT.value
    -1
    >>> Signal.EVALUATE.tag != Signal.RESULT.tag
    True
    """

    ABORT = -1
    EVALUATE = 1
    RESULT = 2

    @property
    def tag(self) -> int:
        """The MPI tag that carries this kind of message."""
        return _TAG_BASE + self.value

    @classmethod
    def from_tag(cls, tag: int) -> Signal:
        """The signal carried by MPI tag ``tag``."""
        return cls(tag - _TAG_BASE)


_TAG_BASE = 7700
_RESULT_TAG = Signal.RESULT.tag


@dataclass(frozen=True)
class _WaitPolicy:
    """How a rank waits for a message: spin first, then sleep a growing fraction of the wait.

    For the first ``spin`` seconds of a wait the rank polls without sleeping (yielding the core
    to any other runnable process between polls), so a message that comes soon, as the next
    call of a running fit does, is noticed within microseconds. After that it sleeps between
    polls for ``fraction`` of the time waited beyond ``spin``, within ``[min_sleep,
    max_sleep]``: a late message costs at most about ``fraction`` of the wait (plus the
    timer's slack of ~0.1 ms), and a long wait costs only ``1 / max_sleep`` wake-ups a second.
    """

    spin: float
    fraction: float
    min_sleep: float
    max_sleep: float

    def sleep_after(self, waited: float) -> float:
        """Seconds to sleep before the next poll after ``waited`` seconds (0: just yield)."""
        beyond = waited - self.spin
        if beyond < 0:
            return 0.0
        return min(self.max_sleep, max(self.min_sleep, self.fraction * beyond))


# Workers: a fit calls again after its optimizer's ask and tell (a few ms, ~10 ms for
# NgIohTuned), so a worker spins for 20 ms after each reply; idle for longer, it sleeps 0.5 %
# of its idle time (the first call after an idle second waits ~5 ms more), at most 10 ms
# (under 1 % of a core once no fit runs). Rank 0 waits only within a call, where it has
# nothing else to do: it spins for 100 ms, then sleeps 1 % of the wait, at most 1 ms.
_WORKER_WAIT = _WaitPolicy(spin=20e-3, fraction=0.005, min_sleep=50e-6, max_sleep=10e-3)
_ROOT_WAIT = _WaitPolicy(spin=100e-3, fraction=0.01, min_sleep=50e-6, max_sleep=1e-3)

# More ranks than cores on a node: a rank that spins takes CPU time from one that computes,
# so ranks spin only briefly (the hops of a cheap call) before they sleep.
_SHARED_CORE_SPIN = 1e-3

_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def _a_core_for_each_rank(comm: Any) -> bool:
    """Whether the ranks of ``comm`` on this node may run on at least as many cores as there
    are such ranks (their CPU affinities together), so that waiting without sleeping costs no
    other rank anything. Collective over ``comm``."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        if hasattr(os, "sched_getaffinity"):
            cpus = set(os.sched_getaffinity(0))
        else:  # pragma: no cover - macOS and Windows
            cpus = set(range(os.cpu_count() or 1))
        usable = set().union(*local.allgather(cpus))
        return local.Get_size() <= len(usable)
    finally:
        local.Free()


def _poll(test: Callable[[], T | None], policy: _WaitPolicy) -> T:
    """Call ``test`` until it returns something other than ``None``, waiting as ``policy``
    says in between."""
    result = test()
    if result is not None:
        return result
    clock = time.perf_counter
    started = clock()
    while True:
        pause = policy.sleep_after(clock() - started)
        if pause:
            time.sleep(pause)
        else:
            _yield()
        result = test()
        if result is not None:
            return result


def _poll_until(test: Callable[[], T | None], policy: _WaitPolicy, deadline: float) -> T | None:
    """:func:`_poll` that gives up at ``deadline`` (a ``time.perf_counter()`` value) and
    returns ``None`` then; ``test`` is always tried at least once."""
    clock = time.perf_counter
    started = clock()
    while True:
        result = test()
        if result is not None:
            return result
        now = clock()
        if now >= deadline:
            return None
        pause = policy.sleep_after(now - started)
        if pause:
            time.sleep(min(pause, deadline - now))
        else:
            _yield()


def _flush_output() -> None:
    """Flush stdout, stderr and every logging handler (before ``MPI_Abort`` ends us)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream
            stream.flush()
    logging.shutdown()


@dataclass
class _Failure:
    """A failure while evaluating (or sending back) the terms of one request."""

    # "exception" (a term raised), "term_count", or a pickling failure: "unpicklable_result"
    # (the worker could not pickle its results), "bad_request" (the worker could not load the
    # request), "bad_reply" (rank 0 could not load the reply)
    kind: str
    term_index: int | None
    remote: RemoteFailure | None = None  # the exception, as every remote failure travels
    n_terms: int | None = None  # the worker's term count (kind "term_count")


@dataclass
class _Reply:
    """A worker's answer to one ``EVALUATE`` request."""

    call_id: int
    rank: int
    start: int
    results: list[tuple[Any, dict]] = field(default_factory=list)  # (term value, result state)
    error: _Failure | None = None


@dataclass
class _Exchange:
    """The requests of one call to the worker ranks, from sending until all replies are in."""

    call_id: int
    n_terms: int
    slices: list[tuple[int, int]]
    requests: list[Any]  # the Isend requests (their buffers wait in _pending_payloads)
    params: Any = None  # the call's parameters (named when a rank does not answer)
    sent_at: float = 0.0  # time.perf_counter() when the requests went out


def _captured(kind: str, exc: BaseException, term_index: int | None, rank: int) -> _Failure:
    return _Failure(kind, term_index, RemoteFailure.capture(exc, where=f"rank {rank}"))


_STOCK_RECIPE = ("evaluate", "_kept_terms", "prepare_context")
_STOCK_SPAWN = ("child_contexts", "spawn_children", "_new_child")


def _workers_can_spawn(cob: Any, ctx: EvaluateContext) -> bool:
    """Whether the children of this call are known before the recipe spawns them.

    Without a child-context configurator, the stock recipe spawns blank children of ``ctx``:
    a copy of its ``config`` and its ``shared`` each, nothing else. Workers can then spawn
    their own children from those two and start before rank 0 has spawned, configured and
    pickled any. A subclass that overrides a step of the recipe or of spawning might change
    the children, so it gets the general path (rank 0 sends the children it spawned).
    """
    if getattr(cob, "child_context_configurator", True) is not None:
        return False
    cob_type, ctx_type = type(cob), type(ctx)
    return all(
        getattr(cob_type, name, None) is getattr(CombinedObjectiveFunction, name)
        for name in _STOCK_RECIPE
    ) and all(
        getattr(ctx_type, name, None) is getattr(EvaluateContext, name) for name in _STOCK_SPAWN
    )


class MPIWrapperCOB(ObjectiveFunctor):
    """Evaluate a :class:`CombinedObjectiveFunction` with its terms spread over MPI ranks.

    Build the same objective on every rank, open ``with MPIWrapperCOB(cob) as mpi:``, call
    ``mpi(params, ctx)`` (or run a ``Fitter``) on rank 0 and ``mpi.worker_loop()`` on every
    other rank. Leaving the ``with`` block on rank 0 releases the workers.

    Parameters
    ----------
    cob : CombinedObjectiveFunction
        The objective; every rank must hold an equivalent one (same terms in the same order).
    comm : mpi4py.MPI.Comm, optional
        The communicator. Default: a duplicate of ``MPI.COMM_WORLD``, freed by :meth:`close`.
        Creating the wrapper is collective over it, so construct it on every rank.
    mpi_debug_log : bool
        Log every message sent and received at WARNING as ``"[Rank r] ..."``.
    timeout : float, optional
        Seconds rank 0 waits for a worker rank to answer one call, from sending it its terms
        (so the worker's whole slice must finish within it). ``None`` (the default) waits for
        ever. A rank that does not answer in time makes rank 0 raise
        :class:`RankTimeoutError` naming the rank and its terms; every rank is then aborted
        (``MPI_Abort``) once the error has propagated (see Notes).

    Attributes
    ----------
    cob, comm, rank, size
        The objective, the communicator, this rank and the number of ranks.
    serialises_calls : bool
        Always ``True``: concurrent calls are served one at a time (R10), so a fitter can say
        that its candidates are evaluated one after another.
    last_call_bytes_sent : int
        Bytes rank 0 sent to the workers in the last call (a debugging aid for R21).
    bytes_sent : int
        Bytes sent by this rank over the wrapper's lifetime.

    Notes
    -----
    Rank 0 runs the child-context configurator for all children, with absolute indices, and
    sends each worker the children of its slice (their ``parameters``, ``config``, ``shared``
    and ``meta``, never ``"children"``). Anything a configurator puts into ``child_ctx.temp``
    therefore stays on rank 0; the terms of other ranks see an empty ``temp``. Without a
    configurator (and with the stock recipe) the children are blank copies of the parent, so
    each worker gets only the parent's ``config`` and ``shared`` and spawns the children of its
    slice itself, before rank 0 has spawned its own.

    A worker rank polls without sleeping for 20 ms after each reply, then sleeps for 0.5 % of
    the time it has been idle (at most 10 ms): a fit's next call finds it awake, and an idle
    worker uses about 2 % of a core over its first 2 s and under 1 % afterwards. With more
    ranks than cores on a node, ranks poll without sleeping for 1 ms only.

    A term exception on a worker is raised on rank 0 after every rank has answered: the
    exception itself ``from`` a :class:`~chemfit.exceptions.RemoteEvaluationError` naming the
    rank and term, or only the ``RemoteEvaluationError`` when the exception cannot be pickled.
    With several failures the first in term order wins. Workers stay in :meth:`worker_loop`.

    A rank that did not answer within ``timeout`` (stopped, hanging, or computing for longer)
    can neither answer later nor be released, so after :class:`RankTimeoutError` the wrapper
    aborts all ranks with ``MPI_Abort``: when it is closed (the end of its ``with`` block, also
    on the exception), when it is called again (a retry), or at the latest when the program
    exits. A fit on rank 0 ends with the error first, so its history and checkpoint callbacks
    hold every finished evaluation; resume it with ``load_observations``. ``MPI_Abort`` ends
    rank 0 too, so the error is written to stderr just before (with stdout and the logging
    handlers flushed). Under ``mpiexec`` a rank that dies takes the others with it at once
    (``mpiexec`` kills them); what a fit's callbacks wrote up to then stays on disk.

    Examples
    --------
    A single-rank communicator evaluates everything on rank 0:

    >>> from mpi4py import MPI
    >>> from chemfit.core.combined import CombinedObjectiveFunction
    >>> cob = CombinedObjectiveFunction([lambda p: p["x"], lambda p: 2 * p["x"]])
    >>> with MPIWrapperCOB(cob, comm=MPI.COMM_SELF) as mpi:
    ...     mpi({"x": 1.5})
    4.5
    """

    serialises_calls: bool = True

    def __init__(
        self,
        cob: CombinedObjectiveFunction,
        comm: Any | None = None,
        mpi_debug_log: bool = False,
        *,
        timeout: float | None = None,
    ) -> None:
        self.timeout = check_timeout(timeout)
        self.cob = cob
        self._owns_comm = comm is None
        self.comm = MPI.COMM_WORLD.Dup() if comm is None else comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self._wait = _ROOT_WAIT if self.rank == 0 else _WORKER_WAIT
        if self.size > 1 and not _a_core_for_each_rank(self.comm):
            # a spinning rank would take CPU time from a rank computing on the same core
            self._wait = replace(self._wait, spin=_SHARED_CORE_SPIN)
        self._status = MPI.Status()
        self.mpi_debug_log = mpi_debug_log
        self.last_call_bytes_sent = 0
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._call_id = 0
        self._released = False
        self._closed = False
        # Replies still owed by each worker (after an interrupted call); drained before reuse.
        self._owed: dict[int, int] = {}
        self._pending_payloads: list[bytes] = []
        self._early: _Exchange | None = None  # requests sent before the recipe started
        self._broken: RankTimeoutError | None = None  # a rank did not answer: abort the world

    # -- small helpers --------------------------------------------------------------------

    def _debug(self, message: str, *args: Any) -> None:
        if self.mpi_debug_log:
            logger.warning("[Rank %d] " + message, self.rank, *args)

    def _isend(self, data: bytes, dest: int, signal: Signal) -> Any:
        self._debug("Isend %s (%d bytes) to rank %d", signal.name, len(data), dest)
        self.bytes_sent += len(data)
        return self.comm.Isend([data, MPI.BYTE], dest=dest, tag=signal.tag)

    def _wait_all(self, requests: list[Any]) -> None:
        if requests:
            _poll(lambda: True if MPI.Request.Testall(requests) else None, self._wait)

    def _try_receive(self, source: int, tag: int) -> tuple[int, Signal, bytearray] | None:
        """Receive one message with ``tag`` from ``source`` if one has arrived; else ``None``."""
        status = self._status
        message = self.comm.Improbe(source, tag, status)
        if message is None:
            return None
        buffer = bytearray(status.Get_count(MPI.BYTE))
        request = message.Irecv([buffer, MPI.BYTE])
        if not request.Test():  # a large message may still be on its way
            _poll(lambda: True if request.Test() else None, self._wait)
        received = Signal.from_tag(status.Get_tag())
        self._debug(
            "received %s (%d bytes) from rank %d", received.name, len(buffer), status.Get_source()
        )
        return status.Get_source(), received, buffer

    def _check_rank(self, want_root: bool, method: str) -> None:
        if (self.rank == 0) != want_root:
            where = "rank 0" if want_root else "ranks other than 0"
            fix = (
                "call the wrapper on rank 0 and worker_loop() on the other ranks"
                if want_root
                else "call worker_loop() on the other ranks and the wrapper itself on rank 0"
            )
            raise RuntimeError(
                f"MPIWrapperCOB.{method} runs on {where} only, but this is rank {self.rank}; {fix}"
            )

    # -- rank 0 -----------------------------------------------------------------------------

    def __call__(self, params: dict, ctx: EvaluateContext | None = None) -> float:
        """Evaluate the objective at ``params``; rank 0 only.

        Parameters
        ----------
        params : dict
            The parameters.
        ctx : EvaluateContext, optional
            The context; its ``meta`` ends up as after a serial call of the objective.

        Returns
        -------
        float
            The reduced loss, bitwise equal to ``cob(params, ctx)``.
        """
        self._check_rank(True, "__call__")
        ctx = ensure_context(ctx)
        with self._lock:
            if self._broken is not None:  # a caller goes on (a retry): nothing can run
                self._abort_world()
            if self._released and self.size > 1:
                raise RuntimeError(
                    "MPIWrapperCOB was called after release_workers() or close(); the worker "
                    "ranks have left worker_loop(), so create a new wrapper on every rank"
                )
            self._drain_owed_replies()
            return self._evaluate(params, ctx)

    def _evaluate(self, params: dict, ctx: EvaluateContext) -> float:
        self.last_call_bytes_sent = 0
        # Where the workers can spawn their children themselves, their requests go out before
        # the recipe starts, so they work while rank 0 spawns and runs its own slice.
        early = self.size > 1 and _workers_can_spawn(self.cob, ctx)
        self._early = self._send_requests(params, self.cob.n_terms(), ctx) if early else None
        try:
            return self.cob.evaluate(params, ctx, run_terms=self._run_terms)
        finally:
            exchange, self._early = self._early, None
            if exchange is not None:  # the recipe failed before run_terms (R9)
                self._finish(exchange)

    def _run_terms(self, params: dict, children: list[EvaluateContext]) -> list[Any]:
        """The ``run_terms`` of one call: rank 0's slice here, the others' on their ranks."""
        n_terms = len(children)
        exchange, self._early = self._early, None
        if exchange is None or exchange.n_terms != n_terms:  # (a stale one is answered, skipped)
            exchange = self._send_requests(params, n_terms, children)
        requests = exchange.requests
        terms: list[Any] = [None] * n_terms
        local_error: BaseException | None = None
        replies: list[_Reply] = []
        # A large request travels only while rank 0 calls MPI: test it between own terms
        # until it has gone (a small one has gone at once).
        sending = bool(requests) and not MPI.Request.Testall(requests)
        try:
            run_term = self.cob.run_term
            start, end = exchange.slices[0]
            for idx in range(start, end):
                try:
                    terms[idx] = run_term(params, idx, children[idx])
                except Exception as exc:
                    local_error = exc
                    break
                if sending:
                    sending = not MPI.Request.Testall(requests)
        finally:
            # Complete this evaluation's exchange even when the slice above failed (R9).
            replies = self._finish(exchange)
        for reply in replies:
            for offset, (value, state) in enumerate(reply.results):
                terms[reply.start + offset] = value
                children[reply.start + offset].apply_result_state(state)
        self._raise_first_error(local_error, replies, n_terms)
        return terms

    def _send_requests(
        self, params: dict, n_terms: int, source: list[EvaluateContext] | EvaluateContext
    ) -> _Exchange:
        """Pickle every worker's request first, then send them all without blocking.

        ``source`` is either the children the recipe spawned (each worker gets the wire form
        of its slice) or, before the recipe, the parent context: each worker then spawns the
        children of its slice from the parent's ``config`` and ``shared`` (one body for all).
        """
        self._call_id += 1
        slices = list(slice_up_range(n_terms, self.size))
        parent = source if isinstance(source, EvaluateContext) else None
        common = None  # the one body for all workers when they spawn their children
        payloads: list[tuple[int, bytes]] = []
        for rank, (start, end) in enumerate(slices):
            if rank == 0 or start == end:
                continue
            if parent is None:
                body = self._body(
                    params, source[start:end], None, f"{start}..{end - 1} to rank {rank}"
                )
            else:
                where = f"{start}..{n_terms - 1} to ranks {rank}..{self.size - 1}"
                common = common or self._body(params, None, parent, where)
                body = common
            # The header loads even where the body does not, so a worker can always answer.
            header = (self._call_id, n_terms, start, end, body)
            payloads.append((rank, pickle.dumps(header, protocol=_PICKLE_PROTOCOL)))
        requests = []
        for rank, data in payloads:
            requests.append(self._isend(data, rank, Signal.EVALUATE))
            self.last_call_bytes_sent += len(data)
            self._owed[rank] = self._owed.get(rank, 0) + 1
        self._pending_payloads.extend(data for _, data in payloads)
        return _Exchange(self._call_id, n_terms, slices, requests, params, time.perf_counter())

    @staticmethod
    def _body(
        params: dict,
        children: list[EvaluateContext] | None,
        parent: EvaluateContext | None,
        where: str,
    ) -> bytes:
        """A request's body: ``(params, wires of the children, None)`` or, for workers that
        spawn their children, ``(params, None, (parent's config, parent's shared))``."""
        if children is not None:
            content = (params, [child.to_wire() for child in children], None)
        else:
            content = (params, None, (parent.config, parent.shared))
        try:
            return pickle.dumps(content, protocol=_PICKLE_PROTOCOL)
        except Exception as exc:
            raise NotPicklableError(
                f"MPIWrapperCOB cannot send terms {where}: the "
                "parameters or the children's config, shared or meta cannot be pickled "
                f"({type(exc).__name__}: {exc}); keep them picklable (plain data, arrays)"
            ) from exc

    def _finish(self, exchange: _Exchange) -> list[_Reply]:
        """Wait until the requests are sent and every worker of ``exchange`` has answered."""
        slices = exchange.slices
        waiting = {rank for rank in range(1, self.size) if slices[rank][0] < slices[rank][1]}
        deadline = None if self.timeout is None else exchange.sent_at + self.timeout
        if deadline is None:
            self._wait_all(exchange.requests)
        elif exchange.requests:
            requests = exchange.requests
            sent = _poll_until(
                lambda: True if MPI.Request.Testall(requests) else None, self._wait, deadline
            )
            if sent is None:
                self._time_out(exchange, waiting)
        replies: dict[int, _Reply] = {}
        receive = lambda: self._try_receive(MPI.ANY_SOURCE, _RESULT_TAG)  # noqa: E731
        while waiting:
            if deadline is None:
                source, _, buffer = _poll(receive, self._wait)
            else:
                received = _poll_until(receive, self._wait, deadline)
                if received is None:
                    self._time_out(exchange, waiting)
                source, _, buffer = received
            self._owed[source] -= 1
            reply = self._load_reply(source, buffer, slices[source][0])
            if reply.call_id != exchange.call_id:
                continue  # an answer to an interrupted earlier call
            replies[source] = reply
            waiting.discard(source)
        self._pending_payloads.clear()  # every request was received, so every send is done
        return [replies[rank] for rank in sorted(replies)]

    def _time_out(self, exchange: _Exchange, waiting: set[int]) -> None:
        """The ranks in ``waiting`` did not answer ``exchange`` in time: break the wrapper, raise."""
        ranks = {rank: exchange.slices[rank] for rank in sorted(waiting)}
        who = ", ".join(
            f"rank {rank} (terms {start}..{end - 1} of {exchange.n_terms})"
            for rank, (start, end) in ranks.items()
        )
        self._raise_timeout(who, ranks, f"call {exchange.call_id}", exchange.params)

    def _raise_timeout(
        self, who: str, ranks: dict[int, tuple[int, int]], call: str, params: Any
    ) -> None:
        verb = "does" if len(ranks) == 1 else "do"
        message = (
            f"MPIWrapperCOB: {who} did not answer within the timeout of {self.timeout:g} s "
            f"({call}, parameters {params!r:.300}). A rank that "
            f"{verb} not answer cannot be released, so all {self.size} ranks are aborted "
            "(MPI_Abort) when the wrapper is closed or called again, or when the program "
            "exits. If the terms take that long, raise the timeout; a fit's history and "
            "checkpoint hold every finished evaluation: resume with "
            "initial_observations=load_observations(path)"
        )
        error = RankTimeoutError(message, ranks=ranks, timeout=self.timeout, parameters=params)
        self._broken = error
        self._early = None
        atexit.register(self._abort_at_exit)
        raise error

    def _abort_at_exit(self) -> None:
        if self._broken is not None and not MPI.Is_finalized():
            self._abort_world()

    def _abort_world(self) -> None:
        """Write why to stderr, flush every output, then ``MPI_Abort`` (which ends us too)."""
        # MPI_Abort ends this process before Python could print a traceback: say it here,
        # on stderr, and in the log where logging is set up.
        if logger.hasHandlers():
            logger.critical("%s; MPI_Abort of all %d ranks now", self._broken, self.size)
        with contextlib.suppress(Exception):  # a closed stderr
            sys.stderr.write(f"{self._broken}\nchemfit: MPI_Abort of all {self.size} ranks now\n")
        _flush_output()
        self.comm.Abort(1)

    def _load_reply(self, source: int, buffer: bytearray, start: int) -> _Reply:
        try:
            return pickle.loads(buffer)
        except Exception as exc:
            error = _captured("bad_reply", exc, None, self.rank)
            return _Reply(call_id=self._call_id, rank=source, start=start, error=error)

    def _drain_owed_replies(self) -> None:
        """Receive the answers still owed from interrupted calls (within ``timeout``)."""
        deadline = None if self.timeout is None else time.perf_counter() + self.timeout
        for rank, owed in list(self._owed.items()):
            for _ in range(owed):
                receive = lambda rank=rank: self._try_receive(rank, _RESULT_TAG)  # noqa: E731
                if deadline is None:
                    _poll(receive, self._wait)
                elif _poll_until(receive, self._wait, deadline) is None:
                    late = {r: (0, 0) for r, n in self._owed.items() if n}
                    who = ", ".join(f"rank {r}" for r in late)
                    self._raise_timeout(who, late, "the answer to an interrupted call", None)
                self._owed[rank] -= 1

    def _raise_first_error(
        self,
        local_error: BaseException | None,
        replies: list[_Reply],
        n_terms: int,
    ) -> None:
        for reply in replies:
            error = reply.error
            if error is not None and error.kind == "term_count":
                raise ValueError(
                    f"rank {reply.rank} has a combined objective with {error.n_terms} terms but "
                    f"rank 0 has {n_terms}; build the same objective on every rank"
                )
        if local_error is not None:  # rank 0 holds the first slice, so its error comes first
            raise local_error
        for reply in replies:
            if reply.error is not None:
                self._raise_remote(reply.rank, reply.error)

    def _raise_remote(self, rank: int, failure: _Failure) -> None:
        """Raise what failed on ``rank``: the term's exception caused by a
        ``RemoteEvaluationError`` (as every remote failure), or a ``NotPicklableError``."""
        error = failure.remote.to_exception(rank=rank, term_index=failure.term_index)
        if failure.kind == "exception":
            raise error
        remote = error if isinstance(error, RemoteEvaluationError) else error.__cause__
        type_name, message = failure.remote.type_name, failure.remote.message
        if failure.kind == "unpicklable_result":
            raise NotPicklableError(
                f"the result of term {failure.term_index} on rank {rank} cannot be sent to "
                f"rank 0 ({type_name}: {message}); MPIWrapperCOB pickles each term's "
                "loss, quantities and meta, so keep them picklable (plain data, arrays)"
            ) from remote
        what, where = (
            ("the request (parameters, children's config, shared, meta)", f"rank {rank}")
            if failure.kind == "bad_request"
            else (f"the results of rank {rank}", "rank 0")
        )
        raise NotPicklableError(
            f"{what} could not be unpickled on {where} ({type_name}: {message}); every rank "
            "must be able to import the classes they use"
        ) from remote

    def release_workers(self) -> None:
        """Let the worker ranks leave :meth:`worker_loop`. Idempotent; a no-op off rank 0."""
        if self.rank != 0:
            return
        with self._lock:
            if self._broken is not None:
                self._abort_world()
            if self._released or self._closed:
                return
            self._released = True
            if self.size == 1 or MPI.Is_finalized():
                return
            self._drain_owed_replies()
            empty = b""
            requests = [self._isend(empty, rank, Signal.ABORT) for rank in range(1, self.size)]
            self._wait_all(requests)

    def close(self) -> None:
        """Release the workers (on rank 0), then free the communicator if the wrapper made it.

        Safe to call more than once and on every rank.
        """
        if self._closed:
            return
        self.release_workers()
        self._closed = True
        if self._owns_comm and self.comm is not None and not MPI.Is_finalized():
            self.comm.Free()

    @property
    def broken(self) -> RankTimeoutError | None:
        """The :class:`RankTimeoutError` that ends this MPI world, or ``None`` (rank 0)."""
        return self._broken

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    # -- worker ranks ---------------------------------------------------------------------

    def worker_loop(self) -> None:
        """Serve rank 0's evaluation requests until released; ranks other than 0 only."""
        self._check_rank(False, "worker_loop")
        if self._released:
            logger.info("[Rank %d] worker_loop() after release: nothing to do", self.rank)
            return
        while True:
            _, signal, buffer = _poll(lambda: self._try_receive(0, MPI.ANY_TAG), self._wait)
            if signal is Signal.ABORT:
                self._released = True
                return
            if signal is Signal.EVALUATE:
                data = self._serve(buffer)
                self._wait_all([self._isend(data, 0, Signal.RESULT)])
            else:  # pragma: no cover - rank 0 sends nothing else
                logger.error("[Rank %d] unexpected %s message from rank 0", self.rank, signal)

    def _serve(self, buffer: bytearray) -> bytes:
        """Evaluate one request and return the pickled reply."""
        call_id, n_terms, start, end, body = pickle.loads(buffer)
        reply = _Reply(call_id=call_id, rank=self.rank, start=start)
        try:
            params, wires, parent = pickle.loads(body)
        except Exception as exc:
            reply.error = _captured("bad_request", exc, None, self.rank)
            return pickle.dumps(reply, protocol=_PICKLE_PROTOCOL)
        if wires is None:  # spawn them as the recipe on rank 0 does (no configurator)
            config, shared = parent
            children = EvaluateContext(config, shared).spawn_children(end - start)
        else:
            children = [EvaluateContext.from_wire(wire) for wire in wires]
        local_n_terms = self.cob.n_terms()
        if local_n_terms != n_terms:
            reply.error = _Failure("term_count", None, n_terms=local_n_terms)
            return pickle.dumps(reply, protocol=_PICKLE_PROTOCOL)
        run_term, results = self.cob.run_term, reply.results
        for idx, child in zip(range(start, end), children):
            try:
                value = run_term(params, idx, child)
            except Exception as exc:
                reply.error = _captured("exception", exc, idx, self.rank)
                results.append((None, child.to_result_state()))
                break
            results.append((value, child.to_result_state()))
        try:
            return pickle.dumps(reply, protocol=_PICKLE_PROTOCOL)
        except Exception:
            return self._pickle_partial_reply(reply)

    def _pickle_partial_reply(self, reply: _Reply) -> bytes:
        """Keep the results before the first unpicklable one and report that one."""
        for offset, entry in enumerate(reply.results):
            try:
                pickle.dumps(entry, protocol=_PICKLE_PROTOCOL)
            except Exception as exc:
                idx = reply.start + offset
                failed_term = reply.error is not None and reply.error.term_index == idx
                if not failed_term:
                    reply.error = _captured("unpicklable_result", exc, idx, self.rank)
                reply.results = reply.results[:offset]
                break
        try:
            return pickle.dumps(reply, protocol=_PICKLE_PROTOCOL)
        except Exception as exc:  # e.g. an unpicklable value; report without any results
            reply.results = []
            reply.error = _captured("unpicklable_result", exc, reply.start, self.rank)
            return pickle.dumps(reply, protocol=_PICKLE_PROTOCOL)
