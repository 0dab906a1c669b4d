"""Build the SQL task's jsonl files from public text-to-SQL sets, with WHOLE table schemas.

    python tools/sql_data.py wikisql CLONE --out data/sql-full                  # train/dev/test.jsonl
    python tools/sql_data.py wikisql CLONE --out data/sql-rows --sample-rows 3  # with 3 rows of each table
    python tools/sql_data.py wikisql CLONE --out data/sql-pruned --pruned       # as sql-create-context prunes
    python tools/sql_data.py wikisql-rebuilt wikisql.json.bz2 --out data/sql-full  # train, tables rebuilt
    python tools/sql_data.py spider CLONE --out data/spider                     # whole databases, joins
    python tools/sql_data.py generated --rows 8000 --sample-rows 3 --out data/gen-rows  # the generator's rows
    python tools/sql_data.py check data/sql-full/dev.jsonl ...                  # the schema leak check

CLONE is a local folder holding the public files anywhere below it: for WikiSQL (github salesforce/WikiSQL's
data.tar.bz2 unpacked, or a copy in its format) `train.jsonl`, `dev.jsonl`, `test.jsonl` with their
`<split>.tables.jsonl` (or `<split>_tables.jsonl`; also the zero-shot `<split>_zs.jsonl` with
`<split>_zs.tables.jsonl`); for Spider `tables.json` with `train_spider.json`,
`dev.json` (and `test.json` where present). Splits are kept as published. Each output row has the task's
fields: `context` (every table's CREATE TABLE, every column in the table's own order: never pruned to the
answer), `question` and `answer` (SQLite), plus `source` (set, split, table or database id).

Public copies of WikiSQL's train split whose tables files can be fetched are rare; `wikisql-rebuilt` takes
the copy in github jkkummerfeld/text2sql-data (`data/wikisql.json.bz2`: every question of every split with its
query by column index and by header name) and rebuilds each table of the split once: the headers its questions
use at their published positions (where a question alone has the query, which ties index to name), the other
positions filled with headers of other real tables of the same split, and headers known only by name placed
at random (the widening the issue suggests: a whole-looking table, most columns unused). Its limit: a filler
comes from an unrelated table, so the unused columns are often off the table's topic, where a real table's
are not; the leak check cannot see that, the whole-table dev rows can.

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
    names = []
    for index, header in enumerate(headers):
        name = column_name(header).strip() or f"col{index + 1}"
        if name[0].isdigit():
            name = "_" + name
        if name in RESERVED:
            name += "_"
        unique, count = name, 1
        while unique in names:
            count += 1
            unique = f"{name}_{count}"
        names.append(unique)
    return names


def table_name(table_id: str) -> str:
    """`1-10015132-11` -> `table_10015132_11`, as sql-create-context names WikiSQL's tables."""
    return "table_" + re.sub(r"\W", "_", table_id.split("-", 1)[-1])


def sql_literal(value, numeric_column: bool, columns: list[str] = ()) -> str:
    """A value as the query writes it: a number bare, a text double-quoted as sql-create-context does, single-
    quoted where double quotes would not make a text (it holds one, or it is a column's name, which SQLite
    would read as that column)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    text = str(value).strip()
    if numeric_column and re.fullmatch(r"-?\d+(\.\d+)?", text):
        return text
    if '"' in text or text.lower() in columns:
        return "'" + text.replace("'", "''") + "'"
    return f'"{text}"'


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
    clauses = [f"{names[column]} {OPERATORS[op]} {sql_literal(value, types[column] == 'REAL', names)}"
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
        for stem in (split, f"{split}_zs"):
            questions = find_file(root, (f"{stem}.jsonl",))
            tables = questions and next((questions.parent / name for name in (f"{stem}.tables.jsonl",
                                                                              f"{stem}_tables.jsonl")
                                         if (questions.parent / name).is_file()), None)  # beside its questions
            if questions is not None and tables is not None:
                break
        else:
            continue
        by_id = {table["id"]: table for table in read_jsonl(tables)}
        rows, skipped = [], Counter()
        for question in read_jsonl(questions):
            table = by_id.get(question["table_id"])
            if table is None:
                skipped["its table is not in the tables file"] += 1
                continue
            row = wikisql_row(question, table, sample_rows)
            row["source"] = f"wikisql {questions.stem} {question['table_id']}"
            rows.append(row)
        splits[split] = (rows, skipped)
    return splits


# jkkummerfeld/text2sql-data's WikiSQL: "sql" names header fields (`SCHOOL/CLUB_TEAM_FIELD`, values as variables
# var0.. in the order of "sql-original"'s conditions), "sql-original" gives column indices (`col5`)
_REBUILT_QUERY = re.compile(r"^SELECT (?:(MAX|MIN|COUNT|SUM|AVG) )?(?:TABLEalias0\.)?(\S+)_FIELD FROM TABLE AS "
                            r"TABLEalias0(?: WHERE (.*?))? ;$")
_REBUILT_CONDITION = re.compile(r"^(?:TABLEalias0\.)?(\S+)_FIELD (=|<|>) (\"var\d+\"|var\d+|\S.*)$")
_ORIGINAL_QUERY = re.compile(r"^SELECT\s+(?:(?:MAX|MIN|COUNT|SUM|AVG)\s+)?col(\d+) FROM table(?: WHERE (.*))?$")
EXTRA_COLUMNS = (0, 3)  # columns added after the last known one of a rebuilt table, at least and at most


def field_header(field: str) -> str:
    """`SCHOOL/CLUB_TEAM` -> `school/club team`: the header as far as the field name keeps it."""
    return field.replace("_", " ").lower()


def read_rebuilt_source(path: Path) -> list[dict]:
    import bz2

    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


def rebuilt_splits(path: Path, splits: tuple[str, ...], seed: int = 0) -> dict[str, tuple[list[dict], Counter]]:
    """{split: (rows, skipped)}, each split's tables rebuilt from what that split's questions name alone."""
    entries = read_rebuilt_source(path)
    return {split: rebuilt_split(entries, split, seed) for split in splits}


def parse_question(sentence: dict, query: re.Match) -> tuple | None:
    """(aggregate, selected header, [(header, op, value, quoted)]) of one question, None when a condition
    cannot be read."""
    conditions = []
    for text in query.group(3).split(" AND ") if query.group(3) else []:
        condition = _REBUILT_CONDITION.match(text)
        if condition is None:
            return None
        value = condition.group(3)
        variable = re.fullmatch(r'("?)(var\d+)"?', value)
        if variable:
            if variable.group(2) not in sentence["variables"]:
                return None
            quoted, value = bool(variable.group(1)), sentence["variables"][variable.group(2)]
        else:
            quoted, value = value.startswith('"'), value.strip('"')
        conditions.append((field_header(condition.group(1)), condition.group(2), value, quoted))
    return query.group(1) or "", field_header(query.group(2)), conditions


def rebuilt_split(entries: list[dict], split: str, seed: int) -> tuple[list[dict], Counter]:
    import random

    positions: dict[str, dict[int, str]] = {}  # table id -> {column index: header}
    parsed, skipped = [], Counter()
    for entry in entries:
        query = _REBUILT_QUERY.match(entry["sql"][0])
        for sentence in entry["sentences"]:
            if sentence["question-split"] != split:
                continue
            question = parse_question(sentence, query) if query else None
            if question is None:
                skipped["a query not in the single-table form" if query is None
                        else "a condition that could not be read"] += 1
                continue
            parsed.append((sentence, question))
        original = _ORIGINAL_QUERY.match(entry["sql-original"][0])
        if query is None or original is None or len(entry["sentences"]) != 1 \
                or entry["sentences"][0]["question-split"] != split:
            continue  # an index is tied to a name only where one question shares the query; other splits untouched
        table = positions.setdefault(entry["sentences"][0]["table-id"], {})
        table[int(original.group(1))] = field_header(query.group(2))
        indices = re.findall(r"(?:^|\s)col(\d+) [=<>] ", original.group(2) or "")
        for text in query.group(3).split(" AND ") if query.group(3) else []:
            condition = _REBUILT_CONDITION.match(text)
            variable = re.fullmatch(r'"?var(\d+)"?', condition.group(3)) if condition else None
            if variable and int(variable.group(1)) < len(indices):
                table[int(indices[int(variable.group(1))])] = field_header(condition.group(1))
    named: dict[str, list[str]] = {}  # table id -> every header its questions name
    for sentence, (_, selected, conditions) in parsed:
        named.setdefault(sentence["table-id"], []).extend([selected, *(c[0] for c in conditions)])
    pool = sorted({header for table in positions.values() for header in table.values()})
    numeric = numeric_headers(question for _, question in parsed)
    rng = random.Random(seed)
    tables = {table_id: rebuilt_table(positions.get(table_id, {}), fields, pool, rng)
              for table_id, fields in named.items()}
    rows = []
    for sentence, question in parsed:
        row = rebuilt_row(sentence, question, tables[sentence["table-id"]], numeric)
        row["source"] = f"wikisql {split} {sentence['table-id']} (rebuilt)"
        rows.append(row)
    return rows, skipped


def numeric_headers(questions) -> set[str]:
    """Headers that questions mostly aggregate with MAX/MIN/SUM/AVG or compare with a bare number: typed REAL
    in every table that has them, so that a column's type never says whether this question uses it."""
    votes = Counter()
    for aggregate, selected, conditions in questions:
        if aggregate in ("MAX", "MIN", "SUM", "AVG"):
            votes[selected] += 1
        for header, _, value, quoted in conditions:
            votes[header] += -1 if quoted or not re.fullmatch(r"-?\d+(\.\d+)?", str(value).strip()) else 1
    return {header for header, vote in votes.items() if vote > 0}


def rebuilt_table(known: dict[int, str], named: list[str], pool: list[str], rng) -> list[str]:
    """One table's headers, made once for all its questions: those known by position where they stand, the
    other positions up to the last known one (and 0-3 more) filled with headers of other tables, then the
    headers its questions name but no position says where (a query shared by several questions), each at a
    random place."""
    width = max([*known, -1]) + 1 + rng.randint(*EXTRA_COLUMNS)
    taken = set(known.values()) | set(named)
    headers = []
    for index in range(width):
        header = known.get(index)
        if header is None:
            candidates = [h for h in rng.sample(pool, min(8, len(pool))) if h not in taken]
            header = rng.choice(candidates) if candidates else f"column {index + 1}"
            taken.add(header)
        headers.append(header)
    for header in dict.fromkeys(named):
        if header not in headers:
            headers.insert(rng.randint(0, len(headers)), header)
    return headers


def rebuilt_row(sentence: dict, question: tuple, headers: list[str], numeric: set[str]) -> dict:
    """One question over its rebuilt table; a header the table repeats is named by its first column."""
    aggregate, selected, conditions = question
    names = column_names(headers)
    name_of = {}
    for header, name in zip(headers, names):
        name_of.setdefault(header, name)
    table = table_name(sentence["table-id"])
    answer = f"SELECT {aggregate}({name_of[selected]})" if aggregate else f"SELECT {name_of[selected]}"
    answer += f" FROM {table}"
    if conditions:
        answer += " WHERE " + " AND ".join(f"{name_of[header]} {op} {sql_literal(value, not quoted, names)}"
                                          for header, op, value, quoted in conditions)
    columns = ", ".join(f"{name} {'REAL' if header in numeric else 'VARCHAR'}" for header, name in zip(headers, names))
    return {"context": f"CREATE TABLE {table} ({columns})", "question": " ".join(sentence["original"].split()),
            "answer": answer}


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
    """Spider's splits; the test databases are in test_tables.json where the release has one."""
    contexts = {}
    for name in ("tables.json", "test_tables.json"):
        schema_file = find_file(root, (name,))
        if schema_file is not None:
            contexts.update({database["db_id"]: spider_context(database)
                             for database in json.loads(schema_file.read_text(encoding="utf-8"))})
    if not contexts:
        return {}
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
    rebuilt = commands.add_parser("wikisql-rebuilt", help="WikiSQL questions with their tables rebuilt "
                                                          "(jkkummerfeld/text2sql-data's data/wikisql.json.bz2)")
    rebuilt.add_argument("source", type=Path, help="wikisql.json or wikisql.json.bz2")
    rebuilt.add_argument("--out", type=Path, required=True, help="folder for <split>.jsonl")
    rebuilt.add_argument("--splits", default="train", help="comma-separated splits to write (default train; dev "
                                                          "and test come whole from the tables files)")
    rebuilt.add_argument("--pruned", action="store_true", help="as for wikisql")
    generated = commands.add_parser("generated", help="the embedded generator's real-table rows as a file")
    generated.add_argument("--rows", type=int, required=True)
    generated.add_argument("--seed", type=int, default=0)
    generated.add_argument("--sample-rows", type=int, default=0, metavar="N", help="as for wikisql")
    generated.add_argument("--out", type=Path, required=True, help="folder for train.jsonl")
    check = commands.add_parser("check", help="the schema leak check of SQL jsonl files")
    check.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args(argv)

    if args.command == "check":
        for path in args.files:
            result = check_schemas(read_jsonl(path))
            print(f"{path}: {json.dumps(result.as_dict())}")
        return 0
    if args.command == "generated":
        import random

        from lib.tasks.sql_wiki import wiki_row

        rng = random.Random(args.seed)
        rows = [{**wiki_row(rng, args.sample_rows), "source": f"generator seed {args.seed}"} for _ in range(args.rows)]
        splits = {"train": (rows, Counter())}
    elif args.command == "wikisql-rebuilt":
        if not args.source.is_file():
            print(f"error: {args.source} is not a file (data/wikisql.json.bz2 of a clone of "
                  "jkkummerfeld/text2sql-data)", file=sys.stderr)
            return 2
        splits = rebuilt_splits(args.source, tuple(args.splits.split(",")))
    elif not args.clone.is_dir():
        print(f"error: {args.clone} is not a folder (clone the public repository first)", file=sys.stderr)
        return 2
    else:
        splits = wikisql_splits(args.clone, args.sample_rows) if args.command == "wikisql" else spider_splits(args.clone)
    if not splits:
        print(f"error: no {args.command} files found below {args.clone} (see --help for the names looked for)",
              file=sys.stderr)
        return 2
    for split, (rows, skipped) in splits.items():
        if getattr(args, "pruned", False):
            rows = [prune_schema(row) for row in rows]
        write_split(rows, args.out / f"{split}.jsonl")
        print(summary(split, rows, skipped), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
