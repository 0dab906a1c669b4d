"""The schema leak check: does a SQL data file show whole tables, or only the columns each answer uses?

Real users give a table as it is. sql-create-context (the seed's data set) lists in each CREATE TABLE only
the columns its answer uses, so a model trained and scored on it learns "use every column you are shown":
0.69 exact match there, 0.005 on the same kind of questions over whole tables. A dev or test file that looks
pruned scores that shortcut, not the skill; `check_schemas` measures it and `pruned_warning` says so.

    from lib.tasks.sql_schema import check_schemas
    check = check_schemas(rows)      # rows with "context" and "answer"
    check.unused_share               # share of rows whose schema has a column the answer does not use
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

# A file where fewer rows than this share show a column their answer does not use looks pruned.
PRUNED_BELOW = 0.5

_CREATE = re.compile(r"CREATE\s+TABLE\s+[\"`\[]?(\w+)[\"`\]]?\s*\((.*?)\)\s*(?:;|$)", re.IGNORECASE | re.DOTALL)
_LITERAL = re.compile(r"\"[^\"]*\"|'[^']*'")
_COMMENT = re.compile(r"/\*.*?\*/|--[^\n]*", re.DOTALL)
_WORD = re.compile(r"[A-Za-z_][\w$]*")


def schema_tables(context: str) -> dict[str, list[str]]:
    """{table: [column, ...]} (lower case, in declared order) for each CREATE TABLE of a context.
    Constraints such as PRIMARY KEY (...) or FOREIGN KEY lines are not columns."""
    tables = {}
    for name, body in _CREATE.findall(_COMMENT.sub(" ", context)):
        columns = []
        for definition in _split_top_level(body):
            words = definition.strip().strip("\"`[]").split()
            if not words or words[0].upper() in ("PRIMARY", "FOREIGN", "UNIQUE", "CONSTRAINT", "CHECK", "KEY"):
                continue
            columns.append(words[0].strip("\"`[]").lower())
        tables[name.lower()] = columns
    return tables


def _split_top_level(body: str) -> list[str]:
    """A column list split at its commas, not at those inside parentheses (DECIMAL(10, 2))."""
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += (char == "(") - (char == ")")
        current.append(char)
    parts.append("".join(current))
    return parts


def query_identifiers(query: str) -> set[str]:
    """The words of a query outside its string literals, lower case (column and table names among them)."""
    return {word.lower() for word in _WORD.findall(_LITERAL.sub(" ", query))}


def queried_columns(row: dict) -> list[str]:
    """The columns of the tables the answer queries (of every table when it names none of them)."""
    tables = schema_tables(row["context"])
    words = query_identifiers(row["answer"])
    queried = [name for name in tables if name in words] or list(tables)
    return [column for name in queried for column in tables[name]]


def unused_columns(row: dict) -> list[str]:
    """Columns of the tables the answer queries that the answer does not name."""
    words = query_identifiers(row["answer"])
    return [column for column in queried_columns(row) if column not in words]


@dataclass(frozen=True)
class SchemaCheck:
    rows: int  # rows checked
    rows_with_unused: int  # rows whose schema has a column their answer does not use
    unused_share: float  # rows_with_unused / rows
    mean_columns: float  # columns a row's queried tables have, on average
    mean_unused: float  # of which the answer does not use, on average

    @property
    def looks_pruned(self) -> bool:
        return self.unused_share < PRUNED_BELOW

    def as_dict(self) -> dict:
        return {**asdict(self), "looks_pruned": self.looks_pruned}


def check_schemas(rows: list[dict]) -> SchemaCheck:
    """The leak check over rows with `context` and `answer`."""
    if not rows:
        raise ValueError("the schema check needs at least one row, got none")
    with_unused = columns = unused = 0
    for row in rows:
        missing = unused_columns(row)
        columns += len(queried_columns(row))
        unused += len(missing)
        with_unused += bool(missing)
    count = len(rows)
    return SchemaCheck(count, with_unused, round(with_unused / count, 4), round(columns / count, 2),
                       round(unused / count, 2))


def pruned_warning(check: SchemaCheck, source: str = "these rows") -> str | None:
    """The warning for a file that looks pruned, None when it does not."""
    if not check.looks_pruned:
        return None
    return (f"{source} look pruned: only {check.unused_share:.0%} of {check.rows} rows show a column their answer "
            f"does not use (at least {PRUNED_BELOW:.0%} expected of whole tables). A model can score well here by "
            "using every column it is shown, which real tables do not allow: score on rows with whole schemas "
            "(tools/sql_data.py builds them from public WikiSQL files; docs/QUALITY.md)")


def prune_schema(row: dict) -> dict:
    """The row as sql-create-context would give it: each queried table's CREATE TABLE cut to the columns the
    answer uses, in the order the answer first names them (the selected column first). For showing the
    artifact, and for measuring what a model trained on it does on whole tables (tools/sql_data.py --pruned)."""
    words = [word.lower() for word in _WORD.findall(_LITERAL.sub(" ", row["answer"]))]
    context = row["context"]
    for name, body in _CREATE.findall(_COMMENT.sub(" ", context)):
        if name.lower() not in words:
            continue
        definitions = {d.strip().split()[0].strip("\"`[]").lower(): d.strip() for d in _split_top_level(body) if d.strip()}
        kept = [definitions[word] for word in dict.fromkeys(words) if word in definitions]
        if kept:
            context = re.sub(rf"(CREATE\s+TABLE\s+[\"`\[]?{re.escape(name)}[\"`\]]?\s*)\(.*?\)(?=\s*(?:;|$|/\*))",
                             lambda match: f"{match.group(1)}({', '.join(kept)})", context, count=1,
                             flags=re.IGNORECASE | re.DOTALL)
    return {**row, "context": context}
