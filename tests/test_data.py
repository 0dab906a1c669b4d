"""Loading a task's rows from every file format, with and without a column mapping, and bad files."""

import csv
import json

import pyarrow
import pyarrow.parquet
import pytest

from lib.config import RunConfig
from lib.data import DataError, load_splits, read_rows, split_rows, to_prompt_completion
from lib.tasks import get_task

SQL = get_task("sql")
ROWS = SQL.generate(12, seed=3)


def write(path, rows):
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix in (".csv", ".tsv"):
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]), delimiter="\t" if suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    else:
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_each_format_with_seed_column_names(tmp_path, suffix):
    path = write(tmp_path / f"rows{suffix}", ROWS)
    assert read_rows(path, SQL) == ROWS


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
def test_each_format_with_column_map(tmp_path, suffix):
    renamed = [{"schema": r["context"], "q": r["question"], "sql": r["answer"], "extra": "x"} for r in ROWS]
    path = write(tmp_path / f"rows{suffix}", renamed)
    rows = read_rows(path, SQL, {"schema": "context", "q": "question", "sql": "answer"})
    assert rows == ROWS


def test_missing_columns_name_file_expected_and_found(tmp_path):
    path = write(tmp_path / "rows.jsonl", [{"question": "q", "query": "SELECT 1"}])
    with pytest.raises(DataError) as error:
        read_rows(path, SQL)
    message = str(error.value)
    assert str(path) in message and "context" in message and "answer" in message and "query" in message


def test_empty_file(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no rows"):
        read_rows(path, SQL)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_not_utf8(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(b"context,question,answer\n\xff\xfe\xfa,b,c\n")
    with pytest.raises(DataError, match="UTF-8"):
        read_rows(path, SQL)


@pytest.mark.parametrize("suffix, content", [(".json", b"{not json"), (".jsonl", b'{"a": 1}\n[1, 2\n'),
                                             (".parquet", b"PAR1 not really"), (".json", b'{"rows": 3}')])
def test_unparseable(tmp_path, suffix, content):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        read_rows(path, SQL)
    assert str(path) in str(error.value)


def test_rows_must_be_objects(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("[1, 2, 3]", encoding="utf-8")
    with pytest.raises(DataError, match="object"):
        read_rows(path, SQL)


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="cannot be read"):
        read_rows(tmp_path / "gone.jsonl", SQL)


def test_split_is_disjoint_and_deterministic():
    rows = SQL.generate(50, seed=1)
    train, held_out = split_rows(rows, train_rows=100, eval_rows=10, seed=7)
    assert len(held_out) == 10 and len(train) == 40
    assert not {SQL.prompt(r) for r in train} & {SQL.prompt(r) for r in held_out}
    assert split_rows(rows, 100, 10, 7) == (train, held_out)


def test_load_splits_from_file_and_embedded(tmp_path):
    path = write(tmp_path / "rows.jsonl", SQL.generate(40, seed=5))
    train, held_out = load_splits(RunConfig(task="sql", data=str(path), train_rows=20, eval_rows=5))
    assert (len(train), len(held_out)) == (20, 5)
    train, held_out = load_splits(RunConfig(task="detox", train_rows=30, eval_rows=6))
    assert (len(train), len(held_out)) == (30, 6)


def test_prompt_completion_concatenates_to_training_text():
    pairs = to_prompt_completion(ROWS, SQL)
    assert [p["prompt"] + p["completion"] for p in pairs] == [SQL.text(r) for r in ROWS]


def test_multiline_fields_keep_their_line_breaks(tmp_path):
    row = dict(ROWS[0], answer="SELECT name\r\nFROM t\n")
    path = write(tmp_path / "rows.jsonl", [row])
    assert read_rows(path, SQL)[0]["answer"] == "SELECT name\nFROM t"
