"""Exceptions raised by chemfit.

Every exception subclasses a builtin (``ValueError``, ``TypeError``, ``RuntimeError``,
``TimeoutError``, ``KeyboardInterrupt``) so that code written against upstream chemfit, which
raised the builtins, keeps catching them.
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = [
    "ComputeError",
    "ComputeTimeoutError",
    "ExternalProgramError",
    "FitInterrupted",
    "NotPicklableError",
    "RankTimeoutError",
    "RemoteEvaluationError",
    "UnknownOptimizerError",
    "WorkerLostError",
]


class UnknownOptimizerError(ValueError, KeyError):
    """The optimizer name is not in ``nevergrad.optimizers.registry``.

    Also a ``KeyError`` so that upstream handlers keep working; ``str()`` is the plain message
    (``KeyError`` would otherwise quote it).
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotPicklableError(TypeError):
    """An object must cross a process or rank boundary and cannot be pickled."""


class WorkerLostError(RuntimeError):
    """A worker process or engine died while evaluating.

    Attributes
    ----------
    index : int | None
        Index of the lost evaluation (position in the batch or call sequence).
    parameters : Any
        The parameters of the lost evaluation, when known.
    """

    def __init__(self, message: str, *, index: int | None = None, parameters: Any = None):
        super().__init__(message)
        self.index = index
        self.parameters = parameters


class RankTimeoutError(WorkerLostError, TimeoutError):
    """Worker ranks of an :class:`MPIWrapperCOB` did not answer within its ``timeout``.

    A :class:`WorkerLostError` (and a ``TimeoutError``). The wrapper aborts every rank once
    this error has propagated (see :class:`~chemfit.execution.mpi_wrapper_cob.MPIWrapperCOB`).
    Defined here, not beside the wrapper, so that a notebook receiving it from MPI engines
    does not import mpi4py to unpickle it.

    Attributes
    ----------
    ranks : dict[int, tuple[int, int]]
        Each rank that did not answer and the terms ``(start, end)`` (``end`` exclusive) it was
        evaluating.
    timeout : float
        The wrapper's timeout in seconds.
    parameters : dict
        The parameters of the call.

    Examples
    --------
    >>> error = RankTimeoutError("rank 1 did not answer", ranks={1: (3, 6)}, timeout=5.0)
    >>> isinstance(error, TimeoutError), error.ranks
    (True, {1: (3, 6)})
    >>> import pickle
    >>> pickle.loads(pickle.dumps(error)).ranks  # it travels from an engine as itself
    {1: (3, 6)}
    """

    def __init__(
        self,
        message: str,
        *,
        ranks: dict[int, tuple[int, int]],
        timeout: float,
        parameters: Any = None,
    ) -> None:
        super().__init__(message, parameters=parameters)
        self.ranks = dict(ranks)
        self.timeout = timeout

    def __reduce__(self) -> tuple:
        # BaseException pickles as cls(*args), which would lose the keyword-only attributes.
        rebuild = functools.partial(
            type(self), ranks=self.ranks, timeout=self.timeout, parameters=self.parameters
        )
        return rebuild, self.args


class RemoteEvaluationError(RuntimeError):
    """An error happened on another MPI rank or ipyparallel engine.

    Attributes
    ----------
    rank : int | None
        The rank (or engine id) where the error happened.
    where : str
        Where it happened, in words (``"worker process 4242"``, ``"ipyparallel engine 1"``,
        ``"rank 2"``); empty when unknown.
    term_index : int | None
        The index of the objective term that raised, when known.
    type_name : str
        The remote exception's type name.
    remote_message : str
        The remote exception's message.
    remote_traceback : str
        The remote traceback as text.
    """

    def __init__(
        self,
        message: str | None = None,
        *,
        rank: int | None = None,
        term_index: int | None = None,
        type_name: str = "",
        remote_message: str = "",
        remote_traceback: str = "",
        where: str = "",
    ):
        if message is None:
            place = where or (f"rank {rank}" if rank is not None else "a remote worker")
            term = f", term {term_index}" if term_index is not None else ""
            message = f"{type_name} on {place}{term}: {remote_message}"
        super().__init__(message)
        self.where = where
        self.rank = rank
        self.term_index = term_index
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __reduce__(self):
        return (
            _rebuild_remote_error,
            (
                str(self),
                self.rank,
                self.term_index,
                self.type_name,
                self.remote_message,
                self.remote_traceback,
                self.where,
            ),
        )


def _rebuild_remote_error(
    message, rank, term_index, type_name, remote_message, remote_tb, where=""
):
    return RemoteEvaluationError(
        message,
        rank=rank,
        term_index=term_index,
        type_name=type_name,
        remote_message=remote_message,
        remote_traceback=remote_tb,
        where=where,
    )


class ComputeError(RuntimeError):
    """A file-based quantity computer failed."""


class ComputeTimeoutError(ComputeError, TimeoutError):
    """A file-based quantity computer timed out."""


class ExternalProgramError(RuntimeError):
    """An external program failed.

    Attributes
    ----------
    cmd : list[str]
        The command that ran.
    returncode : int | None
        Its exit code (``None`` on a timeout).
    stderr_tail : str
        The last lines of its standard error.
    workdir : str | None
        The working directory, kept for inspection.
    """

    def __init__(
        self,
        message: str,
        *,
        cmd: Any = None,
        returncode: int | None = None,
        stderr_tail: str = "",
        workdir: Any = None,
    ):
        super().__init__(message)
        self.cmd = cmd
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.workdir = workdir


class FitInterrupted(KeyboardInterrupt):
    """A ``KeyboardInterrupt`` (Ctrl-C, a kernel interrupt) ended a fit; what it evaluated is kept.

    The fitter raises it from the original interrupt once ``fitter.result`` holds the
    evaluations so far. It is a ``KeyboardInterrupt``, so code that catches those keeps
    working. IPython and Jupyter show it as its one-line message instead of a traceback.

    Attributes
    ----------
    result : FitResult or None
        The fitter's ``result`` at the interrupt.

    Examples
    --------
    >>> exc = FitInterrupted("fit interrupted after 3 evaluations; they are kept in ...")
    >>> isinstance(exc, KeyboardInterrupt), exc._render_traceback_()
    (True, ['KeyboardInterrupt: fit interrupted after 3 evaluations; they are kept in ...'])
    """

    def __init__(self, message: str, *, result: Any = None) -> None:
        super().__init__(message)
        self.result = result

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def _render_traceback_(self) -> list[str]:
        """IPython's hook: the lines shown instead of the traceback (one line here)."""
        return [f"KeyboardInterrupt: {self}"]
