"""Starting and stopping ipyparallel clusters prints nothing (library code logs, never prints).

In an IPython session or a notebook, ipyparallel shows a progress bar while it waits for the
engines (tqdm text on stdout, or a widget in a notebook cell), writes its log ("Starting 2
engines with ...", "Stopping controller") to stdout, and prints "Stopping cluster ..." to stderr
when it stops a cluster at exit. Each test runs real 2-engine clusters through chemfit's API in
a separate process (an IPython shell, or a Jupyter kernel) and checks what that process wrote;
afterwards no controller, engine or ``mpiexec`` of theirs may still run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("ipyparallel")
pytest.importorskip("mpi4py")
psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter with an IPython shell instance, as in IPython or a notebook
# (``get_ipython()`` is not None). Its cluster processes are written to pids.json, chemfit's
# log to chemfit.log (a file: stdout and stderr must stay empty).
IPYTHON_SCRIPT = """
import json, logging, sys
from pathlib import Path

import psutil
from IPython.core.interactiveshell import InteractiveShell

out = Path(sys.argv[1])
mode = sys.argv[2]
InteractiveShell.instance()
handler = logging.FileHandler(out / "chemfit.log")
handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
logging.getLogger("chemfit").addHandler(handler)
logging.getLogger("chemfit").setLevel(logging.INFO)

from chemfit.execution.ipyparallel_executor import IPyParallelExecutor

seen = {}

def remember():
    for p in psutil.Process().children(recursive=True):
        try:
            seen[p.pid] = " ".join(p.cmdline())
        except psutil.Error:
            pass
    (out / "pids.json").write_text(json.dumps(seen))

if mode == "start-stop":
    # ipyparallel's own messages at INFO: they must reach chemfit's log, not stdout.
    with IPyParallelExecutor(2, cluster_options={"log_level": logging.INFO}) as ex:
        assert sorted(ex.map(abs, [-1, -2])) == [1, 2]
        remember()
    (out / "profile_dirs.txt").write_text(ex.profile_dir + "\\n")
    # MPI engines, left running: the cluster is stopped at exit.
    ex = IPyParallelExecutor(2, mpi=True)
    assert sorted(ex.map(abs, [-1, -2])) == [1, 2]
    remember()
    with open(out / "profile_dirs.txt", "a") as f:
        f.write(ex.profile_dir + "\\n")
elif mode == "engines-fail":
    from traitlets.config import Config

    config = Config()
    config.LocalEngineSetLauncher.engine_cmd = [
        sys.executable, "-c", "import sys; print('engine boom: no GPU here'); sys.exit(3)"
    ]
    try:
        IPyParallelExecutor(2, timeout=60, cluster_options={"config": config})
    except Exception as exc:
        error = {"type": type(exc).__name__, "message": str(exc)}
    else:
        error = None
    remember()
    (out / "error.json").write_text(json.dumps(error))
"""

KERNEL_CELL = """
import psutil
from chemfit.execution.ipyparallel_executor import IPyParallelExecutor

with IPyParallelExecutor(2) as ex:
    assert sorted(ex.map(abs, [-1, -2])) == [1, 2]
    CLUSTER = {p.pid: " ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)}
PROFILE_DIR = ex.profile_dir
"""


def still_running(processes: dict[int, str], wait: float) -> dict[int, str]:
    """Which of ``processes`` (pid -> command line) still run after waiting up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        alive = {}
        for pid, cmdline in processes.items():
            try:
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE and " ".join(process.cmdline()) == (
                    cmdline
                ):
                    alive[pid] = cmdline
            except psutil.Error:
                pass
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def run_in_ipython(tmp_path: Path, mode: str) -> tuple[subprocess.CompletedProcess, float]:
    script = tmp_path / "cluster_script.py"
    script.write_text(IPYTHON_SCRIPT)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), mode],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=240,
    )
    return proc, time.perf_counter() - t0


def assert_printed_nothing(stdout: str, stderr: str) -> None:
    chatter = ("engine/s", "%|", "Starting", "Stopping", "ipyparallel", "Cluster(")
    printed = f"stdout:\n{stdout}\nstderr:\n{stderr}"
    found = [word for word in chatter if word in stdout + stderr]
    assert not found, f"ipyparallel chatter {found} was printed:\n{printed}"
    assert stdout == "" and stderr == "", f"starting/stopping a cluster printed:\n{printed}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_start_and_stop_print_nothing_in_an_ipython_session(tmp_path):
    proc, elapsed = run_in_ipython(tmp_path, "start-stop")
    print(f"\nlocal + MPI cluster up and down in an IPython session: {elapsed:.1f} s")
    assert proc.returncode == 0, proc.stderr
    seen = {int(pid): cmd for pid, cmd in json.loads((tmp_path / "pids.json").read_text()).items()}
    assert any("mpiexec" in cmd for cmd in seen.values()), seen
    assert still_running(seen, wait=10) == {}, "cluster processes left behind"
    for profile_dir in (tmp_path / "profile_dirs.txt").read_text().split():
        assert not Path(profile_dir).exists(), f"throwaway profile dir {profile_dir} kept"
    assert_printed_nothing(proc.stdout, proc.stderr)
    log = (tmp_path / "chemfit.log").read_text()
    # chemfit still says what happens, and ipyparallel's own messages go to the log instead.
    assert "started 2 local engines in" in log, log
    assert "started 2 MPI engines in" in log, log
    assert log.count("stopped ipyparallel cluster") == 2, log
    assert "Starting 2 engines with" in log, log


@pytest.mark.timeout(180)
def test_engines_that_fail_to_start_raise_a_clear_error_and_print_nothing(tmp_path):
    proc, elapsed = run_in_ipython(tmp_path, "engines-fail")
    print(f"\nfailed start in an IPython session: {elapsed:.1f} s")
    assert proc.returncode == 0, proc.stderr
    error = json.loads((tmp_path / "error.json").read_text())
    assert error is not None, "starting engines that exit at once did not fail"
    assert error["type"] == "RuntimeError", error
    message = error["message"]
    assert "2 local ipyparallel engines did not start" in message, message
    assert "exit code 3" in message, message
    assert "engine boom: no GPU here" in message, message  # the engines' own output
    seen = {int(pid): cmd for pid, cmd in json.loads((tmp_path / "pids.json").read_text()).items()}
    assert still_running(seen, wait=10) == {}, "cluster processes left behind"
    assert_printed_nothing(proc.stdout, proc.stderr)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_start_and_stop_show_nothing_in_a_notebook_cell():
    """The JupyterLab case: the cell that starts and stops a cluster has no output at all."""
    pytest.importorskip("ipykernel")
    from jupyter_client.manager import start_new_kernel

    t0 = time.perf_counter()
    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120, cwd=str(ROOT))
    messages: list[dict] = []
    try:
        kc.hb_channel.time_to_dead = 10.0  # a busy kernel on a loaded machine is not dead
        reply = kc.execute_interactive(KERNEL_CELL, timeout=200, output_hook=messages.append)
        assert reply["content"]["status"] == "ok", reply["content"]
        printed: list[str] = []
        reply = kc.execute_interactive(
            "import json, sys; print(json.dumps([sys.executable, CLUSTER, PROFILE_DIR]))",
            timeout=30,
            output_hook=lambda m: printed.append(m["content"].get("text", "")),
        )
        assert reply["content"]["status"] == "ok", reply["content"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(f"\nlocal cluster up and down in a Jupyter kernel: {time.perf_counter() - t0:.1f} s")
    executable, cluster, profile_dir = json.loads("".join(printed))
    assert Path(executable).resolve() == Path(sys.executable).resolve()
    assert still_running({int(p): c for p, c in cluster.items()}, wait=10) == {}
    assert not Path(profile_dir).exists()
    shown = [
        (m["msg_type"], textwrap.shorten(json.dumps(m["content"]), 300))
        for m in messages
        if m["msg_type"] not in ("status", "execute_input")
    ]
    assert shown == [], f"the cell showed output: {shown}"
