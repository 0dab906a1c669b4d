"""Faults and hostile input beyond bad settings (tests/test_bad_input.py): a save killed part-way, folders
that cannot be written, paths with spaces and unicode, shell metacharacters in names, secrets in the
environment. docs/RELIABILITY.md lists every fault tried and the test that shows its outcome.

Run: python -m pytest tests/test_reliability.py   (about 1 minute on 2 CPU cores; one tiny training run)
"""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from lib import launcher, runs
from lib.config import ConfigError, RunConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_reliabilitySecretToken0123456789"  # set as HF_TOKEN; must never be written anywhere
HOSTILE_NAME = "run ü;$(touch {marker}) 'q' \"dq\" `touch {marker}`"  # a run name full of shell syntax


def hostile_name(tmp_path: Path) -> tuple[str, Path]:
    """A run name that would create `marker` if any shell ever read it, and that marker."""
    marker = tmp_path / "pwned"
    return HOSTILE_NAME.format(marker=marker.name), marker


# ---- a save killed part-way -------------------------------------------------------------------

# Runs FineTuner's real save path (_save_adapter: staging folder, then runs.publish_dir) with a slow
# stand-in for save_pretrained; prints the named point and sleeps there until the test kills it.
SAVE_CHILD = r"""
import os, sys, time, types
from pathlib import Path
from lib import runs
from lib.config import RunConfig
from lib.fine_tuner import FineTuner

config, point = RunConfig.from_json(sys.argv[1]), sys.argv[2]

def reached(name):
    if name == point:
        print(name, flush=True)
        time.sleep(120)

def slow_save(folder):
    Path(folder).mkdir(parents=True, exist_ok=True)
    for index in range(3):
        (Path(folder) / f"part-{index}.bin").write_bytes(b"new" * 1000)
        reached(f"wrote-{index}")

renames, real_rename = [], os.rename
def rename(source, target):
    real_rename(source, target)
    renames.append(target)
    reached(f"rename-{len(renames)}")
runs.os.rename = rename

tuner = FineTuner.__new__(FineTuner)
tuner.config = config
tuner.trainer = types.SimpleNamespace(model=types.SimpleNamespace(save_pretrained=slow_save))
write_tokenizer = lambda folder: (Path(folder) / "tokenizer.json").write_text("{}")
tuner.tokenizer = types.SimpleNamespace(save_pretrained=write_tokenizer)
tuner._save_adapter({"global_step": 2})
reached("saved")
"""
OLD = {"part-0.bin": b"old", "part-1.bin": b"old", "part-2.bin": b"old", "tokenizer.json": b"{}"}
NEW = {"part-0.bin": b"new" * 1000, "part-1.bin": b"new" * 1000, "part-2.bin": b"new" * 1000,
       "tokenizer.json": b"{}", runs.RUN_RECORD: b'{\n  "global_step": 2\n}\n'}
# Where the process is killed -> which adapter the next start must find.
KILL_POINTS = {"wrote-0": OLD, "wrote-2": OLD, "rename-1": OLD, "rename-2": NEW}


def folder_content(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_a_save_killed_part_way_keeps_a_whole_adapter(tmp_path, point):
    """SIGKILL while the adapter is written (after 1 or all 3 files), between publish_dir's two renames,
    or after them: `adapter` is never half-written, and the next start_run_dir leaves the old adapter
    (or the new one, once it was in place) and no staging leftovers."""
    config = RunConfig(output_dir=str(tmp_path / "runs"), run_name="saved", overwrite=True).validate()
    adapter_dir = runs.start_run_dir(config) / runs.ADAPTER
    adapter_dir.mkdir()
    for name, content in OLD.items():
        (adapter_dir / name).write_bytes(content)
    config.to_json(tmp_path / "run.json")
    child = subprocess.Popen([sys.executable, "-c", SAVE_CHILD, str(tmp_path / "run.json"), point], cwd=REPO_ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == point
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    if adapter_dir.exists():  # whatever is named `adapter` right after the kill is a whole adapter
        assert folder_content(adapter_dir) in (OLD, NEW)
    else:
        assert point == "rename-1"  # the old adapter is retired, waiting to be restored

    runs.check_run_dir(config)
    runs.start_run_dir(config)
    assert folder_content(adapter_dir) == KILL_POINTS[point]
    assert not list(adapter_dir.parent.glob(f"{runs.STAGING_PREFIX}*"))


def test_a_retired_adapter_still_counts_as_an_adapter_not_to_overwrite(tmp_path):
    config = RunConfig(output_dir=str(tmp_path), run_name="retired").validate()
    retired = config.run_dir / f"{runs.STAGING_PREFIX}retired-123-{runs.ADAPTER}"
    retired.mkdir(parents=True)
    with pytest.raises(ConfigError) as error:
        runs.check_run_dir(config)
    assert error.value.setting == "overwrite" and retired.is_dir()


# ---- disk and paths ---------------------------------------------------------------------------

@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; see the next test")
def test_a_read_only_output_dir_is_refused_before_the_run(tmp_path):
    output_dir = tmp_path / "read-only"
    output_dir.mkdir()
    output_dir.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as error:
            runs.check_run_dir(RunConfig(output_dir=str(output_dir / "runs"), run_name="r").validate())
        assert error.value.setting == "output_dir"
    finally:
        output_dir.chmod(0o700)


def test_an_output_dir_that_cannot_be_a_folder_is_refused_before_the_run(tmp_path):
    """What a read-only folder is to other users, a path through a file is to root too."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for output_dir in (blocker, blocker / "runs", blocker / "runs" / "deeper"):
        with pytest.raises(ConfigError) as error:
            runs.check_run_dir(RunConfig(output_dir=str(output_dir), run_name="r").validate())
        assert error.value.setting in ("output_dir", "run_name"), error.value
    assert blocker.read_text() == "not a folder"


def test_spaces_unicode_and_shell_syntax_in_paths_run_end_to_end(tmp_path, monkeypatch):
    """One tiny training run, reading its data from and writing its run under paths with spaces, unicode
    and shell syntax, HF_TOKEN set: the adapter is saved there, no shell ran, and the token is nowhere."""
    from lib.fine_tuner import FineTuner
    from lib.tasks import get_task

    monkeypatch.setenv("HF_TOKEN", SECRET)
    run_name, marker = hostile_name(tmp_path)
    data_dir = tmp_path / "données d'entraînement ✓"
    data_dir.mkdir()
    rows, _ = get_task("sql").embedded_splits(12, 1, 0)
    data = data_dir / "requêtes sql.jsonl"
    data.write_text("\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n", encoding="utf-8")
    config = RunConfig(task="sql", data=str(data), output_dir=str(tmp_path / "sorties $HOME ü"), run_name=run_name,
                       train_rows=8, eval_rows=2, max_steps=1, max_seq_length=128, batch_size=2, logging_steps=1,
                       save_steps=1)
    result = FineTuner(config).run()
    assert result.run_dir == tmp_path / "sorties $HOME ü" / run_name
    assert (result.adapter_dir / "adapter_config.json").is_file() and result.record["train_rows"] == 8
    assert not marker.exists() and not (Path.cwd() / marker.name).exists()
    assert_secret_nowhere(result.run_dir)


# ---- no shell: values reach processes as data ---------------------------------------------------

def test_job_parameters_with_shell_syntax_stay_values(tmp_path):
    """run_notebook.prepare: a run name and a base model full of shell syntax become a folder of exactly
    that name and exactly that parameter value; nothing runs them."""
    from jobs.run_notebook import NOTEBOOKS, prepare

    run_name, marker = hostile_name(tmp_path)
    base_model = f"$(touch {marker}); `touch {marker}` \"'"
    run_dir, parameters = prepare(NOTEBOOKS / "02_english_to_sql.ipynb",
                                  ["--output-dir", str(tmp_path / "runs"), "--run-name", run_name],
                                  {"QLORA_BASE_MODEL": base_model, "HF_TOKEN": SECRET})
    assert run_dir == tmp_path / "runs" / run_name and run_dir.is_dir()
    assert parameters["base_model"] == base_model and parameters["run_name"] == run_name
    assert SECRET not in json.dumps(parameters)
    from lib.models import resolve_base_model

    RunConfig(base_model=base_model).validate()  # what the notebook's config cell then does with it
    with pytest.raises(ConfigError) as error:    # and FineTuner.setup() (a Hub id must be letters, digits, -_.)
        resolve_base_model(base_model)
    assert error.value.setting == "base_model" and not marker.exists()


class RecordingWorkers:
    """A worker backend that records what it is asked to start and starts nothing."""

    name, shares_host = "recording", True

    def __init__(self):
        self.started = {}

    def main_address(self):
        return "127.0.0.1"

    def start(self, rank, argv, env, log_path, *, join_timeout_s, gpus):
        self.started[rank] = (argv, env)
        return types.SimpleNamespace(rank=rank, log_path=log_path, failure="", exit_code=lambda: 0, stop=lambda: None)


@pytest.fixture
def recorded_launch(tmp_path, monkeypatch):
    """A two-worker launch of a run with a hostile name, HF_TOKEN set; nothing trains: (argv by rank, env by
    rank, run folder, marker)."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    run_name, marker = hostile_name(tmp_path)
    backend = RecordingWorkers()
    monkeypatch.setattr(launcher, "start_local", lambda rank, argv, env, log: backend.start(
        rank, argv, env, log, join_timeout_s=0, gpus=0))
    config = RunConfig(task="sql", output_dir=str(tmp_path / "runs $(id)"), run_name=run_name, max_steps=1)
    with pytest.raises(launcher.LaunchError, match="without writing"):  # no worker trained, so no run record
        launcher.launch(config, 2, backend, join_timeout_s=5, echo=False)
    argv = {rank: started[0] for rank, started in backend.started.items()}
    env = {rank: started[1] for rank, started in backend.started.items()}
    return argv, env, tmp_path / "runs $(id)" / run_name, marker


def test_launcher_arguments_keep_hostile_paths_as_single_values(recorded_launch, tmp_path):
    """Each worker's argument list names its accelerate config and run.json as single arguments; a real
    process started from that list (as LocalProcess starts workers) receives them unchanged."""
    from lib.workers import LocalProcess

    argv, _, run_dir, marker = recorded_launch
    assert sorted(argv) == [0, 1]
    for rank, arguments in argv.items():
        assert str(run_dir / "launch" / f"accelerate-{rank}.yaml") in arguments
        assert str(run_dir / "launch" / "run.json") in arguments
    assert RunConfig.from_json(run_dir / "launch" / "run.json").run_name == run_dir.name
    log = tmp_path / "echo.log"
    log.write_bytes(b"")
    echo = ["-c", "import json, sys; print(json.dumps(sys.argv[1:]))", *argv[1]]
    process = LocalProcess(1, echo, {}, log)
    assert process.process.wait(timeout=60) == 0
    assert json.loads(log.read_text()) == argv[1]
    assert not marker.exists() and not (REPO_ROOT / marker.name).exists()


def assert_secret_nowhere(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_hf_token_is_in_no_rendered_config_run_json_log_or_command_line(recorded_launch):
    argv, env, run_dir, _ = recorded_launch
    assert sorted(path.name for path in (run_dir / "launch").iterdir()) == [
        "accelerate-0.yaml", "accelerate-1.yaml", "run.json"]
    assert_secret_nowhere(run_dir)
    assert SECRET not in json.dumps(argv) and SECRET not in json.dumps(env)  # inherited, never passed


def test_cml_workers_get_hf_token_through_the_api_environment_only(tmp_path, monkeypatch):
    """CML Workers do not inherit this session's environment: HF_TOKEN goes in the API's env mapping,
    never in the worker's argument list (QLORA_WORKER_ARGV) or script."""
    from lib.workers import CmlWorkers

    monkeypatch.setenv("HF_TOKEN", SECRET)
    calls = []
    api = types.SimpleNamespace(launch_workers=lambda **kwargs: calls.append(kwargs) or [{"id": "w1"}],
                                await_workers=lambda *args, **kwargs: {"failures": []}, stop_workers=lambda *a: None)
    argv = launcher.accelerate_argv(tmp_path / "accelerate-1.yaml", tmp_path / "run.json", 5)
    CmlWorkers(api=api).start(1, argv, {"PYTHONUNBUFFERED": "1"}, tmp_path / "worker-1.log", join_timeout_s=5, gpus=0)
    (call,) = calls
    assert call["env"]["HF_TOKEN"] == SECRET
    assert json.loads(call["env"]["QLORA_WORKER_ARGV"]) == argv and SECRET not in call["env"]["QLORA_WORKER_ARGV"]
    assert SECRET not in call["script"]


def test_a_distributed_run_killed_mid_run_resumes_from_its_last_checkpoint(tmp_path):
    """Kill rank 1 after the first checkpoint: the launch fails naming it; the same launch again resumes."""
    import threading

    import psutil

    from lib.launcher import LaunchError, launch

    config = RunConfig(task="sql", max_steps=6, save_steps=2, logging_steps=1, train_rows=48, eval_rows=2,
                       max_seq_length=128, batch_size=2, output_dir=str(tmp_path), run_name="resumed")
    outcome = {}

    def first_attempt():
        try:
            launch(config, 2, "local", join_timeout_s=120, echo=False)
        except Exception as error:  # handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=first_attempt)
    thread.start()
    deadline = time.monotonic() + 300
    while runs.last_checkpoint(config.run_dir) is None and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    rank_one = [process for process in psutil.process_iter(["cmdline"])
                if "lib.train" in (process.info["cmdline"] or []) and str(tmp_path) in " ".join(process.info["cmdline"])
                and process.environ().get("RANK") == "1"]
    assert rank_one, "rank 1's training process was not found"
    rank_one[0].kill()
    thread.join(180)
    assert not thread.is_alive()
    if not (config.run_dir / runs.ADAPTER).exists():  # the kill landed before the end of training
        assert isinstance(outcome.get("error"), LaunchError) and outcome["error"].rank == 1
    assert runs.last_checkpoint(config.run_dir) is not None

    result = launch(config.replace(overwrite=True), 2, "local", join_timeout_s=120, echo=False)
    assert result.record["world_size"] == 2 and result.record["global_step"] == 6
    assert result.record["resumed_from"] is not None
    assert [point["step"] for point in result.record["loss_history"]] == [1, 2, 3, 4, 5, 6]
