"""Which executor is running the current task (R11), and which worker process runs a task.

Tasks submitted through :func:`~chemfit.execution.executor_utils.map_with_context`,
:func:`~chemfit.execution.executor_utils.as_completed_with_context` (and the Fitter) mark the
thread that runs them with the executor they were submitted to. A nested parallel objective
(``ExecutorWrapperCOB``) reads the mark with :func:`current_task_executor`: when its chosen
executor is the one already running the task, submitting to it again could deadlock a bounded
pool, so it evaluates inline instead.

The mark holds the executor object only while a task runs **in the caller's process** (thread
pools, :class:`~chemfit.execution.executors.SerialExecutor`). A task that is pickled to another
process forgets its executor, so the mark there is ``None``.

A task on a local process pool announces the worker process that runs it
(:class:`TaskAnnouncements`): a few bytes written into a small shared file at its start, so that
the caller can kill that very process when the evaluation is abandoned
(:meth:`~chemfit.execution.submission.ContextFuture.abandon`).
"""

from __future__ import annotations

import itertools
import mmap
import os
import shutil
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable
from typing import Any

__all__ = [
    "TaskAnnouncements",
    "announce_task",
    "call_marked",
    "current_task_executor",
    "marked_as_task_of",
    "task_announcements",
]


class _Marks(threading.local):
    def __init__(self) -> None:  # runs once in each thread that uses the marks
        self.stack: list[object | None] = [None]  # the current mark last


_marks = _Marks()


def current_task_executor() -> object | None:
    """The executor whose task is running in this thread, or ``None``.

    Returns
    -------
    object or None
        The executor that the running task was submitted to, when that task runs in this
        process; ``None`` outside such a task or in another process.

    Examples
    --------
    >>> current_task_executor() is None
    True
    >>> token = object()
    >>> with marked_as_task_of(token):
    ...     current_task_executor() is token
    True
    """
    return _marks.stack[-1]


class marked_as_task_of:  # a context manager, named like a function
    """Mark the current thread as running a task of ``executor`` for the ``with`` block.

    The previous mark is restored on exit, so marks nest. This is the one place that sets the
    mark: every chemfit task runs inside it (a class, not a generator, because it wraps every
    task and must cost next to nothing). One object may be entered by several threads at once
    and again within its own block.

    Parameters
    ----------
    executor : object or None
        The executor the task was submitted to; ``None`` for a task that runs in another
        process (a pickled task forgets its executor).

    Examples
    --------
    >>> outer, inner = object(), object()
    >>> with marked_as_task_of(outer):
    ...     with marked_as_task_of(inner):
    ...         assert current_task_executor() is inner
    ...     current_task_executor() is outer
    True
    """

    __slots__ = ("_executor",)

    def __init__(self, executor: object | None) -> None:
        self._executor = executor

    # The marks are a per-thread stack, not state of this object, so one object can mark many
    # tasks at once (a task object reuses it in every thread of a pool).
    def __enter__(self) -> None:
        _marks.stack.append(self._executor)

    def __exit__(self, *exc_info: Any) -> None:
        _marks.stack.pop()


def call_marked(executor: object | None, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with the thread marked as running a task of ``executor``.

    What :class:`marked_as_task_of` does for a ``with`` block, for one call, in one frame: the
    form a single in-process call is submitted in, where a frame more per call shows.

    Examples
    --------
    >>> token = object()
    >>> call_marked(token, current_task_executor) is token, current_task_executor() is None
    (True, True)
    """
    stack = _marks.stack
    stack.append(executor)
    try:
        return fn(*args)
    finally:
        stack.pop()


# -- which worker process runs a task --------------------------------------------------------------

#: A slot: the task's number and the pid of the process that started it (native int64 each).
_SLOT = struct.Struct("qq")
_SLOTS = 8192  # more tasks than this in flight only forget the pids of the oldest ones

# In a worker: the announcement files it has opened, by path (mapped once per process).
_views: dict[str, mmap.mmap] = {}


def _open_view(path: str) -> mmap.mmap:
    with open(path, "r+b") as handle:
        view = mmap.mmap(handle.fileno(), _SLOT.size * _SLOTS)
    _views[path] = view
    return view


def announce_task(path: str, number: int) -> None:
    """In a worker: say that this process runs task ``number`` (at its start).

    Writes ``(number, pid)`` into the slot of ``number`` of the file at ``path``
    (:class:`TaskAnnouncements`); a file that cannot be opened is ignored (the task runs, only
    its process cannot be named).

    Examples
    --------
    >>> board = TaskAnnouncements()
    >>> number = board.next_number()
    >>> announce_task(board.path, number)
    >>> board.pid_of(number) == os.getpid()
    True
    >>> board.close()
    """
    view = _views.get(path)
    if view is None:
        try:
            view = _open_view(path)
        except (OSError, ValueError):
            return
    _SLOT.pack_into(view, (number % _SLOTS) * _SLOT.size, number, os.getpid())


class TaskAnnouncements:
    """Where the tasks of local process pools say which worker process runs them.

    One small file (in ``/dev/shm`` where it exists, else the temporary directory; private to
    this user), mapped into memory by the caller and by each worker that runs a task: a task
    numbered ``n`` writes ``(n, pid)`` into slot ``n % 8192`` as it starts
    (:func:`announce_task`), and :meth:`pid_of` reads it back. Writing costs a microsecond,
    against the tens of microseconds of sending a task to a pool. Use :func:`task_announcements`
    for this process's board.

    Examples
    --------
    >>> board = TaskAnnouncements()
    >>> first, second = board.next_number(), board.next_number()
    >>> announce_task(board.path, second)
    >>> board.pid_of(first) is None, board.pid_of(second) == os.getpid()
    (True, True)
    >>> board.close()
    """

    def __init__(self) -> None:
        shm = "/dev/shm"
        base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()
        _remove_stale(base)
        self.directory = tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base)
        self.path = os.path.join(self.directory, "pids")
        with open(self.path, "wb") as handle:
            handle.truncate(_SLOT.size * _SLOTS)
        self._view = _open_view(self.path)
        self._numbers = itertools.count(1)
        self.owner = os.getpid()
        self._finalizer = weakref.finalize(self, _remove, self.directory, self.owner)

    def next_number(self) -> int:
        """A new task number (unique in this process; thread-safe)."""
        return next(self._numbers)

    def pid_of(self, number: int) -> int | None:
        """The pid of the process that started task ``number``, ``None`` when not known (it has
        not started, or later tasks took its slot)."""
        found, pid = _SLOT.unpack_from(self._view, (number % _SLOTS) * _SLOT.size)
        return pid if found == number and pid > 0 else None

    def close(self) -> None:
        """Remove the file (the workers' mappings stay valid)."""
        self._finalizer()


_PREFIX = "chemfit-tasks-"


def _remove_stale(base: str) -> None:
    """Remove the files of processes that ended without removing theirs (killed, or a forked
    child that left with ``os._exit``); their pid is in the name."""
    try:
        names = [name for name in os.listdir(base) if name.startswith(_PREFIX)]
    except OSError:
        return
    for name in names:
        pid = name[len(_PREFIX) :].partition("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        except (PermissionError, OverflowError):  # another user's, or not a pid
            continue


def _remove(directory: str, owner: int) -> None:
    if os.getpid() == owner:  # not a forked child's inherited copy
        shutil.rmtree(directory, ignore_errors=True)


_board: TaskAnnouncements | None = None
_board_lock = threading.Lock()


def task_announcements() -> TaskAnnouncements:
    """This process's :class:`TaskAnnouncements` (created on first use; a forked child makes its
    own, so its numbers never collide with its parent's).

    Examples
    --------
    >>> task_announcements() is task_announcements()
    True
    """
    global _board
    board = _board
    if board is not None and board.owner == os.getpid():
        return board
    with _board_lock:
        if _board is None or _board.owner != os.getpid():
            _board = TaskAnnouncements()  # an OSError: the caller goes on without
        return _board
