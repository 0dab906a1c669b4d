"""A task's rows from the embedded generator, a local file, or the task's Hub dataset.

Whatever the source, the result is two disjoint lists of rows keyed by the
task's fields (the seed datasets' own column names), and the trainer sees
them as prompt/completion pairs whose concatenation is the training text.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from pathlib import Path

from lib.config import ConfigError, RunConfig
from lib.tasks import Task, get_task


class DataError(ValueError):
    """A data file cannot be used; the message names the file and what was expected and found."""


def load_splits(config: RunConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) for the config's task and data source, disjoint and deterministic.

    With `eval_data`, the eval rows are the first `eval_rows` rows of that file (in file order, so scores of
    different runs share their rows) and training may use every row of `data`; rows whose prompt also
    appears in the eval file are left out of training."""
    task = get_task(config.task)
    if not config.eval_data:
        if config.data == "embedded":
            return task.embedded_splits(config.train_rows, config.eval_rows, config.seed)
        rows = _source_rows(config, task)
        if len(rows) < 2:
            raise DataError(f"{config.data}: {len(rows)} row; a split needs at least 2 (one to train on, one to "
                            "score); add rows, or give held-out rows as eval_data")
        return split_rows(rows, config.train_rows, config.eval_rows, config.seed)
    eval_rows = read_rows(config.eval_data, task, config.column_map)[:config.eval_rows]
    if config.data == "embedded":
        train = task.generate(config.train_rows + len(eval_rows), config.seed)
    else:
        train = _source_rows(config, task)
        random.Random(config.seed).shuffle(train)
    held_out = {task.prompt(row) for row in eval_rows}
    train = [row for row in train if task.prompt(row) not in held_out][:config.train_rows]
    if not train:
        raise DataError(f"{config.data}: no training rows left: every row is also among the {len(eval_rows)} "
                        f"scored rows of eval_data {config.eval_data}")
    if len(eval_rows) < config.eval_rows:
        warnings.warn(f"eval_data {config.eval_data} has {len(eval_rows)} rows; scoring those, not the "
                      f"{config.eval_rows} of eval_rows", stacklevel=2)
    return train, eval_rows


def _source_rows(config: RunConfig, task: Task) -> list[dict]:
    return _hub_rows(task) if config.data == "hub" else read_rows(config.data, task, config.column_map)


def split_rows(rows: list[dict], train_rows: int, eval_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with `seed`, hold out up to a fifth for evaluation, train on up to `train_rows` of the rest."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    held_out = max(1, min(eval_rows, len(rows) // 5))
    return rows[held_out:held_out + train_rows], rows[:held_out]


def read_rows(path: str | Path, task: Task, column_map: dict | None = None) -> list[dict]:
    """Rows of a jsonl/json/csv/tsv/parquet file, renamed by `column_map` and checked against the task's fields."""
    path = Path(path)
    records = _read_records(path)
    if not records:
        raise DataError(f"{path}: the file has no rows; expected columns {', '.join(task.fields)}")
    rows = [_task_row(record, task, column_map or {}, path) for record in records]
    empty = [name for name in task.fields if name not in task.optional_fields and not any(row[name] for row in rows)]
    if empty:
        raise DataError(f"{path}: column(s) {', '.join(empty)} are empty in every row; task {task.name!r} "
                        f"needs text there")
    return rows


def to_prompt_completion(rows: list[dict], fmt) -> list[dict]:
    """The trainer's view of rows in a prompt format (lib/prompts.py): the inference prompt and the answer
    that follows it; the trainer appends the end-of-text token to the answer."""
    return [{"prompt": fmt.prompt(row), "completion": fmt.completion(row)} for row in rows]


def _read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".tsv": _read_csv,
               ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix!r}; expected one of {', '.join(readers)}")
    try:
        records = readers[suffix](path)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: the file is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (json.JSONDecodeError, csv.Error) as error:
        raise DataError(f"{path}: the file cannot be parsed as {suffix[1:]} ({error})") from None
    except RecursionError:  # json nests deeper than Python's recursion limit
        raise DataError(f"{path}: the file cannot be parsed as {suffix[1:]} (nested too deeply)") from None
    except OSError as error:
        raise DataError(f"{path}: the file cannot be read ({error.strerror or error})") from None
    if not all(isinstance(record, dict) for record in records):
        raise DataError(f"{path}: every row must be an object with named columns")
    return records


def _read_jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _read_json(path: Path) -> list[dict]:
    content = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(content, dict) and isinstance(content.get("data"), list):
        return content["data"]
    if isinstance(content, list):
        return content
    raise DataError(f"{path}: expected a JSON list of rows (or an object with a 'data' list)")


def _read_csv(path: Path) -> list[dict]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter=delimiter))


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as error:
        raise DataError(f"{path}: the file cannot be parsed as parquet ({error})") from None


def _task_row(record: dict, task: Task, column_map: dict, path: Path) -> dict:
    renamed = {column_map.get(column, column): value for column, value in record.items()}
    missing = [name for name in task.fields if name not in renamed]
    if missing:
        found = ", ".join(str(column) for column in record) or "none"
        mapping = f" after column_map {column_map}" if column_map else ""
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}{mapping}; "
                        f"task {task.name!r} expects {', '.join(task.fields)}; found {found}")
    for name in task.fields:
        if isinstance(renamed[name], (list, dict)):
            raise DataError(f"{path}: column {name!r} holds a {type(renamed[name]).__name__} "
                            f"({str(renamed[name])[:60]}); expected text (or a number)")
    return {name: _field_text(renamed[name]) for name in task.fields}


def _field_text(value) -> str:
    """A cell as text: line breaks kept (answers may span lines: lists, code, formatted SQL) and unified,
    surrounding whitespace dropped."""
    text = "" if value is None else str(value)
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _hub_rows(task: Task) -> list[dict]:
    from lib.models import hub_reachable

    if not hub_reachable():
        raise ConfigError("data", "hub", f"'embedded' or a local file: the Hugging Face Hub cannot be reached, "
                                         f"so {task.hub_dataset} cannot be downloaded")
    import datasets

    table = datasets.load_dataset(task.hub_dataset, split="train")
    return [_task_row(record, task, {}, Path(task.hub_dataset)) for record in table]
