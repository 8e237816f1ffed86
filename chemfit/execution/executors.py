"""Creating and normalising executors.

* :func:`make_executor` builds an executor by name (``"serial"``, ``"thread"``, ``"process"``,
  ``"loky"``, ``"ipyparallel"``).
* :func:`as_executor` turns what users pass as ``executor=`` (any ``ExecutorLike``, a Dask
  ``distributed.Client``, an ipyparallel ``Client`` or ``View``, or ``None``) into an
  ``ExecutorLike`` or ``None``.
* :class:`SerialExecutor` runs every call in the caller's thread.
* :class:`RestartableProcessPoolExecutor` is the stdlib process pool of
  ``make_executor("process")``, which :meth:`~RestartableProcessPoolExecutor.restart` makes
  usable again after a worker died (in place: references to it stay valid).

Dask, ipyparallel and loky are never imported here at module import: clients are recognised by
the module names of their classes, and loky and the ipyparallel executor load on first use.
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, Literal, get_args

from chemfit.core.context import ExecutorLike

__all__ = [
    "ExecutorKind",
    "RestartableProcessPoolExecutor",
    "SerialExecutor",
    "as_executor",
    "make_executor",
]

logger = logging.getLogger(__name__)

ExecutorKind = Literal["serial", "thread", "process", "loky", "ipyparallel", "dask"]
_KINDS: tuple[str, ...] = get_args(ExecutorKind)
_IPP_EXECUTOR_MODULE = "chemfit.execution.ipyparallel_executor"


class SerialExecutor(Executor):
    """An executor that runs each call at once, in the caller's thread.

    ``submit`` returns an already completed ``concurrent.futures.Future``; an exception raised
    by the call is stored in the future, as a pool would. Useful for debugging, for
    ``num_workers=1`` and wherever an ``ExecutorLike`` is required but parallelism is not.

    Examples
    --------
    >>> with SerialExecutor() as ex:
    ...     future = ex.submit(pow, 2, 10)
    ...     print(future.done(), future.result())
    ...     print(list(ex.map(pow, [1, 2, 3], [2, 2, 2])))
    True 1024
    [1, 4, 9]
    """

    def __init__(self) -> None:
        self._shutdown = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        """Run ``fn(*args, **kwargs)`` now and return its completed future."""
        if self._shutdown:
            raise RuntimeError("cannot submit to a SerialExecutor after shutdown()")
        future: Future = Future()
        future.set_running_or_notify_cancel()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Run ``fn`` over the zipped iterables, in order, before returning the iterator.

        ``chunksize`` is accepted and ignored. Calls that would start after ``timeout`` seconds
        are not run; iterating up to them raises ``TimeoutError``. Like the stdlib pools, an
        exception is raised when its result is reached.
        """
        if self._shutdown:
            raise RuntimeError("cannot map on a SerialExecutor after shutdown()")
        deadline = None if timeout is None else time.monotonic() + timeout
        futures: list[Future] = []
        for args in zip(*iterables):
            if deadline is not None and time.monotonic() >= deadline:
                futures.append(_timed_out_future(timeout))
                break
            futures.append(self.submit(fn, *args))
        return (future.result() for future in futures)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse further submissions (nothing is ever pending)."""
        self._shutdown = True

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "open"
        return f"SerialExecutor({state})"


class RestartableProcessPoolExecutor(ProcessPoolExecutor):
    """The stdlib ``ProcessPoolExecutor`` (what ``make_executor("process")`` returns), which
    :meth:`restart` makes usable again after one of its workers died.

    A stdlib pool whose worker dies is *broken*: every pending future fails with
    ``BrokenProcessPool`` and every later ``submit`` raises it. :meth:`restart` gives this very
    object new workers and queues (with the arguments it was created with), so that whoever
    holds a reference to it goes on using it;
    :func:`~chemfit.execution.recovery.recover_executor` calls it after a lost evaluation.

    Examples
    --------
    >>> import os, signal
    >>> with RestartableProcessPoolExecutor(1) as pool:
    ...     pid = pool.submit(os.getpid).result()
    ...     os.kill(pid, signal.SIGKILL)
    ...     try:
    ...         pool.submit(abs, -1).result()
    ...     except Exception as exc:
    ...         print(type(exc).__name__, pool.broken)
    ...     print(pool.restart(), pool.broken, pool.submit(abs, -2).result(), pool.restarts)
    BrokenProcessPool True
    True False 2 1
    """

    def __init__(self, max_workers: int | None = None, *args: Any, **kwargs: Any) -> None:
        super().__init__(max_workers, *args, **kwargs)
        self._arguments = (max_workers, args, kwargs)
        self._restart_lock = threading.Lock()
        #: How often :meth:`restart` replaced broken workers.
        self.restarts = 0

    @property
    def broken(self) -> bool:
        """Whether a worker died (the pool takes no work until :meth:`restart`)."""
        return bool(self._broken)

    @property
    def shut_down(self) -> bool:
        """Whether ``shutdown()`` was called (a broken pool is not shut down)."""
        return bool(self._shutdown_thread) and not self._broken

    def restart(self, timeout: float = 30) -> bool:
        """Replace the workers and queues of a broken pool, in place.

        Returns ``False`` (and does nothing) when the pool is not broken. The futures that
        failed when it broke stay failed: submit their calls again.

        Parameters
        ----------
        timeout : float
            Seconds to wait for the old pool's manager thread to finish cleaning up.

        Raises
        ------
        RuntimeError
            When the old pool does not finish cleaning up within ``timeout``.
        """
        with self._restart_lock:
            if not self._broken:
                return False
            thread = self._executor_manager_thread
            if thread is not None:
                thread.join(timeout)  # it fails the pending futures and ends the old workers
                if thread.is_alive():
                    raise RuntimeError(
                        f"the broken process pool did not finish cleaning up within {timeout} s; "
                        "create a new pool with make_executor('process', n)"
                    )
            max_workers, args, kwargs = self._arguments
            ProcessPoolExecutor.__init__(self, max_workers, *args, **kwargs)
            self.restarts += 1
            logger.info("restarted the broken process pool (restart %d)", self.restarts)
            return True


def _timed_out_future(timeout: float | None) -> Future:
    future: Future = Future()
    future.set_exception(TimeoutError(f"SerialExecutor.map ran out of its timeout of {timeout} s"))
    return future


def _check_max_workers(max_workers: Any) -> None:
    if max_workers is None:
        return
    if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(
            f"max_workers must be None or a positive int, got {max_workers!r}; "
            "pass e.g. max_workers=2, or None for the executor's default"
        )


def make_executor(
    kind: ExecutorKind = "thread", max_workers: int | None = None, **options: Any
) -> ExecutorLike:
    """Create an executor by name.

    Parameters
    ----------
    kind : {"serial", "thread", "process", "loky", "ipyparallel", "dask"}
        ``"serial"``: :class:`SerialExecutor`. ``"thread"`` / ``"process"``: the stdlib
        ``ThreadPoolExecutor`` / ``ProcessPoolExecutor`` (a
        :class:`RestartableProcessPoolExecutor`, which chemfit restarts when a worker dies). ``"loky"``:
        ``loky.get_reusable_executor(max_workers)``, which pickles lambdas and closures with
        cloudpickle (extra ``loky``). ``"ipyparallel"``: an ``IPyParallelExecutor`` on local
        engines or an existing cluster (extra ``ipyparallel``); ``engines="slurm"`` starts the
        engines as a Slurm job, with ``mpi=True`` under ``srun`` as one MPI world (extra
        ``slurm``). ``"dask"``: a ``DaskClusterExecutor`` on a ``LocalCluster``
        (``cluster="local"``), dask-jobqueue's ``SLURMCluster`` (``cluster="slurm"``) or a
        running scheduler (``address=``). On all of them chemfit sends what a notebook cell
        defines by value (with cloudpickle, when it is installed). See docs/cluster.md.
    max_workers : int, optional
        Number of workers; ``None`` uses the executor's default.
    **options
        Passed on to the executor's constructor (e.g. ``mp_context=`` for ``"process"``,
        ``timeout=`` for ``"loky"``, ``profile=`` or ``mpi=True`` for ``"ipyparallel"``). With
        ``engines="slurm"`` or ``cluster="slurm"``, the batch options ``partition``, ``time``,
        ``cores``, ``memory``, ``account``, ``extra_directives``, ``job_name`` and
        ``prologue`` (:class:`~chemfit.execution.slurm_batch.SlurmBatchOptions`).

    Returns
    -------
    ExecutorLike
        An executor that is also a context manager; leaving the ``with`` block shuts it down.

    Raises
    ------
    ValueError
        For an unknown ``kind`` or a bad ``max_workers``.
    ImportError
        When the extra that ``kind`` needs is not installed.

    Examples
    --------
    >>> with make_executor("thread", max_workers=2) as ex:
    ...     list(ex.map(abs, [-1, -2]))
    [1, 2]
    >>> make_executor("serial")
    SerialExecutor(open)
    >>> make_executor("gpu")
    Traceback (most recent call last):
    ...
    ValueError: unknown executor kind 'gpu'; choose one of 'serial', 'thread', 'process', 'loky', 'ipyparallel', 'dask'
    """
    if kind not in _KINDS:
        kinds = ", ".join(repr(k) for k in _KINDS)
        raise ValueError(f"unknown executor kind {kind!r}; choose one of {kinds}")
    _check_max_workers(max_workers)
    if kind == "serial":
        if options:
            raise TypeError(
                f"make_executor('serial') takes no options, got {sorted(options)}; remove them"
            )
        return SerialExecutor()
    if kind == "thread":
        from concurrent.futures import ThreadPoolExecutor

        return ThreadPoolExecutor(max_workers=max_workers, **options)
    if kind == "process":
        return RestartableProcessPoolExecutor(max_workers=max_workers, **options)
    if kind == "loky":
        try:
            import loky
        except ImportError as exc:
            raise ImportError(
                "make_executor('loky') needs the optional dependency loky; "
                "install it with: pip install 'chemfit[loky]'"
            ) from exc
        return loky.get_reusable_executor(max_workers=max_workers, **options)
    if kind == "dask":
        from chemfit.execution.dask_clusters import DaskClusterExecutor

        return DaskClusterExecutor(max_workers, **options)
    # kind == "ipyparallel": the executor lives in its own module, loaded on first use.
    try:
        module = importlib.import_module(_IPP_EXECUTOR_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name != _IPP_EXECUTOR_MODULE:
            raise
        raise ImportError(
            f"make_executor('ipyparallel') needs {_IPP_EXECUTOR_MODULE}, which is not available "
            "in this installation of chemfit; use 'loky' or 'process' instead"
        ) from exc
    return module.IPyParallelExecutor(max_workers, **options)


def _class_names(obj: Any) -> set[tuple[str, str]]:
    """``(top-level package, class name)`` for every class in the MRO of ``obj``'s type."""
    return {(cls.__module__.partition(".")[0], cls.__name__) for cls in type(obj).__mro__}


def _is_executor_like(obj: Any) -> bool:
    return callable(getattr(obj, "submit", None)) and callable(getattr(obj, "map", None))


def as_executor(obj: Any) -> ExecutorLike | None:
    """Normalise what users pass as ``executor=``.

    Parameters
    ----------
    obj : ExecutorLike, distributed.Client, ipyparallel.Client, ipyparallel View or None
        ``None`` and any object with ``submit`` and ``map`` are returned as they are. A Dask
        ``distributed.Client`` becomes ``client.get_executor()``. An ipyparallel ``Client``
        becomes ``client.executor()`` (load-balanced over all engines), a ``LoadBalancedView``
        becomes ``view.executor`` and a ``DirectView`` becomes a load-balanced executor over
        the view's engines (a direct view's own executor would run each call on every engine).

    Returns
    -------
    ExecutorLike or None

    Raises
    ------
    TypeError
        For anything else.

    Examples
    --------
    >>> ex = SerialExecutor()
    >>> as_executor(ex) is ex, as_executor(None)
    (True, None)
    >>> as_executor("threads")
    Traceback (most recent call last):
    ...
    TypeError: executor must be an ExecutorLike (an object with submit() and map(), e.g. a concurrent.futures, loky or SerialExecutor executor), a dask distributed.Client, an ipyparallel Client or View, or None; got str ('threads'). Use chemfit.executors.make_executor(kind) to create one.
    """
    if obj is None:
        return None
    names = _class_names(obj)
    # Clients are checked first: a dask Client has submit()/map() that return dask futures.
    if ("distributed", "Client") in names and callable(getattr(obj, "get_executor", None)):
        logger.debug("using the executor of dask client %r", obj)
        return obj.get_executor()
    if ("ipyparallel", "Client") in names and callable(getattr(obj, "executor", None)):
        logger.debug("using a load-balanced executor of ipyparallel client %r", obj)
        return obj.executor()
    if ("ipyparallel", "DirectView") in names:
        logger.debug("using a load-balanced executor over the engines of direct view %r", obj)
        return obj.client.executor(targets=obj.targets)
    if ("ipyparallel", "View") in names and _is_executor_like(getattr(obj, "executor", None)):
        return obj.executor
    if isinstance(obj, type):
        raise TypeError(
            f"executor must be an executor instance, got the class {obj.__name__}; "
            f"create one first, e.g. {obj.__name__}(max_workers=2), or use make_executor(kind)"
        )
    if _is_executor_like(obj):
        return obj
    text = repr(obj)
    if len(text) > 80:
        text = text[:77] + "..."
    raise TypeError(
        "executor must be an ExecutorLike (an object with submit() and map(), e.g. a "
        "concurrent.futures, loky or SerialExecutor executor), a dask distributed.Client, an "
        f"ipyparallel Client or View, or None; got {type(obj).__name__} ({text}). "
        "Use chemfit.executors.make_executor(kind) to create one."
    )
