"""Evaluate the terms of a :class:`CombinedObjectiveFunction` across MPI ranks.

Every rank builds the same combined objective and wraps it in :class:`MPIWrapperCOB`. Rank 0
drives: each call splits the terms into balanced contiguous slices over all ranks (rank 0
included), runs the child-context configurator for **all** children itself (so parent and
child contexts end up exactly as in a serial call), sends each worker rank its slice, evaluates
its own slice, and collects the workers' results in term order. The reduction runs on rank 0
over the terms in term order, so the value is bitwise equal to the serial one (R20).

Wire protocol (internal, see ``Signal``): rank 0 sends point-to-point messages to the workers;
each worker answers every ``EVALUATE`` message with exactly one ``RESULT`` message. A message
body is a pickle made by this module, so its size can be counted (R21). Waiting ranks poll
with non-blocking probes and a growing sleep instead of blocking receives or broadcasts, which
MPICH implements as busy-polling loops that would keep a core at 100 %.

Importing this module imports mpi4py; without it the import raises an ``ImportError`` naming
the ``mpi`` extra.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, TypeVar

from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import NotPicklableError, RemoteEvaluationError
from chemfit.core.objectives import ObjectiveFunctor, ensure_context
from chemfit.execution.task_errors import exception_traceback, pickled_exception

if TYPE_CHECKING:
    from typing_extensions import Self

    from chemfit.core.combined import CombinedObjectiveFunction


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

__all__ = ["MPIWrapperCOB", "Signal", "slice_up_range"]

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


# Polling back-off. A waiting rank sleeps for a tenth of the time it has waited so far, within
# [first, cap] seconds: a reply that comes soon is noticed soon (latency <= ~10 % of the wait),
# and a long wait costs a few wake-ups per second. Workers idle for long periods, so their sleep
# grows to 10 ms (about 0.1 % of a core); rank 0 only waits within a call and caps at 1 ms.
_WORKER_FIRST_SLEEP = 50e-6
_WORKER_MAX_SLEEP = 10e-3
_ROOT_FIRST_SLEEP = 20e-6
_ROOT_MAX_SLEEP = 1e-3
_SLEEP_FRACTION = 0.1


def _poll(test: Callable[[], T | None], first: float, cap: float) -> T:
    """Call ``test`` until it returns something other than ``None``, sleeping in between."""
    result = test()
    if result is not None:
        return result
    started = time.perf_counter()
    while True:
        waited = time.perf_counter() - started
        time.sleep(min(cap, max(first, _SLEEP_FRACTION * waited)))
        result = test()
        if result is not None:
            return result


@dataclass
class _TermError:
    """A failure while evaluating (or sending back) one term on a worker rank."""

    # "exception", "term_count", or a pickling failure: "unpicklable_result" (worker could not
    # pickle its results), "bad_request" (worker could not load the request), "bad_reply"
    # (rank 0 could not load the reply)
    kind: str
    term_index: int | None
    type_name: str
    message: str
    traceback: str
    pickled: bytes | None = None  # the exception itself, when it survives a pickle round trip
    n_terms: int | None = None  # the worker's term count (kind "term_count")


@dataclass
class _Reply:
    """A worker's answer to one ``EVALUATE`` request."""

    call_id: int
    rank: int
    start: int
    results: list[tuple[Any, dict]] = field(default_factory=list)  # (term value, result state)
    error: _TermError | None = None


def _describe_exception(exc: BaseException, term_index: int | None) -> _TermError:
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails
        message = f"<unprintable {type(exc).__name__}>"
    return _TermError(
        kind="exception",
        term_index=term_index,
        type_name=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=message,
        traceback=exception_traceback(exc),
        pickled=pickled_exception(exc, protocol=_PICKLE_PROTOCOL),
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
        The communicator. Default: a duplicate of ``MPI.COMM_WORLD`` (creating it is collective,
        so construct the wrapper on every rank), freed by :meth:`close`.
    mpi_debug_log : bool
        Log every message sent and received at WARNING as ``"[Rank r] ..."``.

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
    therefore stays on rank 0; the terms of other ranks see an empty ``temp``.

    A term exception on a worker is raised on rank 0 after every rank has answered: the
    exception itself ``from`` a :class:`~chemfit.exceptions.RemoteEvaluationError` naming the
    rank and term, or only the ``RemoteEvaluationError`` when the exception cannot be pickled.
    With several failures the first in term order wins. Workers stay in :meth:`worker_loop`.

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
    ) -> None:
        self.cob = cob
        self._owns_comm = comm is None
        self.comm = MPI.COMM_WORLD.Dup() if comm is None else comm
        self.rank: int = self.comm.Get_rank()
        self.size: int = self.comm.Get_size()
        self.mpi_debug_log = mpi_debug_log
        self.last_call_bytes_sent = 0
        self.bytes_sent = 0
        self._lock = threading.Lock()
        self._call_id = 0
        self._released = False
        self._closed = False
        # Replies still owed by each worker (after an interrupted call); drained before reuse.
        self._owed: dict[int, int] = {}
        self._pending_payloads: list[tuple[int, bytes]] = []

    # -- small helpers --------------------------------------------------------------------

    def _debug(self, message: str, *args: Any) -> None:
        if self.mpi_debug_log:
            logger.warning("[Rank %d] " + message, self.rank, *args)

    def _isend(self, data: bytes, dest: int, signal: Signal) -> Any:
        self._debug("Isend %s (%d bytes) to rank %d", signal.name, len(data), dest)
        self.bytes_sent += len(data)
        return self.comm.Isend([data, MPI.BYTE], dest=dest, tag=signal.tag)

    def _wait_all(self, requests: list[Any], first: float, cap: float) -> None:
        if requests:
            _poll(lambda: True if MPI.Request.Testall(requests) else None, first, cap)

    def _try_receive(
        self, source: int, signal: Signal | None, first: float, cap: float
    ) -> tuple[int, Signal, bytearray] | None:
        """Receive one matching message if one has arrived; ``None`` otherwise."""
        status = MPI.Status()
        tag = MPI.ANY_TAG if signal is None else signal.tag
        message = self.comm.Improbe(source, tag, status)
        if message is None:
            return None
        buffer = bytearray(status.Get_count(MPI.BYTE))
        request = message.Irecv([buffer, MPI.BYTE])
        _poll(lambda: True if request.Test() else None, first, cap)
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
            if self._released and self.size > 1:
                raise RuntimeError(
                    "MPIWrapperCOB was called after release_workers() or close(); the worker "
                    "ranks have left worker_loop(), so create a new wrapper on every rank"
                )
            self._drain_owed_replies()
            return self._evaluate(params, ctx)

    def _evaluate(self, params: dict, ctx: EvaluateContext) -> float:
        # The serial steps of CombinedObjectiveFunction.evaluate_terms and __call__, with the
        # term evaluations spread over the ranks.
        cob = self.cob
        ctx = cob.prepare_context(params, ctx)
        n_terms = cob.n_terms()
        self._call_id += 1
        self.last_call_bytes_sent = 0
        slices = list(slice_up_range(n_terms, self.size))
        terms: list[Any] = [None] * n_terms
        local_error: BaseException | None = None
        replies: list[_Reply] = []

        with ctx.child_contexts(n_terms, cob.child_context_configurator) as children:
            requests = self._send_requests(params, n_terms, slices, children)
            try:
                start, end = slices[0]
                for idx in range(start, end):
                    try:
                        terms[idx] = cob.evaluate_term(params, idx, children[idx])
                    except Exception as exc:
                        local_error = exc
                        break
                    if requests:
                        MPI.Request.Testall(requests)  # lets large sends progress
            finally:
                # Complete this evaluation's exchange even when the slice above failed (R9).
                self._wait_all(requests, _ROOT_FIRST_SLEEP, _ROOT_MAX_SLEEP)
                replies = self._receive_replies(slices)
            # Inside the block, so that the collected children meta includes remote results.
            for reply in replies:
                for offset, (value, state) in enumerate(reply.results):
                    terms[reply.start + offset] = value
                    children[reply.start + offset].apply_result_state(state)

        self._raise_first_error(local_error, replies, n_terms)
        kept = cob.filter_terms(terms, ctx)
        ctx.loss = cob.apply_reduction(kept, ctx)
        return ctx.loss

    def _send_requests(
        self,
        params: dict,
        n_terms: int,
        slices: list[tuple[int, int]],
        children: list[EvaluateContext],
    ) -> list[Any]:
        """Pickle every worker's request first, then send them all without blocking."""
        payloads: list[tuple[int, bytes]] = []
        for rank, (start, end) in enumerate(slices):
            if rank == 0 or start == end:
                continue
            try:
                body = pickle.dumps((params, children[start:end]), protocol=_PICKLE_PROTOCOL)
            except Exception as exc:
                raise NotPicklableError(
                    f"MPIWrapperCOB cannot send terms {start}..{end - 1} to rank {rank}: the "
                    "parameters or the children's config, shared or meta cannot be pickled "
                    f"({type(exc).__name__}: {exc}); keep them picklable (plain data, arrays)"
                ) from exc
            # The header loads even where the body does not, so a worker can always answer.
            header = (self._call_id, n_terms, start, end, body)
            payloads.append((rank, pickle.dumps(header, protocol=_PICKLE_PROTOCOL)))
        requests = []
        for rank, data in payloads:
            requests.append(self._isend(data, rank, Signal.EVALUATE))
            self.last_call_bytes_sent += len(data)
            self._owed[rank] = self._owed.get(rank, 0) + 1
        self._pending_payloads = payloads  # MPI reads them until the sends complete
        return requests

    def _receive_replies(self, slices: list[tuple[int, int]]) -> list[_Reply]:
        waiting = {rank for rank in range(1, self.size) if slices[rank][0] < slices[rank][1]}
        replies: dict[int, _Reply] = {}
        while waiting:
            source, _, buffer = _poll(
                lambda: self._try_receive(
                    MPI.ANY_SOURCE, Signal.RESULT, _ROOT_FIRST_SLEEP, _ROOT_MAX_SLEEP
                ),
                _ROOT_FIRST_SLEEP,
                _ROOT_MAX_SLEEP,
            )
            self._owed[source] -= 1
            reply = self._load_reply(source, buffer, slices[source][0])
            if reply.call_id != self._call_id:
                continue  # an answer to an interrupted earlier call
            replies[source] = reply
            waiting.discard(source)
        self._pending_payloads = []
        return [replies[rank] for rank in sorted(replies)]

    def _load_reply(self, source: int, buffer: bytearray, start: int) -> _Reply:
        try:
            return pickle.loads(buffer)
        except Exception as exc:
            error = _describe_exception(exc, None)
            error.kind = "bad_reply"
            return _Reply(call_id=self._call_id, rank=source, start=start, error=error)

    def _drain_owed_replies(self) -> None:
        for rank, owed in list(self._owed.items()):
            for _ in range(owed):
                _poll(
                    lambda rank=rank: self._try_receive(
                        rank, Signal.RESULT, _ROOT_FIRST_SLEEP, _ROOT_MAX_SLEEP
                    ),
                    _ROOT_FIRST_SLEEP,
                    _ROOT_MAX_SLEEP,
                )
            self._owed[rank] = 0

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

    def _raise_remote(self, rank: int, error: _TermError) -> None:
        term = "" if error.term_index is None else f", term {error.term_index}"
        remote = RemoteEvaluationError(
            f"{error.type_name} on rank {rank}{term}: {error.message}\n\n"
            f"Traceback on rank {rank}:\n{error.traceback}",
            rank=rank,
            term_index=error.term_index,
            type_name=error.type_name,
            remote_message=error.message,
            remote_traceback=error.traceback,
        )
        if error.kind == "unpicklable_result":
            raise NotPicklableError(
                f"the result of term {error.term_index} on rank {rank} cannot be sent to rank "
                f"0 ({error.type_name}: {error.message}); MPIWrapperCOB pickles each term's "
                "loss, quantities and meta, so keep them picklable (plain data, arrays)"
            ) from remote
        if error.kind in ("bad_request", "bad_reply"):
            what, where = (
                ("the request (parameters, children's config, shared, meta)", f"rank {rank}")
                if error.kind == "bad_request"
                else (f"the results of rank {rank}", "rank 0")
            )
            raise NotPicklableError(
                f"{what} could not be unpickled on {where} ({error.type_name}: "
                f"{error.message}); every rank must be able to import the classes they use"
            ) from remote
        if error.pickled is not None:
            try:
                original = pickle.loads(error.pickled)
            except Exception:
                original = None
            if isinstance(original, BaseException):
                raise original from remote
        raise remote

    def release_workers(self) -> None:
        """Let the worker ranks leave :meth:`worker_loop`. Idempotent; a no-op off rank 0."""
        if self.rank != 0:
            return
        with self._lock:
            if self._released or self._closed:
                return
            self._released = True
            if self.size == 1 or MPI.Is_finalized():
                return
            self._drain_owed_replies()
            empty = b""
            requests = [self._isend(empty, rank, Signal.ABORT) for rank in range(1, self.size)]
            self._wait_all(requests, _ROOT_FIRST_SLEEP, _ROOT_MAX_SLEEP)

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
            _, signal, buffer = _poll(
                lambda: self._try_receive(0, None, _WORKER_FIRST_SLEEP, _WORKER_MAX_SLEEP),
                _WORKER_FIRST_SLEEP,
                _WORKER_MAX_SLEEP,
            )
            if signal is Signal.ABORT:
                self._released = True
                return
            if signal is Signal.EVALUATE:
                data = self._serve(buffer)
                self._wait_all(
                    [self._isend(data, 0, Signal.RESULT)], _WORKER_FIRST_SLEEP, _WORKER_MAX_SLEEP
                )
            else:  # pragma: no cover - rank 0 sends nothing else
                logger.error("[Rank %d] unexpected %s message from rank 0", self.rank, signal)

    def _serve(self, buffer: bytearray) -> bytes:
        """Evaluate one request and return the pickled reply."""
        call_id, n_terms, start, end, body = pickle.loads(buffer)
        reply = _Reply(call_id=call_id, rank=self.rank, start=start)
        try:
            params, children = pickle.loads(body)
        except Exception as exc:
            reply.error = _describe_exception(exc, None)
            reply.error.kind = "bad_request"
            return pickle.dumps(reply, protocol=_PICKLE_PROTOCOL)
        local_n_terms = self.cob.n_terms()
        if local_n_terms != n_terms:
            reply.error = _TermError(
                "term_count", None, "ValueError", "term-count mismatch", "", n_terms=local_n_terms
            )
            return pickle.dumps(reply, protocol=_PICKLE_PROTOCOL)
        for offset, idx in enumerate(range(start, end)):
            child = children[offset]
            try:
                value = self.cob.evaluate_term(params, idx, child)
            except Exception as exc:
                reply.error = _describe_exception(exc, idx)
                child.collect_child_meta_data(recursive=True)
                reply.results.append((None, child.to_result_state()))
                break
            child.collect_child_meta_data(recursive=True)
            reply.results.append((value, child.to_result_state()))
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
                    reply.error = _describe_exception(exc, idx)
                    reply.error.kind = "unpicklable_result"
                reply.results = reply.results[:offset]
                break
        try:
            return pickle.dumps(reply, protocol=_PICKLE_PROTOCOL)
        except Exception as exc:  # e.g. an unpicklable value; report without any results
            reply.results = []
            reply.error = _describe_exception(exc, reply.start)
            reply.error.kind = "unpicklable_result"
            return pickle.dumps(reply, protocol=_PICKLE_PROTOCOL)
