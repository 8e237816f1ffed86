"""End to end in a real browser: JupyterLab + Debian's chromium driven by Playwright.

One JupyterLab server (127.0.0.1, a free port, no token, throwaway settings, workspaces and
runtime directories) serves two copies of ``notebooks/03_fit_dashboard.ipynb``, each opened in
its own workspace in ``/usr/bin/chromium`` through Playwright's sync API:

* ``dashboard_clicks.ipynb``: the cells that build the dashboard are run (not the ``autorun``
  ones, which drive it from code); then, by clicking, a fit is started (its first live-plot
  frame must appear within 2 s of its first evaluation, and the plot must keep changing),
  stopped, and continued (the evaluation count goes on and the best loss never gets worse);
  then the picker is switched to loky and **New fit** fits the notebook's own model, defined in
  a cell (``__main__``), on loky's worker processes.
* ``dashboard_run_all.ipynb``: Run All, as a person would; it must end with a finished fit in a
  working dashboard (plot, table, controls), and the plot must have drawn while the cells ran.

Screenshots go to a folder the test prints (``CHEMFIT_SCREENSHOTS=<dir>`` chooses it); with
``CHEMFIT_UPDATE_SCREENSHOT=1`` (or when it is missing) the mid-fit one is also copied to
``docs/images/dashboard.png`` for the README. JupyterLab and its kernels are stopped at the end
and no process is left behind.

Chromium comes from the system (``.ci/install-system-packages``); a downloaded browser
(``playwright install``) is never used.
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
import time
import urllib.request
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "notebooks" / "03_fit_dashboard.ipynb"
CLICKS = "dashboard_clicks.ipynb"
RUN_ALL = "dashboard_run_all.ipynb"
SLURM = "dashboard_slurm.ipynb"
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
FIRST_FRAME_SECONDS = 2.0


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
    """Run JupyterLab in throwaway directories, serving the two notebook copies; yields its URL."""
    lab_root = tmp_path / "lab"
    lab_root.mkdir()
    for name in (CLICKS, RUN_ALL, SLURM):
        shutil.copy(NOTEBOOK, lab_root / name)
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


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server and a headless chromium for this module's tests."""
    _require_browser()
    from playwright.sync_api import sync_playwright

    tmp_path = tmp_path_factory.mktemp("jupyterlab")
    with _jupyterlab(tmp_path) as base_url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield base_url, browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go (printed, so that a person can look at them)."""
    chosen = os.environ.get("CHEMFIT_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nbrowser screenshots in {folder}")
    return folder


def _first_autorun_cell() -> int:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    for index, cell in enumerate(cells):
        if "autorun" in cell.get("metadata", {}).get("tags", []):
            return index
    raise AssertionError(f"{NOTEBOOK} has no cell tagged 'autorun'")


KERNEL_IDLE = """(name) => {
    const app = window.jupyterapp;
    const widget = app && app.shell.currentWidget;
    if (!widget || !widget.context || widget.context.path !== name) return false;
    const session = widget.sessionContext && widget.sessionContext.session;
    return !!(session && session.kernel && session.kernel.status === 'idle');
}"""

# The text of every output of the open notebook, read from its model: JupyterLab does not render
# cells scrolled out of view, so the page's text may lack them.
NOTEBOOK_OUTPUTS = """() => {
    const widget = window.jupyterapp.shell.currentWidget;
    const cells = widget.content.model.cells;
    const texts = [];
    for (let i = 0; i < cells.length; i++) {
        const outputs = cells.get(i).outputs;
        if (!outputs) continue;
        for (let j = 0; j < outputs.length; j++) {
            const output = outputs.get(j).toJSON();
            if (output.text) texts.push([].concat(output.text).join(''));
            if (output.ename) texts.push(`${output.ename}: ${output.evalue}`);
            if (output.traceback) texts.push('Traceback');
        }
    }
    return texts.join('\\n');
}"""

# Timestamps (performance.now(), ms) of what the page shows, kept in window.__chemfit: when
# the progress label first counts an evaluation, when the plot caption first counts one, when
# the canvas first paints after that, and every caption and progress text seen.
WATCH_PAGE = """() => {
    const seen = window.__chemfit = {captions: [], progress: []};
    const text = (selector) => {
        const node = document.querySelector(selector);
        return node ? node.innerText.trim() : '';
    };
    const pixels = () => {
        let sum = 0;
        for (const canvas of document.querySelectorAll('.chemfit-live-plot canvas')) {
            if (!canvas.width || !canvas.height) continue;
            try {
                const data = canvas.getContext('2d').getImageData(
                    0, 0, canvas.width, canvas.height).data;
                for (let i = 0; i < data.length; i += 29) sum = (sum * 31 + data[i]) % 1000000007;
            } catch (error) {
                seen.pixelError = String(error);
            }
        }
        return sum;
    };
    let caption = null, progress = null, base = null;
    const tick = () => {
        const now = performance.now();
        const c = text('.chemfit-plot-caption'), p = text('.chemfit-progress-label');
        if (c !== caption) { caption = c; seen.captions.push([now, c]); }
        if (p !== progress) { progress = p; seen.progress.push([now, p]); }
        if (seen.firstEval === undefined && /^[1-9][\\d,]* \\//.test(p)) seen.firstEval = now;
        if (seen.firstCaption === undefined && /^[1-9][\\d,]* evaluation/.test(c)) {
            seen.firstCaption = now;
            base = pixels();
        } else if (seen.firstCaption !== undefined && seen.firstPaint === undefined
                   && pixels() !== base) {
            seen.firstPaint = now;
        }
        requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
}"""


def _open(browser, base_url: str, name: str):
    """Open notebook ``name`` in its own workspace; returns the page and its error list."""
    page = browser.new_page(viewport={"width": 1280, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    workspace = name.removesuffix(".ipynb")
    page.goto(f"{base_url}/lab/workspaces/{workspace}/tree/{name}")
    page.wait_for_function(KERNEL_IDLE, arg=name, timeout=60_000)
    return page, errors


def _run_cells_that_build_the_dashboard(page) -> None:
    """Run the cells above the first ``autorun`` one (braces: do not await the run)."""
    page.evaluate(
        """(index) => {
            const widget = window.jupyterapp.shell.currentWidget;
            widget.content.activeCellIndex = index;
            window.jupyterapp.commands.execute('notebook:run-all-above');
        }""",
        _first_autorun_cell(),
    )


def _shut_down_kernel(page) -> None:
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")


def _status(page) -> str:
    return page.locator(".chemfit-status").inner_text()


def _wait_for_text(page, selector: str, pattern: str, timeout: float, what: str) -> str:
    """Wait until the text of ``selector`` matches ``pattern``; returns it."""
    try:
        page.wait_for_function(
            """([selector, pattern]) => {
                const node = document.querySelector(selector);
                return node && new RegExp(pattern).test(node.innerText);
            }""",
            arg=[selector, pattern],
            timeout=timeout * 1000,
        )
    except Exception as exc:
        raise AssertionError(
            f"{what} never matched {pattern!r} within {timeout} s; it says: "
            f"{page.locator(selector).inner_text()!r}"
        ) from exc
    return page.locator(selector).inner_text()


def _wait_for_status(page, pattern: str, timeout: float) -> str:
    """Wait until the dashboard's status line matches ``pattern`` (or shows an error)."""
    return _wait_for_text(page, ".chemfit-status", pattern, timeout, "the status")


def _count(text: str) -> int:
    match = re.match(r"\s*([\d,]+)", text)
    return int(match.group(1).replace(",", "")) if match else 0


def _plotted(page) -> int:
    """How many evaluations the plot's caption counts now (0 before the first frame)."""
    caption = page.locator(".chemfit-plot-caption").inner_text()
    match = re.search(r"([\d,]+) evaluation", caption)
    return int(match.group(1).replace(",", "")) if match else 0


def _wait_for_plotted(page, at_least: int, timeout: float) -> int:
    """Wait until the plot's caption counts ``at_least`` evaluations; returns the count."""
    try:
        handle = page.wait_for_function(
            """(n) => {
                const caption = document.querySelector('.chemfit-plot-caption');
                const match = caption && /([\\d,]+) evaluation/.exec(caption.innerText);
                const count = match ? Number(match[1].replace(/,/g, '')) : 0;
                return count >= n ? count : false;
            }""",
            arg=at_least,
            timeout=timeout * 1000,
        )
    except Exception as exc:
        caption = page.locator(".chemfit-plot-caption").inner_text()
        raise AssertionError(
            f"the plot did not show {at_least} evaluations within {timeout} s; its caption "
            f"says {caption!r}; the dashboard says {_status(page)!r}"
        ) from exc
    return int(handle.json_value())


def _best_loss(page) -> float:
    text = page.locator(".chemfit-best-loss").inner_text()
    match = re.match(r"Best loss: ([-+0-9.eE]+|inf)", text)
    assert match, text
    return float(match.group(1))


def _wait_for_change(read, before, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        now = read()
        if now != before:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not change within {timeout} s")
        time.sleep(0.25)


def _set_budget(page, value: int) -> None:
    budget = page.locator(".chemfit-budget input")
    budget.fill(str(value))
    budget.press("Enter")


@pytest.mark.timeout(170)
def test_dashboard_live_plot_stop_continue_and_loky_by_clicking(lab, shots):
    base_url, browser = lab
    t_start = time.monotonic()
    page, page_errors = _open(browser, base_url, CLICKS)
    try:
        _run_cells_that_build_the_dashboard(page)
        dash = page.locator(".chemfit-dashboard")
        dash.wait_for(timeout=60_000)
        plot = page.locator(".chemfit-live-plot")
        page.locator(".chemfit-live-plot canvas").first.wait_for(timeout=30_000)
        page.wait_for_function(KERNEL_IDLE, arg=CLICKS, timeout=60_000)
        box = plot.bounding_box()
        assert box and box["width"] > 300 and box["height"] > 150, box
        best = page.locator(".chemfit-best-loss")
        start = page.locator("button.chemfit-start")
        assert "no evaluation yet" in best.inner_text()
        assert start.inner_text().strip() == "Start fit"
        assert page.locator("button.chemfit-new-fit").is_disabled()
        dash.scroll_into_view_if_needed()
        page.wait_for_timeout(500)  # the first (empty) frame
        plot_before = plot.screenshot()

        # (a) A long fit, so that it still runs when Stop is clicked; its first frame.
        _set_budget(page, 5000)
        page.evaluate(WATCH_PAGE)
        start.click()
        page.wait_for_function("() => window.__chemfit.firstPaint !== undefined", timeout=45_000)
        marks = page.evaluate("() => window.__chemfit")
        caption_delay = (marks["firstCaption"] - marks["firstEval"]) / 1000
        paint_delay = (marks["firstPaint"] - marks["firstEval"]) / 1000
        print(
            f"first evaluation -> first plot caption {caption_delay:.2f} s, "
            f"-> first painted frame {paint_delay:.2f} s"
        )
        assert paint_delay <= FIRST_FRAME_SECONDS, (
            f"the first live-plot frame appeared {paint_delay:.2f} s after the first "
            f"evaluation (at most {FIRST_FRAME_SECONDS} s)"
        )
        page.screenshot(path=str(shots / "1-first-frame.png"))

        # The plot keeps changing: the caption counts on, and the canvas paints later frames.
        # The canvas paints a frame a little after its caption, so the count is read after
        # each screenshot, and the next screenshot is awaited until it shows a later frame.
        plot_1 = _wait_for_change(plot.screenshot, plot_before, 20, "the live plot")
        shown_1 = _plotted(page)
        shown_2 = _wait_for_plotted(page, shown_1 + 1, 45)
        _wait_for_change(plot.screenshot, plot_1, 20, "the live plot")
        assert shown_2 > shown_1 >= 1
        mid_fit = shots / "2-dashboard-mid-fit.png"
        dash.screenshot(path=str(mid_fit))
        if os.environ.get("CHEMFIT_UPDATE_SCREENSHOT") == "1" or not README_SCREENSHOT.exists():
            README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(mid_fit, README_SCREENSHOT)
        progress = page.locator(".chemfit-progress-label")
        assert _count(progress.inner_text()) >= shown_2
        fault_fields = [
            page.locator(f".chemfit-{name} {tag}")
            for name, tag in (("retries", "input"), ("on-error", "select"), ("timeout", "input"))
        ]
        assert all(field.is_visible() and field.is_disabled() for field in fault_fields)

        # (b) Stop, then Continue: the count goes on, the best loss never gets worse.
        page.locator("button.chemfit-stop").click()
        status = _wait_for_status(page, r"Stopped after \d+ evaluations", 30)
        assert "kept in fitter.result" in status
        assert "Continue goes on from here; New fit starts over" in status
        n_stop = _count(status.removeprefix("Stopped after "))
        best_stop = _best_loss(page)
        assert _count(progress.inner_text()) == n_stop
        assert start.inner_text().strip() == "Continue" and start.is_enabled()
        assert page.locator("button.chemfit-new-fit").is_enabled()
        plan = page.locator(".chemfit-plan").inner_text()
        assert f"Continue runs {5000 - n_stop} more, to the budget of 5000" in plan, plan
        assert all(field.is_enabled() for field in fault_fields)
        chosen = fault_fields[1].evaluate("select => select.options[select.selectedIndex].text")
        assert chosen.replace("\xa0", " ") == "stop the fit", chosen  # ipywidgets' nbsp
        page.screenshot(path=str(shots / "3-stopped.png"))

        _set_budget(page, n_stop + 300)
        page.wait_for_function(
            "() => /Continue runs 300 more/.test("
            "document.querySelector('.chemfit-plan').innerText)",
            timeout=10_000,
        )
        page.evaluate("() => { window.__chemfit.progress = []; }")
        start.click()
        n_all = n_stop + 300
        status = _wait_for_status(page, rf"Finished: {n_all} evaluations \(300 more in", 60)
        counts = [_count(text) for _, text in page.evaluate("() => window.__chemfit.progress")]
        assert counts and min(counts) >= n_stop, counts  # it never started again from 0
        assert counts == sorted(counts), counts
        assert progress.inner_text() == f"{n_all} / {n_all}"
        best_end = _best_loss(page)
        assert best_end <= best_stop, (best_stop, best_end)
        assert _wait_for_plotted(page, n_all, 20) == n_all
        page.screenshot(path=str(shots / "4-continued.png"))

        # (d) The notebook's own model (defined in a cell, so in __main__) on loky's
        # processes, picked in the picker; New fit starts over.
        page.locator(".chemfit-picker-kind select").select_option(label="Processes (loky)")
        page.wait_for_function(
            "() => /Processes \\(loky\\): created when a fit starts/.test("
            "document.querySelector('.chemfit-picker-status').innerText)",
            timeout=10_000,
        )
        _set_budget(page, 150)
        page.locator("button.chemfit-new-fit").click()
        status = _wait_for_status(page, r"^(Finished: 150 |The fit failed|The executor)", 90)
        page.screenshot(path=str(shots / "5-loky.png"))
        assert status.startswith("Finished: 150 evaluations (in "), status
        picker_status = page.locator(".chemfit-picker-status").inner_text()
        assert picker_status.startswith("Ready: 2 loky worker processes"), picker_status
        assert _wait_for_plotted(page, 150, 20) == 150 and progress.inner_text() == "150 / 150"

        notebook_text = page.locator(".jp-Notebook").inner_text()
        assert "Traceback" not in notebook_text
        assert not page_errors, page_errors
    finally:
        with contextlib.suppress(Exception):
            _shut_down_kernel(page)
        page.close()
    print(f"clicking test took {time.monotonic() - t_start:.1f} s")


@pytest.mark.timeout(150)
def test_run_all_leaves_a_finished_fit_in_a_working_dashboard(lab, shots):
    base_url, browser = lab
    t_start = time.monotonic()
    page, page_errors = _open(browser, base_url, RUN_ALL)
    try:
        page.evaluate(WATCH_PAGE)
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        status = _wait_for_status(page, r"^(Finished: 900 |The fit failed|The executor)", 120)
        # The kernel is idle for a moment between two cells of Run All: wait for the last
        # cell's output (the saved plot) instead.
        page.wait_for_function(
            f"() => /fit\\.png|Traceback/.test(({NOTEBOOK_OUTPUTS})())", timeout=30_000
        )
        page.wait_for_function(KERNEL_IDLE, arg=RUN_ALL, timeout=30_000)
        assert status.startswith("Finished: 900 evaluations (300 more in "), status

        # The plot drew while the cells waited for the fit, not only at the end.
        captions = [_count(text) for _, text in page.evaluate("() => window.__chemfit.captions")]
        assert any(0 < count < 600 for count in captions), captions
        # A finished fit in a working dashboard: plot, table, controls.
        assert _wait_for_plotted(page, 900, 20) == 900
        table = page.locator(".chemfit-best-table").inner_text()
        assert "epsilon" in table and "sigma" in table and "900" in table
        assert page.locator(".chemfit-progress-label").inner_text() == "900 / 900"
        start = page.locator("button.chemfit-start")
        assert start.inner_text().strip() == "Continue" and start.is_enabled()
        assert page.locator("button.chemfit-new-fit").is_enabled()
        assert page.locator("button.chemfit-stop").is_disabled()
        assert page.locator(".chemfit-budget input").is_enabled()
        plot = page.locator(".chemfit-live-plot")
        plot.scroll_into_view_if_needed()
        box = plot.bounding_box()
        assert box and box["width"] > 300 and box["height"] > 150, box
        outputs = page.evaluate(NOTEBOOK_OUTPUTS)
        assert "900 evaluations in all" in outputs and "fit.png" in outputs, outputs
        assert "Traceback" not in outputs, outputs
        assert not page_errors, page_errors
        page.locator(".chemfit-dashboard").screenshot(path=str(shots / "6-run-all-dashboard.png"))
        page.screenshot(path=str(shots / "7-run-all-page.png"))

        # The controls still work: New fit starts over from the page.
        _set_budget(page, 60)
        page.locator("button.chemfit-new-fit").click()
        status = _wait_for_status(page, r"^(Finished: 60 |The fit failed|The executor)", 60)
        assert status.startswith("Finished: 60 evaluations (in "), status
        assert _wait_for_plotted(page, 60, 20) == 60
    finally:
        with contextlib.suppress(Exception):
            _shut_down_kernel(page)
        page.close()
    print(f"Run All test took {time.monotonic() - t_start:.1f} s")


# The picker's status text over time, kept in window.__picker as [ms, text] pairs.
WATCH_PICKER = """() => {
    const seen = window.__picker = [];
    let last = null;
    const tick = () => {
        const node = document.querySelector('.chemfit-picker-status');
        const text = node ? node.innerText.trim() : '';
        if (text !== last) { last = text; seen.push([performance.now(), text]); }
        requestAnimationFrame(tick);
    };
    requestAnimationFrame(tick);
}"""


def _wait_for_picker(page, pattern: str, timeout: float) -> str:
    return _wait_for_text(page, ".chemfit-picker-status", pattern, timeout, "the picker")


@pytest.mark.slow
@pytest.mark.timeout(170)
def test_slurm_engines_picked_filled_in_and_launched_by_clicking(lab, shots):
    """Slurm engines as a person picks them: the batch fields, the job while it starts, a fit
    of the notebook's own model on the engines, and nothing left in the queue after Shut down."""
    from tests.helpers.slurm import require_slurm, slurm_step_processes, wait_no_jobs

    require_slurm()
    base_url, browser = lab
    page, page_errors = _open(browser, base_url, SLURM)
    try:
        _run_cells_that_build_the_dashboard(page)
        page.locator(".chemfit-dashboard").wait_for(timeout=60_000)
        page.wait_for_function(KERNEL_IDLE, arg=SLURM, timeout=60_000)
        picker = page.locator(".chemfit-executor-picker")
        partition = page.locator(".chemfit-picker-partition input")
        assert not partition.is_visible()  # batch fields only for the Slurm kinds
        page.locator(".chemfit-picker-kind select").select_option(
            label="Slurm engines (ipyparallel)"
        )
        partition.wait_for(state="visible", timeout=10_000)
        page.locator(".chemfit-picker-engines input").fill("2")
        partition.fill("debug")
        page.locator(".chemfit-picker-time input").fill("10")
        page.locator(".chemfit-picker-time input").press("Tab")
        picker.scroll_into_view_if_needed()
        picker.screenshot(path=str(shots / "8-slurm-fields.png"))

        page.evaluate(WATCH_PICKER)
        page.locator("button.chemfit-picker-start").click()
        status = _wait_for_picker(page, r"^(Running: |Starting the cluster failed)", 90)
        picker.screenshot(path=str(shots / "9-slurm-running.png"))
        assert re.match(r"Running: 2 engines up, Slurm job \d+ RUNNING", status), status
        job = re.search(r"Slurm job (\d+)", status).group(1)
        seen = [text for _, text in page.evaluate("() => window.__picker")]
        # While it started: the job and its state, then the engines registering.
        assert any(f"Slurm job {job}" in t and "registered" in t for t in seen), seen

        _set_budget(page, 40)
        page.locator("button.chemfit-start").click()
        done = _wait_for_status(page, r"^(Finished: 40 |The fit failed|The executor)", 90)
        page.locator(".chemfit-dashboard").screenshot(path=str(shots / "10-slurm-fit.png"))
        assert done.startswith("Finished: 40 evaluations (in "), done
        assert _wait_for_plotted(page, 40, 20) == 40

        page.locator("button.chemfit-picker-stop").click()
        _wait_for_picker(page, r"^(Shut down|Stopped|Not started|.*created when)", 60)
        assert wait_no_jobs(15) == [], "the engines' job is still queued after Shut down"
        assert slurm_step_processes() == []
        outputs = page.evaluate(NOTEBOOK_OUTPUTS)
        assert "Traceback" not in outputs, outputs
        assert not page_errors, page_errors
    finally:
        with contextlib.suppress(Exception):
            _shut_down_kernel(page)
        page.close()
