"""End to end in a real browser: JupyterLab + Debian's chromium driven by Playwright.

The test starts JupyterLab on 127.0.0.1 (a free port, no token, throwaway settings, workspaces
and runtime directories, a copy of ``notebooks/03_fit_dashboard.ipynb``), opens the notebook
in ``/usr/bin/chromium`` through Playwright's sync API, runs the cells that build the dashboard
(not the ``autorun`` ones at the end, which start a fit from code), raises the budget, clicks
Start fit and checks that the live plot appears and changes and that the best-loss text
updates; then it clicks Stop and checks that the results were kept. Screenshots go to the
test's ``tmp_path``; with ``CHEMFIT_UPDATE_SCREENSHOT=1`` (or when it is missing) the mid-fit
one is also copied to ``docs/images/dashboard.png`` for the README. JupyterLab and its kernels
are stopped at the end and no process is left behind.

Chromium comes from the system (``.ci/install-system-packages``); a downloaded browser
(``playwright install``) is never used.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "03_fit_dashboard.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
README_SCREENSHOT = ROOT / "docs" / "images" / "dashboard.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # chromium runs as root on the CI machines
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _require_browser() -> None:
    if not CHROMIUM.exists():
        pytest.fail(
            f"Debian's chromium is missing ({CHROMIUM} does not exist). Run "
            ".ci/install-system-packages (as root, or with sudo) to install it; the browser "
            "test never downloads a browser (no `playwright install`)."
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail(
            "the Python package playwright is missing: install the test extra "
            "(pip install -e '.[test]'); it drives the system's chromium, so never run "
            "`playwright install`."
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop_tree(process: subprocess.Popen, log_path: Path) -> None:
    """Stop JupyterLab (it shuts its kernels down), then kill whatever it left behind."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        tree = []
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    for leftover in alive:
        with contextlib.suppress(psutil.Error):
            leftover.kill()
    _gone, still = psutil.wait_procs(alive, timeout=10)
    assert not still, f"processes left after stopping JupyterLab: {still}; see {log_path}"


@contextlib.contextmanager
def _jupyterlab(tmp_path: Path):
    """Run JupyterLab in throwaway directories; yields ``(base_url, notebook_name)``."""
    lab_root = tmp_path / "lab"
    lab_root.mkdir()
    shutil.copy(NOTEBOOK, lab_root / NOTEBOOK.name)
    settings = tmp_path / "settings"
    notification = settings / "@jupyterlab" / "apputils-extension"
    notification.mkdir(parents=True)
    (notification / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        "--ServerApp.token=",
        "--ServerApp.password=",
        f"--ServerApp.root_dir={lab_root}",
        "--LabApp.expose_app_in_browser=True",
        f"--LabApp.user_settings_dir={settings}",
        f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}",
    ]
    if os.geteuid() == 0:
        cmd.append("--allow-root")  # the server refuses to run as root otherwise
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(tmp_path / "jupyter-config"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "jupyter-runtime"),
        IPYTHONDIR=str(tmp_path / "ipython"),
        MPLCONFIGDIR=str(tmp_path / "matplotlib"),
    )
    log_path = tmp_path / "jupyterlab.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=lab_root, env=env,
            start_new_session=True,
        )  # fmt: skip
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"JupyterLab exited with {process.returncode}:\n{log_path.read_text()}")
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{base_url}/api/status", timeout=2) as response,
            ):
                if response.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"JupyterLab did not answer within 60 s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield base_url
    finally:
        _stop_tree(process, log_path)


def _first_autorun_cell() -> int:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    for index, cell in enumerate(cells):
        if "autorun" in cell.get("metadata", {}).get("tags", []):
            return index
    raise AssertionError(f"{NOTEBOOK} has no cell tagged 'autorun'")


KERNEL_IDLE = """(name) => {
    const app = window.jupyterapp;
    const widget = app && app.shell.currentWidget;
    if (!widget || !widget.context || !widget.context.path.endsWith(name)) return false;
    const session = widget.sessionContext && widget.sessionContext.session;
    return !!(session && session.kernel && session.kernel.status === 'idle');
}"""


def _wait_for_plotted(page, at_least: int, timeout: float) -> int:
    """Wait until the plot's caption counts ``at_least`` evaluations; returns the count."""
    handle = page.wait_for_function(
        """(n) => {
            const caption = document.querySelector('.chemfit-plot-caption');
            const match = caption && /^(\\d+) evaluation/.exec(caption.innerText);
            return match && Number(match[1]) >= n ? Number(match[1]) : false;
        }""",
        arg=at_least,
        timeout=timeout * 1000,
    )
    return int(handle.json_value())


def _plotted(page) -> int:
    """How many evaluations the plot's caption counts now (0 before the first frame)."""
    caption = page.locator(".chemfit-plot-caption").inner_text()
    words = caption.split()
    return int(words[0]) if words and words[0].isdigit() else 0


def _wait_for_change(read, before, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        now = read()
        if now != before:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not change within {timeout} s")
        time.sleep(0.25)


@pytest.mark.timeout(150)
def test_dashboard_runs_live_in_jupyterlab(tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    t_start = time.monotonic()
    autorun = _first_autorun_cell()
    with _jupyterlab(tmp_path) as base_url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(f"{base_url}/lab/tree/{NOTEBOOK.name}")
            page.wait_for_function(KERNEL_IDLE, arg=NOTEBOOK.name, timeout=60_000)

            # Run the cells that build the dashboard (braces: do not await the run).
            page.evaluate(
                """(index) => {
                    const widget = window.jupyterapp.shell.currentWidget;
                    widget.content.activeCellIndex = index;
                    window.jupyterapp.commands.execute('notebook:run-all-above');
                }""",
                autorun,
            )
            dash = page.locator(".chemfit-dashboard")
            dash.wait_for(timeout=60_000)
            plot = page.locator(".chemfit-live-plot")
            page.locator(".chemfit-live-plot canvas").first.wait_for(timeout=30_000)
            page.wait_for_function(KERNEL_IDLE, arg=NOTEBOOK.name, timeout=60_000)
            box = plot.bounding_box()
            assert box and box["width"] > 300 and box["height"] > 150, box
            best = page.locator(".chemfit-best-loss")
            assert "no evaluation yet" in best.inner_text()
            dash.scroll_into_view_if_needed()
            page.wait_for_timeout(500)  # the first (empty) frame
            plot_before = plot.screenshot()

            # A larger budget, so that the fit is still running when Stop is clicked.
            budget = page.locator(".chemfit-budget input")
            budget.fill("5000")
            budget.press("Enter")
            page.locator(".chemfit-start").click()
            page.wait_for_function(
                "() => /Best loss: \\d/.test(document.querySelector('.chemfit-best-loss')"
                ".innerText)",
                timeout=45_000,
            )
            text_1 = best.inner_text()

            # The plot shows evaluations (its caption counts them), and it keeps changing. The
            # caption may move on while a screenshot is taken, and the canvas paints its frame a
            # little after the caption: so the count is read after each screenshot, and the
            # next screenshot is awaited until it shows a later frame.
            _wait_for_plotted(page, 1, 45)
            plot_1 = _wait_for_change(plot.screenshot, plot_before, 20, "the live plot")
            shown_1 = _plotted(page)
            shown_2 = _wait_for_plotted(page, shown_1 + 1, 45)
            _wait_for_change(plot.screenshot, plot_1, 20, "the live plot")
            assert shown_2 > shown_1 >= 1
            mid_fit = tmp_path / "dashboard-mid-fit.png"
            dash.screenshot(path=str(mid_fit))
            page.screenshot(path=str(tmp_path / "page-mid-fit.png"))
            if os.environ.get("CHEMFIT_UPDATE_SCREENSHOT") == "1" or not README_SCREENSHOT.exists():
                README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(mid_fit, README_SCREENSHOT)
            text_2 = _wait_for_change(best.inner_text, text_1, 20, "the best-loss text")
            assert text_2.startswith("Best loss: ")
            progress = page.locator(".chemfit-progress-label").inner_text()
            assert int(progress.split("/")[0]) >= shown_2, progress

            page.locator(".chemfit-stop").click()
            status = page.locator(".chemfit-status")
            page.wait_for_function(
                "() => /Stopped after \\d+ evaluations/.test("
                "document.querySelector('.chemfit-status').innerText)",
                timeout=30_000,
            )
            assert "kept in fitter.result" in status.inner_text()
            page.screenshot(path=str(tmp_path / "page-stopped.png"))
            notebook_text = page.locator(".jp-Notebook").inner_text()
            assert "Traceback" not in notebook_text
            assert not page_errors, page_errors
        finally:
            browser.close()
    elapsed = time.monotonic() - t_start
    print(f"browser test took {elapsed:.1f} s; screenshots in {tmp_path}")
    assert mid_fit.stat().st_size > 10_000
