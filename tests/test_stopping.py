"""Stop signals and full disks during training (issue 14): a SIGTERM (a CML Job stopped by its user, a
worker preempted) saves a checkpoint and ends cleanly, so the same command resumes; a write that fails
for want of space ends with an error naming the folder and the space needed, and leaves no partial
checkpoint or staging folder. docs/RELIABILITY.md lists these rows.

Run: python -m pytest tests/test_stopping.py   (about 3 minutes on 2 CPU cores; five tiny training runs)
"""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lib import runs
from lib.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
THREADS = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
# Enough steps that the signal lands long before the end; no regular checkpoint, so the one found is the stop's.
SETTINGS = dict(task="sql", train_rows=32, eval_rows=2, max_steps=30, max_seq_length=128, batch_size=2,
                logging_steps=1, save_steps=1000)
STOP_WITHIN_S = 90


def set_arguments(output_dir: Path, run_name: str) -> list[str]:
    values = {**SETTINGS, "output_dir": str(output_dir), "run_name": run_name}
    return [argument for name, value in values.items() for argument in ("--set", f"{name}={value}")]


def start(argv: list[str], log: Path, **popen) -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                env={**os.environ, **THREADS}, **popen)


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout_s: float = 400) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.3)
    log = path.read_text(errors="replace")[-3000:] if path.is_file() else "(no log)"
    pytest.fail(f"{text!r} never appeared in {path} (exit {process.poll()}):\n{log}")


def stop_and_wait(process: subprocess.Popen) -> tuple[int, float]:
    """SIGTERM to the process; its exit status and the seconds it took to end."""
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(STOP_WITHIN_S)
    return code, time.monotonic() - sent


def training_processes(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if marker in " ".join(process.info["cmdline"] or []) and process.pid != os.getpid():
            found.append(process)
    return found


def assert_resumed_to_the_end(run_dir: Path, stopped_at: int, world_size: int) -> None:
    record = runs.read_json(run_dir / runs.RUN_RECORD)
    assert record["resumed_from"].endswith(f"checkpoint-{stopped_at}")
    assert record["global_step"] == SETTINGS["max_steps"] and record["world_size"] == world_size
    assert [point["step"] for point in record["loss_history"]] == list(range(1, SETTINGS["max_steps"] + 1))


def stopped_step(run_dir: Path) -> int:
    checkpoint = runs.last_checkpoint(run_dir)
    assert checkpoint, f"no complete checkpoint in {run_dir / runs.CHECKPOINTS}"
    return int(checkpoint.rsplit("-", 1)[-1])


# ---- SIGTERM ----------------------------------------------------------------------------------

def test_sigterm_saves_a_checkpoint_and_the_same_command_resumes(tmp_path):
    """One process (python -m lib.train): SIGTERM mid-training ends it within seconds with status 143 and a
    one-line message, after saving a checkpoint at the end of the step; the same command resumes there."""
    argv = ["-m", "lib.train", *set_arguments(tmp_path, "stopped")]
    log = tmp_path / "first.log"
    process = start(argv, log)
    wait_for_text(log, "'loss'", process)  # training has started
    code, took_s = stop_and_wait(process)
    text = log.read_text(errors="replace")
    assert code == 143, text[-3000:]
    assert "Traceback" not in text and "stopped: SIGTERM received: training stopped at step" in text
    run_dir = tmp_path / "stopped"
    step = stopped_step(run_dir)
    assert 1 <= step < SETTINGS["max_steps"] and not (run_dir / runs.ADAPTER).exists()
    assert not (tmp_path / ".stopped.lock").exists()  # the lock went with the run

    again = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                           env={**os.environ, **THREADS}, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_resumed_to_the_end(run_dir, step, world_size=1)
    print(f"one process: stopped {took_s:.1f} s after SIGTERM at step {step}")


def test_sigterm_to_a_two_process_launch_stops_every_rank_and_the_same_launch_resumes(tmp_path):
    """Two local processes (python -m lib.launcher): SIGTERM to the launcher, as CML sends it to a stopped
    job, reaches rank 0; the ranks agree after the step, save one checkpoint, and end; the launcher exits
    143 naming the checkpoint; no process is left; the same launch resumes with both ranks."""
    argv = ["-m", "lib.launcher", "--workers", "2", "--backend", "local", *set_arguments(tmp_path, "stopped2")]
    log, run_dir = tmp_path / "launch.log", tmp_path / "stopped2"
    process = start(argv, log)
    wait_for_text(run_dir / "logs" / "attempt-1" / "worker-0.log", "'loss'", process)
    code, took_s = stop_and_wait(process)
    text = log.read_text(errors="replace")
    assert code == 143, text[-3000:]
    assert "every worker stopped at the end of a step and saved" in text and "Traceback" not in text
    step = stopped_step(run_dir)
    for rank in (0, 1):
        worker_log = (run_dir / "logs" / "attempt-1" / f"worker-{rank}.log").read_text(errors="replace")
        assert f"training stopped at step {step}" in worker_log, worker_log[-2000:]
    assert training_processes(str(run_dir)) == []

    again = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                           env={**os.environ, **THREADS}, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_resumed_to_the_end(run_dir, step, world_size=2)
    first_attempt = (run_dir / "logs" / "attempt-1" / "worker-1.log").read_text(errors="replace")
    assert f"training stopped at step {step}" in first_attempt  # the relaunch kept the stopped attempt's logs
    assert (run_dir / "logs" / "attempt-2" / "worker-1.log").stat().st_size > 0
    print(f"two processes: stopped {took_s:.1f} s after SIGTERM at step {step}")


def test_sigterm_to_a_job_stops_its_notebook_and_resume_goes_on(tmp_path):
    """A CML Job (jobs/finetune_sql.py under papermill) stopped by its user: the kernel's training saves a
    checkpoint, the job exits 143 printing the command that goes on; that command resumes and finishes."""
    parameters = {**{name: value for name, value in SETTINGS.items() if name != "task"}, "save_steps": 2}
    env = {"QLORA_PARAMETERS": json.dumps(parameters), "QLORA_OUTPUT_DIR": str(tmp_path)}
    log = tmp_path / "job.log"
    with open(log, "wb") as handle:
        process = subprocess.Popen([sys.executable, "jobs/finetune_sql.py", "--run-name", "job"], cwd=REPO_ROOT,
                                   stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **THREADS, **env})
    run_dir = tmp_path / "job"
    deadline = time.monotonic() + 600
    while runs.last_checkpoint(run_dir) is None:  # the notebook is training (its progress bar is a widget)
        assert process.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.3)
    code, _ = stop_and_wait(process)
    text = log.read_text(errors="replace")
    assert code == 143, text[-3000:]
    assert "STOPPED by SIGTERM" in text and "--resume" in text
    step = stopped_step(run_dir)
    resume = text.split("to go on from the last checkpoint: ", 1)[1].splitlines()[0]
    assert resume.endswith("--run-name job --resume")

    again = subprocess.run([sys.executable, "jobs/finetune_sql.py", "--run-name", "job", "--resume"], cwd=REPO_ROOT,
                           capture_output=True, text=True, env={**os.environ, **THREADS, **env}, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_resumed_to_the_end(run_dir, step, world_size=1)


# ---- a full disk ------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 256 MiB (tmpfs), or skip where this user may not mount one."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_disk_that_fills_up_mid_run_is_named_and_leaves_no_partial_checkpoint(small_disk, tiny_config):
    """The disk fills after the first checkpoint (another program's file): the second checkpoint's write
    fails with ENOSPC; the run ends with StorageError naming the folder and the space needed, the partial
    checkpoint is removed, the complete one kept; after space is freed the same run resumes from it."""
    from transformers import TrainerCallback

    from lib.fine_tuner import FineTuner

    filler = small_disk / "someone-elses-file.bin"

    class FillTheDisk(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if not filler.exists():
                free = runs.free_bytes(small_disk)
                with open(filler, "wb") as handle:
                    handle.truncate(0)
                    os.posix_fallocate(handle.fileno(), 0, free - 16 * 1024)

    config = tiny_config(output_dir=str(small_disk / "runs"), run_name="full", max_steps=4, save_steps=1)
    tuner = FineTuner(config).setup()
    tuner.trainer.add_callback(FillTheDisk())
    with pytest.raises(runs.StorageError) as error:
        tuner.train()
    message = str(error.value)
    assert str(config.run_dir) in message and "No space left on device" in message
    assert "MiB are free now" in message and "run the same command again" in message
    assert [path.name for path in (config.run_dir / runs.CHECKPOINTS).glob("checkpoint-*")] == ["checkpoint-1"]
    assert runs.last_checkpoint(config.run_dir).endswith("checkpoint-1")
    assert not list(config.run_dir.glob(f"{runs.STAGING_PREFIX}*")) and not (config.run_dir / runs.ADAPTER).exists()
    assert tuner.lock is None

    filler.unlink()
    result = FineTuner(config).run()
    assert result.record["resumed_from"].endswith("checkpoint-1") and result.record["global_step"] == 4


def test_too_little_free_space_is_refused_before_training(small_disk, tiny_config):
    """Less free space than a checkpoint and the adapter need: ConfigError naming output_dir and both
    amounts, before any training or run folder."""
    from lib.fine_tuner import FineTuner

    with open(small_disk / "filler.bin", "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, 200 * 2**20)
    config = tiny_config(output_dir=str(small_disk / "runs"), run_name="tight")
    with pytest.raises(ConfigError) as error:
        FineTuner(config).setup()
    assert error.value.setting == "output_dir" and "MiB free" in str(error.value)
    assert not config.run_dir.exists()


def limit_file_size(limit: int):
    """A kernel limit on the size of any file the child writes: past it, write() fails with EFBIG."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_write_error_mid_checkpoint_is_named_and_leaves_no_partial_checkpoint(tmp_path):
    """A write refused by the kernel while the first checkpoint is written (here EFBIG, a file-size limit;
    needs no privileges): the process exits 1 with one error line naming the folder and the space needed,
    not a traceback, and the partial checkpoint is gone."""
    argv = ["-m", "lib.train", *set_arguments(tmp_path, "limited"), "--set", "save_steps=2", "--set", "max_steps=4"]
    done = subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **THREADS}, preexec_fn=limit_file_size(8 * 2**20))
    assert done.returncode == 1, done.stderr[-3000:]
    error = done.stderr.split("error: writing into ", 1)[-1].splitlines()[0]
    assert str(tmp_path / "limited") in error and "File too large" in error, done.stderr[-3000:]
    assert "file-size limit" in error and "MiB" in error
    assert "Traceback" not in done.stderr
    run_dir = tmp_path / "limited"
    assert not list((run_dir / runs.CHECKPOINTS).glob("checkpoint-*"))
    assert not list(run_dir.glob(f"{runs.STAGING_PREFIX}*"))
