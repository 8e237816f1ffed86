"""What an executor is, worked out once where it is resolved and passed along.

:func:`executor_info` resolves what users pass as ``executor=`` (``None`` becomes a
:class:`~chemfit.execution.executors.SerialExecutor`) and answers every question chemfit asks
about it: where its tasks run, whether they are pickled, how many run at once, whether its
workers see this process's ``__main__`` and who shuts it down. Code that receives an
:class:`ExecutorInfo` passes it on instead of asking again; :func:`executor_info` returns one
as it is.

Executor libraries are recognised by the module names of their classes, so none is imported.
An executor chemfit does not know (kind ``"other"``) is taken to run its tasks elsewhere until
one of chemfit's tasks is seen running on the caller's own objects in this process
(:func:`note_ran_in_place`); from then on it is known to run in this process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import weakref
from dataclasses import dataclass
from typing import Any

from chemfit.execution.executors import SerialExecutor, as_executor

__all__ = ["ExecutorInfo", "executor_info", "note_ran_in_place"]

logger = logging.getLogger(__name__)

_REMOTE_KINDS = {"ipyparallel": "ipyparallel", "distributed": "dask"}

# Executors passed as they are (not clients resolved to a new executor) -> the other fields of
# their info, which do not change over an executor's life (map_with_context asks at every
# call). Not the info itself: it refers to the executor, which would then never be collected.
_known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ExecutorInfo:
    """What an executor is (see :func:`executor_info`).

    Attributes
    ----------
    executor : ExecutorLike
        The resolved executor (a :class:`~chemfit.execution.executors.SerialExecutor` for
        ``None``); never ``None``.
    kind : str
        ``"serial"``, ``"threads"``, ``"process-pool"`` (``concurrent.futures``), ``"loky"``,
        ``"ipyparallel"``, ``"dask"`` or ``"other"``.
    in_process : bool
        Tasks run in this process: nothing is pickled, contexts are written in place. For an
        executor of kind ``"other"`` this becomes true (for the infos resolved from then on)
        once a task chemfit sent it in the wire form ran on the caller's own objects, in this
        process (see :func:`note_ran_in_place`).
    local_pool : bool
        A stdlib process pool or loky: worker processes on this machine.
    n_workers : int
        How many tasks it runs at once (a guess for unknown executors).
    main_reachable : bool
        Its workers can look names up in this process's ``__main__``.
    owned : bool
        chemfit created it and shuts it down.
    """

    executor: Any
    kind: str
    in_process: bool
    local_pool: bool
    n_workers: int
    main_reachable: bool
    owned: bool = False

    @property
    def on_this_machine(self) -> bool:
        """In this process or a local pool: what a task does, the caller could do itself."""
        return self.in_process or self.local_pool

    @property
    def name(self) -> str:
        """The executor's type name, for messages.

        Examples
        --------
        >>> executor_info(None).name
        'SerialExecutor'
        """
        return type(self.executor).__name__


def _top_packages(obj: Any) -> set[str]:
    return {cls.__module__.partition(".")[0] for cls in type(obj).__mro__}


def _kind(executor: Any) -> str:
    if isinstance(executor, SerialExecutor):
        return "serial"
    threads = sys.modules.get("concurrent.futures.thread")
    if threads is not None and isinstance(executor, threads.ThreadPoolExecutor):
        return "threads"
    packages = _top_packages(executor)
    if "loky" in packages:  # loky's executor subclasses the stdlib process pool: check it first
        return "loky"
    processes = sys.modules.get("concurrent.futures.process")
    if processes is not None and isinstance(executor, processes.ProcessPoolExecutor):
        return "process-pool"
    if type(executor).__name__ == "IPyParallelExecutor":
        return "ipyparallel"
    for package, kind in _REMOTE_KINDS.items():
        if package in packages:
            return kind
    return "other"


def _worker_count(executor: Any, kind: str) -> int:
    if kind == "serial":
        return 1
    for name in ("_max_workers", "max_workers", "_n_workers", "n_workers", "n_engines"):
        value = getattr(executor, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return os.cpu_count() or 1


def _pool_reaches_main(executor: Any) -> bool:
    """A stdlib pool's workers see ``__main__`` when they fork, or when they spawn and
    ``__main__`` is a script file (they import it again); not a notebook's ``__main__``."""
    context = getattr(executor, "_mp_context", None)
    if context is None:
        import multiprocessing

        context = multiprocessing.get_context()
    if context.get_start_method() == "fork":
        return True
    main = sys.modules.get("__main__")
    return bool(getattr(main, "__file__", None)) and not sys.flags.interactive


def executor_info(executor: Any, *, owned: bool = False) -> ExecutorInfo:
    """What ``executor`` is; an :class:`ExecutorInfo` is returned as it is.

    Parameters
    ----------
    executor : ExecutorLike, a Dask or ipyparallel client or view, ExecutorInfo or None
        Anything :func:`~chemfit.execution.executors.as_executor` accepts; ``None`` becomes a
        :class:`~chemfit.execution.executors.SerialExecutor`.
    owned : bool
        chemfit created the executor and shuts it down.

    Raises
    ------
    TypeError
        For anything :func:`~chemfit.execution.executors.as_executor` refuses.

    Examples
    --------
    >>> from concurrent.futures import ThreadPoolExecutor
    >>> info = executor_info(None)
    >>> info.kind, info.in_process, info.local_pool, info.n_workers
    ('serial', True, False, 1)
    >>> with ThreadPoolExecutor(3) as pool:
    ...     info = executor_info(pool)
    >>> info.kind, info.in_process, info.n_workers, executor_info(info) is info
    ('threads', True, 3, True)
    """
    if isinstance(executor, ExecutorInfo):
        return executor
    try:
        return ExecutorInfo(executor, *_known[executor], owned=owned)
    except (KeyError, TypeError):  # not seen yet, or not weakly referable (None, ...)
        pass
    resolved = as_executor(executor)
    if resolved is None:
        resolved = SerialExecutor()
    kind = _kind(resolved)
    in_process = kind in ("serial", "threads")
    fields = (
        kind,
        in_process,
        kind in ("process-pool", "loky"),
        _worker_count(resolved, kind),
        in_process or (kind == "process-pool" and _pool_reaches_main(resolved)),
    )
    if resolved is executor:
        with contextlib.suppress(TypeError):  # not hashable or not weakly referable
            _known[executor] = fields
    return ExecutorInfo(resolved, *fields, owned=owned)


def note_ran_in_place(executor: Any) -> None:
    """A task that chemfit submitted to ``executor`` ran on the very objects it was given.

    Called by the task itself (:class:`~chemfit.execution.context_tasks.ContextTask`) when it
    finds that neither it nor its calls were copied on their way: it runs in this process, on
    the caller's objects. Only this process's memory sees the call (a pickled task has
    forgotten its executor, a forked worker writes into its own copy), so it is evidence that
    ``executor`` runs tasks in this process without copying them, where a process id could not
    tell (a container elsewhere may have the same one, and an executor here may pickle what it
    runs). From then on :func:`executor_info` of an executor of kind ``"other"`` says
    ``in_process`` (and ``main_reachable``): calls get the caller's own contexts instead of
    their wire form, as on a thread pool. Known kinds are left alone: what they are does not
    depend on one task. (An executor that ran some tasks in place and sent others elsewhere
    would be misjudged; none is known to.)

    Examples
    --------
    >>> from concurrent.futures import Executor, Future
    >>> class RunsAtOnce(Executor):
    ...     def submit(self, fn, /, *args, **kwargs):
    ...         future = Future()
    ...         future.set_result(fn(*args, **kwargs))
    ...         return future
    >>> executor = RunsAtOnce()
    >>> executor_info(executor).in_process
    False
    >>> note_ran_in_place(executor)
    >>> info = executor_info(executor)
    >>> info.kind, info.in_process, info.main_reachable, info.on_this_machine
    ('other', True, True, True)
    """
    try:
        fields = _known.get(executor)
    except TypeError:  # not weakly referable: nothing was cached, nothing is learned
        return
    if fields is None or fields[0] != "other" or fields[1]:
        return
    kind, _, local_pool, n_workers, _ = fields
    _known[executor] = (kind, True, local_pool, n_workers, True)
    logger.debug(
        "a task ran in place on %s: its tasks run in this process from now on",
        type(executor).__name__,
    )
