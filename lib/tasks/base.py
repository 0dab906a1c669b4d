"""The `Task` base class and the text helpers its subclasses share.

A task knows its data format (fields, prompt, completion), how to make rows
offline (`generate`, `embedded_splits`), and how to score cleaned predictions.
"""

import random
import string
from abc import ABC, abstractmethod

# How many draws `generate` may spend per requested row before it gives up: the
# generators repeat themselves rarely, so running out means the pool is too small.
DRAWS_PER_ROW = 20


class Task(ABC):
    """One fine-tuning task. Subclasses set the class attributes and implement
    `make_row` and `compute_metrics`."""

    name: str  # registry key, the value of the `task` setting
    notebook: str  # its notebook in notebooks/ (and job jobs/finetune_<name>.py), both rendered from one template
    title: str  # how prose names the adapter ("the English-to-SQL adapter")
    hub_dataset: str  # the online source of real rows
    fields: tuple[str, ...]  # the row's columns, named as in hub_dataset
    answer_field: str  # the column the model learns to write
    optional_fields: tuple[str, ...] = ()  # columns a data file may leave empty in every row
    prompt_template: str  # str.format template over fields, ending with the answer tag ("tags" format)
    chat_request: str  # str.format template over fields: the user's turn in the "chat" format
    max_new_tokens: int  # generation budget: the longest generated answer, with headroom
    metrics: tuple[str, ...]  # the keys `score` returns
    headline_metric: str  # the metric a chart shows first
    # Measured default recipes (docs/QUALITY.md), per device: only what differs from RunConfig's defaults.
    # "cpu" is sized for a workshop's 2 cores; "gpu" (chosen when CUDA is present) fills a GPU.
    recipes: dict[str, dict]
    chart_scale: dict[str, float] = {}  # metric -> divisor that puts it on the 0-1 axis of the charts

    def prompt(self, row: dict) -> str:
        """The inference prompt: the training text up to and including the answer tag."""
        return self.prompt_template.format(**row)

    def completion(self, row: dict) -> str:
        """The answer with its leading space, which belongs to the answer so that
        training and inference tokenize the prompt identically."""
        return " " + row[self.answer_field]

    def text(self, row: dict) -> str:
        """The training text; the trainer appends the end-of-sequence token."""
        return self.prompt(row) + self.completion(row)

    def clean(self, generated: str) -> str:
        """The answer inside raw generated text (already cut at the format's stop): trimmed. Answers may span
        several lines, and one-line tasks keep them too: an adapter stops at its end-of-text token, and a
        base model that rambles on is scored on what it wrote."""
        return generated.strip()

    def data_check(self, rows: list[dict]) -> dict:
        """Figures that say whether rows test the skill as users' inputs would (SQL: the share of rows whose
        schema has columns the answer does not use); {} when the task has none."""
        return {}

    def data_warnings(self, rows: list[dict], source: str = "these rows") -> list[str]:
        """Warnings for rows to score on that carry an artifact a user's input would not (SQL: pruned schemas)."""
        return []

    def baselines(self, rows: list[dict]) -> dict[str, list[str]]:
        """Answers of trivial systems every report should beat, by name (e.g. detox: copy the input)."""
        return {}

    @abstractmethod
    def make_row(self, rng: random.Random) -> dict:
        """One random row with exactly `fields` as keys."""

    def generate(self, n: int, seed: int) -> list[dict]:
        """n rows with distinct prompts, the same for the same seed.

        Rows come in draw order, so the first k rows of generate(n) are generate(k).
        """
        rng = random.Random(seed)
        rows_by_prompt = {}
        for _ in range(DRAWS_PER_ROW * n):
            if len(rows_by_prompt) == n:
                break
            row = self.make_row(rng)
            rows_by_prompt.setdefault(self.prompt(row), row)
        if len(rows_by_prompt) < n:
            raise ValueError(f"task {self.name!r} made only {len(rows_by_prompt)} distinct rows of the {n} asked")
        return list(rows_by_prompt.values())

    def embedded_splits(self, train_rows: int, eval_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
        """Generated (train, eval) rows with no prompt in both.

        Eval rows are drawn first, so the eval set stays the same when only
        train_rows changes and runs of different sizes stay comparable.
        """
        for setting, value in (("train_rows", train_rows), ("eval_rows", eval_rows)):
            if value < 1:
                raise ValueError(f"{setting} must be at least 1, got {value!r}")
        rows = self.generate(eval_rows + train_rows, seed)
        return rows[eval_rows:], rows[:eval_rows]

    def score(self, predictions: list[str], rows: list[dict]) -> dict[str, float]:
        """The task's metrics of cleaned predictions against the rows' answers."""
        if len(predictions) != len(rows):
            raise ValueError(
                f"score needs one prediction per row, got {len(predictions)} predictions for {len(rows)} rows"
            )
        if not rows:
            raise ValueError("score needs at least one row, got none")
        return self.compute_metrics(predictions, rows)

    @abstractmethod
    def compute_metrics(self, predictions: list[str], rows: list[dict]) -> dict[str, float]:
        """The `metrics`, given as many predictions as rows (at least one)."""

    def references(self, rows: list[dict]) -> list[str]:
        return [row[self.answer_field] for row in rows]


def normalize_text(text: str) -> str:
    """Lower case, single spaces, no whitespace or punctuation at either end."""
    collapsed = " ".join(text.lower().split())
    return collapsed.strip(string.punctuation + " ")


def exact_match_rate(predictions: list[str], references: list[str], normalize=normalize_text) -> float:
    matches = sum(normalize(p) == normalize(r) for p, r in zip(predictions, references, strict=True))
    return matches / len(references)

