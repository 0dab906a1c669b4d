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

_CREATE_HEAD = re.compile(r"CREATE\s+(?:TEMP(?:ORARY)?\s+)?TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?"
                          r"((?:[\"`\[][^\"`\]]+[\"`\]]|[\w$]+)(?:\.(?:[\"`\[][^\"`\]]+[\"`\]]|[\w$]+))?)\s*\(",
                          re.IGNORECASE)
_LITERAL = re.compile(r"\"[^\"]*\"|'[^']*'")
_COMMENT = re.compile(r"/\*.*?\*/|--[^\n]*", re.DOTALL)
_WORD = re.compile(r"[^\W\d][\w$]*")
_CONSTRAINT = re.compile(r"(?:PRIMARY\s+KEY|FOREIGN\s+KEY|UNIQUE\s*\(|CHECK\s*\(|CONSTRAINT\s|KEY\s*\()",
                         re.IGNORECASE)


def _unquote(name: str) -> str:
    return name.strip().strip("\"`[]").lower()


def _create_statements(context: str) -> list[tuple[str, str, int, int]]:
    """(table, column list, start, end of the list) for each CREATE TABLE, the list found by matching its
    parentheses (statements may be on separate lines, without `;`)."""
    text = _COMMENT.sub(lambda match: " " * len(match.group()), context)  # same offsets as the context
    found = []
    for head in _CREATE_HEAD.finditer(text):
        depth, index = 1, head.end()
        while index < len(text) and depth:
            depth += (text[index] == "(") - (text[index] == ")")
            index += 1
        if depth == 0:
            table = _unquote(head.group(1).split(".")[-1])
            found.append((table, text[head.end():index - 1], head.end(), index - 1))
    return found


def schema_tables(context: str) -> dict[str, list[str]]:
    """{table: [column, ...]} (lower case, in declared order) for each CREATE TABLE of a context.
    Table constraints (PRIMARY KEY (...), FOREIGN KEY ..., UNIQUE (...)) are not columns; a column named
    `key` is."""
    tables = {}
    for name, body, _, _ in _create_statements(context):
        columns = []
        for definition in _split_top_level(body):
            definition = definition.strip()
            if not definition or _CONSTRAINT.match(definition):
                continue
            quoted = re.match(r"[\"`\[]([^\"`\]]+)[\"`\]]", definition)
            columns.append(_unquote(quoted.group(1)) if quoted else definition.split()[0].lower())
        tables[name] = columns
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


def query_identifiers(query: str, columns: list[str] = ()) -> set[str]:
    """The words of a query that can name columns or tables, lower case: outside string literals and comments,
    not function names (COUNT in `COUNT(*)`); a double-quoted text that is one of `columns` counts as naming
    it, as SQLite reads it (`SELECT "Player" ...`), and `*` as naming every one of them."""
    query = _COMMENT.sub(" ", query)
    quoted = {match.group()[1:-1].lower() for match in _LITERAL.finditer(query) if match.group()[0] == '"'}
    bare = _LITERAL.sub(" ", query)
    words = {match.group().lower() for match in _WORD.finditer(bare)
             if not bare[match.end():].lstrip().startswith("(")}
    words |= quoted & set(columns)
    if re.search(r"(?:SELECT|,)\s*(?:\w+\.)?\*", bare, re.IGNORECASE):
        words |= set(columns)
    return words


def queried_columns(row: dict) -> list[str]:
    """The columns of the tables the answer queries (of every table when it names none of them)."""
    tables = schema_tables(row["context"])
    words = query_identifiers(row["answer"], list(tables))
    queried = [name for name in tables if name in words] or list(tables)
    return [column for name in queried for column in tables[name]]


def unused_columns(row: dict, columns: list[str] | None = None) -> list[str]:
    """Columns of the tables the answer queries (`columns`, when already read) that the answer does not name."""
    columns = queried_columns(row) if columns is None else columns
    words = query_identifiers(row["answer"], columns)
    return [column for column in columns if column not in words]


@dataclass(frozen=True)
class SchemaCheck:
    rows: int  # rows checked
    rows_with_unused: int  # rows whose schema has a column their answer does not use
    unused_share: float  # rows_with_unused / the rows whose schema could be read
    unreadable: int  # rows without a CREATE TABLE this check can read (left out of the share)
    mean_columns: float  # columns a row's queried tables have, on average
    mean_unused: float  # of which the answer does not use, on average

    @property
    def looks_pruned(self) -> bool:
        return self.unreadable < self.rows and self.unused_share < PRUNED_BELOW

    def as_dict(self) -> dict:
        return {**asdict(self), "looks_pruned": self.looks_pruned}


def check_schemas(rows: list[dict]) -> SchemaCheck:
    """The leak check over rows with `context` and `answer`."""
    if not rows:
        raise ValueError("the schema check needs at least one row, got none")
    with_unused = columns = unused = unreadable = 0
    for row in rows:
        queried = queried_columns(row)
        if not queried:
            unreadable += 1
            continue
        missing = unused_columns(row, queried)
        columns += len(queried)
        unused += len(missing)
        with_unused += bool(missing)
    read = max(1, len(rows) - unreadable)
    return SchemaCheck(len(rows), with_unused, round(with_unused / read, 4), unreadable, round(columns / read, 2),
                       round(unused / read, 2))


def pruned_warning(check: SchemaCheck, source: str = "these rows") -> str | None:
    """The warning for a file that looks pruned, None when it does not."""
    if check.unreadable == check.rows:
        return (f"{source}: none of the {check.rows} rows has a CREATE TABLE the schema check can read, so whether "
                "they show whole tables is unknown")
    if not check.looks_pruned:
        return None
    return (f"{source} look pruned: only {check.unused_share:.0%} of {check.rows} rows show a column their answer "
            f"does not use (at least {PRUNED_BELOW:.0%} expected of whole tables). A model can score well here by "
            "using every column it is shown, which real tables do not allow: score on rows with whole schemas "
            "(tools/sql_data.py builds them from public WikiSQL files; docs/QUALITY.md)")


def prune_schema(row: dict) -> dict:
    """The row as sql-create-context would give it: each queried table's CREATE TABLE cut to the columns the
    answer uses, in the order the answer first names them (the selected column first), and no example rows
    (they would no longer line up). For showing the artifact, and for measuring what a model trained on it
    does on whole tables (tools/sql_data.py --pruned)."""
    answer = _COMMENT.sub(" ", row["answer"])
    order = [word.lower() for word in _WORD.findall(_LITERAL.sub(" ", answer))]
    order += [match.group()[1:-1].lower() for match in _LITERAL.finditer(answer)]
    tables = schema_tables(row["context"])
    context = row["context"]
    for name, body, start, end in reversed(_create_statements(context)):  # from the end: offsets stay valid
        if name not in order and name not in query_identifiers(answer, list(tables)):
            continue
        definitions = [d.strip() for d in _split_top_level(body) if d.strip() and not _CONSTRAINT.match(d.strip())]
        by_name = dict(zip(tables[name], definitions))
        used = query_identifiers(answer, tables[name])
        kept = [by_name[word] for word in dict.fromkeys(order + tables[name]) if word in by_name and word in used]
        if kept:
            context = context[:start] + ", ".join(kept) + context[end:]
    context = re.sub(r"\s*/\*.*?\*/", "", context, flags=re.DOTALL)
    return {**row, "context": context}
