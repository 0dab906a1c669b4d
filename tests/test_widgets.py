"""The LoRA panel driven through its Python API: its values make `panel.config`, and its counts and
estimates follow them, matching what PEFT counts on the embedded model.

Run: python -m pytest tests/test_widgets.py
"""

from pathlib import Path

import pytest

from lib.config import RunConfig
from lib.models import resolve_base_model
from lib.widgets import LoraPanel, job_line, set_lines


@pytest.fixture(scope="module")
def model_path():
    return resolve_base_model("embedded")


@pytest.fixture
def panel(model_path):
    return LoraPanel(RunConfig.for_task("sql"), model_path=model_path)


@pytest.fixture(scope="module")
def peft_counter(model_path):
    """PEFT's trainable count for (r, target layer names) on the unquantized embedded model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path)

    def count(r: int, targets: list[str]) -> int:
        nonlocal model
        peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                      task_type="CAUSAL_LM"))
        trainable = peft_model.get_nb_trainable_parameters()[0]
        model = peft_model.unload()  # the bare model again, for the next config
        return trainable

    return count


def shown(panel) -> str:
    return panel.summary.value + panel.set_text.value


def test_untouched_panel_gives_the_notebook_config(panel):
    assert panel.config == RunConfig.for_task("sql")
    assert panel.config.target_modules == "all-linear"
    assert set_lines(panel.config) == []
    assert panel.set_text.value == "python jobs/finetune_sql.py"


def test_rank_and_alpha_change_config_counts_and_set_lines(panel):
    before, page_before = panel.estimate(), shown(panel)
    panel.rank.value, panel.alpha.value = 8, 16
    after = panel.estimate()
    assert (panel.config.lora_r, panel.config.lora_alpha) == (8, 16)
    assert after["trainable"] * 2 == before["trainable"]  # r * (in + out): half the rank, half the weights
    assert after["adapter_bytes"] < before["adapter_bytes"]
    assert after["memory"]["optimizer state"] < before["memory"]["optimizer state"]
    assert f"{after['trainable']:,}" in panel.summary.value and shown(panel) != page_before
    assert "--set lora_r=8" in panel.set_text.value and "--set lora_alpha=16" in panel.set_text.value


def test_target_modules_and_presets(panel):
    all_linear = panel.estimate()["trainable"]
    panel.attention_button.click()
    assert panel.config.target_modules == "attention"
    attention = panel.estimate()["trainable"]
    assert 0 < attention < all_linear
    panel.choose_targets(["q_proj", "v_proj"])
    assert panel.config.target_modules == "q_proj,v_proj"
    assert panel.config.validate().target_module_list() == ["q_proj", "v_proj"]
    assert 0 < panel.estimate()["trainable"] < attention
    assert "--set target_modules=q_proj,v_proj" in panel.set_text.value
    panel.all_linear_button.click()
    assert panel.config.target_modules == "all-linear" and panel.estimate()["trainable"] == all_linear
    panel.choose_targets([])
    assert panel.train_button.disabled


def test_quantization_changes_config_and_memory_not_parameters(panel):
    quantized = panel.estimate()
    panel.load_in_4bit.value = False
    full = panel.estimate()
    assert panel.config.load_in_4bit is False and "--set load_in_4bit=false" in panel.set_text.value
    assert full["trainable"] == quantized["trainable"]
    assert full["memory"]["base weights"] > 1.5 * quantized["memory"]["base weights"]  # embeddings stay 16/32-bit
    assert full["memory_total"] > quantized["memory_total"]


def test_training_settings_reach_config_and_activations(panel):
    before = panel.estimate()["memory"]["activations"]
    panel.batch_size.value, panel.max_seq_length.value, panel.max_steps.value = 4, 512, 30
    panel.learning_rate.value = 2e-4
    config = panel.config.validate()
    assert (config.batch_size, config.max_seq_length, config.max_steps, config.learning_rate) == (4, 512, 30, 2e-4)
    assert panel.estimate()["memory"]["activations"] == pytest.approx(4 * before)  # batch x2, sequence x2


@pytest.mark.parametrize("r, targets", [(16, "all-linear"), (8, "attention"), (4, ["q_proj", "v_proj"])])
def test_trainable_count_equals_peft(panel, peft_counter, r, targets):
    panel.rank.value = r
    panel.choose_targets(panel.shapes.resolve(targets if isinstance(targets, list) else [targets]))
    assert panel.estimate()["trainable"] == peft_counter(r, panel.shapes.resolve(panel.config.target_module_list()))



def test_set_lines_give_the_panel_config_back_to_a_headless_job(panel):
    from lib.train import parse_config

    panel.rank.value, panel.dropout.value, panel.load_in_4bit.value = 4, 0.1, False
    panel.choose_targets(["q_proj", "v_proj"])
    panel.learning_rate.value, panel.num_epochs.value = 5e-4, 2.5
    arguments = [part for line in set_lines(panel.config) for part in line.split(" ", 1)]
    config, _ = parse_config(["--task", "sql", *arguments])
    assert config == panel.config


def test_the_panels_job_line_pastes_into_the_job_and_runs(model_path, tmp_path):
    """The notebook's config names its own run folder; the panel's job line leaves it out (a job makes a new
    one), so pasted as it is shown (tiny sizes appended for the test's time) the job runs and trains with the
    panel's settings."""
    import json
    import os
    import subprocess
    import sys

    notebook_config = RunConfig.for_task("sql").replace(run_name="sql-from-the-notebook", output_dir="runs")
    panel = LoraPanel(notebook_config, model_path=model_path)
    panel.rank.value, panel.alpha.value = 4, 8
    panel.choose_targets(["q_proj", "v_proj"])
    line = panel.set_text.value
    assert line == job_line(panel.config) and "run_name" not in line and "output_dir" not in line
    assert line.startswith("python jobs/finetune_sql.py --set ")
    tiny = " --set max_steps=2 --set train_rows=8 --set eval_rows=2 --set max_seq_length=128 --set tracking=off"
    command = line.replace("python ", f"{sys.executable} ", 1) + tiny + f" --output-dir {tmp_path} --run-name pasted"
    done = subprocess.run(["bash", "-c", command], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    record = json.loads((tmp_path / "pasted" / "run_record.json").read_text())
    assert (record["config"]["lora_r"], record["config"]["lora_alpha"]) == (4, 8)
    assert sorted(record["target_modules"]) == ["q_proj", "v_proj"]


def test_train_button_trains_with_progress_and_loss_then_compare_answers(tiny_config, model_path):
    config = tiny_config(load_in_4bit=False, train_rows=8, max_steps=1, max_seq_length=192, batch_size=1)
    panel = LoraPanel(config, prompt="SELECT", model_path=model_path)
    panel.rank.value = 4
    panel.train_button.click()
    assert panel.result.record["config"]["lora_r"] == 4 and panel.result.adapter_dir.is_dir()
    assert panel.progress.value == panel.progress.max == 1
    assert panel.loss_output.outputs, "the loss curve was drawn while training"
    assert not panel.compare_button.disabled
    base, tuned = panel.compare()
    assert isinstance(base, str) and isinstance(tuned, str) and panel.answers.outputs
    import html

    shown_answers = panel.answers.outputs[0]["data"]["text/html"]
    assert f"<pre>{html.escape(base)}</pre>" in shown_answers and f"<pre>{html.escape(tuned)}</pre>" in shown_answers
