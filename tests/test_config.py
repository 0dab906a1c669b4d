"""RunConfig: defaults, JSON round trip, and a clear error for every bad setting."""

import json

import pytest

from lib.config import ConfigError, RunConfig
from lib.tasks import TASKS

BAD_VALUES = [
    ("task", "poetry"), ("task", ""), ("base_model", ""), ("base_model", "a\nb"), ("data", "rows.xlsx"),
    ("data", "/no/such/file.jsonl"), ("column_map", ["a"]), ("column_map", {"a": 1}),
    ("train_rows", 0), ("train_rows", "10"), ("train_rows", 2.5), ("train_rows", True), ("eval_rows", -1),
    ("seed", -1), ("lora_r", 0), ("lora_alpha", 0), ("lora_dropout", 1.5), ("lora_dropout", float("nan")),
    ("target_modules", ""), ("target_modules", "q_proj;rm -rf"), ("target_modules", 3),
    ("target_modules", "attention,q_proj"), ("learning_rate", 0), ("learning_rate", float("inf")),
    ("lr_scheduler", "cyclic"), ("warmup_ratio", 0.9), ("num_epochs", 0), ("max_steps", 0), ("max_steps", -2),
    ("batch_size", 0), ("micro_batch_size", 0), ("micro_batch_size", 3), ("memory_budget_gib", 0), ("memory_budget_gib", "lots"), ("max_seq_length", 8), ("packing", "yes"), ("load_in_4bit", 1),
    ("max_grad_norm", -1), ("logging_steps", 0), ("save_steps", 0), ("output_dir", ""),
    ("run_name", "../escape"), ("run_name", "a/b"), ("run_name", ".."), ("overwrite", "false"), ("fused_lora", "yes"),
]


def test_defaults_validate():
    assert RunConfig().validate().task == "sql"


@pytest.mark.parametrize("setting, value", BAD_VALUES)
def test_bad_value_names_setting_value_and_accepted(setting, value):
    with pytest.raises(ConfigError) as error:
        RunConfig(**{setting: value}).validate()
    assert error.value.setting == setting
    message = str(error.value)
    assert repr(setting) in message and repr(value) in message and "expected" in message


def test_unknown_setting_is_an_error():
    with pytest.raises(ConfigError, match="lora_rank"):
        RunConfig.from_dict({"lora_rank": 8})


def test_json_round_trip(tmp_path):
    config = RunConfig(task="detox", lora_r=4, target_modules=["q_proj", "v_proj"], column_map={"a": "b"})
    config.to_json(tmp_path / "run.json")
    assert RunConfig.from_json(tmp_path / "run.json") == config


def test_unreadable_config_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="config file"):
        RunConfig.from_json(path)


def test_from_namespace_takes_only_settings():
    config = RunConfig.from_namespace({"task": "detox", "lora_r": 4, "show_panel": True, "__name__": "x"})
    assert (config.task, config.lora_r) == ("detox", 4)


def test_task_recipes_are_valid_and_overridable():
    for task in TASKS:
        for device in ("cpu", "gpu"):
            assert RunConfig.for_task(task, device).validate().task == task
    assert RunConfig.for_task("sql", lora_r=4).lora_r == 4
    assert RunConfig.for_task("sql", "gpu").batch_size > RunConfig.for_task("sql", "cpu").batch_size


def test_cli_recipe_follows_the_device_unless_named(monkeypatch):
    import torch

    from lib.train import parse_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert parse_config(["--task", "sql"])[0] == RunConfig.for_task("sql", "gpu")
    assert parse_config(["--task", "sql", "--recipe", "cpu"])[0] == RunConfig.for_task("sql", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parse_config(["--task", "sql"])[0] == RunConfig.for_task("sql", "cpu")


def test_run_name_is_fixed_once():
    config = RunConfig().with_run_name()
    assert config.run_name.startswith("sql-") and config.with_run_name() == config
    assert json.loads(json.dumps(config.to_dict()))["run_name"] == config.run_name


def test_cli_starts_from_the_task_recipe_and_a_saved_config_is_kept_as_is(tmp_path):
    from lib.train import parse_config

    config, evaluate = parse_config(["--task", "detox", "--recipe", "cpu", "--set", "lora_r=4", "--evaluate"])
    assert config == RunConfig.for_task("detox", lora_r=4) and evaluate
    saved = RunConfig(task="detox", learning_rate=3e-4)
    saved.to_json(tmp_path / "run.json")
    config, _ = parse_config(["--config", str(tmp_path / "run.json"), "--set", "max_steps=5"])
    assert config == saved.replace(max_steps=5)


def test_auto_or_number_settings_read_numbers_written_as_text():
    # a notebook's str parameter or an environment variable gives "4": it is the number 4
    config = RunConfig.from_dict({"batch_size": 8, "micro_batch_size": "4", "memory_budget_gib": "7.5"}).validate()
    assert (config.micro_batch_size, config.memory_budget_gib) == (4, 7.5)
    assert RunConfig.from_dict({"micro_batch_size": "auto"}).micro_batch_size == "auto"
    with pytest.raises(ConfigError, match="micro_batch_size"):
        RunConfig.from_dict({"micro_batch_size": "many"}).validate()
