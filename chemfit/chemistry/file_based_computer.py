"""Quantities from an external program that reads and writes files.

Per call, :class:`FileBasedQuantityComputer` creates a fresh working directory, lets a presubmit
hook write the inputs, runs a command there, waits for the output files and merges what the
output parsers read from them. Failures become a :class:`~chemfit.exceptions.ComputeError`
(a :class:`~chemfit.exceptions.ComputeTimeoutError` for timeouts) whose message names the
command, the exit code, the tail of stderr and the kept working directory.

The computer holds only paths, plain values and the callables you give it, so it pickles to
process pools, loky, ipyparallel engines and MPI ranks as long as those callables do (use
module-level functions or ``functools.partial`` of them).
"""

from __future__ import annotations

import copy
import datetime
import logging
import os
import shutil
import subprocess
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from functools import partial
from numbers import Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from chemfit.chemistry._subprocess import run_command, tail
from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import ComputeError, ComputeTimeoutError, ExternalProgramError
from chemfit.core.objectives import QuantityComputer
from chemfit.core.utils import dump_dict_to_file

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "CommandType",
    "FileBasedQuantityComputer",
    "OutputParser",
    "PreSubmitHook",
]

logger = logging.getLogger(__name__)

MESSAGE_PREFIX = "Exception in `_compute` of FileBasedQuantityComputer"


@runtime_checkable
class OutputParser(Protocol):
    """Read quantities from the output files (absolute paths, in the order given).

    Examples
    --------
    >>> def read_energy(output_files):
    ...     return {"energy": float(output_files[0].read_text())}
    >>> isinstance(read_energy, OutputParser)
    True
    """

    def __call__(self, output_files: list[Path]) -> dict: ...


@runtime_checkable
class PreSubmitHook(Protocol):
    """Prepare a fresh working directory (write the inputs) before the command runs.

    Examples
    --------
    >>> def write_input(parameters, workdir):
    ...     (workdir / "in.txt").write_text(str(parameters["x"]))
    >>> isinstance(write_input, PreSubmitHook)
    True
    """

    def __call__(self, parameters: dict, workdir: Path) -> None: ...


CommandType = Callable[[dict, Path], list[str]]


class _Failure(Exception):
    """Internal: one failed stage, with what the error message needs."""

    def __init__(
        self,
        reason: str,
        cause: BaseException,
        *,
        timeout: bool = False,
        program_error: ExternalProgramError | None = None,
        exited: bool = False,
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause
        self.timeout = timeout
        self.program_error = program_error
        self.exited = exited  # the command ran and exited non-zero: outputs may be usable


def _check_output_files(output_files: Any) -> list[Path]:
    if isinstance(output_files, (str, os.PathLike)):
        output_files = [output_files]
    try:
        paths = [Path(p) for p in output_files]
    except TypeError:
        raise TypeError(
            f"output_files must be a list of relative paths, got {output_files!r:.80}"
        ) from None
    for path in paths:
        if path.is_absolute():
            raise ValueError(
                f"output_files entry {str(path)!r} is absolute; give paths relative to the "
                "working directory, which is new for every evaluation"
            )
    return paths


def _check_parsers(output_parsers: Any) -> list[Callable[[list[Path]], dict]]:
    parsers = [output_parsers] if callable(output_parsers) else list(output_parsers)
    if not parsers:
        raise ValueError("output_parsers is empty; pass at least one parser(output_files) -> dict")
    for i, parser in enumerate(parsers):
        if not callable(parser):
            raise TypeError(
                f"output_parsers[{i}] must be callable as parser(output_files) -> dict, "
                f"got {type(parser).__name__}"
            )
    return parsers


def _check_optional_callable(value: Any, argument: str, signature: str) -> None:
    if value is not None and not callable(value):
        raise TypeError(
            f"{argument} must be None or a callable {signature}, got {type(value).__name__}"
        )


def _check_seconds(value: Any, argument: str, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{argument} must be a number of seconds, got {value!r}")
    value = float(value)
    if not (value > 0 if positive else value >= 0) or value != value:
        raise ValueError(
            f"{argument} must be {'> 0' if positive else '>= 0'} seconds, got {value!r}"
        )
    return value


class FileBasedQuantityComputer(QuantityComputer):
    """Compute quantities by running an external program in a fresh working directory.

    Parameters
    ----------
    output_files : list of str or Path
        Output files, relative to the working directory (absolute paths raise ``ValueError``).
    output_parsers : OutputParser or list of OutputParser
        ``parser(output_files) -> dict`` with the absolute output paths; the dicts are merged
        in order. A failing parser is retried once, after ``poll_interval``.
    base_working_directory : str or Path
        Where the per-call working directories ``<base>/<uuid4>`` are created.
    executable_cmd : CommandType, optional
        ``cmd(parameters, workdir) -> list[str]``. Required unless set later with
        :meth:`with_cmd` or supplied by overriding :meth:`build_cmd`.
    presubmit_hook : PreSubmitHook, optional
        ``hook(parameters, workdir)`` writes the inputs before the command runs.
    wait_timeout : float
        Seconds to wait for every output file after the command returned (for commands that
        submit a job and return at once). A positive value also bounds the command itself
        unless ``subprocess_run_args`` has its own ``timeout``.
    poll_interval : float
        Seconds between checks for the output files.
    subprocess_run_args : dict, optional
        Keywords for running the command, as for ``subprocess.run`` (default
        ``{"capture_output": True}``). ``check`` is always on.
    delete_temp_workdirs : bool
        Delete the working directory after a successful call. With ``False`` no working
        directory is ever deleted.
    write_dump_file_after_crash : bool
        After a failure, write ``<base>/<uuid>.dump`` (JSON: parameters, command, exit code,
        stdout and stderr tails, error and traceback).
    keep_temp_workdir_after_crash : bool
        Keep the working directory of a failed call for inspection. A failed call deletes it
        only when this is ``False`` and ``delete_temp_workdirs`` is ``True``.
    try_parsing_after_exception : bool
        When the command exits with a non-zero code (``subprocess.CalledProcessError``), write
        the dump file, log the WARNING "Will attempt to parse output files." and wait for and
        parse the outputs anyway. If the parsers succeed, so does the call, and its working
        directory is handled as after a success. A command that timed out or could not be
        started is never parsed.

    Raises
    ------
    ComputeError
        From a call whose command, output files or parsers failed. The message starts with
        "Exception in `_compute` of FileBasedQuantityComputer" and names the command, the exit
        code, the stderr tail and the working directory. For a failed command, ``__cause__``
        is an :class:`~chemfit.exceptions.ExternalProgramError` whose ``__cause__`` is the
        ``CalledProcessError``. The error also has the attributes ``cmd``, ``returncode``,
        ``stderr_tail`` and ``workdir``.
        A program that could not be started raises at once, with the ``OSError``
        (``FileNotFoundError``, ``PermissionError``) as ``__cause__``.
    ComputeTimeoutError
        When the command exceeds its timeout, or the output files do not appear within a
        positive ``wait_timeout``; also a ``TimeoutError``.

    Notes
    -----
    The command runs as ``subprocess.run(cmd, check=True, cwd=workdir, **args)``, looked up
    at call time, so a test may monkeypatch ``subprocess.run``. ``args`` adds to
    ``subprocess_run_args`` a ``timeout`` (unless given), ``stdin=subprocess.DEVNULL`` and, on
    POSIX, ``start_new_session=True``; after a timeout the processes the command left running
    in its working directory are killed with its session (Linux).

    Each call stores the working directory in ``ctx.temp.workdir`` and writes
    ``ctx.meta["external_program"] = {"workdir", "cmd", "returncode", "seconds"}``.

    Examples
    --------
    >>> import sys, tempfile
    >>> def write_input(parameters, workdir):
    ...     (workdir / "x.txt").write_text(repr(parameters["x"]))
    >>> def square_cmd(parameters, workdir):
    ...     code = "x = float(open('x.txt').read()); open('y.txt', 'w').write(repr(x * x))"
    ...     return [sys.executable, "-c", code]
    >>> def read_y(output_files):
    ...     return {"y": float(output_files[0].read_text())}
    >>> computer = FileBasedQuantityComputer(
    ...     ["y.txt"], read_y, tempfile.mkdtemp(), executable_cmd=square_cmd,
    ...     presubmit_hook=write_input, wait_timeout=30)
    >>> computer({"x": 3.0})
    {'y': 9.0}
    """

    def __init__(
        self,
        output_files: list[Path | str],
        output_parsers: list[OutputParser] | OutputParser,
        base_working_directory: str | os.PathLike,
        executable_cmd: CommandType | None = None,
        presubmit_hook: PreSubmitHook | None = None,
        wait_timeout: float = 500.0,
        poll_interval: float = 1,
        subprocess_run_args: dict | None = None,
        delete_temp_workdirs: bool = True,
        write_dump_file_after_crash: bool = True,
        keep_temp_workdir_after_crash: bool = True,
        try_parsing_after_exception: bool = False,
    ) -> None:
        super().__init__()
        self.output_files = _check_output_files(output_files)
        self.output_parsers = _check_parsers(output_parsers)
        if not isinstance(base_working_directory, (str, os.PathLike)):
            raise TypeError(
                "base_working_directory must be a str or os.PathLike, got "
                f"{type(base_working_directory).__name__}"
            )
        self.base_working_directory = Path(base_working_directory).expanduser().resolve()
        _check_optional_callable(executable_cmd, "executable_cmd", "cmd(parameters, workdir)")
        _check_optional_callable(presubmit_hook, "presubmit_hook", "hook(parameters, workdir)")
        self.executable_cmd = executable_cmd
        self.presubmit_hook = presubmit_hook
        self.wait_timeout = _check_seconds(wait_timeout, "wait_timeout", positive=False)
        self.poll_interval = _check_seconds(poll_interval, "poll_interval", positive=True)
        if subprocess_run_args is not None and not isinstance(subprocess_run_args, dict):
            raise TypeError(
                "subprocess_run_args must be a dict of subprocess.run keywords or None, got "
                f"{type(subprocess_run_args).__name__}"
            )
        self.subprocess_run_args = (
            {"capture_output": True} if subprocess_run_args is None else dict(subprocess_run_args)
        )
        self.delete_temp_workdirs = bool(delete_temp_workdirs)
        self.write_dump_file_after_crash = bool(write_dump_file_after_crash)
        self.keep_temp_workdir_after_crash = bool(keep_temp_workdir_after_crash)
        self.try_parsing_after_exception = bool(try_parsing_after_exception)

    # -- configuration --------------------------------------------------------------------

    def with_presubmit(self, fn: Callable[..., None], /, **kw: Any) -> Self:
        """A shallow copy whose presubmit hook is ``partial(fn, **kw)``."""
        _check_optional_callable(fn, "fn", "hook(parameters, workdir, **kw)")
        new = copy.copy(self)
        new.presubmit_hook = partial(fn, **kw)
        return new

    def with_cmd(self, fn: Callable[..., list[str]], /, **kw: Any) -> Self:
        """A shallow copy whose command is ``partial(fn, **kw)``."""
        _check_optional_callable(fn, "fn", "cmd(parameters, workdir, **kw)")
        new = copy.copy(self)
        new.executable_cmd = partial(fn, **kw)
        return new

    def create_temp_workdir(self) -> Path:
        """Create and return a new, empty ``<base_working_directory>/<uuid4>``."""
        self.base_working_directory.mkdir(parents=True, exist_ok=True)
        workdir = self.base_working_directory / str(uuid.uuid4())
        workdir.mkdir()
        return workdir

    def _has_command(self) -> bool:
        return (
            self.executable_cmd is not None
            or type(self).build_cmd is not FileBasedQuantityComputer.build_cmd
        )

    def build_cmd(self, parameters: dict, ctx: EvaluateContext) -> list[str]:
        """The command for this call; override it e.g. to prepend ``srun``.

        The default calls ``executable_cmd(parameters, ctx.temp.workdir)``.
        """
        if self.executable_cmd is None:
            raise ValueError(
                "FileBasedQuantityComputer has no command: pass executable_cmd=, use "
                ".with_cmd(fn), or override build_cmd"
            )
        return self.executable_cmd(parameters, ctx.temp.workdir)

    # -- one call -------------------------------------------------------------------------

    def _command(self, parameters: dict, ctx: EvaluateContext) -> list[str]:
        cmd = self.build_cmd(parameters, ctx)
        if isinstance(cmd, (str, bytes)) or not isinstance(cmd, Iterable):
            raise TypeError(
                f"the command must be a list of arguments, got {cmd!r:.80}; "
                "split a command line with shlex.split"
            )
        cmd = [os.fspath(arg) if isinstance(arg, os.PathLike) else arg for arg in cmd]
        if not cmd or not all(isinstance(arg, str) for arg in cmd):
            raise TypeError(f"the command must be a non-empty list of str, got {cmd!r:.120}")
        return cmd

    def _run_args(self) -> dict:
        """The keywords for running the command in this call."""
        return self.subprocess_run_args

    def _run(self, cmd: list[str], workdir: Path, record: dict) -> None:
        try:
            default_timeout = self.wait_timeout if self.wait_timeout > 0 else None
            done = run_command(cmd, workdir, self._run_args(), timeout=default_timeout)
        except subprocess.CalledProcessError as exc:
            record["returncode"] = exc.returncode
            record["stderr_tail"] = tail(exc.stderr)
            record["stdout_tail"] = tail(exc.stdout)
            error = ExternalProgramError(
                f"command exited with code {exc.returncode}",
                cmd=cmd,
                returncode=exc.returncode,
                stderr_tail=record["stderr_tail"],
                workdir=str(workdir),
            )
            error.__cause__ = exc
            raise _Failure(
                f"the command exited with code {exc.returncode}",
                error,
                program_error=error,
                exited=True,
            ) from exc
        except subprocess.TimeoutExpired as exc:
            record["stderr_tail"] = tail(exc.stderr)
            record["stdout_tail"] = tail(exc.output)
            error = ExternalProgramError(
                f"command timed out after {exc.timeout} s and was killed",
                cmd=cmd,
                returncode=None,
                stderr_tail=record["stderr_tail"],
                workdir=str(workdir),
            )
            error.__cause__ = exc
            raise _Failure(
                f"the command timed out after {exc.timeout} s and was killed",
                error,
                timeout=True,
                program_error=error,
            ) from exc
        except OSError as exc:  # FileNotFoundError, PermissionError: it never ran
            raise _Failure(
                f"the command could not be started: {cmd[0]!r}: {type(exc).__name__}: "
                f"{exc.strerror or exc}; check that the program exists, is executable and is on "
                "PATH (or give its absolute path)",
                exc,
            ) from exc
        record["returncode"] = done.returncode
        record["stderr_tail"] = tail(done.stderr)

    def _wait_for_outputs(self, workdir: Path) -> list[Path]:
        paths = [workdir / p for p in self.output_files]
        deadline = time.monotonic() + self.wait_timeout
        while True:
            missing = [str(p.relative_to(workdir)) for p in paths if not p.exists()]
            if not missing:
                return paths
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                exc = FileNotFoundError(f"output files {missing} missing in {workdir}")
                raise _Failure(
                    f"the output files {missing} did not appear within {self.wait_timeout:g} s",
                    exc,
                    timeout=self.wait_timeout > 0,
                ) from exc
            time.sleep(min(self.poll_interval, remaining))

    def _parse(self, paths: list[Path]) -> dict:
        quantities: dict = {}
        for parser in self.output_parsers:
            for attempt in (1, 2):
                try:
                    produced = parser(list(paths))
                    if not isinstance(produced, dict):
                        raise TypeError(
                            f"output parser {parser!r:.60} returned {type(produced).__name__}, "
                            "expected a dict"
                        )
                    break
                except Exception as exc:
                    if attempt == 2:
                        raise _Failure(
                            f"the output parser {parser!r:.60} failed twice: "
                            f"{type(exc).__name__}: {exc}",
                            exc,
                        ) from exc
                    logger.debug("output parser %r failed (%s); retrying once", parser, exc)
                    time.sleep(self.poll_interval)
            quantities.update(produced)
        return quantities

    def _compute(self, parameters: dict, ctx: EvaluateContext) -> dict:
        if not self._has_command():
            raise ValueError(
                "FileBasedQuantityComputer has no command: pass executable_cmd=, use "
                ".with_cmd(fn), or override build_cmd"
            )
        workdir = self.create_temp_workdir()
        ctx.temp.workdir = workdir
        record: dict = {"workdir": str(workdir), "cmd": None, "returncode": None}
        start = time.perf_counter()
        try:
            quantities = self._run_stages(parameters, ctx, workdir, record)
        except _Failure as failure:
            record["seconds"] = time.perf_counter() - start
            ctx.meta["external_program"] = _public(record)
            raise self._error(failure, parameters, workdir, record) from (
                failure.program_error or failure.cause
            )
        except BaseException:
            # a bad command (TypeError) or an interrupt: nothing to inspect if nothing ran
            if record["cmd"] is None or not self._keep_after_crash():
                shutil.rmtree(workdir, ignore_errors=True)
            raise
        record["seconds"] = time.perf_counter() - start
        ctx.meta["external_program"] = _public(record)
        # also after a failed command whose outputs parsed: the dump file tells about it
        if self.delete_temp_workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
        return quantities

    def _run_stages(
        self, parameters: dict, ctx: EvaluateContext, workdir: Path, record: dict
    ) -> dict:
        if self.presubmit_hook is not None:
            try:
                self.presubmit_hook(parameters, workdir)
            except Exception as exc:
                raise _Failure(
                    f"the presubmit hook failed: {type(exc).__name__}: {exc}", exc
                ) from exc
        cmd = self._command(parameters, ctx)
        record["cmd"] = cmd
        logger.debug("running %s in %s", cmd, workdir)
        try:
            self._run(cmd, workdir, record)
        except _Failure as failure:
            # only a command that ran and exited non-zero may have left usable outputs
            if not (self.try_parsing_after_exception and failure.exited):
                raise
            self._write_dump(failure, parameters, workdir, record)
            exc = failure.program_error.__cause__ if failure.program_error else failure.cause
            logger.warning(
                "Command failed with %s: %s%s",
                type(exc).__name__,
                exc,
                f" Dump file: {record['dump_file']}" if record.get("dump_file") else "",
            )
            logger.warning("Will attempt to parse output files.")
            try:
                return self._parse(self._wait_for_outputs(workdir))
            except _Failure as parse_failure:
                failure.reason += f"; parsing afterwards failed too: {parse_failure.reason}"
                raise failure from parse_failure.cause
        return self._parse(self._wait_for_outputs(workdir))

    # -- failures -------------------------------------------------------------------------

    def _keep_after_crash(self) -> bool:
        """Whether a failed call keeps its working directory (as upstream: unless both
        ``delete_temp_workdirs`` is set and ``keep_temp_workdir_after_crash`` is not)."""
        return self.keep_temp_workdir_after_crash or not self.delete_temp_workdirs

    def _write_dump(self, failure: _Failure, parameters: dict, workdir: Path, record: dict) -> None:
        """Write ``<base>/<uuid>.dump`` (if asked to), once per call."""
        if record.get("dumped") or not self.write_dump_file_after_crash:
            return
        record["dumped"] = True
        dump = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "parameters": parameters,
            "cmd": record.get("cmd"),
            "workdir": str(workdir),
            "returncode": record.get("returncode"),
            "stderr_tail": record.get("stderr_tail", ""),
            "stdout_tail": record.get("stdout_tail", ""),
            "error": f"{type(failure.cause).__name__}: {failure.cause}",
            "reason": failure.reason,
            "traceback": "".join(traceback.format_exception(failure.cause)),
        }
        path = self.base_working_directory / f"{workdir.name}.dump"
        try:
            dump_dict_to_file(path, dump)
            record["dump_file"] = str(path)
        except Exception:
            logger.exception("could not write the dump file %s", path)

    def _error(
        self, failure: _Failure, parameters: dict, workdir: Path, record: dict
    ) -> ComputeError:
        keep = self._keep_after_crash()
        self._write_dump(failure, parameters, workdir, record)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
        kind = type(self).__name__
        where = f"kept for inspection: {workdir}" if keep else f"deleted: {workdir}"
        stderr_tail = record.get("stderr_tail", "")
        lines = [
            f"{MESSAGE_PREFIX}"
            + (f" ({kind})" if kind != "FileBasedQuantityComputer" else "")
            + f": {failure.reason}",
            f"  command: {record.get('cmd')}",
            f"  exit code: {record.get('returncode')}",
            f"  working directory {where}",
        ]
        if record.get("dump_file"):
            lines.append(f"  dump file: {record['dump_file']}")
        lines.append(
            "  stderr tail:"
            + ("\n    " + stderr_tail.replace("\n", "\n    ") if stderr_tail else " (empty)")
        )
        error_cls = ComputeTimeoutError if failure.timeout else ComputeError
        error = error_cls("\n".join(lines))
        error.cmd = record.get("cmd")
        error.returncode = record.get("returncode")
        error.stderr_tail = stderr_tail
        error.workdir = str(workdir) if keep else None
        return error


def _public(record: dict) -> dict:
    return {k: record.get(k) for k in ("workdir", "cmd", "returncode", "seconds")}
