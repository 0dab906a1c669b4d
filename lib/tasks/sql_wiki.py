"""Questions about one Wikipedia-style table, as people ask them in real text-to-SQL sets (WikiSQL and the
sql-create-context rows drawn from it), over the WHOLE table.

What real rows look like, and this generator copies: the table is `table_name_<n>` or `table_<id>_<n>`; its
CREATE TABLE lists every column of the table in the table's own order (4-12 here), most of them unused by the
query, typed as the table holds them (REAL for most numeric columns, VARCHAR otherwise: never by what the
query does with them); column names are the table's headers made into names (`Win %` -> `win__percentage`,
`U.S. viewers (millions)` -> `us_viewers__millions_`); the question names columns loosely (the header, lower
or title case, without its parenthesis or punctuation), puts conditions in any order and phrasing ("with a
Matches smaller than 145", "after 1979", "when the location is ..."); values appear as the question writes
them, mostly lower case; numbers are unquoted, text double-quoted; one SELECT, at most one aggregate,
conditions joined by AND with =, < or >.

sql-create-context, the seed's data set, lists only the columns the answer uses: a model trained on that
learns to put every column it sees into the query, and fails on real tables (docs/QUALITY.md). So does a
generator that copies it; this one does not (lib/tasks/sql_schema.py measures it).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FIRST = ("john", "maria", "david", "anna", "michael", "sarah", "james", "laura", "robert", "elena", "thomas",
         "sofia", "peter", "julia", "mark", "nina", "carlos", "yuki", "ahmed", "olga", "luis", "greg", "kim")
LAST = ("smith", "jones", "garcia", "martin", "brown", "nielsen", "kowalski", "rossi", "tanaka", "dubois",
        "novak", "silva", "johnson", "walker", "schmidt", "petrov", "oconnor", "hughes", "lee", "fischer")
TEAMS = ("chicago", "boston", "detroit", "toronto", "new york", "los angeles", "miami", "denver", "phoenix",
         "seattle", "atlanta", "dallas", "portland", "ottawa", "houston", "cleveland", "st. louis")
CLUBS = ("fc porto", "ajax", "celtic", "benfica", "real madrid", "juventus", "everton", "lyon", "galatasaray",
         "rapid wien", "sparta prague", "dinamo zagreb", "hibernian", "feyenoord")
COUNTRIES = ("united states", "canada", "england", "france", "germany", "italy", "spain", "japan", "australia",
             "brazil", "argentina", "sweden", "norway", "south africa", "new zealand", "ireland", "mexico")
VENUES = ("wembley stadium", "twickenham, london", "memorial stadium", "victoria park", "city ground",
          "lakeside arena", "riverside park", "olympic stadium", "mcg", "hampden park", "princes park")
CITIES = ("springfield", "richmond", "salem", "franklin", "greenville", "bristol", "clinton", "fairview",
          "madison", "georgetown", "arlington", "ashland", "dover", "milton", "newport", "oxford")
MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")
PARTIES = ("democratic", "republican", "independent", "labour", "conservative", "liberal", "green")
WORDS = ("river", "night", "summer", "shadow", "home", "fire", "dream", "road", "heart", "storm", "light",
         "secret", "wild", "blue", "last", "gold", "silent", "broken", "little", "city")
SURFACES = ("clay", "hard", "grass", "carpet")
POSITIONS = ("guard", "forward", "center", "defenseman", "goaltender", "quarterback", "linebacker",
             "wide receiver", "pitcher", "midfielder", "defender", "striker")


def person(rng):
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def title(rng):
    return f"the {rng.choice(WORDS)} {rng.choice(WORDS)}" if rng.random() < 0.5 else \
        f"{rng.choice(WORDS)} of {rng.choice(WORDS)}s"


def date(rng):
    return f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(1950, 2012)}"


def score(rng):
    return f"{rng.randint(0, 6)}-{rng.randint(0, 6)}" if rng.random() < 0.5 else \
        f"{rng.randint(60, 130)}-{rng.randint(60, 130)}"


def record(rng):
    return f"{rng.randint(0, 15)}-{rng.randint(0, 15)}"


def ordinal(rng):
    n = rng.randint(1, 20)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def pick(pool):
    return lambda rng: rng.choice(pool)


def integer(low, high):
    return lambda rng: rng.randint(low, high)


def decimal(low, high, places=1):
    return lambda rng: round(rng.uniform(low, high), places)


def code(rng):
    return f"{rng.randint(1, 9)}{rng.choice('abcdefx')}{rng.choice('abkjz')}{rng.randint(1, 24):02d}"


@dataclass(frozen=True)
class Header:
    """A table header, how its values are made, and whether it is a measure (compared, aggregated)."""

    text: str  # as on the page: "Win %"
    values: object  # rng -> value
    numeric: bool = False  # numbers the question compares (<, >) and aggregates (MIN, MAX, AVG, SUM)
    who: bool = False  # a person: "who" questions

    @property
    def column(self) -> str:
        return column_name(self.text)


def column_name(header: str) -> str:
    """A header as sql-create-context names its column: lower case, % spelt out, other marks as _."""
    name = header.lower().replace("%", "_percentage").replace(".", "")
    return re.sub(r"[^\w]", "_", name)


H = Header
TABLES = (
    (H("Year", integer(1950, 2012), True), H("Team", pick(TEAMS)), H("Wins", integer(0, 20), True),
     H("Losses", integer(0, 20), True), H("Points", integer(0, 120), True), H("Position", ordinal),
     H("Class", pick(("125cc", "250cc", "350cc", "500cc", "gt2", "lmp1"))), H("Win %", decimal(10, 90))),
    (H("Date", date), H("Opponent", pick(TEAMS)), H("Score", score), H("Result", pick(("w", "l", "win", "loss"))),
     H("Attendance", integer(1000, 80000), True), H("Record", record), H("Week", integer(1, 17), True),
     H("Venue", pick(VENUES))),
    (H("District", lambda rng: f"{rng.choice(('ohio', 'texas', 'georgia', 'new york'))} {rng.randint(1, 20)}"),
     H("Incumbent", person, who=True), H("Party", pick(PARTIES)), H("First elected", integer(1950, 2010), True),
     H("Result", pick(("re-elected", "retired", "lost re-election", "defeated"))),
     H("Votes", integer(1000, 90000), True), H("%", decimal(1, 70))),
    (H("No. in series", integer(1, 150), True), H("No. in season", integer(1, 24), True), H("Title", title),
     H("Directed by", person, who=True), H("Written by", person, who=True), H("Original air date", date),
     H("Production code", code), H("U.S. viewers (millions)", decimal(1, 25, 2), True)),
    (H("Player", person, who=True), H("Position", pick(POSITIONS)), H("Nationality", pick(COUNTRIES)),
     H("Round", integer(1, 10), True), H("Pick", integer(1, 250), True), H("College", pick(CITIES)),
     H("School/Club Team", pick(CLUBS)), H("Height", lambda rng: f"{rng.randint(5, 7)}-{rng.randint(0, 11)}")),
    (H("Place", ordinal), H("Player", person, who=True), H("Country", pick(COUNTRIES)),
     H("Score", integer(64, 80), True), H("To par", lambda rng: rng.choice(("e", f"+{rng.randint(1, 9)}",
                                                                           f"-{rng.randint(1, 9)}"))),
     H("Money ($)", integer(1000, 900000), True)),
    (H("Rank", integer(1, 30), True), H("Nation", pick(COUNTRIES)), H("Gold", integer(0, 40), True),
     H("Silver", integer(0, 40), True), H("Bronze", integer(0, 40), True), H("Total", integer(0, 100), True)),
    (H("Outcome", pick(("winner", "runner-up"))), H("Date", date), H("Tournament", pick(CITIES)),
     H("Surface", pick(SURFACES)), H("Opponent in the final", person, who=True),
     H("Score in the final", lambda rng: f"{rng.randint(0, 7)}-{rng.randint(0, 7)}, {rng.randint(0, 7)}-{rng.randint(0, 7)}")),
    (H("Driver", person, who=True), H("Constructor", pick(("ferrari", "mclaren", "williams", "lotus", "brabham"))),
     H("Laps", integer(1, 80), True), H("Time/Retired", pick(("+1 lap", "engine", "accident", "gearbox", "+2 laps"))),
     H("Grid", integer(1, 26), True)),
    (H("Home team", pick(TEAMS)), H("Home team score", lambda rng: f"{rng.randint(5, 20)}.{rng.randint(5, 20)} "
                                                                  f"({rng.randint(40, 130)})"),
     H("Away team", pick(TEAMS)), H("Crowd", integer(5000, 40000), True), H("Venue", pick(VENUES)), H("Date", date)),
    (H("Year", integer(1950, 2012), True), H("Title", title), H("Role", pick(("himself", "narrator", "host", "detective",
                                                                             "lead", "guest star"))),
     H("Director", person, who=True), H("Notes", pick(("cameo", "uncredited", "tv movie", "voice", "lead role")))),
    (H("Year", integer(1960, 2012), True), H("Single", title), H("Chart", pick(("uk singles chart", "billboard hot 100",
                                                                               "us dance", "irish charts"))),
     H("Peak position", integer(1, 100), True), H("Album", title)),
    (H("School", lambda rng: f"{rng.choice(CITIES)} high school"), H("Location", pick(CITIES)),
     H("Mascot", pick(("tigers", "eagles", "bulldogs", "panthers", "wildcats", "falcons"))),
     H("Enrollment", integer(100, 3000), True), H("IHSAA Class", pick(("a", "aa", "aaa", "aaaa"))),
     H("County", lambda rng: f"{rng.randint(10, 99)} {rng.choice(CITIES)}")),
    (H("Name", person, who=True), H("Nationality", pick(COUNTRIES)), H("Time", decimal(9.5, 60, 2), True),
     H("Lane", integer(1, 8), True), H("Heat", integer(1, 6), True), H("Rank", integer(1, 40), True)),
    (H("Stage", integer(1, 21), True), H("Winner", person, who=True), H("General classification", person),
     H("Points classification", person), H("Mountains classification", person),
     H("Team classification", pick(("team sky", "movistar", "rabobank", "festina", "once")))),
    (H("Model", lambda rng: f"{rng.choice(('xr', 'gt', 'sl', 'rs'))}{rng.randint(100, 900)}"),
     H("Engine", lambda rng: f"{rng.choice(('1.6', '2.0', '2.5', '3.0'))}l"), H("Power", integer(60, 400), True),
     H("Torque", integer(100, 600), True), H("Years", lambda rng: f"{rng.randint(1960, 2000)}-{rng.randint(2001, 2012)}")),
    (H("Season", lambda rng: f"{rng.randint(1960, 2011)}-{rng.randint(10, 99)}"), H("League", pick(("premier league",
                                                                                                     "division 1", "la liga"))),
     H("Games", integer(1, 82), True), H("Goals", integer(0, 60), True), H("Assists", integer(0, 60), True),
     H("Club", pick(CLUBS))),
    (H("Country", pick(COUNTRIES)), H("Capital", pick(CITIES)), H("Population", integer(10000, 9000000), True),
     H("Area (km²)", integer(100, 900000), True), H("Density", decimal(1, 900), True),
     H("Official language", pick(("english", "french", "spanish", "german", "arabic")))),
)

# question words for each aggregate; MIN/MAX/AVG/SUM need a numeric column
AGGREGATES = (("", 60), ("COUNT", 12), ("MAX", 8), ("MIN", 8), ("AVG", 6), ("SUM", 6))
AGGREGATE_WORDS = {
    "COUNT": ("how many", "what is the total number of", "what is the number of", "how many total",
              "what is the count of"),
    "MAX": ("what is the highest", "what is the largest", "what is the maximum", "which is the highest",
            "what is the most"),
    "MIN": ("what is the lowest", "what is the smallest", "what is the minimum", "which is the lowest",
            "what is the least"),
    "AVG": ("what is the average", "what is the mean", "what average"),
    "SUM": ("what is the total", "what is the sum of", "how much"),
}
AGGREGATE_NOUN = {"of": "total", "much": "total", "many": "total number of"}  # "... had what total Points?"
GREATER = ("larger than", "greater than", "more than", "over", "higher than", "bigger than", "above")
LESS = ("smaller than", "less than", "fewer than", "under", "lower than", "below")
YEAR_GREATER, YEAR_LESS = ("after", "later than"), ("before", "earlier than")


def header_phrase(rng, header: Header) -> str:
    """How a question names a column: its header loosely (loose_name), as written, in lower case, or title
    case."""
    text = loose_name(rng, header)
    style = rng.random()
    if style < 0.45:
        return text.lower()
    if style < 0.8:
        return text
    return text.title()


def condition_phrase(rng, header: Header, op: str, value_text: str) -> str:
    phrase = header_phrase(rng, header)
    if op == "=":
        return rng.choice((
            f"{phrase} of {value_text}", f"a {phrase} of {value_text}", f"{value_text} as the {phrase}",
            f"the {phrase} is {value_text}", f"{phrase} {value_text}", f"a {phrase} of {value_text}",
            f"the {phrase} was {value_text}", f"{value_text} {phrase}",
        ))
    is_year = "year" in header.text.lower() or header.text.lower() == "first elected"
    words = (YEAR_GREATER if op == ">" else YEAR_LESS) if is_year and rng.random() < 0.6 else \
        (GREATER if op == ">" else LESS)
    word = rng.choice(words)
    if word in YEAR_GREATER + YEAR_LESS:
        return rng.choice((f"a {phrase} {word} {value_text}", f"{word} {value_text}"))
    return rng.choice((f"a {phrase} {word} {value_text}", f"{phrase} {word} {value_text}",
                       f"{phrase} is {word} {value_text}"))


def join_conditions(rng, parts: list[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    glue = rng.choice((", and ", " and ", ", "))
    return glue.join(parts[:-1]) + rng.choice((" and ", ", and ")) + parts[-1]


def ask(rng, select: Header, aggregate: str, conditions: list[str]) -> str:
    target = header_phrase(rng, select)
    where = join_conditions(rng, conditions)
    if aggregate:
        lead = rng.choice(AGGREGATE_WORDS[aggregate])
        noun = AGGREGATE_NOUN.get(lead.split()[-1], lead.split()[-1])
        forms = (f"{lead} {target} when {where}?", f"{lead} {target} with {where}?",
                 f"{lead} {target} that has {where}?", f"{where} had what {noun} {target}?")
        if aggregate == "COUNT":
            forms += (f"how many {target} have {where}?", f"how many {target} are there for {where}?",
                      f"name the number of {target} for {where}")
        return rng.choice(forms)
    forms = (f"what is the {target} when {where}?", f"what {target} has {where}?",
             f"which {target} had {where}?", f"name the {target} for {where}",
             f"tell me the {target} for {where}", f"what was the {target} for {where}?",
             f"what is the {target} with {where}?", f"{where} has what {target}?",
             f"which {target} has {where}?")
    if select.who:
        forms += (f"who is the {target} with {where}?", f"who was the {target} when {where}?",
                  f"who has {where}?")
    return rng.choice(forms)


QUESTION_WORDS = ("what", "which", "who", "how", "name", "tell")


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def sql_value(value, columns: set[str] = frozenset()) -> str:
    """Numbers bare, text double-quoted, single-quoted where SQLite would read the double-quoted text as a
    column of the table (a Report column holding "report")."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return f"'{value}'" if str(value).lower() in columns else f'"{value}"'


# Columns real tables often carry besides their own, most of them never asked about; a table draws some to
# reach its size.
EXTRAS = (
    H("Notes", pick(("debut", "retired", "injured", "new record", "final season", "loan", "—"))),
    H("Ref.", lambda rng: f"[{rng.randint(1, 60)}]"),
    H("Source", pick(("official site", "census", "press release", "league data", "annual report"))),
    H("Region", pick(("north", "south", "east", "west", "central", "midwest"))),
    H("Status", pick(("active", "retired", "closed", "open", "defunct", "planned"))),
    H("Capacity", integer(500, 90000), True),
    H("Founded", integer(1850, 2010), True),
    H("Coach", person, who=True),
    H("Network", pick(("nbc", "cbs", "abc", "fox", "bbc one", "itv", "hbo"))),
    H("Length", lambda rng: f"{rng.randint(1, 9)}:{rng.randint(10, 59)}"),
    H("Height (m)", decimal(1.5, 2.2, 2), True),
    H("Weight (kg)", integer(50, 140), True),
    H("Location", pick(CITIES)),
    H("Report", pick(("report", "summary", "recap"))),
    H("Competition", pick(("league", "cup", "friendly", "playoffs", "world cup qualifier"))),
)
COLUMNS = (4, 12)  # a table's columns, at least and at most
REAL_SHARE = 0.8  # numeric columns typed REAL (the rest VARCHAR, as many real tables type numbers as text)


def whole_table(rng: random.Random) -> list[Header]:
    """One table's headers in its own order: a kind of table, some of its columns dropped or others added
    to reach 4-12 columns."""
    headers = list(rng.choice(TABLES))
    size = rng.randint(*COLUMNS)
    while len(headers) > max(size, COLUMNS[0]):
        headers.pop(rng.randrange(len(headers)))
    extras = [h for h in EXTRAS if h.column not in {header.column for header in headers}]
    rng.shuffle(extras)
    while len(headers) < size and extras:
        headers.insert(rng.randint(0, len(headers)), extras.pop())
    return headers


SHORT_NAME_SKIP = {"no.", "the", "in", "of", "by", "to", "a", "(m)", "(kg)", "$", "%"}


def loose_name(rng: random.Random, header: Header) -> str:
    """A header as a question names it: without its parenthesis or marks at times ("U.S. viewers (millions)"
    -> "u.s. viewers", "No. in series" -> "number in series"), or by one of its words ("Original air date" ->
    "date", "Directed by" -> "directed"), as people ask about real tables: the model must find the column."""
    text = header.text
    if rng.random() < 0.3:
        text = re.sub(r"\s*\([^)]*\)", "", text) or text
    if rng.random() < 0.3:
        text = re.sub(r"\bNo\.", "number", text)
    words = [word for word in text.split() if word.lower() not in SHORT_NAME_SKIP]
    if len(words) > 1 and rng.random() < 0.25:
        text = rng.choice((words[0], words[-1]))
    return text


def example_rows(rng: random.Random, headers: list[Header], count: int, wanted: dict[str, object]) -> str:
    """` /* N example rows: a | b; ... */` as tools/sql_data.py --sample-rows shows a real table's first rows:
    made-up cells, and half of the time one row holding a value the query looks for, as the table holds it."""
    rows = [[header.values(rng) for header in headers] for _ in range(count)]
    if wanted and rng.random() < 0.5:
        row = rng.choice(rows)
        for index, header in enumerate(headers):
            if header.column in wanted:
                row[index] = wanted[header.column]
    cells = "; ".join(" | ".join(str(cell) for cell in row) for row in rows)
    return f" /* {count} example rows: {cells} */"


def wiki_row(rng: random.Random, sample_rows: int = 0) -> dict:
    """One question, its whole table and its query, in the shape of WikiSQL's rows (with the table's first
    `sample_rows` rows shown after its CREATE TABLE)."""
    headers = whole_table(rng)
    weights = [weight for _, weight in AGGREGATES]
    aggregate = rng.choices([name for name, _ in AGGREGATES], weights)[0]
    numeric = [h for h in headers if h.numeric]
    if aggregate in ("MAX", "MIN", "AVG", "SUM") and numeric:
        select = rng.choice(numeric)
    else:
        aggregate = aggregate if aggregate in ("", "COUNT") else ""
        select = rng.choice(headers)
    others = [h for h in headers if h is not select]
    count = rng.choices((1, 2, 3, 4), (70, 22, 6, 2))[0]
    chosen = rng.sample(others, min(count, len(others)))
    original_case = rng.random() < 0.35  # table_<id>_<n> rows keep the page's capitals
    conditions, clauses, wanted = [], [], {}
    for header in chosen:
        value = header.values(rng)
        op = "="
        if header.numeric and rng.random() < 0.45:
            op = rng.choice((">", "<"))
        text = str(value)
        if original_case and isinstance(value, str):
            text = value.title() if rng.random() < 0.7 else value.upper() if len(value) < 8 else value
            value = text
        if op == "=":
            wanted[header.column] = value.title() if isinstance(value, str) else value
        conditions.append(condition_phrase(rng, header, op, text))
        clauses.append(f"{header.column} {op} {sql_value(value, {h.column for h in headers})}")
    question = ask(rng, select, aggregate, conditions)
    if question.startswith(QUESTION_WORDS) and rng.random() < 0.85:  # a value opening it keeps its case
        question = capitalize(question)
    table = f"table_{rng.randint(10**6, 3 * 10**7)}_{rng.randint(1, 9)}" if original_case else \
        f"table_name_{rng.randint(1, 99)}"
    selected = f"{aggregate}({select.column})" if aggregate else select.column
    columns = [f"{h.column} {'REAL' if h.numeric and rng.random() < REAL_SHARE else 'VARCHAR'}" for h in headers]
    shown = example_rows(rng, headers, sample_rows, wanted) if sample_rows else ""
    return {
        "context": f"CREATE TABLE {table} ({', '.join(columns)}){shown}",
        "question": question,
        "answer": f"SELECT {selected} FROM {table} WHERE {' AND '.join(clauses)}",
    }
