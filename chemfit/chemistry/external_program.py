"""A friendlier front end to :class:`FileBasedQuantityComputer` for simulation programs.

:class:`ExternalProgramComputer` writes input files from templates filled with the parameters
(and optionally the parameters as JSON), runs a fixed command with a timeout in a fresh working
directory, and hands the output files to a parser. Failures keep the working directory; a
successful one is deleted unless ``keep_workdirs`` is set.

Templates use :meth:`str.format` fields: ``{x}`` for a top-level parameter, ``{lj.epsilon}`` or
``{lj[epsilon]}`` for a nested one, with format specs such as ``{lj.sigma:.6f}``. Literal braces
are doubled (``{{`` and ``}}``).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from string import Formatter
from typing import Any

from chemfit.chemistry.file_based_computer import (
    CommandType,
    FileBasedQuantityComputer,
    OutputParser,
)
from chemfit.core.utils import check_timeout

__all__ = ["ExternalProgramComputer", "TemplateInputWriter", "render_template"]

DEFAULT_WORKDIR_BASE = Path(tempfile.gettempdir()) / "chemfit-runs"


class _Fields(dict):
    """Nested parameters readable as ``{a.b}`` as well as ``{a[b]}`` in format strings."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _fields(value: Any) -> Any:
    if isinstance(value, Mapping):
        return _Fields({k: _fields(v) for k, v in value.items()})
    return value


def render_template(template: str, parameters: Mapping[str, Any]) -> str:
    """Fill a :meth:`str.format` template with (nested) parameters.

    Raises
    ------
    ValueError
        When the template names a parameter that does not exist.

    Examples
    --------
    >>> render_template("eps {lj.epsilon:.3f} sig {lj[sigma]} {{x}}", {"lj": {"epsilon": 0.0104, "sigma": 3.4}})
    'eps 0.010 sig 3.4 {x}'
    """
    try:
        return Formatter().vformat(template, (), _fields(parameters))
    except (KeyError, AttributeError, IndexError) as exc:
        raise ValueError(
            f"the template names the field {exc.args[0]!r}, which is not a parameter (have "
            f"{sorted(map(str, parameters))}); double literal braces as {{{{ and }}}}"
        ) from None


TemplateSource = str | os.PathLike | Callable[[dict], str]


class TemplateInputWriter:
    """Presubmit hook that writes input files from templates and, optionally, the parameters.

    Parameters
    ----------
    templates : mapping of str to template
        File name (relative to the working directory) -> template. A ``str`` is the template
        text, a ``Path`` a template file (read once, here), a callable ``f(parameters) -> str``
        renders the text itself.
    parameters_file : str, optional
        Also write the parameters as JSON to this file.

    Examples
    --------
    >>> workdir = Path(tempfile.mkdtemp())
    >>> TemplateInputWriter({"in.txt": "x = {x}"}, parameters_file="p.json")({"x": 2.5}, workdir)
    >>> (workdir / "in.txt").read_text(), json.loads((workdir / "p.json").read_text())
    ('x = 2.5', {'x': 2.5})
    """

    def __init__(
        self,
        templates: Mapping[str, TemplateSource] | None = None,
        parameters_file: str | None = None,
    ) -> None:
        self.templates: dict[str, str | Callable[[dict], str]] = {}
        for name, source in (templates or {}).items():
            if Path(name).is_absolute():
                raise ValueError(
                    f"input file name {name!r} is absolute; name it relative to the working "
                    "directory"
                )
            if isinstance(source, os.PathLike):
                self.templates[str(name)] = Path(source).read_text()
            elif isinstance(source, str) or callable(source):
                self.templates[str(name)] = source
            else:
                raise TypeError(
                    f"the template of {name!r} must be a str (the text), a Path (a template "
                    f"file) or a callable(parameters) -> str, got {type(source).__name__}"
                )
        if parameters_file is not None and Path(parameters_file).is_absolute():
            raise ValueError(f"parameters_file {parameters_file!r} must be a relative name")
        self.parameters_file = parameters_file

    def __call__(self, parameters: dict, workdir: Path) -> None:
        for name, template in self.templates.items():
            if callable(template):
                text = template(parameters)
                if not isinstance(text, str):
                    raise TypeError(
                        f"the template callable for {name!r} returned "
                        f"{type(text).__name__}, expected str"
                    )
            else:
                text = render_template(template, parameters)
            target = workdir / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        if self.parameters_file is not None:
            (workdir / self.parameters_file).write_text(json.dumps(parameters, default=float))


class _FixedCommand:
    """A picklable command that ignores the parameters and the working directory."""

    def __init__(self, args: Sequence[str | os.PathLike]) -> None:
        self.args = [os.fspath(a) for a in args]

    def __call__(self, parameters: dict, workdir: Path) -> list[str]:
        return list(self.args)

    def __repr__(self) -> str:
        return f"_FixedCommand({self.args!r})"


class ExternalProgramComputer(FileBasedQuantityComputer):
    """Run a simulation program once per evaluation, from templated inputs.

    Parameters
    ----------
    command : list of str, or CommandType
        The command line (run in the working directory, no shell), or
        ``cmd(parameters, workdir) -> list[str]``.
    output_files : list of str
        Output files the program writes, relative to the working directory.
    parser : OutputParser or list of OutputParser
        ``parser(output_files) -> dict``.
    input_templates : mapping of str to template, optional
        Input files to write, see :class:`TemplateInputWriter`.
    parameters_file : str, optional
        Also write the parameters as JSON to this file.
    workdir_base : str or Path, optional
        Parent of the per-evaluation directories; default ``<tmp>/chemfit-runs``. Use a
        shared file system when evaluating on several machines.
    timeout : float
        Seconds the command may run before it (and its process group) is killed.
    keep_workdirs : bool
        Also keep the working directories of successful evaluations.
    output_wait : float
        Seconds to wait for the output files after the command returned (0: check once).
    env : mapping, optional
        Environment variables added to the current environment for the command.
    poll_interval : float
        Seconds between checks for the outputs, and before a parser is retried.

    Notes
    -----
    Failures raise :class:`~chemfit.exceptions.ComputeError` (a
    :class:`~chemfit.exceptions.ComputeTimeoutError` on a timeout), naming the command, the
    exit code, the stderr tail and the kept working directory; a JSON dump file next to it
    records the parameters and the traceback.

    Examples
    --------
    >>> import sys
    >>> script = "import json; p = json.load(open('p.json')); print(p['x'] ** 2, file=open('out', 'w'))"
    >>> computer = ExternalProgramComputer(
    ...     [sys.executable, "-c", script], ["out"],
    ...     parser=lambda files: {"y": float(files[0].read_text())},
    ...     parameters_file="p.json", timeout=30)
    >>> computer({"x": 1.5})
    {'y': 2.25}
    """

    def __init__(
        self,
        command: Sequence[str | os.PathLike] | CommandType,
        output_files: Sequence[str | os.PathLike],
        parser: OutputParser | Sequence[OutputParser],
        input_templates: Mapping[str, TemplateSource] | None = None,
        parameters_file: str | None = None,
        workdir_base: str | os.PathLike | None = None,
        timeout: float = 600.0,
        keep_workdirs: bool = False,
        output_wait: float = 0.0,
        env: Mapping[str, str] | None = None,
        poll_interval: float = 0.05,
    ) -> None:
        if callable(command):
            executable_cmd = command
        elif isinstance(command, (str, bytes)):
            raise TypeError(
                f"command must be a list of arguments, got the string {command!r:.80}; "
                "split it with shlex.split"
            )
        else:
            args = list(command)
            if not args or not all(isinstance(a, (str, os.PathLike)) for a in args):
                raise ValueError(f"command must be a non-empty list of str, got {command!r:.80}")
            executable_cmd = _FixedCommand(args)
        timeout = check_timeout(timeout, allow_none=False)
        run_args: dict[str, Any] = {"capture_output": True, "timeout": timeout}
        super().__init__(
            output_files=list(output_files),
            output_parsers=parser,
            base_working_directory=DEFAULT_WORKDIR_BASE if workdir_base is None else workdir_base,
            executable_cmd=executable_cmd,
            presubmit_hook=TemplateInputWriter(input_templates, parameters_file),
            wait_timeout=output_wait,
            poll_interval=poll_interval,
            subprocess_run_args=run_args,
            delete_temp_workdirs=not keep_workdirs,
            write_dump_file_after_crash=True,
            keep_temp_workdir_after_crash=True,
            try_parsing_after_exception=False,
        )
        self.timeout = float(timeout)
        self.env = None if env is None else {str(k): str(v) for k, v in env.items()}

    def _run_args(self) -> dict:
        # merged at call time, so each worker or rank uses its own environment
        if self.env is None:
            return self.subprocess_run_args
        return {**self.subprocess_run_args, "env": {**os.environ, **self.env}}
