"""English to SQL, in the format of sql-create-context.

A row's `context` holds one or two `CREATE TABLE` statements joined by "; ", its
`question` asks about one table, and its `answer` is a SQLite query. Following
the dataset, string literals are double-quoted (`WHERE city = "Paris"`), which
SQLite reads as strings because no column has such a name, and every value in a
question appears verbatim in its query.
"""

import random
import re
import sqlite3
import time
from dataclasses import dataclass

from .base import Task, exact_match_rate
from .sql_schema import check_schemas, pruned_warning
from .sql_wiki import wiki_row

PEOPLE = (
    "Maria Lopez", "John Smith", "Anna Kowalski", "David Chen", "Fatima Khan", "Luca Rossi",
    "Sarah Johnson", "Kenji Tanaka", "Olga Petrova", "Ahmed Hassan", "Emma Brown", "Carlos Silva",
    "Priya Patel", "Tom Wilson", "Ines Moreau", "Lars Nilsson", "Grace Okafor", "Mei Lin",
)
CITIES = (
    "Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "Chicago", "Toronto", "Sydney",
    "Lisbon", "Vienna", "Oslo", "Dublin", "Boston", "Seoul", "Mumbai", "Nairobi", "Lima",
)
COUNTRIES = (
    "France", "Germany", "Spain", "Italy", "Japan", "Canada", "Brazil", "India", "Australia",
    "Kenya", "Mexico", "Norway", "Egypt", "Chile", "Poland", "Vietnam",
)
YEARS = tuple(range(1990, 2024))


def money(low: int, high: int, step: int) -> tuple[int, ...]:
    return tuple(range(low, high + 1, step))


def decimals(low: float, high: float, step: float) -> tuple[float, ...]:
    count = round((high - low) / step) + 1
    return tuple(round(low + i * step, 2) for i in range(count))


@dataclass(frozen=True)
class Column:
    """A typed column with realistic values. `kind` decides which query shapes
    may use it: "text" and "year" in equality filters, "year" and "measure" in
    comparisons, MIN/MAX and ORDER BY, only "measure" in SUM and AVG."""

    name: str
    kind: str  # "text", "year" or "measure"
    values: tuple

    @property
    def sql_type(self) -> str:
        if self.kind == "text":
            return "VARCHAR"
        return "REAL" if isinstance(self.values[0], float) else "INTEGER"

    @property
    def phrase(self) -> str:
        return self.name.replace("_", " ")


@dataclass(frozen=True)
class Table:
    name: str
    singular: str  # how a question names one row: "employee"
    columns: tuple[Column, ...]

    @property
    def plural(self) -> str:
        return self.name.replace("_", " ")

    @property
    def create_statement(self) -> str:
        columns = ", ".join(f"{c.name} {c.sql_type}" for c in self.columns)
        return f"CREATE TABLE {self.name} ({columns})"

    def of_kinds(self, *kinds: str) -> list[Column]:
        return [c for c in self.columns if c.kind in kinds]


def text(name: str, values: tuple) -> Column:
    return Column(name, "text", values)


def year(name: str, values: tuple = YEARS) -> Column:
    return Column(name, "year", values)


def measure(name: str, values: tuple) -> Column:
    return Column(name, "measure", values)


TABLES = (
    Table("employees", "employee", (
        text("name", PEOPLE),
        text("department", ("Sales", "Marketing", "Engineering", "Finance", "Support", "Legal", "Research")),
        measure("salary", money(30000, 150000, 2500)),
        text("city", CITIES),
        year("hire_year"),
    )),
    Table("orders", "order", (
        text("customer", PEOPLE),
        text("product", ("Laptop", "Desk Lamp", "Office Chair", "Monitor", "Headphones", "Printer", "Backpack")),
        measure("quantity", tuple(range(1, 31))),
        measure("total", decimals(9.5, 950.0, 12.5)),
        text("status", ("Shipped", "Pending", "Cancelled", "Delivered", "Returned")),
    )),
    Table("books", "book", (
        text("title", ("Silent River", "The Glass Garden", "Northern Lights", "A Winter Journey",
                       "The Last Harbor", "Paper Moons", "The Iron Key", "Salt and Stone")),
        text("author", PEOPLE),
        text("genre", ("Mystery", "Fantasy", "Romance", "History", "Science", "Poetry", "Biography")),
        measure("pages", tuple(range(120, 901, 20))),
        year("publication_year"),
        measure("price", decimals(4.99, 39.99, 1.0)),
    )),
    Table("films", "film", (
        text("title", ("Blue Horizon", "Midnight Express Line", "The Quiet Storm", "Desert Echo",
                       "City of Kites", "Second Chance", "The Long Road", "Falling Stars")),
        text("director", PEOPLE),
        text("genre", ("Drama", "Comedy", "Thriller", "Horror", "Documentary", "Animation", "Action")),
        year("release_year"),
        measure("rating", decimals(1.0, 9.9, 0.1)),
        measure("runtime", tuple(range(75, 201, 5))),
    )),
    Table("cities", "city", (
        text("name", CITIES),
        text("country", COUNTRIES),
        measure("population", money(50000, 9000000, 50000)),
        measure("area", decimals(20.5, 2500.5, 10.0)),
        year("founded", tuple(range(800, 1901, 25))),
    )),
    Table("students", "student", (
        text("name", PEOPLE),
        text("major", ("Biology", "History", "Physics", "Economics", "Music", "Chemistry", "Philosophy")),
        measure("gpa", decimals(2.0, 4.0, 0.1)),
        measure("age", tuple(range(17, 31))),
        text("hometown", CITIES),
        year("enrollment_year", tuple(range(2010, 2024))),
    )),
    Table("flights", "flight", (
        text("flight_number", ("AF101", "BA202", "LH303", "IB404", "AZ505", "KL606", "UA707", "JL808")),
        text("origin", CITIES),
        text("destination", CITIES),
        text("airline", ("Air France", "Lufthansa", "Iberia", "United", "Qantas", "Emirates", "KLM")),
        measure("distance", tuple(range(300, 12001, 100))),
        measure("price", decimals(49.0, 1499.0, 25.0)),
    )),
    Table("products", "product", (
        text("name", ("Coffee Maker", "Blender", "Toaster", "Vacuum Cleaner", "Air Fryer", "Kettle", "Fan")),
        text("category", ("Kitchen", "Cleaning", "Garden", "Electronics", "Furniture", "Toys")),
        text("brand", ("Acme", "Nordia", "Sunway", "Kobalt", "Veloce", "Brightline")),
        measure("price", decimals(9.99, 499.99, 5.0)),
        measure("stock", tuple(range(0, 501, 5))),
    )),
    Table("matches", "match", (
        text("home_team", ("Lions", "Eagles", "Sharks", "Wolves", "Tigers", "Falcons", "Bears", "Rangers")),
        text("away_team", ("Comets", "Pirates", "Giants", "Hornets", "Kings", "Rockets", "Bulls", "Storm")),
        measure("home_score", tuple(range(0, 9))),
        measure("away_score", tuple(range(0, 9))),
        year("season", tuple(range(2000, 2024))),
        text("venue", ("Central Stadium", "Riverside Park", "North Arena", "Harbor Field", "Victory Ground")),
    )),
    Table("patients", "patient", (
        text("name", PEOPLE),
        text("ward", ("Cardiology", "Neurology", "Oncology", "Pediatrics", "Orthopedics", "Maternity")),
        text("doctor", ("Dr. Adams", "Dr. Baker", "Dr. Clarke", "Dr. Evans", "Dr. Flores", "Dr. Gupta")),
        measure("age", tuple(range(1, 96))),
        measure("days_admitted", tuple(range(1, 61))),
    )),
    Table("songs", "song", (
        text("title", ("Golden Hour", "Paper Planes", "Ocean Drive", "Wildfire", "Neon Nights",
                       "Slow Dancing", "Homeward", "Echoes")),
        text("artist", PEOPLE),
        text("album", ("First Light", "Open Roads", "Blue Rooms", "Static", "Northbound", "Velvet")),
        year("release_year"),
        measure("duration_seconds", tuple(range(120, 421, 5))),
        measure("plays", money(1000, 5000000, 1000)),
    )),
    Table("restaurants", "restaurant", (
        text("name", ("Casa Verde", "The Golden Spoon", "Sakura House", "Le Petit Bistro", "Spice Route",
                      "Harbor Grill", "Mama Rosa")),
        text("cuisine", ("Italian", "Japanese", "Mexican", "French", "Indian", "Thai", "Greek")),
        text("city", CITIES),
        measure("rating", decimals(1.0, 5.0, 0.1)),
        measure("seats", tuple(range(10, 201, 5))),
    )),
    Table("cars", "car", (
        text("make", ("Toyota", "Ford", "Honda", "Volkswagen", "Fiat", "Kia", "Volvo", "Renault")),
        text("model", ("Corolla", "Focus", "Civic", "Golf", "Panda", "Rio", "Clio", "Yaris")),
        year("model_year", tuple(range(2000, 2025))),
        measure("price", money(3000, 60000, 500)),
        text("fuel_type", ("Petrol", "Diesel", "Electric", "Hybrid")),
        measure("mileage", money(0, 250000, 5000)),
    )),
    Table("hotels", "hotel", (
        text("name", ("Grand Plaza", "Seaside Inn", "Mountain Lodge", "City Central", "Royal Palm", "Old Mill")),
        text("city", CITIES),
        measure("stars", tuple(range(1, 6))),
        measure("rooms", tuple(range(10, 601, 10))),
        measure("price_per_night", decimals(39.0, 599.0, 10.0)),
    )),
    Table("athletes", "athlete", (
        text("name", PEOPLE),
        text("country", COUNTRIES),
        text("sport", ("Swimming", "Cycling", "Rowing", "Judo", "Fencing", "Athletics", "Tennis", "Boxing")),
        measure("medals", tuple(range(0, 16))),
        measure("age", tuple(range(16, 41))),
    )),
    Table("courses", "course", (
        text("title", ("Linear Algebra", "World History", "Organic Chemistry", "Macroeconomics",
                       "Creative Writing", "Data Structures", "Music Theory")),
        text("department", ("Mathematics", "History", "Chemistry", "Economics", "English", "Computing")),
        text("instructor", PEOPLE),
        measure("credits", tuple(range(1, 7))),
        measure("enrollment", tuple(range(5, 401, 5))),
    )),
    Table("museums", "museum", (
        text("name", ("National Gallery", "Science Center", "Maritime Museum", "Modern Art House",
                      "Natural History Hall", "Railway Museum")),
        text("city", CITIES),
        year("opened", tuple(range(1850, 2021, 5))),
        measure("visitors", money(10000, 8000000, 10000)),
        measure("ticket_price", decimals(0.0, 30.0, 0.5)),
    )),
    Table("players", "player", (
        text("name", PEOPLE),
        text("team", ("Lions", "Eagles", "Sharks", "Wolves", "Tigers", "Falcons", "Bears", "Rangers")),
        text("position", ("Goalkeeper", "Defender", "Midfielder", "Forward")),
        text("nationality", COUNTRIES),
        measure("goals", tuple(range(0, 41))),
        measure("age", tuple(range(17, 39))),
    )),
    Table("video_games", "video game", (
        text("title", ("Star Quest", "Dungeon Run", "Speed Circuit", "Farm Life", "Sky Pirates", "Puzzle Tower")),
        text("publisher", ("Nimbus", "Redleaf", "Pixelworks", "Orbit Games", "Blue Fox")),
        text("platform", ("PC", "Switch", "PlayStation", "Xbox", "Mobile")),
        year("release_year", tuple(range(1995, 2024))),
        measure("copies_sold", money(10000, 20000000, 10000)),
    )),
)


def literal(value) -> str:
    return f'"{value}"' if isinstance(value, str) else str(value)


def condition_phrase(rng: random.Random, column: Column, value) -> str:
    return rng.choice((
        f"whose {column.phrase} is {value}",
        f"with {column.phrase} {value}",
        f"where the {column.phrase} is {value}",
    ))


def filter_column(rng: random.Random, table: Table) -> Column:
    return rng.choice(table.of_kinds("text", "year"))


# Each shape takes (rng, table) and returns (question, query). Shapes pick the
# columns their operation makes sense for; see Column.kind.


def select_where(rng, table):
    filtered = filter_column(rng, table)
    selected = rng.choice([c for c in table.columns if c != filtered])
    value = rng.choice(filtered.values)
    condition = condition_phrase(rng, filtered, value)
    question = rng.choice((
        f"What is the {selected.phrase} of the {table.singular} {condition}?",
        f"What is the {selected.phrase} when the {filtered.phrase} is {value}?",
        f"Show the {selected.phrase} of {table.plural} {condition}.",
        f"List the {selected.phrase} for {table.plural} {condition}.",
    ))
    query = f"SELECT {selected.name} FROM {table.name} WHERE {filtered.name} = {literal(value)}"
    return question, query


def count_where(rng, table):
    filtered = filter_column(rng, table)
    value = rng.choice(filtered.values)
    condition = condition_phrase(rng, filtered, value)
    question = rng.choice((
        f"How many {table.plural} are there {condition}?",
        f"Count the {table.plural} {condition}.",
        f"What is the number of {table.plural} {condition}?",
    ))
    return question, f"SELECT COUNT(*) FROM {table.name} WHERE {filtered.name} = {literal(value)}"


AGGREGATE_WORDS = {
    ("MIN", "measure"): ("lowest", "smallest", "minimum"),
    ("MAX", "measure"): ("highest", "largest", "maximum"),
    ("SUM", "measure"): ("total",),
    ("AVG", "measure"): ("average", "mean"),
    ("MIN", "year"): ("earliest", "first"),
    ("MAX", "year"): ("latest", "most recent"),
}


def aggregate_where(rng, table):
    aggregated = rng.choice(table.of_kinds("year", "measure"))
    function = rng.choice([f for f, kind in AGGREGATE_WORDS if kind == aggregated.kind])
    word = rng.choice(AGGREGATE_WORDS[function, aggregated.kind])
    filtered = rng.choice([c for c in table.of_kinds("text", "year") if c != aggregated])
    value = rng.choice(filtered.values)
    condition = condition_phrase(rng, filtered, value)
    question = rng.choice((
        f"What is the {word} {aggregated.phrase} of {table.plural} {condition}?",
        f"Find the {word} {aggregated.phrase} for {table.plural} {condition}.",
        f"Give the {word} {aggregated.phrase} among {table.plural} {condition}.",
    ))
    query = f"SELECT {function}({aggregated.name}) FROM {table.name} WHERE {filtered.name} = {literal(value)}"
    return question, query


def two_conditions(rng, table):
    first, second = rng.sample(table.of_kinds("text", "year"), 2)
    selected = rng.choice([c for c in table.columns if c not in (first, second)])
    first_value, second_value = rng.choice(first.values), rng.choice(second.values)
    if rng.random() < 0.5:
        question = rng.choice((
            f"What is the {selected.phrase} of the {table.singular} whose {first.phrase} is {first_value}"
            f" and whose {second.phrase} is {second_value}?",
            f"Show the {selected.phrase} of {table.plural} with {first.phrase} {first_value}"
            f" and {second.phrase} {second_value}.",
            f"What is the {selected.phrase} when the {first.phrase} is {first_value}"
            f" and the {second.phrase} is {second_value}?",
        ))
        joiner = "AND"
    else:
        question = rng.choice((
            f"List the {selected.phrase} of {table.plural} whose {first.phrase} is {first_value}"
            f" or whose {second.phrase} is {second_value}.",
            f"Show the {selected.phrase} for {table.plural} with {first.phrase} {first_value}"
            f" or {second.phrase} {second_value}.",
        ))
        joiner = "OR"
    query = (
        f"SELECT {selected.name} FROM {table.name} WHERE {first.name} = {literal(first_value)}"
        f" {joiner} {second.name} = {literal(second_value)}"
    )
    return question, query


COMPARISON_WORDS = {
    (">", "measure"): ("greater than", "more than", "above", "over"),
    ("<", "measure"): ("less than", "below", "under"),
    (">", "year"): ("after", "later than"),
    ("<", "year"): ("before", "earlier than"),
}


def comparison(rng, table):
    compared = rng.choice(table.of_kinds("year", "measure"))
    operator = rng.choice((">", "<"))
    word = rng.choice(COMPARISON_WORDS[operator, compared.kind])
    value = rng.choice(compared.values)
    if rng.random() < 0.5:
        selected = rng.choice(table.of_kinds("text"))
        question = rng.choice((
            f"List the {selected.phrase} of {table.plural} with {compared.phrase} {word} {value}.",
            f"Which {selected.phrase} belongs to {table.plural} whose {compared.phrase} is {word} {value}?",
            f"Show the {selected.phrase} of every {table.singular} with a {compared.phrase} {word} {value}.",
        ))
        selection = selected.name
    else:
        question = rng.choice((
            f"How many {table.plural} have a {compared.phrase} {word} {value}?",
            f"Count the {table.plural} whose {compared.phrase} is {word} {value}.",
        ))
        selection = "COUNT(*)"
    return question, f"SELECT {selection} FROM {table.name} WHERE {compared.name} {operator} {value}"


ORDER_WORDS = {
    ("DESC", "measure"): ("highest", "largest"),
    ("ASC", "measure"): ("lowest", "smallest"),
    ("DESC", "year"): ("latest", "most recent"),
    ("ASC", "year"): ("earliest",),
}


def order_limit(rng, table):
    ordered = rng.choice(table.of_kinds("year", "measure"))
    selected = rng.choice(table.of_kinds("text"))
    direction = rng.choice(("DESC", "ASC"))
    word = rng.choice(ORDER_WORDS[direction, ordered.kind])
    count = rng.randint(1, 5)
    if count == 1:
        question = rng.choice((
            f"What is the {selected.phrase} of the {table.singular} with the {word} {ordered.phrase}?",
            f"Which {table.singular} has the {word} {ordered.phrase}? Give its {selected.phrase}.",
        ))
    else:
        question = rng.choice((
            f"List the {selected.phrase} of the {count} {table.plural} with the {word} {ordered.phrase}.",
            f"Which {count} {table.plural} have the {word} {ordered.phrase}? Show their {selected.phrase}.",
        ))
    descending = " DESC" if direction == "DESC" else ""
    return question, f"SELECT {selected.name} FROM {table.name} ORDER BY {ordered.name}{descending} LIMIT {count}"


def count_distinct(rng, table):
    counted, filtered = rng.sample(table.of_kinds("text", "year"), 2)
    value = rng.choice(filtered.values)
    condition = condition_phrase(rng, filtered, value)
    question = rng.choice((
        f"How many different {counted.phrase} values are there for {table.plural} {condition}?",
        f"Count the distinct {counted.phrase} values among {table.plural} {condition}.",
        f"How many unique {counted.phrase} values do {table.plural} {condition} have?",
    ))
    query = f"SELECT COUNT(DISTINCT {counted.name}) FROM {table.name} WHERE {filtered.name} = {literal(value)}"
    return question, query


def group_by(rng, table):
    grouped = rng.choice(table.of_kinds("text"))
    if rng.random() < 0.5:
        question = rng.choice((
            f"How many {table.plural} are there for each {grouped.phrase}?",
            f"Count the {table.plural} in each {grouped.phrase}.",
            f"Show every {grouped.phrase} with its number of {table.plural}.",
        ))
        return question, f"SELECT {grouped.name}, COUNT(*) FROM {table.name} GROUP BY {grouped.name}"
    averaged = rng.choice(table.of_kinds("measure"))
    question = rng.choice((
        f"What is the average {averaged.phrase} of {table.plural} for each {grouped.phrase}?",
        f"Show each {grouped.phrase} with the average {averaged.phrase} of its {table.plural}.",
    ))
    return question, f"SELECT {grouped.name}, AVG({averaged.name}) FROM {table.name} GROUP BY {grouped.name}"


SHAPES = (
    select_where, count_where, aggregate_where, two_conditions, comparison, order_limit,
    count_distinct, group_by,
)

# Share of rows in the shape of real single-table questions (sql_wiki.py); the rest use the named tables
# above, with GROUP BY, ORDER BY, DISTINCT and a distractor table.
WIKI_SHARE = 0.8

# Share of rows whose context also declares an unrelated table, so that the
# model learns to pick the table the question names.
DISTRACTOR_TABLE_SHARE = 0.3

# The tables execution_match fills: a few rows each, enough for WHERE clauses,
# GROUP BY and LIMIT to tell queries apart.
ROWS_PER_TABLE = 6
QUERY_TIME_LIMIT_S = 1.0  # a prediction running longer is treated as failing


def normalize_sql(query: str) -> str:
    """A query's form for exact match, as WikiSQL's own logical-form accuracy compares queries: case
    ignored (literals too), quotes unified, punctuation spaced, and the conditions of a plain
    `WHERE a AND b` in any order, so formatting and condition order do not count."""
    parts = re.split(r"(\"[^\"]*\"|'[^']*')", " ".join(query.split()).rstrip(";"))
    literals, normalized = [], []
    for index, part in enumerate(parts):
        if index % 2:  # re.split puts the captured literals at odd indices; held aside while sorting
            literals.append('"' + part[1:-1].lower() + '"')
            normalized.append(f"\x00{len(literals) - 1}\x00")
        else:
            normalized.append(" ".join(re.sub(r"([(),=<>!*])", r" \1 ", part.lower()).split()))
    text = " ".join(p for p in normalized if p)
    head, where, conditions = text.partition(" where ")
    if where and not re.search(r"\b(or|group|order|limit|having|select|union|join)\b|[()]", conditions):
        text = head + where + " and ".join(sorted(conditions.split(" and "), key=lambda c: _restore(c, literals)))
    return _restore(text, literals)


def _restore(text: str, literals: list[str]) -> str:
    return re.sub(r"\x00(\d+)\x00", lambda match: literals[int(match.group(1))], text)


def parse_tables(context: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """(table, [(column, type)]) for each CREATE TABLE in a context."""
    tables = []
    for name, body in re.findall(r"CREATE TABLE (\w+) \(([^)]*)\)", context, flags=re.IGNORECASE):
        columns = [tuple((definition.split() + ["VARCHAR"])[:2]) for definition in body.split(",")]
        tables.append((name, [(column, sql_type.upper()) for column, sql_type in columns]))
    return tables


def condition_values(query: str) -> dict[str, list]:
    """Literals the query compares each column with, e.g. {"city": ["Paris"]}."""
    pattern = r"(\w+)\s*(?:=|!=|<>|>=|<=|>|<)\s*(\"[^\"]*\"|'[^']*'|-?\d+(?:\.\d+)?)"
    values = {}
    for column, token in re.findall(pattern, query):
        if token[0] in "\"'":
            value = token[1:-1]
        else:
            value = float(token) if "." in token else int(token)
        values.setdefault(column.lower(), []).append(value)
    return values


def cell_value(rng: random.Random, column: str, sql_type: str, candidates: list):
    """A value near what the query looks for half of the time, filler otherwise."""
    if candidates and rng.random() < 0.5:
        value = rng.choice(candidates)
        if isinstance(value, str):
            return value
        return value + rng.choice((-2, -1, 0, 1, 2)) * max(1, abs(value) // 10)
    if sql_type == "INTEGER":
        return rng.randint(0, 100)
    if sql_type == "REAL":
        return round(rng.uniform(0, 100), 2)
    return f"{column}_{rng.randint(1, 3)}"


def build_database(context: str, reference: str) -> sqlite3.Connection:
    """An in-memory database of the context's tables, filled with rows derived
    from the reference's literals. The first row satisfies every equality in
    the reference, so its WHERE clause matches something."""
    rng = random.Random(context + reference)
    wanted = condition_values(reference)
    connection = sqlite3.connect(":memory:")
    connection.executescript(context)
    for table, columns in parse_tables(context):
        for row_index in range(ROWS_PER_TABLE):
            row = [
                wanted[column.lower()][0] if row_index == 0 and column.lower() in wanted
                else cell_value(rng, column, sql_type, wanted.get(column.lower(), []))
                for column, sql_type in columns
            ]
            placeholders = ", ".join("?" * len(row))
            connection.execute(f"INSERT INTO {table} VALUES ({placeholders})", row)
    return connection


def run_query(context: str, reference: str, query: str) -> list | None:
    """The rows `query` returns on the database for (context, reference), or
    None when it fails, returns no result table, or runs past the time limit."""
    deadline = time.monotonic() + QUERY_TIME_LIMIT_S
    try:
        connection = build_database(context, reference)
        connection.set_progress_handler(lambda: time.monotonic() > deadline, 1000)
        cursor = connection.execute(query)
        if cursor.description is None:
            return None
        return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in cursor.fetchall()]
    except (sqlite3.Error, OverflowError):
        return None


def same_result(predicted: list | None, expected: list | None, ordered: bool) -> bool:
    if predicted is None or expected is None:
        return False
    if ordered:
        return predicted == expected
    return sorted(predicted, key=repr) == sorted(expected, key=repr)


class SqlTask(Task):
    name = "sql"
    notebook = "02_english_to_sql.ipynb"  # rendered from notebooks/templates by tools/render_notebooks.py, run by jobs/finetune_sql.py
    title = "English-to-SQL"
    hub_dataset = "philschmid/sql-create-context-copy"
    fields = ("context", "question", "answer")
    answer_field = "answer"
    prompt_template = "<TABLE>: {context}\n<QUESTION>: {question}\n<SQL>:"
    chat_request = "Write the SQLite query that answers the question about these tables.\n{context}\nQuestion: {question}"
    max_new_tokens = 96
    metrics = ("exact_match", "executable", "execution_match")
    headline_metric = "exact_match"
    recipes = {
        "cpu": dict(train_rows=500, max_seq_length=256, batch_size=2, learning_rate=1e-3, packing=False),
        # 64 packed rows a step without checkpointing, chosen on the embedded model (one run each): on an H200
        # 7.2x the tokens/s of 16 rows with it (5.9x on real rows) at the same exact match on WikiSQL dev;
        # 128 rows trains faster still but scores lower (docs/QUALITY.md)
        "gpu": dict(train_rows=20000, max_seq_length=512, batch_size=64, learning_rate=2e-3, num_epochs=4.0,
                    eval_rows=300, prompt_format="chat", gradient_checkpointing=False, lora_dropout=0.0),
    }

    def make_row(self, rng: random.Random) -> dict:
        if rng.random() < WIKI_SHARE:
            return wiki_row(rng)
        table = rng.choice(TABLES)
        question, answer = rng.choice(SHAPES)(rng, table)
        statements = [table.create_statement]
        if rng.random() < DISTRACTOR_TABLE_SHARE:
            distractor = rng.choice([t for t in TABLES if t != table])
            statements.insert(rng.randint(0, 1), distractor.create_statement)
        return {"context": "; ".join(statements), "question": question, "answer": answer}

    def data_check(self, rows: list[dict]) -> dict:
        return {"schema": check_schemas(rows).as_dict()} if rows else {}

    def data_warnings(self, rows: list[dict], source: str = "these rows") -> list[str]:
        warning = pruned_warning(check_schemas(rows), source) if rows else None
        return [warning] if warning else []

    def compute_metrics(self, predictions: list[str], rows: list[dict]) -> dict[str, float]:
        """exact_match compares normalize_sql forms; executable and execution_match
        run each query on the database build_database makes for its row."""
        executable = matches = 0
        for prediction, row in zip(predictions, rows):
            predicted = run_query(row["context"], row["answer"], prediction)
            expected = run_query(row["context"], row["answer"], row["answer"])
            ordered = "order by" in normalize_sql(row["answer"])
            executable += predicted is not None
            matches += same_result(predicted, expected, ordered)
        return {
            "exact_match": exact_match_rate(predictions, self.references(rows), normalize_sql),
            "executable": executable / len(rows),
            "execution_match": matches / len(rows),
        }
