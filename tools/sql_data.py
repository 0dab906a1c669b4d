"""Build the SQL task's jsonl files from public text-to-SQL sets, with WHOLE table schemas.

    python tools/sql_data.py wikisql CLONE --out data/sql-full                  # train/dev/test.jsonl
    python tools/sql_data.py wikisql CLONE --out data/sql-rows --sample-rows 3  # with 3 rows of each table
    python tools/sql_data.py wikisql CLONE --out data/sql-pruned --pruned       # as sql-create-context prunes
    python tools/sql_data.py spider CLONE --out data/spider                     # whole databases, joins
    python tools/sql_data.py check data/sql-full/dev.jsonl ...                  # the schema leak check

CLONE is a local folder holding the public files anywhere below it: for WikiSQL (github salesforce/WikiSQL's
data.tar.bz2 unpacked, or a copy in its format) `train.jsonl`, `dev.jsonl`, `test.jsonl` with their
`<split>.tables.jsonl` (or `<split>_tables.jsonl`); for Spider `tables.json` with `train_spider.json`,
`dev.json` (and `test.json` where present). Splits are kept as published. Each output row has the task's
fields: `context` (every table's CREATE TABLE, every column in the table's own order: never pruned to the
answer), `question` and `answer` (SQLite), plus `source` (set, split, table or database id).

Column names follow sql-create-context (`School/Club Team` -> `school_club_team`, `Win %` ->
`win__percentage`) and are made valid SQLite names where that set's are not (`1st leg` -> `_1st_leg`,
`Group` -> `group_`, a repeated header gets `_2`); types are the table's (WikiSQL's `real` -> REAL, else
VARCHAR). Text values are double-quoted, numbers compared with a numeric column are not. The summary line
of each split gives the rows written, the rows skipped (with why) and the leak check's figure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.tasks.sql import run_query  # noqa: E402
from lib.tasks.sql_schema import check_schemas, prune_schema  # noqa: E402
from lib.tasks.sql_wiki import column_name  # noqa: E402

AGGREGATES = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")  # WikiSQL's agg_ops, by index
OPERATORS = ("=", ">", "<")  # WikiSQL's cond_ops, by index
SPLITS = ("train", "dev", "test")
# SQLite keywords a header can become that SQLite refuses as a bare column name (tried in SELECT, WHERE and an
# aggregate); such a column gets a trailing "_" (sql-create-context leaves them, and its queries then fail)
RESERVED = {
    "add", "all", "alter", "and", "as", "between", "case", "cast", "check", "collate", "commit", "constraint",
    "create", "default", "delete", "distinct", "drop", "else", "escape", "except", "exists", "foreign", "from",
    "group", "having", "in", "index", "insert", "intersect", "into", "is", "isnull", "join", "limit", "not",
    "notnull", "null", "on", "or", "order", "primary", "raise", "references", "select", "set", "table", "then",
    "to", "transaction", "union", "unique", "update", "using", "values", "when", "where",
}
SAMPLE_VALUE_CHARS = 40  # a shown cell longer than this is cut


def column_names(headers: list[str]) -> list[str]:
    """Valid, distinct SQLite names for a table's headers, sql-create-context's where those are valid."""
    names, seen = [], Counter()
    for index, header in enumerate(headers):
        name = column_name(header).strip() or f"col{index + 1}"
        if name[0].isdigit():
            name = "_" + name
        if name in RESERVED:
            name += "_"
        seen[name] += 1
        names.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return names


def table_name(table_id: str) -> str:
    """`1-10015132-11` -> `table_10015132_11`, as sql-create-context names WikiSQL's tables."""
    return "table_" + re.sub(r"\W", "_", table_id.split("-", 1)[-1])


def sql_literal(value, numeric_column: bool) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    if numeric_column and re.fullmatch(r"-?\d+(\.\d+)?", text):
        return text
    return f'"{text}"' if '"' not in text else f"'{text}'"


def sample_comment(rows: list[list], count: int) -> str:
    """` /* 3 example rows: a | b; c | d; ... */`: the first `count` rows of the table, as text."""
    shown = []
    for row in rows[:count]:
        cells = [str(cell).replace("*/", "* /").replace("\n", " ")[:SAMPLE_VALUE_CHARS] for cell in row]
        shown.append(" | ".join(cells))
    return f" /* {len(shown)} example rows: {'; '.join(shown)} */" if shown else ""


def wikisql_row(question: dict, table: dict, sample_rows: int) -> dict:
    """One WikiSQL question as the task's row, over its whole table."""
    names = column_names(table["header"])
    types = ["REAL" if kind == "real" else "VARCHAR" for kind in table.get("types", ["text"] * len(names))]
    name = table_name(table["id"])
    sql = question["sql"]
    selected = names[sql["sel"]]
    aggregate = AGGREGATES[sql["agg"]]
    answer = f"SELECT {aggregate}({selected})" if aggregate else f"SELECT {selected}"
    answer += f" FROM {name}"
    clauses = [f"{names[column]} {OPERATORS[op]} {sql_literal(value, types[column] == 'REAL')}"
               for column, op, value in sql["conds"]]
    if clauses:
        answer += " WHERE " + " AND ".join(clauses)
    context = f"CREATE TABLE {name} ({', '.join(f'{n} {t}' for n, t in zip(names, types))})"
    if sample_rows:
        context += sample_comment(table.get("rows", []), sample_rows)
    return {"context": context, "question": " ".join(question["question"].split()), "answer": answer}


def find_file(root: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        found = sorted(root.rglob(name))
        if found:
            return found[0]
    return None


def read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def wikisql_splits(root: Path, sample_rows: int) -> dict[str, tuple[list[dict], Counter]]:
    """{split: (rows, skipped reasons)} for each split whose questions and tables are below root."""
    splits = {}
    for split in SPLITS:
        questions = find_file(root, (f"{split}.jsonl",))
        tables = find_file(root, (f"{split}.tables.jsonl", f"{split}_tables.jsonl"))
        if questions is None or tables is None:
            continue
        by_id = {table["id"]: table for table in read_jsonl(tables)}
        rows, skipped = [], Counter()
        for question in read_jsonl(questions):
            table = by_id.get(question["table_id"])
            if table is None:
                skipped["its table is not in the tables file"] += 1
                continue
            row = wikisql_row(question, table, sample_rows)
            row["source"] = f"wikisql {split} {question['table_id']}"
            rows.append(row)
        splits[split] = (rows, skipped)
    return splits


SPIDER_FILES = {"train": ("train_spider.json",), "dev": ("dev.json",), "test": ("test.json",)}
SPIDER_TYPES = {"number": "REAL", "time": "TEXT", "boolean": "BOOLEAN"}


def spider_context(database: dict) -> str | None:
    """Every table of a Spider database as CREATE TABLE statements (None when a name is not a plain word)."""
    tables = {index: [] for index in range(len(database["table_names_original"]))}
    for (table, column), kind in zip(database["column_names_original"], database["column_types"]):
        if table >= 0:
            tables[table].append(f"{column} {SPIDER_TYPES.get(kind, 'VARCHAR')}")
    names = database["table_names_original"] + [c for _, c in database["column_names_original"][1:]]
    if not all(re.fullmatch(r"\w+", name) for name in names):
        return None
    return "; ".join(f"CREATE TABLE {database['table_names_original'][index]} ({', '.join(columns)})"
                     for index, columns in tables.items())


def spider_splits(root: Path) -> dict[str, tuple[list[dict], Counter]]:
    schema_file = find_file(root, ("tables.json",))
    if schema_file is None:
        return {}
    contexts = {database["db_id"]: spider_context(database)
                for database in json.loads(schema_file.read_text(encoding="utf-8"))}
    splits = {}
    for split, names in SPIDER_FILES.items():
        path = find_file(root, names)
        if path is None:
            continue
        rows, skipped = [], Counter()
        for item in json.loads(path.read_text(encoding="utf-8")):
            context = contexts.get(item["db_id"])
            if context is None:
                skipped["its database has a name that is not a plain word, or is missing"] += 1
                continue
            rows.append({"context": context, "question": " ".join(item["question"].split()),
                         "answer": " ".join(item["query"].split()).rstrip(";"),
                         "source": f"spider {split} {item['db_id']}"})
        splits[split] = (rows, skipped)
    return splits


def write_split(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    with temporary.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    temporary.replace(path)


def summary(split: str, rows: list[dict], skipped: Counter, checked: int = 2000) -> str:
    check = check_schemas(rows) if rows else None
    sample = rows[:checked]
    runs = sum(run_query(row["context"], row["answer"], row["answer"]) is not None for row in sample)
    reasons = "; ".join(f"{count} {why}" for why, count in skipped.items()) or "none"
    figure = f"{check.unused_share:.0%} of rows have a column the answer does not use" if check else "no rows"
    return (f"{split}: {len(rows)} rows (skipped: {reasons}); {figure}"
            f"{' (looks pruned)' if check and check.looks_pruned else ''}; "
            f"the reference runs in SQLite on {runs} of the first {len(sample)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("wikisql", "spider"):
        command = commands.add_parser(name, help=f"convert a local clone of {name}'s public files")
        command.add_argument("clone", type=Path, help="the folder holding the public files (searched below)")
        command.add_argument("--out", type=Path, required=True, help="folder for train/dev/test.jsonl")
        command.add_argument("--pruned", action="store_true",
                             help="cut each schema to the answer's columns, as sql-create-context does (for "
                                  "measuring the artifact; never for scoring)")
        if name == "wikisql":
            command.add_argument("--sample-rows", type=int, default=0, metavar="N",
                                 help="show the table's first N rows after its CREATE TABLE, in a comment")
    check = commands.add_parser("check", help="the schema leak check of SQL jsonl files")
    check.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)

    if args.command == "check":
        for path in args.files:
            result = check_schemas(read_jsonl(path))
            print(f"{path}: {json.dumps(result.as_dict())}")
        return 0
    if not args.clone.is_dir():
        print(f"error: {args.clone} is not a folder (clone the public repository first)", file=sys.stderr)
        return 2
    splits = wikisql_splits(args.clone, args.sample_rows) if args.command == "wikisql" else spider_splits(args.clone)
    if not splits:
        print(f"error: no {args.command} files found below {args.clone} (see --help for the names looked for)",
              file=sys.stderr)
        return 2
    for split, (rows, skipped) in splits.items():
        if args.pruned:
            rows = [prune_schema(row) for row in rows]
        write_split(rows, args.out / f"{split}.jsonl")
        print(summary(split, rows, skipped), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
