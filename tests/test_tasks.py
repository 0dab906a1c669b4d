"""Tests of lib.tasks: row formats, generators, splits and metrics.

Run: python -m pytest tests/test_tasks.py
"""

import sqlite3

import pytest

from lib.tasks.sql import normalize_sql
from lib.tasks import TASKS, get_task
from lib.tasks.detox import SITUATIONS, rude_lexicon, OPENERS, chrf, rude_word_rate, toxic_input_rude_word_rate
from lib.tasks.instruction import rouge_l
from lib.tasks.sql import TABLES

ROWS = 2000
ANSWER_TAGS = {"instruction": "<Response>:", "sql": "<SQL>:", "detox": "<Neutral>:"}


@pytest.fixture(scope="module")
def rows_by_task():
    return {name: task.generate(ROWS, seed=0) for name, task in TASKS.items()}


@pytest.fixture(params=sorted(TASKS))
def task(request):
    return TASKS[request.param]


def test_get_task_names_the_setting_the_value_and_the_choices():
    with pytest.raises(ValueError) as error:
        get_task("nope")
    assert "task" in str(error.value) and "'nope'" in str(error.value)
    assert all(name in str(error.value) for name in ("instruction", "sql", "detox"))
    assert get_task("sql") is TASKS["sql"]


def test_generate_is_deterministic_per_seed(task):
    assert task.generate(50, seed=1) == task.generate(50, seed=1)
    assert task.generate(50, seed=1) != task.generate(50, seed=2)


def test_generate_makes_distinct_prompts(task, rows_by_task):
    rows = rows_by_task[task.name]
    assert len(rows) == ROWS
    assert len({task.prompt(row) for row in rows}) == ROWS


def test_rows_have_exactly_the_fields_as_strings(task, rows_by_task):
    for row in rows_by_task[task.name]:
        assert tuple(row) == task.fields
        assert all(isinstance(value, str) for value in row.values())


def test_text_is_prompt_then_spaced_answer(task, rows_by_task):
    for row in rows_by_task[task.name]:
        prompt, completion = task.prompt(row), task.completion(row)
        assert task.text(row) == prompt + completion
        assert prompt.endswith(ANSWER_TAGS[task.name])
        assert completion == " " + row[task.answer_field]
        assert completion.strip() == completion[1:]  # may span lines; no whitespace at either end


def test_max_new_tokens_leaves_headroom(task, rows_by_task):
    # SmolLM2 averages about 3.5 characters a token; 2 leaves room for
    # unlucky splits.
    longest = max(len(row[task.answer_field]) for row in rows_by_task[task.name])
    assert longest / 2 <= task.max_new_tokens


def test_embedded_splits_are_disjoint_and_eval_ignores_train_size(task):
    train, evaluation = task.embedded_splits(train_rows=300, eval_rows=50, seed=3)
    assert (len(train), len(evaluation)) == (300, 50)
    assert not {task.prompt(r) for r in train} & {task.prompt(r) for r in evaluation}
    assert task.embedded_splits(train_rows=300, eval_rows=50, seed=3) == (train, evaluation)
    assert task.embedded_splits(train_rows=100, eval_rows=50, seed=3)[1] == evaluation


def test_embedded_splits_reject_empty_sizes(task):
    with pytest.raises(ValueError, match="train_rows"):
        task.embedded_splits(train_rows=0, eval_rows=5, seed=0)


def test_generator_reaches_twenty_thousand_rows(task):
    assert len(task.generate(20_000, seed=0)) == 20_000


def test_clean_keeps_multi_line_answers_stripped(task):
    assert task.clean("  the answer \nmore text\n") == "the answer \nmore text"


def test_tags_format_stops_at_the_next_tag(task):
    from lib.prompts import PromptFormat, tag_markers

    fmt = PromptFormat.build("tags", task)
    assert fmt.stop_strings == tag_markers(task.prompt_template) and len(fmt.stop_strings) >= 2
    assert fmt.clean(" line one\nline two\n" + fmt.stop_strings[0] + " more") == "line one\nline two"


def test_references_score_perfectly(task, rows_by_task):
    rows = rows_by_task[task.name][:200]
    scores = task.score([row[task.answer_field] for row in rows], rows)
    assert set(scores) == set(task.metrics) and task.headline_metric in task.metrics
    assert scores["exact_match"] == 1.0


def test_score_rejects_mismatched_lengths(task, rows_by_task):
    rows = rows_by_task[task.name][:3]
    with pytest.raises(ValueError, match="3 rows"):
        task.score(["x", "y"], rows)


# SQL


SQL_ROW = {
    "context": "CREATE TABLE employees (name VARCHAR, department VARCHAR, salary INTEGER, city VARCHAR)",
    "question": "What is the salary of the employee whose name is Maria Lopez?",
    "answer": 'SELECT salary FROM employees WHERE name = "Maria Lopez"',
}


def test_sql_answers_execute_against_their_context(rows_by_task):
    for row in rows_by_task["sql"]:
        connection = sqlite3.connect(":memory:")
        connection.executescript(row["context"])
        connection.execute(row["answer"]).fetchall()


def test_sql_covers_every_query_shape(rows_by_task):
    answers = " ".join(row["answer"] for row in rows_by_task["sql"])
    for keyword in ("COUNT(*)", "MIN(", "MAX(", "SUM(", "AVG(", "ORDER BY", "LIMIT", " AND ", " OR ",
                    "COUNT(DISTINCT", "GROUP BY", " > ", " < ", "DESC"):
        assert keyword in answers, keyword


def test_sql_uses_many_tables_and_some_distractors(rows_by_task):
    contexts = [row["context"] for row in rows_by_task["sql"]]
    assert len({table.name for table in TABLES if any(table.create_statement in c for c in contexts)}) >= 15
    assert any(context.count("CREATE TABLE") == 2 for context in contexts)


def test_sql_values_cannot_be_read_as_column_names():
    # A double-quoted literal naming a column would silently compare with it.
    column_names = {column.name.lower() for table in TABLES for column in table.columns}
    values = {str(v).lower() for table in TABLES for column in table.columns for v in column.values}
    assert not column_names & values


def test_sql_values_in_questions_appear_verbatim_in_queries(rows_by_task):
    for row in rows_by_task["sql"][:300]:
        for literal in row["answer"].split('"')[1::2]:
            assert literal in row["question"]


def test_sql_reformatted_reference_is_an_exact_match():
    reformatted = "select  salary from EMPLOYEES where name='Maria Lopez' ;"
    scores = get_task("sql").score([reformatted], [SQL_ROW])
    assert scores == {"exact_match": 1.0, "executable": 1.0, "execution_match": 1.0}


def test_sql_exact_match_ignores_literal_case_and_condition_order_as_wikisql_does():
    """WikiSQL's logical-form accuracy lowercases values and compares conditions as a set; execution does not
    (SQLite compares text with its case)."""
    scores = get_task("sql").score(['SELECT salary FROM employees WHERE name = "maria lopez"'], [SQL_ROW])
    assert scores["exact_match"] == 1.0 and scores["executable"] == 1.0 and scores["execution_match"] == 0.0
    row = {"context": "CREATE TABLE t (a VARCHAR, b VARCHAR, c VARCHAR)", "question": "?",
           "answer": 'SELECT a FROM t WHERE b = "x" AND c > 3'}
    assert get_task("sql").score(['SELECT a FROM t WHERE c > 3 AND b = "X"'], [row])["exact_match"] == 1.0
    assert get_task("sql").score(['SELECT a FROM t WHERE c > 3 OR b = "X"'], [row])["exact_match"] == 0.0
    swapped = normalize_sql('SELECT a FROM t WHERE c = "a and b" AND d = "c and e"')
    assert swapped != normalize_sql('SELECT a FROM t WHERE c = "a and e" AND d = "c and b"')
    assert swapped == normalize_sql('select a from t where d = "C and E" and c = "a AND b"')


def test_sql_wrong_but_valid_query_executes_without_matching():
    wrong = 'SELECT city FROM employees WHERE name = "Maria Lopez"'
    scores = get_task("sql").score([wrong], [SQL_ROW])
    assert scores == {"exact_match": 0.0, "executable": 1.0, "execution_match": 0.0}


def test_sql_garbage_scores_zero(rows_by_task):
    rows = rows_by_task["sql"][:50]
    for garbage in ("", "the salary is high", "SELECT FROM WHERE", "DROP TABLE employees"):
        assert get_task("sql").score([garbage] * len(rows), rows) == {
            "exact_match": 0.0, "executable": 0.0, "execution_match": 0.0,
        }


def test_sql_runaway_query_is_stopped():
    endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT COUNT(*) FROM n"
    assert get_task("sql").score([endless], [SQL_ROW])["executable"] == 0.0


def test_sql_execution_match_ignores_row_order_without_order_by():
    row = dict(SQL_ROW, answer='SELECT name FROM employees WHERE city = "Paris" OR department = "Sales"')
    swapped = 'SELECT name FROM employees WHERE department = "Sales" OR city = "Paris"'
    scores = get_task("sql").score([swapped], [row])
    assert scores["exact_match"] == 0.0 and scores["execution_match"] == 1.0


# Detox


def test_detox_lexicon_is_large_and_every_rude_part_uses_it():
    assert len(rude_lexicon()) >= 800
    rude_parts = [rude for rude, _ in OPENERS]
    for situation in SITUATIONS:
        rude_parts += list(situation.insults) + [rude for rude, _ in situation.tails]
    assert rude_word_rate(rude_parts) == 1.0


def test_detox_references_are_clean_and_inputs_are_rude(rows_by_task):
    rows = rows_by_task["detox"]
    assert rude_word_rate([row["en_neutral_comment"] for row in rows]) == 0.0
    assert toxic_input_rude_word_rate(rows) == 1.0


def test_rude_words_match_whole_words_ignoring_case():
    assert rude_word_rate(["What the HELL is this"]) == 1.0
    assert rude_word_rate(["hello, a classic assessment"]) == 0.0


def test_chrf_bounds():
    assert chrf(["the printer is broken"], ["the printer is broken"]) == 100.0
    assert chrf(["xyz qqq"], ["the printer is broken"]) < 10
    assert 0 < chrf(["the printer is bad"], ["the printer is broken"]) < 100


def test_detox_copying_the_input_is_rude_and_imperfect(rows_by_task):
    rows = rows_by_task["detox"][:200]
    scores = get_task("detox").score([row["en_toxic_comment"] for row in rows], rows)
    assert scores["rude_word_rate"] == 1.0 and scores["exact_match"] == 0.0 and scores["chrf"] < 100


# Instruction


def test_rouge_l_hand_checked():
    # LCS "the cat on the mat" = 5 tokens: precision 5/5, recall 5/6, F1 10/11.
    assert rouge_l("the cat on the mat", "The cat sat on the mat.") == pytest.approx(10 / 11)
    assert rouge_l("dog", "the cat sat") == 0.0
    assert rouge_l("", "the cat") == 0.0


def test_instruction_exact_match_ignores_case_and_surrounding_punctuation():
    row = {"instruction": "What is the plural of mouse?", "input": "", "response": "mice"}
    scores = get_task("instruction").score([" Mice."], [row])
    assert scores == {"exact_match": 1.0, "rouge_l": 1.0}
    assert get_task("instruction").score(["mouses"], [row]) == {"exact_match": 0.0, "rouge_l": 0.0}


def test_instruction_covers_many_kinds_with_and_without_input(rows_by_task):
    rows = rows_by_task["instruction"]
    assert len({row["instruction"] for row in rows}) >= 30
    assert any(row["input"] == "" for row in rows) and any(row["input"] for row in rows)


def test_instruction_opposites_have_one_right_answer():
    import random

    from lib.tasks.instruction import AMBIGUOUS, OPPOSITES, opposite

    rng = random.Random(0)
    asked = set()
    for _ in range(2000):
        instruction, word_input, answer = opposite(rng)
        word = word_input or next(w for pair in OPPOSITES for w in pair if f'"{w}"' in instruction
                                  or instruction.endswith(f" {w}."))
        assert word not in AMBIGUOUS and {word, answer} in [set(pair) for pair in OPPOSITES]
        asked.add(word)
    assert len(asked) >= len(OPPOSITES)  # every pair asked, both directions where they are unambiguous
