"""The LoRA panel in a real browser: JupyterLab on loopback, the SQL notebook opened in headless
Chromium (Debian's `chromium`, driven by Playwright), the cells up to the panel run, the rank slider
moved, and the trainable-parameter count read back from the page; the tables must show the prompt tags
(`<QUESTION>:`) as text. Screenshots: test-artifacts/lora_panel.png and training_text_table.png.

Run: python -m pytest tests/test_browser.py      (needs /usr/bin/chromium; .ci/run installs it)

The notebook is copied into a temporary folder first, so that JupyterLab's autosave never writes
outputs into the committed notebook.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lib import memory
from lib.config import RunConfig
from lib.models import resolve_base_model

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "02_english_to_sql.ipynb"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"
SERVER_START_S = 120   # JupyterLab answering on its port
CELLS_RUN_S = 600      # the cells up to the panel, on a busy CPU (loads the 4-bit model once)
UPDATE_S = 60          # the count following the slider

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="Debian's chromium is not installed (.ci/run installs it)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def jupyter_lab(tmp_path):
    """(base URL, token) of a JupyterLab serving a copy of the notebook; the server is stopped after."""
    (tmp_path / "notebooks").mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, tmp_path / "notebooks" / NOTEBOOK)
    (tmp_path / "lib").symlink_to(REPO / "lib")  # the notebook imports lib from the folder above it
    port, token = free_port(), secrets.token_hex(16)
    settings = tmp_path / "settings" / "@jupyterlab" / "notebook-extension"
    settings.mkdir(parents=True)  # every cell's output in the page, not only those scrolled into view
    (settings / "tracker.jupyterlab-settings").write_text('{"windowingMode": "none"}', encoding="utf-8")
    env = {**os.environ, "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
           "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    command = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", f"--port={port}",
               f"--ServerApp.token={token}", "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={tmp_path}",
               "--LabApp.expose_app_in_browser=True"] + (["--allow-root"] if os.geteuid() == 0 else [])
    log = (tmp_path / "jupyter.log").open("wb")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(base, token, server, tmp_path / "jupyter.log")
        yield base, token
    finally:
        stop(server)
        log.close()


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the server and the kernels it started), SIGKILL if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_server(base: str, token: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


RUN_UP_TO_PANEL = """async () => {
    const app = window.jupyterapp;
    const panel = app.shell.currentWidget;
    await panel.context.ready;
    await panel.sessionContext.ready;
    const cells = panel.content.widgets;
    panel.content.activeCellIndex = cells.findIndex(cell => cell.model.sharedModel.getSource().includes("LoraPanel("));
    await app.commands.execute("notebook:run-all-above");
    await app.commands.execute("notebook:run-cell");
}"""


def test_rank_slider_updates_the_trainable_count_in_the_browser(jupyter_lab):
    from playwright.sync_api import sync_playwright

    base, token = jupyter_lab
    shapes = memory.read_shapes(resolve_base_model("embedded"))
    rank = RunConfig.for_task("sql").lora_r
    expected = {r: f"{memory.trainable_parameters(shapes, r, ['all-linear']):,}" for r in (rank, rank + 1)}
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(UPDATE_S * 1000)
            page.goto(f"{base}/lab/tree/notebooks/{NOTEBOOK}?token={token}", timeout=SERVER_START_S * 1000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                                   " && window.jupyterapp.shell.currentWidget.content", timeout=SERVER_START_S * 1000)
            page.evaluate(RUN_UP_TO_PANEL)
            count = page.locator(".lora-summary td.trainable-parameters")
            count.wait_for(timeout=CELLS_RUN_S * 1000)
            assert count.inner_text() == expected[rank]
            handle = page.locator(".widget-slider:has(label:text-is('rank r')) .noUi-handle").first
            handle.scroll_into_view_if_needed()
            handle.focus()
            page.keyboard.press("ArrowRight")  # one step: rank + 1
            page.wait_for_function(
                "expected => document.querySelector('.lora-summary td.trainable-parameters').innerText === expected",
                arg=expected[rank + 1])
            count.scroll_into_view_if_needed()
            page.screenshot(path=str(ARTIFACTS / "lora_panel.png"), full_page=False)
            # The tables above show the prompt tags as text (escaped HTML), not as vanished "tags"
            tables = page.locator(".jp-OutputArea-output table")
            text = "\n".join(tables.nth(index).inner_text() for index in range(tables.count()))
            for tag in ("<TABLE>:", "<QUESTION>:", "<SQL>:"):
                assert tag in text, f"{tag} is not shown in the notebook's tables"
            training_text = tables.filter(has_text="<QUESTION>:").first
            training_text.scroll_into_view_if_needed()
            training_text.screenshot(path=str(ARTIFACTS / "training_text_table.png"))
        finally:
            browser.close()
