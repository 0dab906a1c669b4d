"""Bad input, property-tested: random and adversarial values for every setting, data file and job
parameter end in a ConfigError or DataError that names what is wrong, never in another exception from
deep inside a library, and never in a run folder.

Run: python -m pytest tests/test_bad_input.py   (about 30 s on 2 CPU cores; one job subprocess)
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lib import runs
from lib.config import ConfigError, RunConfig
from lib.data import DataError, read_rows
from lib.fine_tuner import FineTuner
from lib.tasks import get_task

REPO_ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [field.name for field in dataclasses.fields(RunConfig)]
EXAMPLES = 250  # hypothesis examples per property: 5 properties give the 1,250 generated cases a CI run tries
FAST = settings(max_examples=EXAMPLES, deadline=None, database=None,  # database=None: no .hypothesis/ in the tree
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Values of every kind a setting might wrongly receive: from papermill, JSON, widgets or a typo.
HUGE = st.sampled_from([10**400, -10**400, 2**63, -(2**63), 1e308, -1e308, 1e-320])
SPECIAL_FLOATS = st.sampled_from([math.nan, math.inf, -math.inf, -0.0])
ADVERSARIAL_TEXT = st.sampled_from([
    "", " ", "\n", "\x00", "a\x00b", "\ud800", "../..", "/", "~nosuchuser/x", "a" * 300, "ü" * 200,
    "$(touch /tmp/pwned)", "x; rm -rf /", "'\"`", "all-linear,q_proj", "q_proj;v_proj", "not_a_layer",
    "poetry", "embedded", "hub", "rows.xlsx", "/no/such/file.jsonl", "C:\\data.csv",
])
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(), HUGE, st.floats(allow_nan=True, allow_infinity=True), SPECIAL_FLOATS,
    st.text(max_size=40), ADVERSARIAL_TEXT, st.binary(max_size=8),
    st.lists(st.one_of(st.text(max_size=10), st.integers()), max_size=3),
    st.dictionaries(st.one_of(st.text(max_size=5), st.integers()), st.one_of(st.text(max_size=5), st.integers()),
                    max_size=2),
)


def assert_names_setting(error: ConfigError, setting: str) -> None:
    assert error.setting == setting, f"the error names {error.setting!r}, not {setting!r}: {error}"
    message = str(error)
    assert repr(setting) in message and "expected" in message


@FAST
@given(setting=st.sampled_from(SETTINGS), value=ANY_VALUE)
@example(setting="learning_rate", value=10**400)           # overflowed math.isfinite (fixed)
@example(setting="lora_dropout", value=-10**400)
@example(setting="data", value="a" * 300 + ".jsonl")       # raised OSError: file name too long (fixed)
@example(setting="output_dir", value="a" * 300)            # raised OSError in check_run_dir (fixed)
@example(setting="run_name", value="ü" * 200)              # 400 bytes: OSError at mkdir (fixed)
@example(setting="run_name", value="\ud800")               # lone surrogate: UnicodeEncodeError at mkdir (fixed)
def test_any_value_of_any_setting_is_accepted_or_a_config_error_naming_it(setting, value):
    """validate() either accepts the value or raises ConfigError naming this setting, whatever the value."""
    config = RunConfig(**{setting: value})
    try:
        config.validate()
    except ConfigError as error:
        assert_names_setting(error, setting)
        return
    # Accepted: then the path checks before a run starts must not raise anything but ConfigError either.
    try:
        runs.check_run_dir(config.with_run_name())
    except ConfigError as error:
        assert error.setting in (setting, "output_dir", "run_name")


@FAST
@given(values=st.dictionaries(st.text(max_size=20), ANY_VALUE, min_size=1, max_size=3))
def test_unknown_or_bad_settings_from_a_mapping_are_config_errors(values):
    try:
        RunConfig.from_dict(values).validate()
    except ConfigError as error:
        assert error.setting in values or error.setting in SETTINGS


@FAST
@given(value=st.one_of(ANY_VALUE, st.lists(ADVERSARIAL_TEXT, min_size=1, max_size=3)))
@example(value="q_proj,not_a_layer")
@example(value=["q_proj", "v_proj;rm"])
@example(value=["", " q_proj"])  # validate() accepted it, target_module_list() kept "" and " q_proj" (fixed)
def test_target_modules_are_a_preset_or_plain_layer_names(value):
    try:
        names = RunConfig(target_modules=value).validate().target_module_list()
    except ConfigError as error:
        assert_names_setting(error, "target_modules")
        return
    assert all(name.replace("_", "").replace(".", "").replace("-", "").isalnum() for name in names)


@pytest.mark.parametrize("value", ["~nosuchuser/model", "a" * 300, "org/" + "b" * 300, "org/model;rm -rf x",
                                   "org/\"quoted'", "$(touch /tmp/pwned_base_model)", "org/model"])
def test_a_base_model_that_cannot_be_loaded_is_a_config_error(value, monkeypatch):
    """Hub ids, paths and junk: offline, each is refused with the setting named (not HFValidationError,
    OSError or RuntimeError from inside huggingface_hub or pathlib: fixed)."""
    from lib.models import resolve_base_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as error:
        resolve_base_model(value)
    assert_names_setting(error.value, "base_model")
    assert not Path("/tmp/pwned_base_model").exists()


# ---- data files ---------------------------------------------------------------------------------

ROW_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                               max_size=1))
JSON_CONTENT = st.one_of(
    st.lists(st.dictionaries(st.sampled_from(["question", "context", "answer", "sql", "other", ""]), ROW_VALUES,
                             max_size=4), max_size=3),
    st.lists(ROW_VALUES, max_size=3), ROW_VALUES,
    st.fixed_dictionaries({"data": st.one_of(ROW_VALUES, st.lists(ROW_VALUES, max_size=2))}),
)
ADVERSARIAL_BYTES = st.sampled_from([
    b"", b"\xff\xfe\x00", b"\x00\x00\x00", b"PAR1", b"PAR1\x00\x00PAR1",
    b"[" * 5000, b'{"a":' * 5000,  # nested beyond the recursion limit: raised RecursionError (fixed)
    b"a,b\n" + b"x" * 200_000 + b",y\n", b"question,context,answer\n\"unclosed\n", "é".encode("latin-1") * 5,
])


def check_read(path: Path, column_map=None) -> None:
    """read_rows returns rows with every task field as a stripped string (line breaks unified to \\n), or raises
    DataError naming the file."""
    task = get_task("sql")
    try:
        rows = read_rows(path, task, column_map)
    except DataError as error:
        assert str(path) in str(error)
        return
    assert rows and all(set(row) == set(task.fields) for row in rows)
    assert all(isinstance(value, str) and "\r" not in value and value == value.strip()
               for row in rows for value in row.values())


@FAST
@given(suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]),
       content=st.one_of(st.binary(max_size=200), ADVERSARIAL_BYTES))
def test_any_bytes_in_a_data_file_are_rows_or_a_data_error(tmp_path, suffix, content):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(content)
    check_read(path)


@FAST
@given(content=JSON_CONTENT, as_lines=st.booleans())
def test_any_json_shape_is_rows_or_a_data_error(tmp_path, content, as_lines):
    path = tmp_path / ("rows.jsonl" if as_lines else "rows.json")
    items = content if as_lines and isinstance(content, list) else [content]
    text = "\n".join(json.dumps(item) for item in items) if as_lines else json.dumps(content)
    path.write_text(text, encoding="utf-8")
    check_read(path, column_map={"sql": "answer"})


@pytest.mark.parametrize("content, expected", [
    ('{"question": "q", "context": "c"}\n', "missing column"),
    (b"\xff\xfe{}\n", "not UTF-8"),
])
def test_bad_data_file_fails_setup_before_the_run_folder_exists(tiny_config, tmp_path, content, expected):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    config = tiny_config(task="sql", data=str(path), run_name="never")
    with pytest.raises(DataError, match=expected):
        FineTuner(config).setup()
    assert not config.run_dir.exists()


def test_output_dir_below_a_file_fails_setup_before_anything_is_written(tiny_config, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = tiny_config(output_dir=str(blocker / "runs"), run_name="never")
    with pytest.raises(ConfigError) as error:
        FineTuner(config).setup()
    assert_names_setting(error.value, "output_dir")
    assert blocker.read_text() == "not a folder"


# ---- job parameters -----------------------------------------------------------------------------

def test_a_job_given_a_parameter_of_the_wrong_type_fails_at_the_config_cell_naming_it(tmp_path):
    """QLORA_LORA_R=abc: the job stops at the config cell with a ConfigError naming lora_r (exit 1).
    --set is read the same way: see the next test."""
    finished = subprocess.run(
        [sys.executable, "jobs/finetune_sql.py", "--output-dir", str(tmp_path), "--run-name", "wrong-type"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "QLORA_LORA_R": "abc"})
    assert finished.returncode == 1, finished.stderr[-2000:]
    assert "ConfigError: setting 'lora_r' has value 'abc'" in finished.stderr
    assert not (tmp_path / "wrong-type" / runs.ADAPTER).exists()


@pytest.mark.parametrize("text", ['"abc"', "abc", "1.5", "[1]", "null", "true"])
def test_set_values_of_the_wrong_type_reach_the_config_as_values_it_refuses(text):
    """--set lora_r=<text> is read like QLORA_LORA_R: whatever it becomes, validate() names lora_r."""
    from jobs.run_notebook import collect_parameters

    declared = {"lora_r": {"inferred_type_name": "int"}}
    values = collect_parameters(declared, {}, [f"lora_r={text}"])
    with pytest.raises(ConfigError) as error:
        RunConfig(**values).validate()
    assert_names_setting(error.value, "lora_r")


@pytest.mark.parametrize("setting", ["output_dir", "base_model"])
def test_a_launch_with_a_home_folder_of_no_such_user_is_a_config_error(setting, tmp_path):
    """~nosuchuser/...: the launcher made paths absolute with expanduser, which raised RuntimeError (fixed)."""
    from lib.launcher import launch

    config = RunConfig(**{"output_dir": str(tmp_path), setting: "~nosuchuser/x"})
    with pytest.raises(ConfigError) as error:
        launch(config, 2, "local")
    assert_names_setting(error.value, setting)
    assert list(tmp_path.iterdir()) == []


def test_the_properties_try_at_least_1000_generated_cases_a_run():
    """Issue 14's floor: the generated data files and settings of one run, summed over the properties here."""
    properties = [test for name, test in globals().items() if name.startswith("test_") and hasattr(test, "hypothesis")]
    total = sum(test._hypothesis_internal_use_settings.max_examples for test in properties)
    assert len(properties) >= 5 and total >= 1000, (len(properties), total)
