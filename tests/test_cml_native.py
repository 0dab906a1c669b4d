"""CML-native parts (issue 16): MLflow tracking into a real local store, its UI in a real browser, the
merged export loaded without PEFT, the Application in a real browser, and the entry points' --help.

Run: python -m pytest tests/test_cml_native.py   (about 3 minutes on 2 CPU cores; one tiny training run)
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from lib import runs, tracking
from lib.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"
THREADS = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny SQL run with tracking on (the default), evaluated: (config, its evaluation report)."""
    from lib import plots
    from lib.evaluation import evaluate_run
    from lib.fine_tuner import FineTuner

    os.environ.pop("MLFLOW_TRACKING_URI", None)
    output_dir = tmp_path_factory.mktemp("cml") / "runs"
    config = RunConfig(task="sql", train_rows=64, eval_rows=20, max_steps=30, max_seq_length=192, batch_size=4,
                       learning_rate=2e-3, logging_steps=2, save_steps=100, output_dir=str(output_dir),
                       run_name="tracked")
    tuner = FineTuner(config)
    result = tuner.run()
    plots.loss_curve(result.record["loss_history"], result.run_dir / "loss_curve.png")
    report = evaluate_run(tuner.config, tuner.eval_rows, tuner.model_path)
    return tuner.config, report, tuner.eval_rows


def the_run(config):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.tracking_uri(config))
    experiment = client.get_experiment_by_name("qlora-sql")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 1, [run.info.run_name for run in found]  # one MLflow run per training run
    return client, found[0]


def test_a_tracked_run_is_read_back_from_the_local_mlflow_store(trained):
    config, report, _ = trained
    assert (Path(config.output_dir) / tracking.LOCAL_STORE).is_file()  # a real SQLite store in the project
    client, run = the_run(config)
    assert run.info.run_name == "tracked" and run.info.status in ("RUNNING", "FINISHED")
    assert run.data.params["lora_r"] == "16" and run.data.params["task"] == "sql"
    assert run.data.params["plan.optimizer"] == "adamw_torch"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert len(losses) >= 10 and [point.step for point in losses] == sorted(point.step for point in losses)
    metrics = run.data.metrics
    assert metrics["tokens_per_s"] > 0 and metrics["peak_memory_gib"] > 0 and metrics["global_step"] == 30
    assert metrics["adapter.exact_match"] == report["adapter"]["exact_match"]
    assert metrics["base.exact_match"] == report["base"]["exact_match"]
    top = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "run_record.json", "metrics.json", "plots"} <= top
    plots = {item.path for item in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/loss_curve.png", "plots/metrics.png"} <= plots
    adapter_files = {item.path for item in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in adapter_files


def test_tracking_off_logs_nothing(tiny_config, tmp_path):
    from lib.fine_tuner import FineTuner

    config = tiny_config(tracking="off", run_name="untracked")
    FineTuner(config).run()
    assert not (Path(config.output_dir) / tracking.LOCAL_STORE).exists()
    assert not (config.run_dir / tracking.RUN_ID_FILE).exists()


def test_the_merged_model_answers_like_base_plus_adapter_without_peft(trained, tmp_path):
    """The adapter merged into the dequantized base, loaded by plain transformers: the same greedy answers
    as the 4-bit base with the adapter attached on at least 95% of held-out rows."""
    from transformers import AutoModelForCausalLM

    from lib.evaluation import Evaluator
    from lib.export import merge_adapter
    from lib.models import resolve_base_model
    from lib.tasks import get_task

    config, _, eval_rows = trained
    merged_dir = merge_adapter(config.run_dir / runs.ADAPTER, tmp_path / "merged")
    assert (merged_dir / "config.json").is_file() and not (merged_dir / "adapter_config.json").exists()
    assert list(merged_dir.glob("*.safetensors")) and (merged_dir / "tokenizer.json").is_file()

    task = get_task("sql")
    with_adapter = Evaluator(resolve_base_model(config.base_model))
    with_adapter.attach("sql", config.run_dir / runs.ADAPTER)
    fmt = with_adapter.adapter_format(task, "sql")
    expected = with_adapter.answers(fmt, eval_rows, "sql", progress=False)

    plain = Evaluator.__new__(Evaluator)  # the same generation code around a model loaded without PEFT
    plain.tokenizer, plain.adapters, plain.adapter_formats, plain.batch_size = with_adapter.tokenizer, {}, {}, 16
    plain.model = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert "peft" not in type(plain.model).__module__
    got = plain.answers(fmt, eval_rows, progress=False)
    same = sum(a == b for a, b in zip(expected, got)) / len(eval_rows)
    assert same >= 0.95, list(zip(expected, got))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(command: list[str], url: str, log: Path, timeout_s: float = 240) -> subprocess.Popen:
    handle = log.open("wb")
    server = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, **THREADS})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"{command[:3]} exited: {log.read_text(errors='replace')[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return server
        except OSError:
            time.sleep(1)
    stop(server)
    pytest.fail(f"{url} did not answer within {timeout_s} s: {log.read_text(errors='replace')[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
            server.wait(10)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def browser_page(playwright):
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
    return browser, browser.new_page(viewport={"width": 1400, "height": 1000})


@needs_chromium
def test_the_mlflow_ui_shows_the_run_and_its_loss_chart(trained, tmp_path):
    from playwright.sync_api import sync_playwright

    config, _, _ = trained
    client, run = the_run(config)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = serve([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking.tracking_uri(config),
                    "--host", "127.0.0.1", "--port", str(port)], base, tmp_path / "mlflow.log")
    try:
        with sync_playwright() as playwright:
            browser, page = browser_page(playwright)
            page.goto(f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/model-metrics")
            page.get_by_text("tracked").first.wait_for(timeout=120_000)
            loss_chart = page.get_by_text("tracked (loss)", exact=True)  # the legend under the loss chart
            for _ in range(60):  # charts render as they scroll into view
                if loss_chart.count():
                    break
                page.mouse.move(700, 600)
                page.mouse.wheel(0, 600)
                time.sleep(0.5)
            loss_chart.first.scroll_into_view_if_needed(timeout=120_000)  # the chart draws late on 2 busy cores
            time.sleep(2)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "mlflow_run.png"))
            browser.close()
    finally:
        stop(server)


@needs_chromium
def test_the_application_shows_base_and_adapter_answers_in_the_browser(trained, tmp_path):
    from playwright.sync_api import sync_playwright

    config, _, _ = trained
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = serve([sys.executable, "app/app.py", "--port", str(port), "--output-dir", config.output_dir,
                    "--adapters-dir", str(tmp_path / "none")], base, tmp_path / "app.log")
    try:
        with sync_playwright() as playwright:
            browser, page = browser_page(playwright)
            page.goto(base)
            page.locator("#adapter").wait_for(timeout=120_000)
            assert "tracked" in page.locator("#adapter").inner_text() or page.locator("#adapter input").input_value() == "tracked"
            page.locator("#field-0 textarea").wait_for(timeout=60_000)
            page.wait_for_function("document.querySelector('#field-0 textarea').value.length > 0", timeout=60_000)
            page.locator("#generate").click()
            page.wait_for_function("document.querySelector('#adapter-answer textarea').value.length > 0",
                                   timeout=240_000)
            base_answer = page.locator("#base-answer textarea").input_value()
            adapter_answer = page.locator("#adapter-answer textarea").input_value()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "application.png"), full_page=True)
            browser.close()
        assert base_answer and adapter_answer and "SELECT" in adapter_answer.upper()
    finally:
        stop(server)


def test_every_application_and_job_entry_point_prints_help():
    metadata = yaml.safe_load((REPO / ".project-metadata.yaml").read_text(encoding="utf-8"))
    scripts = [entry["script"] for entry in metadata["tasks"] if entry.get("script")]
    applications = [entry for entry in metadata["tasks"] if entry["type"] == "start_application"]
    assert applications and applications[0]["script"] == "app/app.py"
    for script in scripts + ["-m lib.export", "-m lib.train", "-m lib.launcher", "-m lib.evaluate"]:
        command = [sys.executable, *script.split()] if script.startswith("-m") else [sys.executable, script]
        done = subprocess.run([*command, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage" in done.stdout.lower(), (script, done.stderr[-1500:])
