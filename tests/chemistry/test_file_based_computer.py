"""FileBasedQuantityComputer and ExternalProgramComputer with a real program as the simulator.

The "simulator" is tests/helpers/fake_simulator.py, run in a fresh working directory per
evaluation; its mode (success, non-zero exit, timeout, garbage or missing output, late output) is
chosen on its command line. The pickling tests run the computers in real process pools and loky, and one test
runs them on MPI ranks under ``mpiexec``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import pytest

import chemfit
from chemfit.chemistry.external_program import (
    ExternalProgramComputer,
    TemplateInputWriter,
    render_template,
)
from chemfit.chemistry.file_based_computer import (
    FileBasedQuantityComputer,
    OutputParser,
    PreSubmitHook,
)
from chemfit.core.context import EvaluateContext
from chemfit.core.exceptions import ComputeError, ComputeTimeoutError, ExternalProgramError
from tests.helpers import external_program_terms as h

PREFIX = "Exception in `_compute` of FileBasedQuantityComputer"


def make_computer(base: Path, mode: str = "ok", **kwargs) -> FileBasedQuantityComputer:
    kwargs.setdefault("wait_timeout", 30)
    kwargs.setdefault("poll_interval", 0.05)
    return FileBasedQuantityComputer(
        ["out.json"],
        h.parse_out_json,
        base,
        executable_cmd=partial(h.simulator_cmd, mode=mode),
        presubmit_hook=h.write_input,
        **kwargs,
    )


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie awaiting its reaper does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def leftovers(base: Path) -> list[Path]:
    return sorted(base.iterdir()) if base.exists() else []


# -- success -------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_success_parses_outputs_and_deletes_the_workdir(tmp_path):
    computer = make_computer(tmp_path)
    ctx = EvaluateContext()
    quantities = computer({"x": 3.0}, ctx)
    assert quantities == {"energy": 4.0, "x": 3.0}
    assert ctx.quantities == quantities
    workdir = ctx.temp.workdir
    assert workdir.parent == tmp_path.resolve()
    assert not workdir.exists()
    assert leftovers(tmp_path) == []
    info = ctx.meta["external_program"]
    assert info["returncode"] == 0
    assert info["workdir"] == str(workdir)
    assert info["cmd"][-1] == "ok"
    assert info["seconds"] > 0


@pytest.mark.timeout(30)
def test_keeps_successful_workdirs_when_asked_and_merges_several_parsers(tmp_path):
    computer = FileBasedQuantityComputer(
        ["out.json", "log.txt"],
        [h.parse_out_json, h.parse_log],
        tmp_path,
        executable_cmd=h.simulator_cmd,
        presubmit_hook=h.write_input,
        delete_temp_workdirs=False,
        wait_timeout=10,
    )
    ctx = EvaluateContext()
    assert computer({"x": 0.0}, ctx) == {"energy": 1.0, "x": 0.0, "done": True}
    assert (ctx.temp.workdir / "out.json").exists()
    assert json.loads((ctx.temp.workdir / "input.json").read_text()) == {"x": 0.0}


@pytest.mark.timeout(30)
def test_each_call_gets_a_fresh_uuid_workdir(tmp_path):
    computer = make_computer(tmp_path)
    first = computer.create_temp_workdir()
    second = computer.create_temp_workdir()
    assert first != second and first.parent == second.parent == tmp_path.resolve()
    assert len(first.name) == 36 and list(first.iterdir()) == []


@pytest.mark.timeout(30)
def test_outputs_written_after_the_command_returned_are_waited_for(tmp_path):
    computer = make_computer(tmp_path, mode="late", wait_timeout=20)
    start = time.perf_counter()
    assert computer({"x": 1.0}) == {"energy": 0.5}
    assert time.perf_counter() - start >= 0.3


@pytest.mark.timeout(30)
def test_as_an_objective_with_a_loss(tmp_path):
    objective = make_computer(tmp_path).with_loss(h.energy_loss)
    ctx = EvaluateContext()
    assert objective({"x": 2.0}, ctx) == 1.0
    assert ctx.loss == 1.0


# -- failures ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_non_zero_exit_names_command_exit_code_stderr_and_keeps_the_workdir(tmp_path):
    computer = make_computer(tmp_path, mode="fail")
    ctx = EvaluateContext()
    with pytest.raises(ComputeError) as info:
        computer({"x": 1.0}, ctx)
    error = info.value
    message = str(error)
    assert message.startswith(PREFIX)
    assert not isinstance(error, ComputeTimeoutError)
    assert "fake_simulator.py" in message and "'fail'" in message
    assert "exit code: 3" in message
    assert "stderr line 29" in message and "stderr line 9\n" not in message  # only the tail
    workdir = ctx.temp.workdir
    assert str(workdir) in message and workdir.is_dir()
    assert (workdir / "input.json").exists()
    # the documented cause chain
    cause = error.__cause__
    assert isinstance(cause, ExternalProgramError)
    assert cause.returncode == 3 and cause.cmd[-1] == "fail"
    assert cause.workdir == str(workdir)
    assert cause.stderr_tail.splitlines()[-1] == "stderr line 29"
    assert isinstance(cause.__cause__, subprocess.CalledProcessError)
    assert error.returncode == 3 and error.workdir == str(workdir)
    # the dump file sits next to the workdir
    dump = json.loads((tmp_path / f"{workdir.name}.dump").read_text())
    assert dump["parameters"] == {"x": 1.0}
    assert dump["returncode"] == 3
    assert "CalledProcessError" in dump["error"] or "ExternalProgramError" in dump["error"]
    assert ctx.meta["external_program"]["returncode"] == 3


@pytest.mark.timeout(30)
def test_crash_flags_can_delete_the_workdir_and_skip_the_dump(tmp_path):
    computer = make_computer(
        tmp_path,
        mode="fail",
        keep_temp_workdir_after_crash=False,
        write_dump_file_after_crash=False,
    )
    with pytest.raises(ComputeError) as info:
        computer({"x": 1.0})
    assert leftovers(tmp_path) == []
    assert "deleted" in str(info.value)
    assert info.value.workdir is None


@pytest.mark.timeout(30)
def test_timeout_kills_the_program_and_its_children(tmp_path):
    computer = make_computer(
        tmp_path, mode="sleep", subprocess_run_args={"capture_output": True, "timeout": 1.5}
    )
    ctx = EvaluateContext()
    start = time.perf_counter()
    with pytest.raises(ComputeTimeoutError) as info:
        computer({"x": 1.0}, ctx)
    assert time.perf_counter() - start < 10
    error = info.value
    assert isinstance(error, TimeoutError) and isinstance(error, ComputeError)
    assert str(error).startswith(PREFIX) and "timed out" in str(error)
    assert isinstance(error.__cause__, ExternalProgramError)
    assert error.__cause__.returncode is None
    assert isinstance(error.__cause__.__cause__, subprocess.TimeoutExpired)
    child_pid = int((ctx.temp.workdir / "child.pid").read_text())
    deadline = time.monotonic() + 5
    while is_running(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_running(child_pid)  # the grandchild died with the process group


@pytest.mark.timeout(30)
def test_wait_timeout_also_bounds_the_command(tmp_path):
    computer = make_computer(tmp_path, mode="sleep", wait_timeout=1.0)
    with pytest.raises(ComputeTimeoutError):
        computer({"x": 1.0})


@pytest.mark.timeout(30)
def test_garbage_output_is_retried_once_then_raises(tmp_path):
    parser = h.CountingParser()
    computer = FileBasedQuantityComputer(
        ["out.json"],
        parser,
        tmp_path,
        executable_cmd=partial(h.simulator_cmd, mode="garbage"),
        presubmit_hook=h.write_input,
        wait_timeout=10,
        poll_interval=0.05,
    )
    with pytest.raises(ComputeError) as info:
        computer({"x": 1.0})
    assert parser.calls == 2
    message = str(info.value)
    assert message.startswith(PREFIX) and "failed twice" in message and "JSONDecodeError" in message
    assert "exit code: 0" in message
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


@pytest.mark.timeout(30)
def test_missing_output_without_waiting_is_a_compute_error(tmp_path):
    computer = make_computer(tmp_path, mode="missing", wait_timeout=0)
    with pytest.raises(ComputeError) as info:
        computer({"x": 1.0})
    assert not isinstance(info.value, ComputeTimeoutError)
    assert "out.json" in str(info.value) and isinstance(info.value.__cause__, FileNotFoundError)


@pytest.mark.timeout(30)
def test_missing_output_after_waiting_is_a_timeout(tmp_path):
    computer = make_computer(tmp_path, mode="missing", wait_timeout=0.3)
    with pytest.raises(ComputeTimeoutError, match=r"did not appear within 0\.3 s"):
        computer({"x": 1.0})


@pytest.mark.timeout(30)
def test_parser_returning_no_dict_is_reported(tmp_path):
    computer = FileBasedQuantityComputer(
        ["out.json"],
        lambda files: [1, 2],
        tmp_path,
        executable_cmd=h.simulator_cmd,
        presubmit_hook=h.write_input,
        wait_timeout=5,
        poll_interval=0.01,
    )
    with pytest.raises(ComputeError, match="expected a dict"):
        computer({"x": 1.0})


@pytest.mark.timeout(30)
def test_a_program_that_cannot_start_is_a_compute_error(tmp_path):
    computer = FileBasedQuantityComputer(
        ["out.json"],
        h.parse_out_json,
        tmp_path,
        executable_cmd=lambda p, w: [str(tmp_path / "no-such-program")],
        wait_timeout=1,
    )
    with pytest.raises(ComputeError, match="could not be started"):
        computer({"x": 1.0})


@pytest.mark.timeout(30)
def test_failing_presubmit_hook_is_a_compute_error(tmp_path):
    def broken_hook(parameters, workdir):
        raise OSError("disk full")

    computer = FileBasedQuantityComputer(
        ["out.json"],
        h.parse_out_json,
        tmp_path,
        executable_cmd=h.simulator_cmd,
        presubmit_hook=broken_hook,
    )
    with pytest.raises(ComputeError, match="presubmit hook failed: OSError: disk full"):
        computer({"x": 1.0})


@pytest.mark.timeout(30)
def test_try_parsing_after_exception_logs_and_parses(tmp_path, caplog):
    computer = make_computer(tmp_path, mode="fail_with_output", try_parsing_after_exception=True)
    ctx = EvaluateContext()
    with caplog.at_level(logging.WARNING, logger="chemfit.chemistry.file_based_computer"):
        assert computer({"x": 3.0}, ctx) == {"energy": 4.0, "x": 3.0}
    assert "Will attempt to parse output files." in caplog.messages
    assert not ctx.temp.workdir.exists()  # parsed: removed as after a success
    dump = json.loads((tmp_path / f"{ctx.temp.workdir.name}.dump").read_text())
    assert dump["returncode"] == 1 and dump["parameters"] == {"x": 3.0}
    assert leftovers(tmp_path) == [tmp_path / f"{ctx.temp.workdir.name}.dump"]
    assert ctx.meta["external_program"]["returncode"] == 1


@pytest.mark.timeout(30)
def test_try_parsing_after_exception_still_raises_without_outputs(tmp_path):
    computer = make_computer(
        tmp_path, mode="fail", try_parsing_after_exception=True, wait_timeout=0
    )
    with pytest.raises(ComputeError) as info:
        computer({"x": 1.0})
    assert "exit code: 3" in str(info.value) and "parsing afterwards failed" in str(info.value)
    assert isinstance(info.value.__cause__, ExternalProgramError)


# -- upstream 3.1 semantics: subprocess.run, parsed failures, programs that never start --------


def _upstream_failing_run(output_file: Path, calls: list, **error_kwargs):
    """A stand-in for ``subprocess.run`` as upstream's tests write it: it writes the output
    file in ``cwd``, then raises ``CalledProcessError``; it records its keywords."""

    def failing_run(cmd, *, check, cwd, **kwargs):
        calls.append({"cmd": cmd, "check": check, "cwd": Path(cwd), **kwargs})
        (Path(cwd) / output_file).write_text("42", encoding="utf-8")
        raise subprocess.CalledProcessError(returncode=1, cmd=cmd, **error_kwargs)

    return failing_run


def _parse_result(output_files: list[Path]) -> dict:
    return {"result": int(output_files[0].read_text(encoding="utf-8"))}


@pytest.mark.timeout(20)
def test_patched_subprocess_run_failure_is_parsed_warned_dumped_and_cleaned_up(
    tmp_path, monkeypatch, caplog
):
    # written against upstream's module paths, as an upstream user's test would be
    from chemfit.abstract_objective_function import EvaluateContext as UpstreamContext
    from chemfit.file_based_computer import FileBasedQuantityComputer as UpstreamComputer

    calls: list = []
    run = _upstream_failing_run(
        Path("result.txt"), calls, output="partial output", stderr="expected failure"
    )
    monkeypatch.setattr(subprocess, "run", run)
    computer = UpstreamComputer(
        output_files=[Path("result.txt")],
        output_parsers=_parse_result,
        base_working_directory=tmp_path,
        subprocess_run_args={},
        try_parsing_after_exception=True,
    ).with_cmd(lambda _parameters, _workdir: ["failing-command"])
    ctx = UpstreamContext()

    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        result = computer({}, ctx)
    assert time.perf_counter() - start < 5  # the output was there: no polling

    assert result == {"result": 42}
    assert not ctx.temp.workdir.exists()
    assert "Will attempt to parse output files." in caplog.text
    assert "Will attempt to parse output files." in caplog.messages
    assert "CalledProcessError" in caplog.text
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    dump_files = list(tmp_path.glob("*.dump"))
    assert len(dump_files) == 1
    assert "expected failure" in dump_files[0].read_text(encoding="utf-8")
    assert dump_files[0].stem == ctx.temp.workdir.name
    assert leftovers(tmp_path) == dump_files
    # one call, the way upstream makes it, plus the session and timeout it needs
    assert len(calls) == 1
    call = calls[0]
    assert call["cmd"] == ["failing-command"] and call["check"] is True
    assert call["cwd"] == ctx.temp.workdir
    assert call["start_new_session"] is True and call["timeout"] == 500.0
    assert "capture_output" not in call  # subprocess_run_args={} is passed on as given


@pytest.mark.timeout(20)
def test_patched_subprocess_run_failure_without_parsing_raises_the_chain(tmp_path, monkeypatch):
    from chemfit.abstract_objective_function import EvaluateContext as UpstreamContext
    from chemfit.file_based_computer import FileBasedQuantityComputer as UpstreamComputer

    parsed: list = []

    def parse_output(output_files: list[Path]) -> dict:
        parsed.append(output_files)
        return {"result": 42}

    calls: list = []
    monkeypatch.setattr(subprocess, "run", _upstream_failing_run(Path("result.txt"), calls))
    computer = UpstreamComputer(
        output_files=[Path("result.txt")],
        output_parsers=parse_output,
        base_working_directory=tmp_path,
        subprocess_run_args={},
        delete_temp_workdirs=True,
        keep_temp_workdir_after_crash=False,
        write_dump_file_after_crash=False,
    ).with_cmd(lambda _parameters, _workdir: ["failing-command"])
    ctx = UpstreamContext()

    with pytest.raises(Exception, match="Exception in `_compute`") as exc_info:
        computer({}, ctx)

    assert len(calls) == 1
    subprocess_exception = exc_info.value.__cause__.__cause__
    assert isinstance(subprocess_exception, subprocess.CalledProcessError)
    assert subprocess_exception.returncode == 1
    assert isinstance(exc_info.value, ComputeError)
    assert isinstance(exc_info.value.__cause__, ExternalProgramError)
    assert parsed == []
    assert not ctx.temp.workdir.exists()
    assert leftovers(tmp_path) == []  # no dump either
    assert "exit code: 1" in str(exc_info.value) and "deleted" in str(exc_info.value)


@pytest.mark.timeout(20)
def test_a_failed_call_keeps_its_workdir_when_workdirs_are_never_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", _upstream_failing_run(Path("result.txt"), []))
    computer = FileBasedQuantityComputer(
        [Path("result.txt")],
        _parse_result,
        tmp_path,
        executable_cmd=lambda _p, _w: ["failing-command"],
        delete_temp_workdirs=False,
        keep_temp_workdir_after_crash=False,
    )
    ctx = EvaluateContext()
    with pytest.raises(ComputeError) as info:
        computer({}, ctx)
    assert ctx.temp.workdir.is_dir() and info.value.workdir == str(ctx.temp.workdir)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind", ["missing", "not executable"])
def test_a_program_that_cannot_start_raises_at_once_even_when_parsing_after_failures(
    tmp_path, kind
):
    program = tmp_path / "bin" / "simulate"
    if kind == "not executable":
        program.parent.mkdir()
        program.write_text("#!/bin/sh\necho never\n")
        program.chmod(0o644)
    computer = FileBasedQuantityComputer(
        ["out.json"],
        h.parse_out_json,
        tmp_path / "runs",
        executable_cmd=lambda _p, _w: [str(program), "--input", "in.txt"],
        try_parsing_after_exception=True,  # with the default wait_timeout of 500 s
    )
    start = time.perf_counter()
    with pytest.raises(ComputeError) as info:
        computer({"x": 1.0})
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"took {elapsed:.1f} s: it waited for outputs of a program that never ran"
    error = info.value
    assert not isinstance(error, ComputeTimeoutError)
    message = str(error)
    assert message.startswith(PREFIX) and "could not be started" in message
    assert repr(str(program)) in message  # names the program
    expected = FileNotFoundError if kind == "missing" else PermissionError
    assert isinstance(error.__cause__, expected)
    assert expected.__name__ in message and (error.__cause__.strerror in message)
    assert error.returncode is None


@pytest.mark.timeout(60)
def test_parsing_after_a_failure_from_a_notebook_style_main_module(tmp_path):
    """A user's script (``__main__``) patches ``subprocess.run`` to fake a failing simulator."""
    script = tmp_path / "user_script.py"
    script.write_text(
        "import json, logging, subprocess, sys\n"
        "from pathlib import Path\n"
        "from chemfit.file_based_computer import FileBasedQuantityComputer\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stderr)\n"
        "def fake_run(cmd, *, check, cwd, **kwargs):\n"
        "    (Path(cwd) / 'energy.txt').write_text('-1.5')\n"
        "    raise subprocess.CalledProcessError(7, cmd, stderr=b'SCF not converged')\n"
        "def parse(files):\n"
        "    return {'energy': float(files[0].read_text())}\n"
        "subprocess.run = fake_run\n"
        "computer = FileBasedQuantityComputer(['energy.txt'], parse, sys.argv[1],\n"
        "    executable_cmd=lambda p, w: ['dft-code'], try_parsing_after_exception=True)\n"
        "print('RESULT', json.dumps(computer({'a': 1.0})))\n"
    )
    base = tmp_path / "runs"
    done = subprocess.run(
        [sys.executable, str(script), str(base)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == 'RESULT {"energy": -1.5}'
    assert "Will attempt to parse output files." in done.stderr
    (dump,) = base.glob("*.dump")
    assert "SCF not converged" in dump.read_text()
    assert sorted(base.iterdir()) == [dump]  # the workdir was removed


# -- configuration -------------------------------------------------------------------------


def test_absolute_output_path_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="absolute"):
        FileBasedQuantityComputer([tmp_path / "out.json"], h.parse_out_json, tmp_path)


@pytest.mark.timeout(30)
def test_missing_command_raises_value_error_and_leaves_nothing(tmp_path):
    computer = FileBasedQuantityComputer(["out.json"], h.parse_out_json, tmp_path)
    with pytest.raises(ValueError, match="no command"):
        computer({"x": 1.0})
    assert leftovers(tmp_path) == []


@pytest.mark.timeout(30)
def test_with_cmd_and_with_presubmit_return_configured_copies(tmp_path):
    bare = FileBasedQuantityComputer(["out.json"], h.parse_out_json, tmp_path, wait_timeout=10)
    ready = bare.with_presubmit(h.write_input).with_cmd(h.simulator_cmd, mode="ok")
    assert bare.executable_cmd is None and bare.presubmit_hook is None
    assert ready.executable_cmd.keywords == {"mode": "ok"}
    assert ready({"x": 1.0}) == {"energy": 0.0, "x": 1.0}


@pytest.mark.timeout(30)
def test_build_cmd_is_an_override_point(tmp_path):
    class Prefixed(FileBasedQuantityComputer):
        def build_cmd(self, parameters, ctx):
            return [
                "env",
                "CHEMFIT_TEST_TAG=prefixed",
                *h.simulator_cmd(parameters, ctx.temp.workdir, "env"),
            ]

    computer = Prefixed(
        ["out.json"], h.parse_out_json, tmp_path, presubmit_hook=h.write_input, wait_timeout=10
    )
    assert computer({"x": 1.0})["tag"] == "prefixed"


@pytest.mark.timeout(30)
def test_a_string_command_is_rejected(tmp_path):
    computer = FileBasedQuantityComputer(
        ["out.json"], h.parse_out_json, tmp_path, executable_cmd=lambda p, w: "echo hi"
    )
    with pytest.raises(TypeError, match=r"shlex\.split"):
        computer({"x": 1.0})
    assert leftovers(tmp_path) == []


def test_argument_validation(tmp_path):
    with pytest.raises(ValueError, match="output_parsers is empty"):
        FileBasedQuantityComputer(["out"], [], tmp_path)
    with pytest.raises(TypeError, match="output_parsers"):
        FileBasedQuantityComputer(["out"], [42], tmp_path)
    with pytest.raises(ValueError, match="wait_timeout"):
        FileBasedQuantityComputer(["out"], h.parse_out_json, tmp_path, wait_timeout=-1)
    with pytest.raises(ValueError, match="poll_interval"):
        FileBasedQuantityComputer(["out"], h.parse_out_json, tmp_path, poll_interval=0)
    with pytest.raises(TypeError, match="executable_cmd"):
        FileBasedQuantityComputer(["out"], h.parse_out_json, tmp_path, executable_cmd="ls")


def test_protocols_and_contract_path():
    assert isinstance(h.parse_out_json, OutputParser)
    assert isinstance(h.write_input, PreSubmitHook)
    from chemfit import file_based_computer as contract

    assert contract.FileBasedQuantityComputer is FileBasedQuantityComputer
    assert contract.ExternalProgramComputer is ExternalProgramComputer
    for name in ("OutputParser", "PreSubmitHook", "CommandType"):
        assert hasattr(contract, name)


# -- ExternalProgramComputer ---------------------------------------------------------------


def test_render_template_fills_nested_parameters():
    text = render_template(
        "a={lj.epsilon:.2f} b={lj[sigma]} c={x} {{literal}}",
        {"lj": {"epsilon": 0.0104, "sigma": 3.4}, "x": 1},
    )
    assert text == "a=0.01 b=3.4 c=1 {literal}"
    with pytest.raises(ValueError, match="'nope'"):
        render_template("{nope}", {"x": 1})


def test_template_writer_reads_template_files_once(tmp_path):
    template = tmp_path / "in.tmpl"
    template.write_text("x = {x}\n")
    writer = TemplateInputWriter({"sub/in.txt": template, "call.txt": lambda p: f"{p['x'] * 2}"})
    template.write_text("changed")
    workdir = tmp_path / "w"
    workdir.mkdir()
    writer({"x": 2}, workdir)
    assert (workdir / "sub" / "in.txt").read_text() == "x = 2\n"
    assert (workdir / "call.txt").read_text() == "4"
    with pytest.raises(ValueError, match="absolute"):
        TemplateInputWriter({str(tmp_path / "x"): "text"})
    with pytest.raises(TypeError, match="template"):
        TemplateInputWriter({"x": 42})


@pytest.mark.timeout(30)
def test_external_program_computer_end_to_end(tmp_path):
    computer = ExternalProgramComputer(
        [sys.executable, str(h.SIMULATOR), "env"],
        ["out.json"],
        h.parse_out_json,
        input_templates={"input.json": '{{"x": {p.x:.3f}}}'},
        parameters_file="parameters.json",
        workdir_base=tmp_path,
        timeout=30,
        env={"CHEMFIT_TEST_TAG": "from-env"},
    )
    ctx = EvaluateContext()
    assert computer({"p": {"x": 2.0}}, ctx) == {"energy": 1.0, "x": 2.0, "tag": "from-env"}
    assert not ctx.temp.workdir.exists() and leftovers(tmp_path) == []
    assert "CHEMFIT_TEST_TAG" not in os.environ


@pytest.mark.timeout(30)
def test_external_program_computer_keeps_workdirs_on_request(tmp_path):
    computer = ExternalProgramComputer(
        [sys.executable, str(h.SIMULATOR), "ok"],
        ["out.json"],
        h.parse_out_json,
        parameters_file="input.json",
        workdir_base=tmp_path,
        keep_workdirs=True,
        timeout=30,
    )
    ctx = EvaluateContext()
    computer({"x": 1.0}, ctx)
    assert json.loads((ctx.temp.workdir / "input.json").read_text()) == {"x": 1.0}
    assert (ctx.temp.workdir / "out.json").exists()
    assert [p for p in leftovers(tmp_path) if p.suffix == ".dump"] == []


@pytest.mark.timeout(30)
def test_external_program_computer_timeout_and_failure(tmp_path):
    common = dict(
        output_files=["out.json"],
        parser=h.parse_out_json,
        parameters_file="input.json",
        workdir_base=tmp_path,
    )
    slow = ExternalProgramComputer(
        [sys.executable, str(h.SIMULATOR), "sleep"], timeout=1.0, **common
    )
    with pytest.raises(ComputeTimeoutError) as info:
        slow({"x": 1.0})
    message = str(info.value)
    assert message.startswith(PREFIX + " (ExternalProgramComputer)")
    assert "timed out after 1.0 s" in message
    failing = ExternalProgramComputer(
        [sys.executable, str(h.SIMULATOR), "fail"], timeout=30, **common
    )
    with pytest.raises(ComputeError, match="exit code: 3"):
        failing({"x": 1.0})
    missing = ExternalProgramComputer(
        [sys.executable, str(h.SIMULATOR), "missing"], timeout=30, **common
    )
    with pytest.raises(ComputeError, match="did not appear within 0 s") as info:
        missing({"x": 1.0})
    assert not isinstance(info.value, ComputeTimeoutError)
    kept = [p for p in leftovers(tmp_path) if p.is_dir()]
    assert len(kept) == 3  # each failing workdir kept, with a dump file next to it
    assert len([p for p in leftovers(tmp_path) if p.suffix == ".dump"]) == 3


def test_external_program_computer_validation(tmp_path):
    with pytest.raises(TypeError, match="shlex"):
        ExternalProgramComputer("python run.py", ["out"], h.parse_out_json)
    with pytest.raises(ValueError, match="non-empty"):
        ExternalProgramComputer([], ["out"], h.parse_out_json)
    with pytest.raises(ValueError, match="timeout"):
        ExternalProgramComputer(["true"], ["out"], h.parse_out_json, timeout=0)


# -- executors and MPI ---------------------------------------------------------------------


def _params():
    return [{"x": float(x)} for x in range(4)]


@pytest.mark.timeout(60)
def test_works_in_a_process_pool(tmp_path):
    computer = make_computer(tmp_path)
    serial = [computer(p) for p in _params()]
    with ProcessPoolExecutor(max_workers=2) as pool:
        parallel = list(pool.map(computer, _params()))
        objective = computer.with_loss(h.energy_loss)
        losses = list(pool.map(objective, _params()))
        failing = pool.submit(make_computer(tmp_path, mode="fail"), {"x": 1.0})
        with pytest.raises(ComputeError) as info:
            failing.result(timeout=30)
    assert parallel == serial
    assert losses == [q["energy"] for q in serial]
    assert str(info.value).startswith(PREFIX) and "exit code: 3" in str(info.value)
    assert info.value.returncode == 3  # attributes survive pickling
    assert len([p for p in leftovers(tmp_path) if p.is_dir()]) == 1


@pytest.mark.timeout(90)
def test_works_under_loky_and_the_fitter(tmp_path):
    loky = pytest.importorskip("loky")
    from chemfit.fitting.fitter import Fitter

    executor = loky.get_reusable_executor(max_workers=2)
    computer = ExternalProgramComputer(
        [sys.executable, str(h.SIMULATOR), "ok"],
        ["out.json"],
        lambda files: json.loads(files[0].read_text()),  # a lambda: loky pickles it
        parameters_file="input.json",
        workdir_base=tmp_path,
        timeout=30,
    )
    assert list(executor.map(computer, _params())) == [computer(p) for p in _params()]
    fitter = Fitter(computer.with_loss(h.energy_loss), {"x": 3.0}, bounds={"x": (-2.0, 4.0)})
    fitter.init(num_workers=2, executor=executor)  # a hand-driven fit on the loky workers
    for batch in ([{"x": 3.0}, {"x": 2.0}], [{"x": 0.5}, {"x": 1.25}]):
        fitter.ask(batch)
        fitter.tell()
    best = fitter.finish()
    assert fitter.result.n_evals == 4
    assert best == {"x": 1.25} and fitter.result.best_loss == pytest.approx(0.0625)
    assert leftovers(tmp_path) == []


MPIEXEC = Path(sys.executable).parent / "mpiexec"


@pytest.mark.mpi
@pytest.mark.timeout(90)
@pytest.mark.skipif(not MPIEXEC.exists(), reason="the venv has no mpiexec")
def test_works_on_mpi_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    root = Path(chemfit.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        [str(MPIEXEC), "-n", "2", sys.executable, str(Path(h.__file__)), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=root,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=75)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"mpiexec hung\n{stdout}\n{stderr}")
    assert proc.returncode == 0, stderr
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout + stderr
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["size"] == 2
    assert result["value"] == result["serial"] == pytest.approx(3 * 4.0 + 1.5)
    assert len(result["workdirs"]) == 3 and len(set(result["workdirs"])) == 3
    assert leftovers(tmp_path) == []
