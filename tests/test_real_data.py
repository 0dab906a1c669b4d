"""What real data needs: a held-out eval file, scoring saved adapters without training, multi-line answers
that survive training and generation, the chat-template prompt format, detox scoring that fits real text."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib.config import ConfigError, RunConfig
from lib.data import load_splits
from lib.evaluation import Evaluator
from lib.fine_tuner import FineTuner
from lib.models import load_tokenizer, resolve_base_model
from lib.prompts import PromptFormat
from lib.tasks import get_task
from lib.tasks.detox import contains_rude_word, rude_word_rate

REPO = Path(__file__).resolve().parents[1]
SQL = get_task("sql")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_base_model("embedded"))


# ---- eval_data: a held-out file --------------------------------------------------------------------


def test_eval_data_is_scored_in_file_order_and_training_uses_every_other_row(tmp_path):
    rows = SQL.generate(30, seed=1)
    train_file = write_jsonl(tmp_path / "train.jsonl", rows[:20] + rows[25:26] + rows[29:30])  # also in the eval file
    eval_file = write_jsonl(tmp_path / "dev.jsonl", rows[25:30])
    config = RunConfig(task="sql", data=str(train_file), eval_data=str(eval_file), train_rows=100, eval_rows=4)
    train, held_out = load_splits(config)
    assert held_out == rows[25:29]  # the file's first eval_rows rows, in order
    assert len(train) == 21 and not {SQL.prompt(r) for r in train} & {SQL.prompt(r) for r in held_out}
    assert sorted(map(SQL.prompt, train)) == sorted(map(SQL.prompt, rows[:20] + rows[29:30]))  # 29 is not scored


def test_eval_data_beside_the_embedded_generator(tmp_path):
    eval_file = write_jsonl(tmp_path / "dev.jsonl", SQL.generate(6, seed=99))
    with pytest.warns(UserWarning, match="has 6 rows"):
        train, held_out = load_splits(RunConfig(task="sql", eval_data=str(eval_file), train_rows=12, eval_rows=10))
    assert len(train) == 12 and len(held_out) == 6


def test_eval_data_that_covers_all_training_rows_is_refused(tmp_path):
    from lib.data import DataError

    rows = write_jsonl(tmp_path / "rows.jsonl", SQL.generate(4, seed=2))
    with pytest.raises(DataError, match="no training rows left"):
        load_splits(RunConfig(task="sql", data=str(rows), eval_data=str(rows), eval_rows=4))


@pytest.mark.parametrize("value, expected", [("missing.jsonl", "missing"), ("rows.txt", "ending in"),
                                             ("folder.jsonl", "directory")])
def test_bad_eval_data_is_named(tmp_path, monkeypatch, value, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(ConfigError, match=expected) as error:
        RunConfig(eval_data=value).validate()
    assert error.value.setting == "eval_data"


def test_prompt_format_is_checked():
    with pytest.raises(ConfigError) as error:
        RunConfig(prompt_format="alpaca").validate()
    assert error.value.setting == "prompt_format" and "chat" in str(error.value)


# ---- prompt formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tags", "chat"])
def test_prompt_is_a_token_prefix_of_the_training_text(tokenizer, name):
    for task_name in ("sql", "detox", "instruction"):
        task = get_task(task_name)
        fmt = PromptFormat.build(name, task, tokenizer)
        for row in task.generate(20, seed=3):
            prompt_ids = tokenizer(fmt.prompt(row)).input_ids
            assert tokenizer(fmt.text(row)).input_ids[:len(prompt_ids)] == prompt_ids


def test_chat_format_is_the_base_models_own_template(tokenizer):
    row = SQL.generate(1, seed=0)[0]
    fmt = PromptFormat.build("chat", SQL, tokenizer)
    expected = tokenizer.apply_chat_template([{"role": "user", "content": SQL.chat_request.format(**row)}],
                                             add_generation_prompt=True, tokenize=False)
    assert fmt.prompt(row) == expected and fmt.prompt(row).endswith("<|im_start|>assistant\n")
    assert row["question"] in fmt.prompt(row) and fmt.completion(row) == row["answer"]


def test_chat_format_needs_a_chat_template(tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="no chat template"):
        PromptFormat.build("chat", SQL, NoTemplate())


# ---- multi-line answers: training text -> generation -----------------------------------------------


def test_a_multi_line_answer_is_learned_and_generation_stops_at_end_of_text(tiny_config, tmp_path):
    """An adapter trained on two-line answers writes both lines and stops at the end-of-text token."""
    rows = [{"instruction": f"List the two steps of task {name}.", "input": "",
             "response": f"1. open {name}\n2. close {name}"} for name in ("alpha", "beta", "gamma", "delta")]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    unseen = write_jsonl(tmp_path / "eval.jsonl", [dict(rows[0], instruction="Name the two steps of task alpha.")])
    config = tiny_config(task="instruction", data=str(data), eval_data=str(unseen), train_rows=4,
                         eval_rows=1, max_steps=40, batch_size=4, learning_rate=3e-3, packing=False,
                         lora_dropout=0.0, warmup_ratio=0.0, lr_scheduler="constant", save_steps=100)
    tuner = FineTuner(config).setup()
    assert len(tuner.train_rows) == 4  # every row trains; the prompt asked below is one of them
    example = tuner.trainer.train_dataset[0]
    assert example["input_ids"][-1] == tuner.tokenizer.eos_token_id  # the answer ends with end-of-text
    assert "\n" in tuner.tokenizer.decode(example["input_ids"])
    result = tuner.train()
    evaluator = Evaluator(tuner.model_path)
    evaluator.attach("steps", result.adapter_dir)
    fmt = evaluator.adapter_format(get_task("instruction"), "steps")
    raw = evaluator.generate([fmt.prompt(rows[0])], 48, "steps", stop_strings=fmt.stop_strings)[0]
    assert fmt.clean(raw) == rows[0]["response"]
    assert raw.strip() == rows[0]["response"]  # nothing after the answer: it stopped at end-of-text


# ---- scoring saved adapters without training --------------------------------------------------------


@pytest.fixture(scope="module")
def trained_sql_adapter(tmp_path_factory):
    from tests.conftest import TINY

    output = tmp_path_factory.mktemp("runs")
    config = RunConfig.from_dict({**TINY, "task": "sql", "output_dir": str(output), "run_name": "scored",
                                  "max_steps": 1})
    return FineTuner(config).run().adapter_dir


def run_evaluate(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "lib.evaluate", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_evaluate_command_scores_base_and_adapters_on_a_file(trained_sql_adapter, tmp_path):
    data = write_jsonl(tmp_path / "dev.jsonl", SQL.generate(5, seed=11))
    out = tmp_path / "scores"
    done = run_evaluate("--task", "sql", "--data", str(data), "--rows", "3", "--adapter", str(trained_sql_adapter),
                        "--adapter", f"again={trained_sql_adapter}", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "metrics.json").read_text())
    assert report["rows"] == 3 and set(report["adapters"]) == {"scored", "again"}
    assert set(report["base"]) == set(SQL.metrics) == set(report["adapters"]["scored"])
    assert report["adapters"]["scored"] == report["adapters"]["again"]  # same adapter, same greedy answers
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header = next(line for line in done.stdout.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "scored", "again"]


def test_evaluate_command_refuses_a_folder_without_an_adapter(tmp_path):
    data = write_jsonl(tmp_path / "dev.jsonl", SQL.generate(2, seed=1))
    done = run_evaluate("--task", "sql", "--data", str(data), "--adapter", str(tmp_path))
    assert done.returncode == 2 and "--adapter" in done.stderr and "adapter_config.json" in done.stderr


def test_evaluate_command_names_a_bad_file(tmp_path):
    done = run_evaluate("--task", "sql", "--data", str(tmp_path / "nothing.jsonl"))
    assert done.returncode == 2 and "nothing.jsonl" in done.stderr and "Traceback" not in done.stderr


def test_evaluate_job_has_help():
    done = subprocess.run([sys.executable, "jobs/evaluate_adapters.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--adapter" in done.stdout


# ---- detox scoring that fits real text ----------------------------------------------------------------

REAL_RUDE = ("he fucked it up", "she fucks around", "those bitches lied", "what a dick", "you idiot",
             "this is bullshit", "shut the fuck up", "you are a moron", "screw you", "what an asshole",
             "that bastard", "you stupid twat", "he is a wanker", "piss off")
CLEAN = ("please assess the class schedule", "hello, could you help me", "the cockpit of the plane",
         "he passed the exam", "a scunthorpe bus", "this is not a good idea", "he had a stroke last year",
         "a pot of tea", "the nazi party won the election", "thank god it is friday", "he was drunk again",
         "the organ in the church", "they kill time on the bus", "the murder trial", "a gay couple")


@pytest.mark.parametrize("text", REAL_RUDE)
def test_lexicon_covers_real_profanity(text):
    assert contains_rude_word(text)


@pytest.mark.parametrize("text", CLEAN)
def test_lexicon_leaves_clean_text_alone(text):
    assert not contains_rude_word(text)


def test_copy_rate_and_the_copy_the_input_baseline():
    detox = get_task("detox")
    rows = detox.generate(10, seed=4)
    copies = [row["en_toxic_comment"] for row in rows]
    scores = detox.score(copies[:5] + [row["en_neutral_comment"] for row in rows[5:]], rows)
    assert scores["copy_rate"] == 0.5 and scores["exact_match"] == 0.5
    baseline = detox.baselines(rows)["copy the input"]
    assert baseline == copies and detox.score(baseline, rows)["copy_rate"] == 1.0
    assert rude_word_rate(baseline) == 1.0


def test_reports_carry_the_baselines(tiny_config):
    from lib.evaluation import comparison_table, evaluate_run

    tuner = FineTuner(tiny_config(task="detox", run_name="with-baseline", max_steps=1))
    tuner.run()
    report = evaluate_run(tuner.config, tuner.eval_rows[:2], tuner.model_path)
    assert report["baselines"]["copy the input"]["copy_rate"] == 1.0
    assert "copy the input" in comparison_table(report).splitlines()[0]


def test_tables_show_prompt_tags_as_text(tokenizer):
    from lib.display import training_text_table

    row = SQL.generate(1, seed=0)[0]
    for name in ("tags", "chat"):
        html = training_text_table(PromptFormat.build(name, SQL, tokenizer), [row])._repr_html_()
        assert ("&lt;TABLE&gt;:" if name == "tags" else "&lt;|im_start|&gt;") in html and "<TABLE>" not in html


# ---- rows that max_seq_length would cut ----------------------------------------------------------------


def test_rows_whose_answer_would_be_lost_are_refused(tiny_config):
    with pytest.raises(ConfigError) as error:
        FineTuner(tiny_config(task="sql", max_seq_length=32, run_name="too-short")).setup()
    assert error.value.setting == "max_seq_length" and "would be dropped" in str(error.value)
    assert "fits every row" in str(error.value)


def test_answers_cut_short_are_counted_and_recorded(tiny_config, tmp_path):
    long_answer = {"instruction": "Repeat the word.", "input": "", "response": " ".join(["apple"] * 60)}
    short = [{"instruction": f"Say {word}.", "input": "", "response": word} for word in ("yes", "no", "maybe")]
    data = write_jsonl(tmp_path / "rows.jsonl", [long_answer] + short)
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Say hello.", "input": "", "response": "hello"}])
    with pytest.warns(UserWarning, match="have it cut short"):
        tuner = FineTuner(tiny_config(task="instruction", data=str(data), eval_data=str(held_out), max_seq_length=48,
                                      eval_rows=1, run_name="cut")).setup()
    assert tuner.truncation["answers_cut"] >= 1 and tuner.truncation["answers_lost"] == 0
    record = tuner.train().record
    assert record["truncation"] == tuner.truncation and record["train_rows"] == tuner.truncation["rows"]


# ---- data files that would have trained on nothing, or on Python's text of a list ----------------------


def test_a_one_row_file_is_named_not_a_traceback(tmp_path):
    from lib.data import DataError

    data = write_jsonl(tmp_path / "one.jsonl", SQL.generate(1, seed=0))
    with pytest.raises(DataError, match="one.jsonl: 1 row; a split needs at least 2"):
        load_splits(RunConfig(task="sql", data=str(data)))


def test_list_cells_and_all_empty_columns_are_refused(tmp_path):
    from lib.data import DataError, read_rows

    row = SQL.generate(1, seed=0)[0]
    listed = write_jsonl(tmp_path / "listed.jsonl", [dict(row, answer=["SELECT 1", "SELECT 2"])])
    with pytest.raises(DataError, match="column 'answer' holds a list"):
        read_rows(listed, SQL)
    empty = write_jsonl(tmp_path / "empty.jsonl", [dict(row, question=None), dict(row, question="  ")])
    with pytest.raises(DataError, match="question are empty in every row"):
        read_rows(empty, SQL)
    no_inputs = write_jsonl(tmp_path / "no_inputs.jsonl", [{"instruction": "Say hi.", "input": None, "response": "hi"}])
    assert read_rows(no_inputs, get_task("instruction"))[0]["input"] == ""


def test_quality_json_rows_carry_what_a_reader_needs():
    rows = json.loads((REPO / "docs" / "quality.json").read_text(encoding="utf-8"))
    for row in rows:
        assert {"task", "model", "trained_on", "evaluated_on", "recipe", "metrics", "date", "device", "command"} <= set(row)
        assert {"source", "rows"} <= set(row["trained_on"]) and {"source", "split", "rows"} <= set(row["evaluated_on"])
        assert row["evaluated_on"]["split"] == "dev" and {"base", "adapter"} <= set(row["metrics"])
    for task in ("detox", "instruction"):
        kinds = {(row["recipe"], row["trained_on"]["source"] == "embedded generator") for row in rows if row["task"] == task}
        assert {("gpu", False), ("gpu", True), ("cpu", False)} <= kinds, task
    sql = [row for row in rows if row["task"] == "sql"]
    assert {(row["recipe"], row["trained_on"]["source"] == "embedded generator") for row in sql} >= {("cpu", False),
                                                                                                 ("cpu", True)}
    for row in sql:  # SQL figures stand only on whole tables: each row carries its dev file's leak check
        assert row["evaluated_on"]["schemas"] == "full schemas"
        leak = row["evaluated_on"]["leak_check"]
        assert not leak["looks_pruned"] and leak["unused_share"] >= 0.5 and leak["rows"] == row["evaluated_on"]["rows"]


# ---- one run per run folder at a time ---------------------------------------------------------------------


def test_a_second_run_into_a_busy_folder_is_refused_at_once(tiny_config):
    config = tiny_config(task="sql", run_name="busy", max_steps=1)
    first = FineTuner(config).setup()
    with pytest.raises(ConfigError) as error:
        FineTuner(config).setup()
    assert error.value.setting == "run_name" and "is training into" in str(error.value)
    first.train()  # releases the lock
    assert not list(Path(config.output_dir).glob(".busy.lock"))
    with pytest.raises(ConfigError) as again:
        FineTuner(config).setup()  # free again: now refused only because the adapter exists
    assert again.value.setting == "overwrite"


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_note(tiny_config):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    config = tiny_config(task="sql", run_name="stale", max_steps=1)
    Path(config.output_dir).mkdir(parents=True)
    (Path(config.output_dir) / ".stale.lock").write_text(dead.stdout.strip())
    with pytest.warns(UserWarning, match=f"process {dead.stdout.strip()} ended without releasing"):
        tuner = FineTuner(config).setup()
    tuner.release_lock()


def test_a_memory_estimate_far_beyond_the_machine_is_refused_not_crashed(tiny_config):
    with pytest.raises(ConfigError) as error:
        FineTuner(tiny_config(task="sql", lora_r=1_000_000_000, run_name="huge")).setup()
    assert error.value.setting == "lora_r" and "GiB" in str(error.value) and "fits this machine" in str(error.value)
    assert not (Path(tiny_config().output_dir) / "huge").exists()


@pytest.mark.parametrize("broken, expected", [
    ({"config.json": "{not json"}, "valid config.json"),
    ({"config.json": '{"model_type": "llama"}'}, "model_type and its sizes"),
    ({"config.json": '{"model_type": "llama", "hidden_size": 64}'}, "weights"),
    ({"config.json": '{"model_type": "llama", "hidden_size": 64}', "model.safetensors": "x"}, "a tokenizer"),
])
def test_a_broken_model_folder_is_named_piece_by_piece(tmp_path, broken, expected):
    for name, text in broken.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=expected) as error:
        resolve_base_model(str(tmp_path))
    assert error.value.setting == "base_model"
