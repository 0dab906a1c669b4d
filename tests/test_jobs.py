"""The headless jobs, end to end: every job entry point runs as a subprocess with tiny parameters, which
executes its notebook through papermill; the tests assert on what the job printed and on what the run
left behind (executed notebook, adapter, run record, metrics, plots). Each job runs once per module
and every assertion reuses that run; the adapter explorer attaches the adapters the task jobs trained.

Run: python -m pytest tests/test_jobs.py   (about 5 minutes on 2 CPU cores)
"""

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from jobs.run_notebook import UsageError, collect_parameters, kernel_name, read_value
from lib.tasks import TASKS, get_task

REPO_ROOT = Path(__file__).resolve().parents[1]
TASK_JOBS = {name: (f"jobs/finetune_{name}.py", task.notebook) for name, task in TASKS.items()}
# Tiny runs of the real path (embedded model in 4-bit), given two of the three ways a job takes
# parameters: a JSON environment variable and one variable per parameter (--set is used below).
TINY_JSON = json.dumps({"train_rows": 8, "eval_rows": 2, "max_seq_length": 128})
TINY_ENV = {"QLORA_PARAMETERS": TINY_JSON, "QLORA_MAX_STEPS": "2", "QLORA_LOGGING_STEPS": "1"}
SECRET = "hf_" + secrets.token_urlsafe(24)  # a token-like value that must never be written anywhere
JOB_TIMEOUT_S = 900
# One CPU thread per job unless told otherwise: on a small machine that also runs other work, torch's
# threads spin-waiting for busy cores made these runs about 5 times slower (measured on 2 cores).
THREADS = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def run(script: str, *arguments: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """A job as CML starts it: `python <script> ...` from the repository root, settings in the environment."""
    return subprocess.run([sys.executable, script, *arguments], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, **THREADS, **(env or {})}, timeout=JOB_TIMEOUT_S)


def executed(run_dir: Path, notebook: str):
    return nbformat.read(run_dir / notebook, as_version=4)


def outputs_text(notebook) -> str:
    texts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            texts.append("".join(output.get("text", "")) + "".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(texts)


def error_outputs(notebook) -> list:
    return [output for cell in notebook.cells for output in cell.get("outputs", []) if output.output_type == "error"]


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    height, width = matplotlib.image.imread(path).shape[:2]  # decodes the whole image
    assert height > 100 and width > 100


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory) -> dict:
    """task -> (finished job, its run folder): each task job run once, with a secret in its environment."""
    output_dir = tmp_path_factory.mktemp("task-runs")
    results = {}
    for task, (script, _) in TASK_JOBS.items():
        arguments = ["--output-dir", str(output_dir), "--run-name", f"{task}-test", "--set", "batch_size=2"]
        finished = run(script, *arguments, env={**TINY_ENV, "HF_TOKEN": SECRET})
        results[task] = (finished, output_dir / f"{task}-test")
    return results


@pytest.fixture(scope="module")
def environment_check(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("environment-check")
    finished = run("jobs/environment_check.py", "--set", "hub_timeout_s=1", env={"HF_TOKEN": SECRET,
                                                                                   "QLORA_OUTPUT_DIR": str(output_dir)})
    return finished, output_dir


# ---- the task jobs and their notebooks --------------------------------------------------------

@pytest.mark.parametrize("task", TASK_JOBS)
def test_task_job_exits_zero_and_prints_metrics_and_locations(task_runs, task):
    finished, run_dir = task_runs[task]
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    for line in (f"adapter:           {run_dir / 'adapter'}", f"run record:        {run_dir / 'run_record.json'}",
                 f"loss curve:        {run_dir / 'loss_curve.png'}",
                 f"{task}: base model vs adapter on 2 held-out rows"):
        assert line in finished.stdout
    for metric in get_task(task).metrics:
        assert metric in finished.stdout.split("base model vs adapter")[-1]
    # headless progress: plain lines in the job's log while the notebook trains (lib/progress.py)
    assert "step 1/2 (50%)" in finished.stdout and "step 2/2 (100%)" in finished.stdout
    assert "tokens/s · elapsed 0:00:" in finished.stdout


# The CPU memory estimate of a run against its measured peak. Whole runs at the notebooks' defaults and on
# two local processes are within 0.8-1.25 (docs/memory_runs_cpu.json, tools/memory_runs.py; too long for the
# suite). These runs train 2 steps: the peak has not grown to the steady state the estimate plans for (the
# allocator's cached blocks, lib/memory.py's CPU workspace), so the estimate may be higher; never much lower.
PEAK_RATIO = (0.8, 1.5)


def assert_peak_estimated(share: dict) -> None:
    ratio = share["estimated_peak_gib"] / share["peak_memory_gib"]
    assert PEAK_RATIO[0] <= ratio <= PEAK_RATIO[1], share


@pytest.mark.parametrize("task", TASK_JOBS)
def test_task_run_record_estimates_its_peak_memory(task_runs, task):
    """The notebook's kernel is a process the estimate did not compute (Jupyter, plots, MLflow): what it holds
    when training starts is measured, the training on top is estimated, and the sum meets the measured peak."""
    _, run_dir = task_runs[task]
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["estimated_peak_gib"] > record["plan"]["estimated_gib"]  # the process's own memory added
    assert_peak_estimated(record)
    assert record["plan"]["threads"] >= 1  # the CPU threads it trained with, decided by lib.plan


@pytest.mark.parametrize("task", TASK_JOBS)
def test_task_notebook_ran_every_cell_with_the_job_parameters(task_runs, task):
    _, run_dir = task_runs[task]
    notebook = executed(run_dir, TASK_JOBS[task][1])
    assert error_outputs(notebook) == []
    injected = notebook.metadata.papermill.parameters
    assert injected["max_steps"] == 2 and injected["train_rows"] == 8 and injected["logging_steps"] == 1
    assert injected["batch_size"] == 2 and "load_in_4bit" not in injected
    assert injected["run_name"] == f"{task}-test" and injected["output_dir"] == str(run_dir.parent)
    assert all(cell.execution_count for cell in notebook.cells if cell.cell_type == "code")
    images = [output for cell in notebook.cells for output in cell.get("outputs", [])
              if "image/png" in output.get("data", {})]
    assert len(images) >= 2, "the loss curve and the metrics chart are displayed"
    assert "trainable parameters" in outputs_text(notebook)
    panel_cell = next(cell for cell in notebook.cells if "LoraPanel(" in cell.source)
    assert any("application/vnd.jupyter.widget-view+json" in output.get("data", {})
               for output in panel_cell.outputs), "the LoRA panel is displayed under papermill"


@pytest.mark.parametrize("task", TASK_JOBS)
def test_adapter_and_run_record_load(task_runs, task):
    from peft import PeftConfig
    from safetensors.torch import load_file

    _, run_dir = task_runs[task]
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["task"] == task and record["global_step"] == 2 and record["world_size"] == 1
    assert record["config"]["run_name"] == f"{task}-test" and record["trainable_parameters"] > 0
    assert json.loads((run_dir / "adapter" / "run_record.json").read_text()) == record
    adapter = PeftConfig.from_pretrained(str(run_dir / "adapter"))
    assert adapter.r == record["config"]["lora_r"]
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in name for name in weights) and any("lora_B" in name for name in weights)


@pytest.mark.parametrize("task", TASK_JOBS)
def test_metrics_json_has_the_task_metrics_and_plots_are_pngs(task_runs, task):
    _, run_dir = task_runs[task]
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["task"] == task and report["rows"] == 2
    assert set(report["base"]) == set(report["adapter"]) == set(get_task(task).metrics)
    assert len(report["examples"]) == 2 and {"prompt", "reference", "base", "adapter"} <= set(report["examples"][0])
    for name in ("loss_curve.png", "metrics.png"):
        assert_png(run_dir / name)


def test_secret_from_the_environment_is_written_nowhere(task_runs, environment_check):
    """HF_TOKEN reached the kernels (the environment check sees it) but no file of any run holds it."""
    finished, output_dir = environment_check
    check_run = next(output_dir.glob("environment_check-*"))
    assert "HF_TOKEN set in the environment: True" in outputs_text(executed(check_run, "00_environment_check.ipynb"))
    folders = [run_dir for _, run_dir in task_runs.values()] + [check_run]
    for folder in folders:
        for path in folder.rglob("*"):
            assert not path.is_file() or SECRET.encode() not in path.read_bytes(), f"the secret is in {path}"
    for finished, _ in [*task_runs.values(), environment_check]:
        assert SECRET not in finished.stdout + finished.stderr


# ---- the other jobs and notebooks --------------------------------------------------------------

def test_environment_check_job_runs_its_kernel_in_this_python(environment_check):
    finished, output_dir = environment_check
    assert finished.returncode == 0, finished.stderr[-3000:]
    runs = list(output_dir.glob("environment_check-*"))
    assert len(runs) == 1, "the job makes one new run folder, under QLORA_OUTPUT_DIR"
    notebook = executed(runs[0], "00_environment_check.ipynb")
    assert error_outputs(notebook) == []
    text = outputs_text(notebook)
    assert f"({sys.executable})" in text, "the notebook's kernel is the job's own Python"
    assert "ready:" in text and "LlamaForCausalLM" in text


def test_distributed_job_trains_on_two_workers(tmp_path):
    finished = run("jobs/distributed_finetune.py", "--output-dir", str(tmp_path), "--set", "backend=local",
                   env={**TINY_ENV, "NUM_GPU_WORKERS": "2"})
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    run_dir = next(tmp_path.glob("distributed-sql-*"))
    assert error_outputs(executed(run_dir, "04_distributed_training.ipynb")) == []
    record = json.loads((run_dir / "run_record.json").read_text())
    assert record["world_size"] == 2 and [share["rank"] for share in record["rank_shares"]] == [0, 1]
    for share in record["rank_shares"]:  # each local process: its own peak against its own estimate
        assert_peak_estimated(share)
    logs = run_dir / "logs" / "attempt-1"
    assert (logs / "worker-0.log").stat().st_size > 0 and (logs / "worker-1.log").is_file()
    assert (run_dir / "launch" / "accelerate-1.yaml").is_file()
    assert set(json.loads((run_dir / "metrics.json").read_text())["adapter"]) == set(get_task("sql").metrics)
    assert_png(run_dir / "loss_curve.png")
    assert f"worker logs:       {run_dir / 'logs'}" in finished.stdout


def test_adapter_explorer_attaches_every_task_adapter(task_runs):
    output_dir = task_runs["sql"][1].parent
    finished = run("jobs/run_notebook.py", "notebooks/05_adapter_explorer.ipynb", "--set", "prompts_per_adapter=1",
                   env={"QLORA_OUTPUT_DIR": str(output_dir)})
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    notebook = executed(next(output_dir.glob("adapter_explorer-*")), "05_adapter_explorer.ipynb")
    assert error_outputs(notebook) == []
    assert "attached: instruction-test, sql-test, detox-test" in outputs_text(notebook)
    assert "no adapter found" not in outputs_text(notebook)


def test_adapter_explorer_with_no_adapter_trains_a_starter_and_shows_it(tmp_path):
    """Notebook 05 is useful before any job: with nothing to attach it trains a small SQL adapter first."""
    finished = run("jobs/run_notebook.py", "notebooks/05_adapter_explorer.ipynb", "--set", "prompts_per_adapter=1",
                   "--set", "starter_steps=2", env={"QLORA_OUTPUT_DIR": str(tmp_path)})
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    notebook = executed(next(tmp_path.glob("adapter_explorer-*")), "05_adapter_explorer.ipynb")
    assert error_outputs(notebook) == [] and (tmp_path / "sql-starter" / "adapter").is_dir()
    text = outputs_text(notebook)
    assert "no adapter found: training a starter SQL adapter (2 steps)" in text and "attached: sql-starter" in text


# ---- failures and arguments ---------------------------------------------------------------------

def test_a_failing_cell_fails_the_job_with_its_error(tmp_path):
    finished = run("jobs/finetune_sql.py", "--output-dir", str(tmp_path), "--set", "lora_r=-1")
    assert finished.returncode == 1
    failure = [line for line in finished.stderr.splitlines() if line.startswith("FAILED:")]
    assert len(failure) == 1 and "raised ConfigError: setting 'lora_r' has value -1" in failure[0]
    notebook = executed(next(tmp_path.glob("sql-*")), "02_english_to_sql.ipynb")
    assert [output.ename for output in error_outputs(notebook)] == ["ConfigError"]


def test_an_existing_run_folder_is_never_reused(tmp_path):
    (tmp_path / "taken").mkdir()
    finished = run("jobs/finetune_sql.py", "--output-dir", str(tmp_path), "--run-name", "taken")
    assert finished.returncode == 2 and "exists already" in finished.stderr
    assert list((tmp_path / "taken").iterdir()) == []


def test_undeclared_names_cannot_become_parameters(tmp_path):
    finished = run("jobs/finetune_sql.py", "--output-dir", str(tmp_path), "--set", f"hf_token={SECRET}")
    assert finished.returncode == 2 and "unknown parameter(s) hf_token" in finished.stderr
    assert list(tmp_path.iterdir()) == []


def test_parameters_come_from_json_then_named_variables_then_set():
    declared = {name: {"inferred_type_name": kind} for name, kind in
                (("max_steps", "int"), ("lora_r", "int"), ("packing", "bool"), ("run_name", "str"),
                 ("learning_rate", "float"), ("target_modules", "str"))}
    environ = {"QLORA_PARAMETERS": '{"max_steps": 5, "lora_r": 4, "learning_rate": 0.1}', "QLORA_MAX_STEPS": "7",
               "QLORA_PACKING": "False", "QLORA_RUN_NAME": "2024", "HF_TOKEN": SECRET, "QLORA_AMP_CACHE": "/tmp"}
    values = collect_parameters(declared, environ, ["lora_r=8", "learning_rate=5e-4", "target_modules=q_proj,v_proj"])
    assert values == {"max_steps": 7, "lora_r": 8, "packing": False, "run_name": "2024", "learning_rate": 5e-4,
                      "target_modules": "q_proj,v_proj"}


def test_bad_values_name_the_parameter():
    with pytest.raises(UsageError, match="'packing' is a bool"):
        read_value("packing", "maybe", "bool")
    with pytest.raises(UsageError, match="JSON object"):
        collect_parameters({}, {"QLORA_PARAMETERS": "[1, 2]"}, [])
    assert read_value("max_steps", "-1", "int") == -1 and read_value("data", "rows.csv", "str") == "rows.csv"


def test_the_kernel_papermill_uses_runs_this_python():
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    name = kernel_name()
    manager = KernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager())
    assert manager.format_kernel_cmd()[0] == sys.executable
