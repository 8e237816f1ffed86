"""``make lab``, the README's main command, serves the notebooks with a working kernel.

The test starts ``make lab`` on a free port, reads the address and token it prints, checks that
the server answers on 127.0.0.1 only and wants the token, lists every notebook through the
contents API, starts a kernel and runs code in it (it must be this repository's .venv Python and
import chemfit), then stops the whole process group and checks that neither the server nor the
kernel is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(path.name for path in (ROOT / "notebooks").glob("*.ipynb"))

pytestmark = [
    pytest.mark.skipif(shutil.which("make") is None, reason="needs make"),
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to find processes"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Lab:
    """A running ``make lab``: its output, address and token, and HTTP helpers."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, to stop it with everything below it
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.url: str | None = None
        self.token: str | None = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def wait_for_address(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"JupyterLab on notebooks/: (http://[\d.]+:\d+)/lab\?token=(\w+)")
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = pattern.search(line)
                if match:
                    self.url, self.token = match.groups()
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"make lab printed no address with a token:\n{self.output()}")

    def request(self, path: str, method: str = "GET", body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as error:
            return error.code, {}

    def wait_until_serving(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                status, data = self.request("/api/status")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                status, data = 0, {}
            if status == 200:
                return data
            time.sleep(0.25)
        raise AssertionError(f"the server did not answer /api/status:\n{self.output()}")

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the process group (make and jupyter), SIGKILL if it does not end."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
                raise AssertionError(f"make lab ignored SIGTERM:\n{self.output()}") from None
            except ProcessLookupError:
                pass
        self._reader.join(5)


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            pids.append(int(entry.name))
    return pids


def listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


def run_in_kernel(connection_file: Path, code: str, timeout: float = 60) -> str:
    """Run ``code`` in the kernel of ``connection_file`` and return what it printed."""
    from jupyter_client import BlockingKernelClient

    deadline = time.monotonic() + timeout
    while not connection_file.exists():
        assert time.monotonic() < deadline, f"no connection file {connection_file}"
        time.sleep(0.1)
    client = BlockingKernelClient(connection_file=str(connection_file))
    client.load_connection_file()
    # A client without a KernelManager judges liveness by heartbeat alone; the default 1 s
    # allowance reads a kernel busy starting up on a loaded 2-core machine as dead.
    client.hb_channel.time_to_dead = 10.0
    client.start_channels()
    try:
        client.wait_for_ready(timeout=timeout)
        printed: list[str] = []

        def collect(message: dict) -> None:
            if message["msg_type"] == "stream":
                printed.append(message["content"]["text"])

        reply = client.execute_interactive(code, timeout=timeout, output_hook=collect)
        assert reply["content"]["status"] == "ok", reply["content"]
        return "".join(printed)
    finally:
        client.stop_channels()


def lab_command(port: int) -> list[str]:
    return ["make", "--no-print-directory", "lab", f"LAB_PORT={port}", "LAB_OPTS=--no-browser"]


def run_lab_checks(command: list[str], port: int, tmp_path: Path) -> None:
    env = dict(os.environ)
    # A new user's Jupyter state: settings, runtime files and workspaces in a fresh folder.
    for name, sub in (
        ("JUPYTER_CONFIG_DIR", "config"),
        ("JUPYTER_RUNTIME_DIR", "runtime"),
        ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
        ("IPYTHONDIR", "ipython"),
    ):
        env[name] = str(tmp_path / sub)
    lab = Lab(command, env)
    kernel_id = None
    try:
        # make may first (re)install .venv when pyproject.toml changed since the last set-up.
        lab.wait_for_address(timeout=240)
        assert lab.url == f"http://127.0.0.1:{port}", lab.url
        status = lab.wait_until_serving(timeout=60)
        assert "started" in status

        assert listening_addresses(port) <= {"0100007F", "00000000000000000000000001000000"}, (
            f"make lab listens beyond 127.0.0.1: {listening_addresses(port)}"
        )
        anonymous = urllib.request.Request(f"{lab.url}/api/contents/")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(anonymous, timeout=10)
        assert refused.value.code == 403, "the server must require the token"

        code, listing = lab.request("/api/contents/")
        assert code == 200
        names = {item["name"] for item in listing["content"]}
        missing = set(NOTEBOOKS) - names
        assert not missing, f"the server's root is not notebooks/: {sorted(missing)} not listed"
        code, model = lab.request(f"/api/contents/{NOTEBOOKS[0]}?content=0")
        assert code == 200 and model["type"] == "notebook"

        code, specs = lab.request("/api/kernelspecs")
        assert code == 200 and specs["default"] in specs["kernelspecs"]
        code, kernel = lab.request("/api/kernels", "POST", {"name": specs["default"]})
        assert code == 201, f"could not start a kernel:\n{lab.output()}"
        kernel_id = kernel["id"]
        printed = run_in_kernel(
            tmp_path / "runtime" / f"kernel-{kernel_id}.json",
            "import sys, chemfit, chemfit_widgets; print(sys.executable)",
        )
        venv_python = os.path.realpath(ROOT / ".venv" / "bin" / "python")
        assert os.path.realpath(printed.strip()) == venv_python, (
            f"the kernel runs {printed.strip()!r}, not this repository's {venv_python}"
        )
    finally:
        lab.stop()
    deadline = time.monotonic() + 10
    leftovers = []
    while time.monotonic() < deadline:
        leftovers = processes_mentioning(f"--port={port}")
        if kernel_id:
            leftovers += processes_mentioning(kernel_id)
        if not leftovers:
            break
        time.sleep(0.2)
    for pid in leftovers:  # do not leave them behind, but fail
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not leftovers, f"processes left after stopping make lab: {leftovers}"
    assert not listening_addresses(port), f"port {port} is still open"


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_make_lab_serves_the_notebooks_and_stops_cleanly(tmp_path):
    port = free_port()
    run_lab_checks(lab_command(port), port, tmp_path)
