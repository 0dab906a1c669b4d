"""Whole schemas for SQL: the leak check, the generator's tables, the public-data tool (tools/sql_data.py) on
small fixtures in the public files' formats, and the warning for pruned dev rows."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lib.tasks import get_task
from lib.tasks.sql import run_query
from lib.tasks.sql_schema import (PRUNED_BELOW, check_schemas, prune_schema, pruned_warning, schema_tables,
                                  unused_columns)

REPO = Path(__file__).resolve().parents[1]
SQL = get_task("sql")

WHOLE = {"context": "CREATE TABLE table_10015132_11 (player VARCHAR, no VARCHAR, nationality VARCHAR, "
                    "position VARCHAR, years_in_toronto VARCHAR, school_club_team VARCHAR)",
         "question": "What position does the player who played for butler cc (ks) play?",
         "answer": 'SELECT position FROM table_10015132_11 WHERE school_club_team = "butler cc (ks)"'}


def test_unused_columns_of_a_whole_table_and_of_its_pruned_form():
    assert unused_columns(WHOLE) == ["player", "no", "nationality", "years_in_toronto"]
    pruned = prune_schema(WHOLE)
    assert pruned["context"] == ("CREATE TABLE table_10015132_11 (position VARCHAR, school_club_team VARCHAR)")
    assert unused_columns(pruned) == []
    assert pruned["answer"] == WHOLE["answer"] and pruned["question"] == WHOLE["question"]


def test_values_and_function_names_do_not_count_as_used_columns():
    row = {"context": "CREATE TABLE t (name VARCHAR, paris VARCHAR, count REAL)",
           "answer": "SELECT COUNT(*) FROM t WHERE name = 'paris' -- paris"}
    assert unused_columns(row) == ["paris", "count"]  # a value, a function name and a comment name no column
    quoted = {"context": 'CREATE TABLE t (name VARCHAR, paris VARCHAR)', "answer": 'SELECT name FROM t WHERE paris = "x"'}
    assert unused_columns(quoted) == []  # "x" is a text here; a double-quoted column name is the column in SQLite
    assert unused_columns({**quoted, "answer": 'SELECT "Name" FROM t'}) == ["paris"]
    assert unused_columns({**quoted, "answer": "SELECT * FROM t WHERE name = 'a'"}) == []


@pytest.mark.parametrize("context, tables", [
    ("CREATE TABLE a (x INTEGER, y DECIMAL(10, 2), PRIMARY KEY (x)); CREATE TABLE b (z TEXT)",
     {"a": ["x", "y"], "b": ["z"]}),
    ("CREATE TABLE a (x INT)\nCREATE TABLE b (y INT, z INT)", {"a": ["x"], "b": ["y", "z"]}),  # no ";" between
    ('CREATE TABLE IF NOT EXISTS "Music Keys" ("Song Title" TEXT, key TEXT, UNIQUE (key))',
     {"music keys": ["song title", "key"]}),  # a column named key is a column
    ("CREATE TABLE t (a VARCHAR) /* 2 example rows: (x) | y; z */", {"t": ["a"]}),
    ("no schema here", {}),
])
def test_schemas_are_read_in_the_forms_they_come(context, tables):
    assert schema_tables(context) == tables


def test_rows_without_a_readable_schema_are_counted_apart():
    unreadable = {"context": "tables: t(a, b)", "answer": "SELECT a FROM t"}
    check = check_schemas([WHOLE, unreadable])
    assert (check.unreadable, check.unused_share, check.looks_pruned) == (1, 1.0, False)
    nothing = check_schemas([unreadable] * 3)
    assert not nothing.looks_pruned and "none of the 3 rows" in pruned_warning(nothing)


def test_only_the_queried_tables_count():
    row = {"context": "CREATE TABLE people (name VARCHAR, age INTEGER); CREATE TABLE pets (kind VARCHAR, legs INTEGER)",
           "answer": "SELECT name FROM people WHERE age > 3"}
    assert unused_columns(row) == []  # the unrelated table's columns are not the answer's to use
    assert prune_schema({**row, "answer": "SELECT name FROM people"})["context"] == (
        "CREATE TABLE people (name VARCHAR); CREATE TABLE pets (kind VARCHAR, legs INTEGER)")


def test_check_measures_the_share_and_calls_a_pruned_file_pruned():
    pruned = [prune_schema(WHOLE)] * 3
    check = check_schemas(pruned + [WHOLE])
    assert (check.rows, check.rows_with_unused, check.unused_share, check.unreadable) == (4, 1, 0.25, 0)
    assert check.looks_pruned and check.unused_share < PRUNED_BELOW
    assert "look pruned" in pruned_warning(check, "dev.jsonl") and "25%" in pruned_warning(check)
    whole = check_schemas([WHOLE] * 3 + pruned[:1])
    assert not whole.looks_pruned and pruned_warning(whole) is None
    with pytest.raises(ValueError, match="at least one row"):
        check_schemas([])


def test_generated_rows_show_whole_tables_with_most_columns_unused():
    rows = SQL.generate(1000, seed=3)
    check = check_schemas(rows)
    assert check.unused_share >= 0.8, check
    assert check.mean_unused >= 0.5 * check.mean_columns, check
    widths = [len(schema_tables(row["context"])[next(iter(schema_tables(row["context"])))]) for row in rows
              if row["context"].startswith("CREATE TABLE table_")]
    assert min(widths) >= 4 and max(widths) == 12
    assert SQL.data_warnings(rows) == [] and not SQL.data_check(rows)["schema"]["looks_pruned"]
    assert len(SQL.data_warnings([prune_schema(row) for row in rows])) == 1


def test_generated_wiki_schemas_are_not_typed_by_what_the_query_does():
    """sql-create-context types a column INTEGER exactly when the answer aggregates it: a hint users' tables
    do not give. Here a numeric column is REAL or VARCHAR whatever the query does with it."""
    rows = [row for row in SQL.generate(1500, seed=5) if row["context"].startswith("CREATE TABLE table_")]
    aggregated = [row for row in rows if any(f"{f}(" in row["answer"] for f in ("MAX", "MIN", "AVG", "SUM"))]
    selected = [re.search(r"\((\w+)\)", row["answer"]).group(1) for row in aggregated]
    selected_types = [re.search(r"\b" + column + r" (\w+)", row["context"]).group(1)
                      for column, row in zip(selected, aggregated)]
    varchar_share = selected_types.count("VARCHAR") / len(selected_types)
    assert 0.05 < varchar_share < 0.5, varchar_share  # an aggregated column is typed as numeric columns are
    reals_unused = sum(" REAL" in row["context"] and any(
        f"{column} REAL" in row["context"] for column in unused_columns(row)) for row in rows)
    assert reals_unused > len(rows) // 4  # numeric columns the query never touches are typed like used ones


# ---- tools/sql_data.py on fixtures in the public formats ------------------------------------------------

TABLE = {"id": "1-10015132-11", "header": ["Player", "No.", "Nationality", "Position", "Years in Toronto",
                                           "School/Club Team", "1st leg", "Group", "Points"],
         "types": ["text", "text", "text", "text", "text", "text", "text", "text", "real"],
         "rows": [["Antonio Lang", "21", "United States", "Guard-Forward", "1999-2000", "Duke", "2-1", "A", 3],
                  ["Martin Lewis", "32, 44", "United States", "Guard-Forward", "1996-97", "Butler CC (KS)", "0-0", "B", 7],
                  ["Brad Lohaus", "33", "United States", "Forward-Center", "1996", "Iowa", "1-1", "A", 12]]}
QUESTIONS = [
    {"phase": 1, "table_id": "1-10015132-11", "question": "What position does the player who played for butler cc (ks) play?",
     "sql": {"sel": 3, "agg": 0, "conds": [[5, 0, "butler cc (ks)"]]}},
    {"phase": 1, "table_id": "1-10015132-11", "question": "How many  players in group a have more than 5 points?",
     "sql": {"sel": 0, "agg": 3, "conds": [[7, 0, "a"], [8, 1, 5]]}},
    {"phase": 1, "table_id": "1-10015132-11", "question": "Highest points with a 1st leg of 2-1?",
     "sql": {"sel": 8, "agg": 1, "conds": [[6, 0, "2-1"]]}},
    {"phase": 1, "table_id": "2-missing-1", "question": "A question whose table is not in the file?",
     "sql": {"sel": 0, "agg": 0, "conds": [[1, 0, "x"]]}},
]


def write_wikisql(root: Path) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS), encoding="utf-8")
        (data / f"{split}.tables.jsonl").write_text(json.dumps(TABLE) + "\n", encoding="utf-8")
    return root


def run_tool(*args):
    return subprocess.run([sys.executable, "tools/sql_data.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_wikisql_rows_keep_the_whole_table_in_its_order(tmp_path):
    clone = write_wikisql(tmp_path / "clone")
    done = run_tool("wikisql", clone, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    for split in ("train", "dev", "test"):  # splits kept as published
        assert f"{split}: 3 rows (skipped: 1 its table is not in the tables file)" in done.stdout
    rows = read(tmp_path / "out" / "dev.jsonl")
    assert rows[0]["context"] == (
        "CREATE TABLE table_10015132_11 (player VARCHAR, no VARCHAR, nationality VARCHAR, position VARCHAR, "
        "years_in_toronto VARCHAR, school_club_team VARCHAR, _1st_leg VARCHAR, group_ VARCHAR, points REAL)")
    assert rows[0]["answer"] == 'SELECT position FROM table_10015132_11 WHERE school_club_team = "butler cc (ks)"'
    assert rows[1]["answer"] == 'SELECT COUNT(player) FROM table_10015132_11 WHERE group_ = "a" AND points > 5'
    assert rows[1]["question"] == "How many players in group a have more than 5 points?"
    assert rows[2]["answer"] == 'SELECT MAX(points) FROM table_10015132_11 WHERE _1st_leg = "2-1"'
    assert rows[0]["source"] == "wikisql dev 1-10015132-11"
    for row in rows:  # every reference runs in SQLite (sql-create-context's `1st_leg` and `group` do not)
        assert run_query(row["context"], row["answer"], row["answer"]) is not None, row
    assert check_schemas(rows).unused_share == 1.0 and "100% of rows" in done.stdout
    assert "the reference runs in SQLite on 3 of the first 3" in done.stdout
    loaded = SQL.score([row["answer"] for row in rows], rows)  # the task reads and scores the rows as they are
    assert loaded["exact_match"] == 1.0 and loaded["execution_match"] == 1.0


def test_wikisql_sample_rows_and_the_pruned_form(tmp_path):
    clone = write_wikisql(tmp_path / "clone")
    assert run_tool("wikisql", clone, "--out", tmp_path / "rows", "--sample-rows", "2").returncode == 0
    row = read(tmp_path / "rows" / "dev.jsonl")[0]
    assert row["context"].endswith(" /* 2 example rows: Antonio Lang | 21 | United States | Guard-Forward | "
                                   "1999-2000 | Duke | 2-1 | A | 3; Martin Lewis | 32, 44 | United States | "
                                   "Guard-Forward | 1996-97 | Butler CC (KS) | 0-0 | B | 7 */")
    assert run_query(row["context"], row["answer"], row["answer"]) is not None  # the comment is harmless SQL
    assert unused_columns(row) == ["player", "no", "nationality", "years_in_toronto", "_1st_leg", "group_",
                                   "points"]
    done = run_tool("wikisql", clone, "--out", tmp_path / "pruned", "--pruned")
    assert "looks pruned" in done.stdout
    pruned = read(tmp_path / "pruned" / "dev.jsonl")
    assert pruned[0]["context"] == "CREATE TABLE table_10015132_11 (position VARCHAR, school_club_team VARCHAR)"
    checked = run_tool("check", tmp_path / "pruned" / "dev.jsonl", tmp_path / "rows" / "dev.jsonl")
    lines = checked.stdout.splitlines()
    assert '"looks_pruned": true' in lines[0] and '"looks_pruned": false' in lines[1]


def test_spider_rows_carry_every_table_of_the_database(tmp_path):
    clone = tmp_path / "spider"
    clone.mkdir()
    (clone / "tables.json").write_text(json.dumps([{
        "db_id": "pets_1", "table_names_original": ["Student", "Has_Pet", "Pets"],
        "column_names_original": [[-1, "*"], [0, "StuID"], [0, "LName"], [0, "Age"], [1, "StuID"], [1, "PetID"],
                                  [2, "PetID"], [2, "PetType"], [2, "weight"]],
        "column_types": ["text", "number", "text", "number", "number", "number", "number", "text", "number"]}]))
    (clone / "dev.json").write_text(json.dumps([{
        "db_id": "pets_1", "question": "How many dogs are there?",
        "query": "SELECT count(*) FROM Pets WHERE PetType = 'dog';"}]))
    done = run_tool("spider", clone, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    row = read(tmp_path / "out" / "dev.jsonl")[0]
    assert row["context"] == ("CREATE TABLE Student (StuID REAL, LName VARCHAR, Age REAL); CREATE TABLE Has_Pet "
                              "(StuID REAL, PetID REAL); CREATE TABLE Pets (PetID REAL, PetType VARCHAR, weight REAL)")
    assert row["answer"] == "SELECT count(*) FROM Pets WHERE PetType = 'dog'"
    assert unused_columns(row) == ["petid", "weight"]
    assert run_query(row["context"], row["answer"], row["answer"]) is not None


def test_the_tool_names_a_missing_clone(tmp_path):
    done = run_tool("wikisql", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert done.returncode == 2 and "nowhere" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "empty").mkdir()
    done = run_tool("wikisql", tmp_path / "empty", "--out", tmp_path / "out")
    assert done.returncode == 2 and "no wikisql files" in done.stderr


JK_ENTRIES = [  # github jkkummerfeld/text2sql-data's data/wikisql.json format
    {"sentences": [{"original": "Tell me what the notes are for South Australia ", "question-split": "train",
                    "table-id": "1-1000181-1", "text": "Tell me what the notes are for var0",
                    "variables": {"var0": "SOUTH AUSTRALIA"}}],
     "sql": ['SELECT TABLEalias0.NOTES_FIELD FROM TABLE AS TABLEalias0 WHERE TABLEalias0.CURRENT_SLOGAN_FIELD = "var0" ;'],
     "sql-original": ["SELECT  col5 FROM table WHERE col3 = SOUTH AUSTRALIA"]},
    {"sentences": [{"original": "Most points with a rank under 7 and group a?", "question-split": "train",
                    "table-id": "1-1000181-1", "text": "Most points with a rank under var1 and group var0 ?",
                    "variables": {"var0": "a", "var1": "7"}}],
     "sql": ['SELECT MAX TABLEalias0.POINTS_FIELD FROM TABLE AS TABLEalias0 WHERE TABLEalias0.RANK_FIELD < var1 '
             'AND TABLEalias0.GROUP_FIELD = "var0" ;'],
     "sql-original": ["SELECT MAX col7 FROM table WHERE col0 = a AND col1 < 7"]},
    {"sentences": [{"original": "A dev question", "question-split": "dev", "table-id": "1-99-1", "text": "x",
                    "variables": {}}],
     "sql": ["SELECT TABLEalias0.A_FIELD FROM TABLE AS TABLEalias0 ;"], "sql-original": ["SELECT  col0 FROM table"]},
]


def test_rebuilt_wikisql_tables_keep_known_headers_at_their_positions(tmp_path):
    import bz2

    source = tmp_path / "wikisql.json.bz2"
    source.write_bytes(bz2.compress(json.dumps(JK_ENTRIES).encode()))
    done = run_tool("wikisql-rebuilt", source, "--out", tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "train: 2 rows" in done.stdout and not (tmp_path / "out" / "dev.jsonl").exists()  # train only
    first, second = read(tmp_path / "out" / "train.jsonl")
    assert first["context"] == second["context"]  # one table, the same for each of its questions
    columns = [part.split()[0] for part in first["context"].split("(", 1)[1].rstrip(")").split(", ")]
    assert len(columns) >= 8 and len(set(columns)) == len(columns)
    assert (columns[0], columns[1], columns[3], columns[5], columns[7]) == ("group_", "rank", "current_slogan",
                                                                            "notes", "points")
    assert first["answer"] == 'SELECT notes FROM table_1000181_1 WHERE current_slogan = "SOUTH AUSTRALIA"'
    assert second["answer"] == 'SELECT MAX(points) FROM table_1000181_1 WHERE rank < 7 AND group_ = "a"'
    assert "points REAL" in first["context"] and "rank REAL" in first["context"] and "notes VARCHAR" in first["context"]
    assert first["question"] == "Tell me what the notes are for South Australia"
    assert all(run_query(row["context"], row["answer"], row["answer"]) is not None for row in (first, second))
    assert len(unused_columns(first)) >= 6


def test_generated_rows_with_example_rows(tmp_path):
    done = run_tool("generated", "--rows", "50", "--sample-rows", "3", "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    rows = read(tmp_path / "train.jsonl")
    assert len(rows) == 50 and all(" /* 3 example rows: " in row["context"] for row in rows)
    for row in rows:
        assert run_query(row["context"], row["answer"], row["answer"]) is not None
        width = len(schema_tables(row["context"])[next(iter(schema_tables(row["context"])))])
        shown = row["context"].split(" /* 3 example rows: ")[1].rstrip(" */").split("; ")
        assert len(shown) == 3 and all(len(line.split(" | ")) == width for line in shown)


def test_names_stay_distinct_and_values_stay_values():
    from tools.sql_data import column_names, sql_literal

    assert column_names(["Pts", "Pts", "Pts 2", "Group", "1st leg", ""]) == ["pts", "pts_2", "pts_2_2", "group_",
                                                                            "_1st_leg", "col6"]
    names = ["report", "driver"]
    assert sql_literal("Report", False, names) == "'Report'"  # "Report" would be the column in SQLite
    assert sql_literal('5" tall \'x\'', False, names) == "'5\" tall ''x'''"
    assert sql_literal("7", True) == "7" and sql_literal("7", False) == '"7"' and sql_literal(7.5, False) == "7.5"
    context = "CREATE TABLE t (report VARCHAR, driver VARCHAR)"
    for value in ("Report", '5" tall \'x\''):
        answer = f"SELECT driver FROM t WHERE report = {sql_literal(value, False, names)}"
        assert run_query(context, answer, answer) is not None


def test_a_rebuilt_table_is_one_table_for_all_its_questions_even_with_repeated_headers(tmp_path):
    entries = [
        {"sentences": [{"original": "Score when the team is lions?", "question-split": "train", "table-id": "1-7-1",
                        "variables": {"var0": "lions"}}],
         "sql": ['SELECT TABLEalias0.SCORE_FIELD FROM TABLE AS TABLEalias0 WHERE TABLEalias0.TEAM_FIELD = "var0" ;'],
         "sql-original": ["SELECT  col2 FROM table WHERE col1 = lions"]},
        {"sentences": [{"original": "Team with score 3?", "question-split": "train", "table-id": "1-7-1",
                        "variables": {"var0": "3"}}],
         "sql": ['SELECT TABLEalias0.TEAM_FIELD FROM TABLE AS TABLEalias0 WHERE TABLEalias0.SCORE_FIELD = "var0" ;'],
         "sql-original": ["SELECT  col1 FROM table WHERE col0 = 3"]},
        {"sentences": [  # one query shared by two questions: names known, positions not
            {"original": "Venue of a crowd of 5?", "question-split": "train", "table-id": "1-7-1", "variables": {"var0": "5"}},
            {"original": "Venue of a crowd of 9?", "question-split": "train", "table-id": "1-8-1", "variables": {"var0": "9"}}],
         "sql": ["SELECT TABLEalias0.VENUE_FIELD FROM TABLE AS TABLEalias0 WHERE TABLEalias0.CROWD_FIELD = var0 ;"],
         "sql-original": ["SELECT  col4 FROM table WHERE col3 = 5"]},
    ]
    source = tmp_path / "wikisql.json"
    source.write_text(json.dumps(entries))
    assert run_tool("wikisql-rebuilt", source, "--out", tmp_path / "out").returncode == 0
    rows = read(tmp_path / "out" / "train.jsonl")
    assert len(rows) == 4 and rows[0]["context"] == rows[1]["context"] == rows[2]["context"]  # one table for 1-7-1
    assert schema_tables(rows[0]["context"])["table_7_1"][:3] == ["score", "team", "score_2"]  # both "score"s
    assert rows[0]["answer"] == 'SELECT score FROM table_7_1 WHERE team = "lions"'
    assert "venue" in schema_tables(rows[0]["context"])["table_7_1"] and "crowd REAL" in rows[0]["context"]
    assert rows[2]["answer"] == "SELECT venue FROM table_7_1 WHERE crowd = 5"
    for row in rows:
        assert run_query(row["context"], row["answer"], row["answer"]) is not None, row


def test_the_test_split_is_scored_once_for_one_adapter():
    done = subprocess.run([sys.executable, "tools/recipe_study.py", "--task", "sql", "--variant", "a", "--variant", "b",
                           "--test", "test.jsonl"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "one --variant" in done.stderr
