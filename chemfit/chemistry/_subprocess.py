"""Run one external command through ``subprocess.run(check=True)``.

The call goes through the ``subprocess.run`` attribute of the :mod:`subprocess` module at call
time, so tests that monkeypatch ``subprocess.run`` (as upstream chemfit's users do) see it. On
POSIX the command runs in its own session; after a timeout or an interrupt, ``subprocess.run``
kills the command itself and :func:`kill_leftover_sessions` kills what it started (Linux).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["kill_leftover_sessions", "run_command", "tail"]

logger = logging.getLogger(__name__)

_TAIL_LINES = 20
_TAIL_CHARS = 2000
_PROC = Path("/proc")


def tail(stream: Any, lines: int = _TAIL_LINES, chars: int = _TAIL_CHARS) -> str:
    """The last ``lines`` lines (at most ``chars`` characters) of captured output.

    Examples
    --------
    >>> tail(b"a\\nb\\nc\\n", lines=2)
    'b\\nc'
    >>> tail(None)
    ''
    """
    if stream is None:
        return ""
    text = stream.decode(errors="replace") if isinstance(stream, bytes) else str(stream)
    text = "\n".join(text.rstrip("\n").splitlines()[-lines:])
    return text[-chars:]


def _run_keywords(run_args: Mapping[str, Any], timeout: float | None) -> dict:
    """The keywords for ``subprocess.run`` besides ``check`` and ``cwd``."""
    args = dict(run_args)
    args.pop("check", None)  # always on
    if args.get("capture_output") and ("stdout" in args or "stderr" in args):
        raise ValueError(
            "subprocess_run_args has capture_output=True together with stdout or stderr; "
            "use one or the other"
        )
    args.setdefault("timeout", timeout)
    if args["timeout"] is None:
        del args["timeout"]
    if "input" not in args:
        # a program waiting for a terminal would otherwise hang until the timeout
        args.setdefault("stdin", subprocess.DEVNULL)
    if os.name == "posix":
        args.setdefault("start_new_session", True)
    return args


def run_command(
    cmd: Sequence[str], cwd: Path, run_args: Mapping[str, Any], timeout: float | None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd`` as ``subprocess.run(cmd, check=True, cwd=cwd, **run_args)``.

    ``run_args`` takes the keywords of ``subprocess.run`` (``capture_output``, ``input``,
    ``timeout``, ``env``, ``text``, ...); its ``timeout`` wins over ``timeout``. Standard input
    is ``/dev/null`` unless ``input`` or ``stdin`` is given. On POSIX the command runs in its
    own session (``start_new_session=True``, unless ``run_args`` says otherwise); when
    ``subprocess.run`` raises ``TimeoutExpired`` or is interrupted, the processes that the
    command started and that still run in ``cwd`` are killed with their sessions.

    Raises
    ------
    subprocess.CalledProcessError
        The command exited with a non-zero code.
    subprocess.TimeoutExpired
        The command ran longer than the timeout (and was killed).
    OSError
        The command could not be started (``FileNotFoundError``, ``PermissionError``, ...).

    Examples
    --------
    >>> import sys, tempfile
    >>> done = run_command([sys.executable, "-c", "print(6 * 7)"], Path(tempfile.gettempdir()),
    ...                    {"capture_output": True, "text": True}, timeout=30)
    >>> done.stdout.strip()
    '42'
    """
    args = _run_keywords(run_args, timeout)
    try:
        return subprocess.run(list(cmd), check=True, cwd=cwd, **args)
    except (subprocess.CalledProcessError, OSError):
        raise  # it ended by itself, or never started: nothing to clean up
    except BaseException:
        if args.get("start_new_session"):
            kill_leftover_sessions(cwd)
        raise


def _is_running(pid: int) -> bool:
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _processes() -> list[tuple[int, int, str]]:
    """``(pid, session id, working directory)`` of every process we may inspect."""
    found = []
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError):
            found.append((pid, os.getsid(pid), os.readlink(_PROC / entry.name / "cwd")))
    return found


def kill_leftover_sessions(workdir: Path) -> list[int]:
    """Kill the sessions, whose leader has ended, of processes still running in ``workdir``.

    After ``subprocess.run`` has killed a timed-out command that ran in its own session, its
    children keep the session (and usually the working directory). Their session id is the
    command's old pid, which is no longer a running process; that tells them apart from
    anything else that happens to run in ``workdir``. Linux only (``/proc``); elsewhere it
    does nothing. Returns the session ids that were killed.

    Examples
    --------
    >>> import tempfile
    >>> kill_leftover_sessions(Path(tempfile.mkdtemp()))
    []
    """
    if not _PROC.is_dir():
        logger.debug("no /proc: processes left by a killed command are not looked for")
        return []
    root = os.path.realpath(workdir)
    own_session = os.getsid(0)
    processes = _processes()
    sessions = {
        sid
        for pid, sid, cwd in processes
        if (cwd == root or cwd.startswith(root + os.sep))
        and sid != own_session
        and not _is_running(sid)
    }
    for sid in sorted(sessions):
        with contextlib.suppress(OSError):
            os.killpg(sid, signal.SIGKILL)  # the command's own process group
        for pid, process_sid, _ in processes:
            if process_sid == sid:  # members that moved to another group of that session
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        logger.debug("killed the processes left in session %d by a command in %s", sid, root)
    return sorted(sessions)
