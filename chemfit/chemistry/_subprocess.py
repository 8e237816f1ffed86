"""Run one external command like ``subprocess.run(check=True)``, killing its whole process
group on a timeout so that no grandchild outlives it (POSIX)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["run_command", "tail"]

_TAIL_LINES = 20
_TAIL_CHARS = 2000


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


def _kill(proc: subprocess.Popen, own_group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, OSError):
        if own_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()


def run_command(
    cmd: Sequence[str], cwd: Path, run_args: Mapping[str, Any], timeout: float | None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``cwd``; raise ``CalledProcessError`` or ``TimeoutExpired`` like ``run``.

    ``run_args`` takes the keywords of ``subprocess.run`` (``capture_output``, ``input``,
    ``timeout``, ``env``, ``text``, ...); its ``timeout`` wins over ``timeout``. Standard input
    is ``/dev/null`` unless ``input`` or ``stdin`` is given. On POSIX the command runs in its own
    session, whose process group is killed on a timeout or an interrupt.

    Examples
    --------
    >>> import sys, tempfile
    >>> done = run_command([sys.executable, "-c", "print(6 * 7)"], Path(tempfile.gettempdir()),
    ...                    {"capture_output": True, "text": True}, timeout=30)
    >>> done.stdout.strip()
    '42'
    """
    args = dict(run_args)
    args.pop("check", None)
    timeout = args.pop("timeout", timeout)
    input_data = args.pop("input", None)
    if args.pop("capture_output", False):
        if "stdout" in args or "stderr" in args:
            raise ValueError(
                "subprocess_run_args has capture_output=True together with stdout or stderr; "
                "use one or the other"
            )
        args["stdout"] = subprocess.PIPE
        args["stderr"] = subprocess.PIPE
    if input_data is not None:
        args["stdin"] = subprocess.PIPE
    else:
        args.setdefault("stdin", subprocess.DEVNULL)
    own_group = os.name == "posix" and args.setdefault("start_new_session", True)
    with subprocess.Popen(list(cmd), cwd=cwd, **args) as proc:
        try:
            stdout, stderr = proc.communicate(input_data, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc, own_group)
            try:
                stdout, stderr = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a detached grandchild still holds the pipes
                stdout, stderr = None, None
            raise subprocess.TimeoutExpired(
                proc.args, timeout, output=stdout, stderr=stderr
            ) from None
        except BaseException:
            _kill(proc, own_group)
            raise
        returncode = proc.poll()
    if returncode:
        raise subprocess.CalledProcessError(returncode, proc.args, output=stdout, stderr=stderr)
    return subprocess.CompletedProcess(proc.args, returncode, stdout, stderr)
