"""The one way chemfit submits evaluations: ``fn(*args, ctx)`` on an executor, state applied back.

:func:`submit_with_context` submits one call, :func:`submit_calls` several calls as one task;
both return a :class:`ContextFuture` whose result applies each call's context state to the
caller's context (in-process executors wrote it in place). :class:`ContextSubmitter` does the
same for many submissions with one executor and one function, which it packs once;
``map_with_context``, ``as_completed_with_context``, ``async_eval_many``, the parallel
combined objectives and the fit loops are built on it.

Where the calls go depends on :class:`~chemfit.execution.executor_info.ExecutorInfo`:

* in this process (threads, ``SerialExecutor``): the task gets the calls as they are;
* a local process pool (stdlib or loky): chemfit pickles the task once and each task's calls
  once (the first task's before anything is submitted, so a
  :class:`~chemfit.core.exceptions.NotPicklableError` that names what cannot be sent comes at
  once), and submits the bytes, which the pool only copies: one pickle per evaluation;
* any other executor (ipyparallel, Dask, ...): the task and the calls' wire form
  (:meth:`~chemfit.core.context.EvaluateContext.to_wire`), for the executor's own serializer.
  An executor chemfit does not know is treated as one in this process once a task ran on it
  uncopied (:func:`~chemfit.execution.executor_info.note_ran_in_place`).

Failures follow one convention (:class:`~chemfit.execution.task_errors.RemoteFailure`): an
exception raised in another process comes back as the original exception caused by a
:class:`~chemfit.core.exceptions.RemoteEvaluationError` holding the remote traceback; a dead
worker becomes a :class:`~chemfit.core.exceptions.WorkerLostError` naming the call and its
parameters. :meth:`ContextFuture.abandon` stops an evaluation that runs too long: it kills the
worker process, engine or Dask worker running it (local pools learn which process that is from
the task itself, :class:`~chemfit.execution.worker_marks.TaskAnnouncements`).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent import futures as cf
from typing import Any, NamedTuple

from chemfit.core.context import FutureLike
from chemfit.core.exceptions import NotPicklableError, WorkerLostError
from chemfit.core.wrapping import dumps_by_value
from chemfit.execution.context_tasks import (
    ContextTask,
    PickledCallable,
    SentCalls,
    TaskNotRun,
    TaskOutput,
    cloudpickle_installed,
    dumps_for_workers,
    run_pickled_task,
)
from chemfit.execution.executor_info import executor_info
from chemfit.execution.task_errors import (
    RemoteFailure,
    call_parameters,
    is_lost_worker,
    short_repr,
    translate_call_error,
)
from chemfit.execution.worker_marks import announce_task, call_marked, task_announcements

__all__ = [
    "CallOutcome",
    "ContextFuture",
    "ContextSubmitter",
    "EachCallFuture",
    "ErrorTranslator",
    "cancel_all",
    "collect_calls",
    "run_announced_task",
    "submit_calls",
    "submit_with_context",
]

logger = logging.getLogger(__name__)

#: Executors in other processes whose tasks get their calls as bytes made here, like local pools.
_BYTES_KINDS = frozenset({"ipyparallel", "dask"})

# On Python 3.10 concurrent.futures.TimeoutError is not the builtin TimeoutError.
TIMEOUT_ERRORS = (TimeoutError, cf.TimeoutError)

#: ``translate(exc, index, last) -> exception to raise``: ``exc`` failed call ``index``; ``last``
#: is the last call of the task when the whole task failed (a lost worker, a pickling error),
#: else ``None`` (the call itself raised ``exc``).
ErrorTranslator = Callable[[BaseException, int, "int | None"], BaseException]


class CallOutcome(NamedTuple):
    """How one call of :func:`submit_calls` ended.

    Attributes
    ----------
    value : Any
        What the call returned (``None`` when it failed).
    error : BaseException or None
        What it raised, as the caller should raise it.
    seconds : float
        Its wall time, measured where it ran.
    """

    value: Any
    error: BaseException | None
    seconds: float


#: The seconds of a single in-process call, which is not timed (nothing plans from it).
_UNTIMED = (math.nan,)


def _is_done(future: Any) -> bool:
    done = getattr(future, "done", None)
    return bool(done()) if callable(done) else False


def _is_cancelled(future: Any) -> bool:
    cancelled = getattr(future, "cancelled", None)
    return bool(cancelled()) if callable(cancelled) else False


class ContextFuture:
    """The future of a task submitted by :class:`ContextSubmitter`.

    :meth:`result` applies the state of every call that ran to the caller's context (once) and
    returns the value of a single call (raising its error), or the list of
    :class:`CallOutcome` of a batch (raising only when the task as a whole failed).
    ``timeout`` runs out with the executor's ``TimeoutError`` and can be retried.

    Attributes
    ----------
    future : FutureLike
        The executor's future.
    calls : list of tuple
        The calls ``(*args, ctx)`` of the task.
    index : int
        The index of its first call (in messages and ``WorkerLostError.index``).
    number : int or None
        On a local process pool: the task's number, under which its worker process announces
        itself (:class:`~chemfit.execution.worker_marks.TaskAnnouncements`).
    """

    # one per task: slots keep it small and cheap to create
    __slots__ = (
        "_bare",
        "_error",
        "_errors",
        "_output",
        "_single",
        "_submitter",
        "calls",
        "future",
        "index",
        "number",
    )

    def __init__(
        self,
        submitter: ContextSubmitter,
        future: Any,
        calls: Sequence[tuple],
        index: int,
        single,
        number: int | None = None,
    ) -> None:
        self._submitter = submitter
        self.future = future
        self.calls = calls
        self.index = index
        self.number = number
        self._single = single
        # a single call in this process: the future holds the call's own value or exception
        self._bare = single and submitter.info.in_process
        self._output: TaskOutput | None = None
        self._errors: dict[int, BaseException] | None = None
        self._error: BaseException | None = None

    def settle(self, timeout: float | None = None) -> tuple[list, dict[int, BaseException] | None]:
        """``(values, errors)`` of the calls that ran, states applied (once).

        ``errors`` is ``None`` or ``{position in the task: exception to raise}``; the cheap
        form of :meth:`outcomes`.

        Raises
        ------
        TimeoutError
            ``timeout`` ran out (the task may still finish; ask again).
        Exception
            When the task as a whole failed (``WorkerLostError``, ``NotPicklableError``, ...).
        """
        output = self._output
        if output is not None:
            return output[0], self._errors
        if self._error is not None:
            raise self._error
        if self._bare:
            return self._settle_bare(timeout)
        try:
            output = self.future.result(timeout)
        except Exception as exc:
            if isinstance(exc, TIMEOUT_ERRORS) and timeout is not None and not _is_done(self):
                raise
            self._error = self._submitter._task_error(exc, self.calls, self.index)
            raise self._error  # noqa: B904 (its __cause__ is set: the executor's error)
        if output.__class__ is not tuple:  # a TaskNotRun
            self._error = self._submitter._not_run_error(output, self.calls, self.index)
            raise self._error
        self._output = output
        if output[1] is None and output[3] is None:  # in this process, no failure
            return output[0], None
        self._errors = errors = self._submitter._absorb(output, self.calls, self.index)
        return output[0], errors

    def _settle_bare(self, timeout: float | None) -> tuple[list, dict[int, BaseException] | None]:
        try:
            value = self.future.result(timeout)
        except Exception as exc:
            if isinstance(exc, TIMEOUT_ERRORS) and timeout is not None and not _is_done(self):
                raise
            if self.cancelled():
                self._error = self._submitter._task_error(exc, self.calls, self.index)
                raise self._error  # noqa: B904
            self._output = ([None], None, _UNTIMED, None)
            error = self._submitter._error_for(exc, self.index, None, self.calls[0])
            self._errors = {0: error}
            return self._output[0], self._errors
        self._output = ([value], None, _UNTIMED, None)
        return self._output[0], None

    def outcomes(self, timeout: float | None = None) -> list[CallOutcome]:
        """The :class:`CallOutcome` of each call that ran, in order, states applied.

        Raises as :meth:`settle` does.
        """
        values, errors = self.settle(timeout)
        seconds = self._output[2]
        if errors is None:
            return [CallOutcome(v, None, s) for v, s in zip(values, seconds)]
        return [
            CallOutcome(v, errors.get(position), s)
            for position, (v, s) in enumerate(zip(values, seconds))
        ]

    def result(self, timeout: float | None = None) -> Any:
        """The value of a single call (its error raised), or the outcomes of a batch."""
        if not self._single:
            return self.outcomes(timeout)
        values, errors = self.settle(timeout)
        if errors:
            raise errors[0]
        return values[0]

    def done(self) -> bool:
        """Whether the task finished (or was cancelled, or abandoned)."""
        return self._error is not None or _is_done(self.future)

    def pending(self) -> int:
        """The number of its calls that have not finished."""
        return 0 if self.done() else len(self.calls)

    def abandon(self, timeout: float | None = None) -> bool:
        """Stop this evaluation: kill the process that runs it, where the executor allows it.

        On a stdlib process pool or loky, the worker process running the task is killed (which
        breaks the pool: its other pending tasks fail with ``WorkerLostError``; see
        :func:`~chemfit.execution.recovery.recover_executor`); on ipyparallel the engine
        running it; on Dask the worker running it (its nanny starts a new one). A task that has
        not started is cancelled instead. Afterwards :meth:`done` is true and :meth:`result`
        raises a :class:`~chemfit.core.exceptions.WorkerLostError` saying that the evaluation
        exceeded its timeout, naming its index and parameters.

        Nothing happens (``False``) when the task has finished already (its result stands), or
        on executors where nothing can be killed: threads, ``SerialExecutor``, executors
        chemfit does not know.

        Parameters
        ----------
        timeout : float, optional
            The timeout it exceeded (seconds), for the message.

        Returns
        -------
        bool
            Whether the evaluation was stopped (its process killed, or the task cancelled).

        Examples
        --------
        >>> import time
        >>> from chemfit.core.context import EvaluateContext
        >>> from chemfit.executors import make_executor
        >>> def nap(seconds, ctx):
        ...     time.sleep(seconds)
        >>> with make_executor("process", 1) as pool:
        ...     future = submit_with_context(pool, nap, 60, EvaluateContext())
        ...     time.sleep(1.0)  # it started
        ...     future.abandon(timeout=1.0), future.done()
        (True, True)
        >>> future.result()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        chemfit.core.exceptions.WorkerLostError: evaluation 0 (parameters 60) exceeded its timeout of 1 s and was abandoned: its worker process ... was killed
        """
        if self._output is not None or self._error is not None or _is_done(self.future):
            return False
        info = self._submitter.info
        if info.in_process:
            return False
        stopped: str | None
        if info.local_pool:  # a pool's future is running once a worker may have it
            if self.cancel():
                stopped = "it was cancelled before it started"
            else:
                stopped = _kill_pool_worker(info.executor, self.number)
        else:
            stopped = _kill_remote_worker(info, self.future)
        if stopped is None:
            return False
        parameters = call_parameters(self.calls[0])
        seconds = f" of {timeout:g} s" if timeout is not None else ""
        self._error = WorkerLostError(
            f"evaluation {self.index} (parameters {short_repr(parameters, 200)}) exceeded its "
            f"timeout{seconds} and was abandoned: {stopped}",
            index=self.index,
            parameters=parameters,
        )
        logger.info("%s", self._error)
        return True

    def cancel(self) -> bool:
        """Cancel the task if it has not started; a future that fails to cancel is abandoned."""
        try:
            return bool(self.future.cancel())
        except Exception:  # a remote future may fail to cancel; it is abandoned either way
            logger.debug("could not cancel %r", self.future, exc_info=True)
            return False

    def cancelled(self) -> bool:
        return _is_cancelled(self.future)

    def add_done_callback(self, fn: Callable[[ContextFuture], Any]) -> None:
        """Call ``fn(self)`` when the task finishes (the executor's future must support it)."""
        self.future.add_done_callback(lambda _: fn(self))

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"<ContextFuture calls {self.index}..{self.index + len(self.calls) - 1} {state}>"


#: How long :meth:`ContextFuture.abandon` waits for a task that has not announced its process.
_ANNOUNCE_WAIT = 0.25
_KILL = getattr(signal, "SIGKILL", signal.SIGTERM)


def _kill_pool_worker(executor: Any, number: int | None) -> str | None:
    """Kill the worker process of a local pool that runs task ``number``; what was done, or
    ``None`` when the pool has no workers (shut down)."""
    processes = getattr(executor, "_processes", None)  # stdlib and loky: {pid: process}
    if not processes:
        return None
    pid = None
    if number is not None:
        board = task_announcements()
        deadline = time.monotonic() + _ANNOUNCE_WAIT
        while (pid := board.pid_of(number)) is None and time.monotonic() < deadline:
            time.sleep(0.005)
    if pid is not None and pid in processes:
        _kill_processes(processes, [pid])
        return f"its worker process {pid} was killed"
    # Not started yet, or it could not announce itself. One dead worker breaks the whole pool
    # (every pending task fails), so killing them all loses nothing more.
    pids = sorted(processes)
    _kill_processes(processes, pids)
    return (
        "the worker process running it could not be told apart (it had not started), so every "
        f"worker process of the pool was killed ({', '.join(map(str, pids))})"
    )


def _kill_remote_worker(info: Any, future: Any) -> str | None:
    """Kill the engine or Dask worker running the task of ``future``; what was done, or
    ``None`` when nothing could be."""
    kill = getattr(info.executor, "kill_worker_of", None)  # chemfit's ipyparallel and Dask
    if callable(kill):
        return kill(future)
    if info.kind == "ipyparallel":  # ipyparallel's own executor: its futures are AsyncResults
        from chemfit.execution.ipyparallel_engine import kill_engine_running

        return kill_engine_running(future)
    return None


#: Seconds :func:`_kill_processes` waits for killed workers to end.
_DEATH_WAIT = 5.0


def _kill_processes(processes: dict, pids: list[int]) -> None:
    """Kill the pool's worker processes ``pids`` and wait until they ended, so that whoever
    looks at the pool next sees them dead (and the pool about to be marked broken)."""
    for pid in pids:
        try:
            os.kill(pid, _KILL)
        except (ProcessLookupError, PermissionError):  # gone already
            logger.debug("worker process %d was gone already", pid)
    deadline = time.monotonic() + _DEATH_WAIT
    for pid in pids:
        process = processes.get(pid)
        is_alive = getattr(process, "is_alive", None)
        while callable(is_alive) and time.monotonic() < deadline:
            try:
                if not is_alive():
                    break
            except Exception:  # closed by the pool meanwhile: it ended
                break
            time.sleep(0.002)


class EachCallFuture(ContextFuture):
    """The future of calls submitted one task each in this process (:meth:`ContextSubmitter.submit_each`).

    It settles like the future of a batch (values and errors by position) while each call runs
    as its own task on the executor's workers; the contexts were written in place. One object
    for many calls keeps the caller's work per call as small as a bare ``executor.map``'s.
    """

    __slots__ = ()

    def settle(self, timeout: float | None = None) -> tuple[list, dict[int, BaseException] | None]:
        output = self._output
        if output is not None:
            return output[0], self._errors
        deadline = None if timeout is None else time.monotonic() + timeout
        values: list[Any] = []
        errors: dict[int, BaseException] | None = None
        for position, future in enumerate(self.future):
            try:
                values.append(
                    future.result(
                        None if deadline is None else max(0.0, deadline - time.monotonic())
                    )
                )
            except Exception as exc:
                if isinstance(exc, TIMEOUT_ERRORS) and timeout is not None and not _is_done(future):
                    raise
                values.append(None)
                errors = errors or {}
                last = self.index + position if _is_cancelled(future) else None
                errors[position] = self._submitter._error_for(
                    exc, self.index + position, last, self.calls[position]
                )
        self._output = (values, None, _UNTIMED * len(values), None)
        self._errors = errors
        return values, errors

    def pending(self) -> int:
        return sum(1 for future in self.future if not _is_done(future))

    def done(self) -> bool:
        return all(_is_done(future) for future in self.future)

    def cancel(self) -> bool:
        cancelled = False
        for future in self.future:
            try:
                cancelled = bool(future.cancel()) or cancelled
            except Exception:  # a foreign future may fail to cancel; it is abandoned
                logger.debug("could not cancel %r", future, exc_info=True)
        return cancelled

    def cancelled(self) -> bool:
        return all(_is_cancelled(future) for future in self.future)

    def add_done_callback(self, fn: Callable[[ContextFuture], Any]) -> None:
        raise TypeError("EachCallFuture has no done callback; submit the calls one by one")


def _failed_future(exc: BaseException) -> cf.Future:
    future: cf.Future = cf.Future()
    future.set_exception(exc)
    return future


class ContextSubmitter:
    """Submits calls ``fn(*args, ctx)`` to one executor; ``fn`` is packed once, here.

    Parameters
    ----------
    executor : ExecutorLike, ExecutorInfo or None
        Where the calls run (see :func:`~chemfit.execution.executor_info.executor_info`).
    fn : callable
        Called as ``fn(*args, ctx)``; may be a
        :class:`~chemfit.execution.context_tasks.PickledCallable` already.
    stop_at_first_error : bool
        In a batch, the calls after a failed one do not run.
    translate : ErrorTranslator, optional
        Turns a failure into the exception to raise (default: the wording of
        ``map_with_context``: lost workers and pickling errors named by call index).

    Raises
    ------
    NotPicklableError
        When ``fn`` cannot be sent to the executor's workers.

    Examples
    --------
    >>> from chemfit.core.context import EvaluateContext
    >>> from chemfit.execution.executors import SerialExecutor
    >>> def square(x, ctx):
    ...     ctx.loss = x * x
    ...     return ctx.loss
    >>> submitter = ContextSubmitter(SerialExecutor(), square)
    >>> ctxs = [EvaluateContext(), EvaluateContext()]
    >>> [submitter.submit(x, ctx).result() for x, ctx in zip([2, 3], ctxs)]
    [4, 9]
    >>> [ctx.loss for ctx in ctxs]
    [4, 9]
    """

    def __init__(
        self,
        executor: Any,
        fn: Callable[..., Any],
        *,
        stop_at_first_error: bool = False,
        translate: ErrorTranslator | None = None,
    ) -> None:
        info = self.info = executor_info(executor)
        self.executor = info.executor
        self._translate = translate
        self._task_data: bytes | None = None
        self._board_path: str | None = None  # local pools: where tasks announce their process
        self._by_value = False  # the calls refer to __main__: cloudpickle them at once
        if info.in_process:
            self.task = ContextTask(
                fn, info.executor, in_process=True, stop_at_first_error=stop_at_first_error
            )
            return
        packed = PickledCallable.pack(fn, info)
        self.task = ContextTask(packed, info.executor, stop_at_first_error=stop_at_first_error)
        if info.local_pool or info.kind in _BYTES_KINDS:
            # The calls travel as bytes that the task unpickles, so that calls a worker cannot
            # rebuild are an error of the task (TaskNotRun), not a broken pool, a dead
            # engine or a Dask worker that dies decoding the message (and a task that hangs).
            self._task_data = pickle.dumps(self.task, protocol=pickle.HIGHEST_PROTOCOL)
        if info.local_pool:
            try:
                self._board_path = task_announcements().path
            except OSError:  # abandon() then kills every worker of the pool
                logger.debug("tasks cannot announce their worker process", exc_info=True)

    def switch_to(self, executor: Any) -> None:
        """Submit to ``executor`` from now on: one of the same kind, e.g. the new executor that
        :func:`~chemfit.execution.recovery.recover_executor` returned for loky's reusable
        executor. What was packed for the workers is kept.

        Raises
        ------
        ValueError
            When ``executor`` is of another kind (create a new submitter for it).

        Examples
        --------
        >>> from chemfit.core.context import EvaluateContext
        >>> from chemfit.execution.executors import SerialExecutor
        >>> submitter = ContextSubmitter(SerialExecutor(), lambda x, ctx: -x)
        >>> submitter.switch_to(SerialExecutor())
        >>> submitter.submit(2, EvaluateContext()).result()
        -2
        """
        info = executor_info(executor)
        if info.kind != self.info.kind or info.in_process != self.info.in_process:
            raise ValueError(
                f"switch_to takes an executor of the same kind ({self.info.kind}), got "
                f"{info.kind}; create a new ContextSubmitter for it"
            )
        self.info = info
        self.executor = info.executor
        if info.in_process:
            self.task = ContextTask(
                self.task.fn,
                info.executor,
                in_process=True,
                stop_at_first_error=self.task.stop_at_first_error,
            )

    # -- submitting ----------------------------------------------------------------------------

    def payload(self, calls: Sequence[tuple], index: int = 0) -> Any:
        """What a task of ``calls`` carries, in the form the executor needs.

        For a local process pool these are bytes, pickled here: a call that cannot be sent
        raises :class:`NotPicklableError` naming it (``index`` is the first call's number).
        """
        if self.info.in_process:
            return calls
        wire = [(call[:-1], call[-1].to_wire()) for call in calls]
        if self._task_data is None:
            # an unknown executor may run the task here, uncopied: let the task tell
            return SentCalls(wire) if self.info.kind == "other" else wire
        if self._by_value:  # earlier calls needed it: do not pickle twice
            try:
                return dumps_by_value(wire, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                logger.debug("cloudpickle could not pickle the calls", exc_info=True)
        try:  # as the pool itself would pickle them
            data = pickle.dumps(wire, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            data = None
        if data is not None and (self.info.main_reachable or b"__main__" not in data):
            return data
        if data is not None and cloudpickle_installed():
            try:  # __main__ definitions by value
                data = dumps_by_value(wire, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:
                logger.debug("cloudpickle could not pickle the calls", exc_info=True)
            else:
                self._by_value = True
                return data
        try:  # an error that names what cannot be sent
            return dumps_for_workers(wire, self.info, label=f"the arguments of call {index}")
        except NotPicklableError as exc:
            raise self._explain(calls, index, exc) from exc.__cause__

    def send(
        self, payload: Any, calls: Sequence[tuple], index: int = 0, *, single: bool = False
    ) -> ContextFuture:
        """Submit a task carrying ``payload`` (from :meth:`payload`); errors of ``submit`` raise.

        With ``single`` (one call) the future's ``result()`` is the call's value, else the
        list of :class:`CallOutcome`. A pool that is broken (a worker died) raises
        :class:`~chemfit.core.exceptions.WorkerLostError` naming the call.
        """
        submit = self.executor.submit
        if self._board_path is not None:
            number = task_announcements().next_number()
            try:
                future = submit(
                    run_announced_task, self._board_path, number, self._task_data, payload
                )
            except Exception as exc:
                if is_lost_worker(exc):
                    raise self._task_error(exc, calls, index) from exc
                raise
            return ContextFuture(self, future, calls, index, single, number)
        if self._task_data is not None:
            future = submit(run_pickled_task, self._task_data, payload)
        elif single and self.info.in_process:
            future = submit(call_marked, self.task.executor, self.task.fn, *calls[0])
        else:
            future = submit(self.task, payload)
        return ContextFuture(self, future, calls, index, single)

    def submit_all(
        self, groups: Sequence[tuple[Sequence[tuple], int]], *, single: bool = False
    ) -> list[ContextFuture]:
        """Submit a task for each ``(calls, index)``, in order; one future per task.

        The first task's calls are packed before anything is submitted, so a
        :class:`NotPicklableError` there raises at once. Each later task is packed just before
        it is submitted (the workers start while the rest is being packed); one that cannot be
        packed gets a future holding its ``NotPicklableError``, as a pool that failed to pickle
        it would report it. When ``submit`` raises, that task and all later ones get failed
        futures holding the error, so the caller still collects the tasks already submitted; a
        ``KeyboardInterrupt`` cancels what was submitted and propagates.
        """
        futures: list[ContextFuture] = []
        if not groups:
            return futures
        in_process = self.info.in_process
        if in_process and single:
            return self._submit_in_process(groups)
        first = groups[0][0] if in_process else self.payload(*groups[0])
        submit, task, task_data = self.executor.submit, self.task, self._task_data
        board_path = self._board_path
        numbers = task_announcements().next_number if board_path is not None else None
        try:
            for position, (calls, index) in enumerate(groups):
                number = None
                if in_process:
                    future = submit(task, calls)
                else:
                    try:
                        payload = first if position == 0 else self.payload(calls, index)
                    except NotPicklableError as exc:
                        future = _failed_future(exc)
                    else:
                        if task_data is None:
                            future = submit(task, payload)
                        elif numbers is None:
                            future = submit(run_pickled_task, task_data, payload)
                        else:
                            number = numbers()
                            future = submit(
                                run_announced_task, board_path, number, task_data, payload
                            )
                futures.append(ContextFuture(self, future, calls, index, single, number))
        except Exception as exc:
            for calls, index in groups[len(futures) :]:
                futures.append(ContextFuture(self, _failed_future(exc), calls, index, single))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return futures

    def _submit_in_process(
        self, groups: Sequence[tuple[Sequence[tuple], int]]
    ) -> list[ContextFuture]:
        """:meth:`submit_all` for single calls in this process: each call's own value or
        exception, in one frame."""
        futures = [ContextFuture(self, None, calls, index, True) for calls, index in groups]
        raw = self._submit_raw([future.calls[0] for future in futures])
        for future, submitted in zip(futures, raw):
            future.future = submitted
        return futures

    def _submit_raw(self, calls: Sequence[tuple]) -> list[Any]:
        """The executor's futures of ``call_marked(fn, *call)``, one per call, in this process.

        When ``submit`` raises, that call and the later ones get failed futures holding the
        error; a ``KeyboardInterrupt`` cancels what was submitted and propagates.
        """
        submit, owner, fn = self.executor.submit, self.task.executor, self.task.fn
        raw: list[Any] = []
        try:
            for call in calls:
                raw.append(submit(call_marked, owner, fn, *call))
        except Exception as exc:
            raw.extend(_failed_future(exc) for _ in calls[len(raw) :])
        except BaseException:
            for future in raw:
                future.cancel()
            raise
        return raw

    def submit_each(self, calls: Sequence[tuple], index: int = 0) -> ContextFuture:
        """Submit each of ``calls`` as its own task; one future settles them all, by position.

        For an executor in this process only (elsewhere a task of several calls is
        :meth:`submit_all`'s). Its :meth:`~ContextFuture.settle` gives the values and the
        errors of the calls as a batch's does.
        """
        if not self.info.in_process:
            raise ValueError("submit_each is for executors that run the calls in this process")
        return EachCallFuture(self, self._submit_raw(calls), calls, index, False)

    def submit(self, *args: Any, index: int = 0) -> ContextFuture:
        """Submit the call ``fn(*args)`` (``args[-1]`` is its context); see
        :func:`submit_with_context`."""
        _check_context(args)
        calls = [args]
        return self.send(self.payload(calls, index), calls, index, single=True)

    def submit_calls(self, calls: Sequence[tuple], index: int = 0) -> ContextFuture:
        """Submit ``calls`` as one task; see :func:`submit_calls`."""
        calls = list(calls)
        for call in calls:
            _check_context(call)
        return self.send(self.payload(calls, index), calls, index)

    # -- results ------------------------------------------------------------------------------

    def _error_for(self, exc: BaseException, index: int, last: int | None, call: tuple) -> Any:
        if self._translate is not None:
            return self._translate(exc, index, last)
        return translate_call_error(exc, index, call, self.executor, last)

    def _absorb(
        self, output: TaskOutput, calls: Sequence[tuple], index: int
    ) -> dict[int, BaseException] | None:
        """Apply the states of ``output`` to the calls' contexts; the errors to raise."""
        _, states, _, failures = output
        if states is not None:
            for call, state in zip(calls, states):
                call[-1].apply_result_state(state)
        if not failures:
            return None
        errors: dict[int, BaseException] = {}
        for position, failure in failures.items():
            if isinstance(failure, RemoteFailure):
                failure = failure.to_exception()
            errors[position] = self._error_for(failure, index + position, None, calls[position])
        return errors

    def _task_error(self, exc: BaseException, calls: Sequence[tuple], index: int) -> Any:
        """A task that failed as a whole: a lost worker, a pickling error, a cancellation."""
        return self._error_for(exc, index, index + len(calls) - 1, calls[0])

    def _not_run_error(self, output: TaskNotRun, calls: Sequence[tuple], index: int) -> Any:
        last = index + len(calls) - 1
        cause = output.failure.to_exception()
        if output.what == "function":
            return self._error_for(cause, index, last, calls[0])
        in_task = f" (in the task with calls {index}..{last})" if last != index else ""
        error = NotPicklableError(
            f"a worker of {self.info.name} could not rebuild the arguments of call {index}"
            f"{in_task} (parameters {short_repr(call_parameters(calls[0]), 200)}) from their "
            f"pickle: {output.failure.type_name}: {output.failure.message}. They (the "
            "parameters, or a context's config, shared or meta) refer to something the worker "
            "cannot import; keep them plain data"
        )
        error.__cause__ = cause
        return self._error_for(error, index, last, calls[0])

    def _explain(self, calls: Sequence[tuple], index: int, error: NotPicklableError) -> Exception:
        """The :class:`NotPicklableError` naming the first argument or context field of
        ``calls`` that cannot be sent (``error`` when each can be sent on its own)."""
        for offset, call in enumerate(calls):
            number = index + offset
            candidates = [
                (f"argument {position} of call {number} ({short_repr(arg)})", arg)
                for position, arg in enumerate(call[:-1])
            ]
            state = call[-1].__getstate__()
            candidates += [
                (f"ctxs[{number}].{key} ({short_repr(value)})", value)
                for key, value in state.items()
            ]
            for label, obj in candidates:
                try:
                    dumps_for_workers(obj, self.info, label=label)
                except NotPicklableError as culprit:
                    return culprit
        return error


def run_announced_task(path: str, number: int, task_data: bytes, calls_data: bytes) -> Any:
    """In a worker of a local pool: announce this process as the one running task ``number``
    (:func:`~chemfit.execution.worker_marks.announce_task`), then
    :func:`~chemfit.execution.context_tasks.run_pickled_task`.

    Examples
    --------
    >>> from chemfit.core.context import EvaluateContext
    >>> board = task_announcements()
    >>> number = board.next_number()
    >>> def halve(x, ctx):
    ...     return x / 2
    >>> task = pickle.dumps(ContextTask(halve))
    >>> calls = pickle.dumps([((7,), EvaluateContext().to_wire())])
    >>> run_announced_task(board.path, number, task, calls)[0], board.pid_of(number) == os.getpid()
    ([3.5], True)
    """
    announce_task(path, number)
    return run_pickled_task(task_data, calls_data)


def _check_context(call: tuple) -> None:
    ctx = call[-1] if call else None
    if not callable(getattr(ctx, "to_wire", None)):
        raise TypeError(
            "the last positional argument must be the EvaluateContext of the call, got "
            f"{type(ctx).__name__}; call the function as fn(*args, ctx)"
        )


def submit_with_context(executor: Any, fn: Callable[..., Any], *args: Any, index: int = 0):
    """Submit ``fn(*args)`` where ``args[-1]`` is the call's context; returns a
    :class:`ContextFuture`.

    Its ``result()`` returns ``fn``'s value after applying the call's state to ``args[-1]``
    (in-process executors wrote it in place). A failure raises the original exception (from a
    worker process: caused by a ``RemoteEvaluationError`` with the remote traceback); a dead
    worker raises ``WorkerLostError`` naming call ``index`` and its parameters.

    Parameters
    ----------
    executor : ExecutorLike, ExecutorInfo or None
        Where the call runs.
    fn : callable
        The function (packed for other processes; may be packed already).
    *args
        Its arguments, the context last.
    index : int
        The call's number, for messages.

    Raises
    ------
    NotPicklableError
        When ``fn`` or the arguments cannot be sent (before anything is submitted).

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> from chemfit.core.context import EvaluateContext
    >>> def objective(x, ctx):
    ...     ctx.meta["x"] = x
    ...     return 2 * x
    >>> ctx = EvaluateContext()
    >>> with ThreadPoolExecutor(1) as pool:
    ...     submit_with_context(pool, objective, 21, ctx).result()
    42
    >>> ctx.meta
    {'x': 21}
    """
    return ContextSubmitter(executor, fn).submit(*args, index=index)


def submit_calls(
    executor: Any,
    fn: Callable[..., Any],
    calls: Sequence[tuple],
    *,
    stop_at_first_error: bool = False,
    index: int = 0,
) -> ContextFuture:
    """Submit several calls ``fn(*call)`` as ONE task; returns a :class:`ContextFuture`.

    Its ``result()`` is a list of :class:`CallOutcome` (value or error, and the wall seconds
    measured where the call ran) in call order, each call's state applied to its context. It
    raises only when the task as a whole failed (a lost worker, a pickling error).

    Parameters
    ----------
    executor, fn
        As in :func:`submit_with_context`.
    calls : sequence of tuple
        ``(*args, ctx)`` for each call.
    stop_at_first_error : bool
        The calls after a failed one do not run (they have no outcome).
    index : int
        The number of the first call, for messages.

    Examples
    --------
    >>> from chemfit.core.context import EvaluateContext
    >>> def inverse(x, ctx):
    ...     ctx.loss = 1 / x
    ...     return ctx.loss
    >>> calls = [(2, EvaluateContext()), (0, EvaluateContext()), (4, EvaluateContext())]
    >>> outcomes = submit_calls(None, inverse, calls, stop_at_first_error=True).result()
    >>> [(o.value, type(o.error).__name__) for o in outcomes]
    [(0.5, 'NoneType'), (None, 'ZeroDivisionError')]
    """
    submitter = ContextSubmitter(executor, fn, stop_at_first_error=stop_at_first_error)
    return submitter.submit_calls(calls, index)


# -- inputs and cancelling ----------------------------------------------------------------------


def collect_calls(iterables: tuple[Iterable, ...], ctxs: Iterable) -> tuple[list[tuple], list]:
    """Read every iterable once (R2) and zip them with the contexts.

    Returns ``(calls, contexts)`` where each call is ``(*args_i, ctx_i)``.

    Raises
    ------
    TypeError
        When ``ctxs`` is not iterable or holds something that is not an evaluation context.
    ValueError
        When an iterable and ``ctxs`` differ in length.

    Examples
    --------
    >>> from chemfit.core.context import EvaluateContext
    >>> ctx = EvaluateContext()
    >>> calls, ctxs = collect_calls((iter([1]),), [ctx])
    >>> calls[0][0], calls[0][1] is ctx
    (1, True)
    """
    try:
        ctx_list = list(ctxs)
    except TypeError:
        raise TypeError(
            f"ctxs must be an iterable of EvaluateContext, got {type(ctxs).__name__}; "
            "pass one context per call, e.g. ctxs=[EvaluateContext() for _ in params]"
        ) from None
    n_calls = len(ctx_list)
    arg_lists = []
    for position, iterable in enumerate(iterables):
        items = list(iterable)
        if len(items) != n_calls:
            raise ValueError(
                f"iterable {position} has {len(items)} items but ctxs has {n_calls}; "
                "pass exactly one context per call"
            )
        arg_lists.append(items)
    checked: set[type] = set()
    for index, ctx in enumerate(ctx_list):
        cls = type(ctx)
        if cls in checked:
            continue
        if not (
            callable(getattr(ctx, "to_result_state", None))
            and callable(getattr(ctx, "apply_result_state", None))
        ):
            raise TypeError(
                f"ctxs[{index}] is a {cls.__name__}, not an EvaluateContext; "
                "pass one EvaluateContext per call"
            )
        checked.add(cls)
    return list(zip(*arg_lists, ctx_list)), ctx_list


def cancel_all(futures: Iterable[FutureLike]) -> None:
    """Cancel every future that has not started; a future that fails to cancel is abandoned.

    Examples
    --------
    >>> future = cf.Future()
    >>> cancel_all([future])
    >>> future.cancelled()
    True
    """
    for future in futures:
        try:
            future.cancel()
        except Exception:  # a remote future may fail to cancel; it is abandoned either way
            logger.debug("could not cancel %r", future, exc_info=True)
