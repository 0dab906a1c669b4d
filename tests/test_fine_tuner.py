"""The real QLoRA training path, tiny: adapters that load, run records, resume, no overwrite, atomic save."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lib import runs
from lib.config import ConfigError
from lib.fine_tuner import FineTuner
from lib.tasks import TASKS

REPO = Path(__file__).resolve().parents[1]


def load_adapter(adapter_dir):
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(adapter_dir))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_tiny_qlora_run_saves_adapter_and_record(tiny_config, task):
    result = FineTuner(tiny_config(task=task, run_name=f"tiny-{task}")).run()
    assert load_adapter(result.adapter_dir).r == 16
    assert (result.adapter_dir / "adapter_model.safetensors").is_file()
    assert (result.adapter_dir / "tokenizer.json").is_file()
    record = json.loads((result.run_dir / runs.RUN_RECORD).read_text())
    assert record["global_step"] == 2 and record["world_size"] == 1
    assert record["config"]["task"] == task and record["train_tokens"] > 0
    assert [point["step"] for point in record["loss_history"]] == [1, 2]
    assert 0 < record["trainable_parameters"] < record["total_parameters"]
    assert record["versions"]["trl"] and record["peak_memory_gib"] > 0
    assert not list(result.run_dir.glob(f"{runs.STAGING_PREFIX}*"))


def test_evaluation_compares_base_and_adapter(tiny_config):
    from lib.evaluation import evaluate_run

    tuner = FineTuner(tiny_config(task="sql", run_name="evaluated", max_steps=1))
    result = tuner.run()
    report = evaluate_run(tuner.config, tuner.eval_rows[:2], tuner.model_path)
    assert set(report["base"]) == set(TASKS["sql"].metrics) == set(report["adapter"])
    assert (result.run_dir / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((result.run_dir / runs.METRICS).read_text())["rows"] == 2


def test_existing_adapter_is_not_overwritten(tiny_config):
    config = tiny_config(task="detox", run_name="keep", max_steps=1)
    first = FineTuner(config).run()
    before = (first.adapter_dir / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ConfigError) as error:
        FineTuner(config).setup()
    assert error.value.setting == "overwrite"
    assert (first.adapter_dir / "adapter_model.safetensors").read_bytes() == before
    replaced = FineTuner(config.replace(overwrite=True, seed=config.seed)).run()
    assert replaced.adapter_dir == first.adapter_dir and load_adapter(replaced.adapter_dir)


def test_bad_input_creates_no_run_folder(tiny_config):
    config = tiny_config(task="sql", run_name="never", target_modules="q_proj,not_a_layer")
    with pytest.raises(ConfigError, match="not_a_layer"):
        FineTuner(config).setup()
    assert not config.run_dir.exists()


def test_other_settings_in_same_run_folder_are_refused(tiny_config):
    config = tiny_config(task="sql", run_name="shared", max_steps=1)
    runs.start_run_dir(config)
    with pytest.raises(ConfigError, match="lora_r"):
        FineTuner(config.replace(lora_r=4)).setup()


def test_failed_save_leaves_previous_adapter_intact(tiny_config, monkeypatch):
    config = tiny_config(task="instruction", run_name="atomic", max_steps=1)
    first = FineTuner(config).run()
    before = (first.adapter_dir / "adapter_model.safetensors").read_bytes()
    tuner = FineTuner(config.replace(overwrite=True)).setup()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tuner.tokenizer, "save_pretrained", crash)
    with pytest.raises(OSError, match="disk full"):
        tuner.train()
    assert (first.adapter_dir / "adapter_model.safetensors").read_bytes() == before
    assert load_adapter(first.adapter_dir).r == 16


def test_killed_run_resumes_from_last_checkpoint(tiny_config):
    """SIGKILL part-way, rerun with the same settings: same final step, loss history without gap or repeat."""
    config = tiny_config(task="sql", run_name="resumed", max_steps=6, save_steps=2, train_rows=48)
    config_file = config.run_dir.parent / "resumed.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config.to_json(config_file)
    command = [sys.executable, "-m", "lib.train", "--config", str(config_file)]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while runs.last_checkpoint(config.run_dir) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted_at = runs.last_checkpoint(config.run_dir)
    assert interrupted_at is not None and not (config.run_dir / runs.ADAPTER).exists()

    finished = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    record = json.loads((config.run_dir / runs.RUN_RECORD).read_text())
    assert record["global_step"] == 6 and record["resumed_from"] is not None
    assert [point["step"] for point in record["loss_history"]] == [1, 2, 3, 4, 5, 6]


def test_every_run_of_two_steps_or_more_has_at_least_two_loss_points(tiny_config):
    """3 steps with logging_steps=5: the first step (logging_first_step) and the last (LogLastStep)."""
    result = FineTuner(tiny_config(max_steps=3, logging_steps=5, save_steps=100, tracking="off")).run()
    assert [point["step"] for point in result.record["loss_history"]] == [1, 3]


def test_checkpointing_the_first_layers_only_keeps_the_loss(tiny_config):
    """checkpointed_layers=3: the first 3 decoder layers recompute in backward, the other 27 keep their
    activations; checkpointing changes no number, so the losses equal those of checkpointing every layer."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    losses, flags, calls = {}, {}, {}
    for layers in ("all", 3):
        tuner = FineTuner(tiny_config(task="sql", run_name=f"ckpt-{layers}", gradient_checkpointing=True,
                                      checkpointed_layers=layers, precision="fp32", max_steps=3)).setup()
        decoder = [module for module in tuner.trainer.model.modules() if isinstance(module, GradientCheckpointingLayer)]
        calls[layers] = [0] * len(decoder)
        for index, layer in enumerate(decoder):
            layer.register_forward_pre_hook(lambda *args, index=index, seen=calls[layers]: seen.__setitem__(
                index, seen[index] + 1))
        result = tuner.train()
        losses[layers] = [point["loss"] for point in result.record["loss_history"]]
        flags[layers] = [module.gradient_checkpointing for module in tuner.trainer.model.modules()
                         if isinstance(module, GradientCheckpointingLayer)]
    assert flags["all"] == [True] * 30 and flags[3] == [True] * 3 + [False] * 27
    passes = calls[3][-1]  # a layer that keeps its activations runs once a pass; a recomputed one twice
    assert passes >= 3 and calls[3] == [2 * passes] * 3 + [passes] * 27 and calls["all"] == [2 * passes] * 30
    assert len(losses[3]) == 3
    assert losses[3] == pytest.approx(losses["all"], rel=1e-5)


def test_checkpointed_layers_setting_is_checked(tiny_config):
    """"all", or a count of layers (text from a notebook parameter read as a number); anything else refused."""
    from lib.config import RunConfig

    assert RunConfig.from_dict({"checkpointed_layers": "4"}).checkpointed_layers == 4
    assert tiny_config(checkpointed_layers=0).validate().checkpointed_layers == 0
    for bad in ("some", -1, 2.5, True):
        with pytest.raises(ConfigError, match='checkpointed_layers.*"all" or a number'):
            tiny_config(checkpointed_layers=bad).validate()
