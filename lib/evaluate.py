"""Score the base model and saved adapters on a data file, without training.

    python -m lib.evaluate --task sql --data dev.jsonl --adapter runs/sql-demo/adapter
    python -m lib.evaluate --task detox --data dev.tsv --rows 200 --adapter a=runs/x/adapter --adapter b=runs/y/adapter \
        --column-map '{"toxic": "en_toxic_comment", "neutral1": "en_neutral_comment"}' --output-dir runs/eval-detox

The file takes the same formats and column mapping as training data (`data`). Every adapter answers in the
prompt format it was trained with (its run record says which); the base model answers in each adapter's
format in turn, or in --prompt-format when no adapter is given. Prints one table (base, each adapter, the
task's baselines such as detox's copy-the-input) and writes metrics.json and metrics.png to --output-dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lib.config import PROMPT_FORMATS, TASK_NAMES, ConfigError


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lib.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=TASK_NAMES)
    parser.add_argument("--data", required=True, help="a jsonl/json/csv/tsv/parquet file of rows to score on")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="a saved adapter folder (repeatable); NAME defaults to the run folder's name")
    parser.add_argument("--rows", type=int, default=100, help="score the file's first ROWS rows (default 100)")
    parser.add_argument("--column-map", default="{}", help="JSON mapping of file columns to the task's fields")
    parser.add_argument("--base-model", default="", help="as the base_model setting (default: the one the "
                                                        "adapters were trained on, else embedded)")
    parser.add_argument("--prompt-format", default="tags", choices=PROMPT_FORMATS,
                        help="the base model's prompt format when no adapter is given")
    parser.add_argument("--no-4bit", action="store_true", help="load the base model in 16/32 bit, not 4-bit")
    parser.add_argument("--output-dir", default="", help="where metrics.json and metrics.png go "
                                                        "(default runs/eval-<task>-<date>-<time>)")
    parser.add_argument("--examples", type=int, default=5, help="example answers kept in metrics.json")
    return parser.parse_args(argv)


def named_adapters(items: list[str]) -> dict[str, Path]:
    """{name: folder} from NAME=DIR or DIR items; a folder must hold a saved adapter."""
    adapters = {}
    for item in items:
        name, equals, folder = item.partition("=")
        if not equals or Path(item).expanduser().is_dir():  # a folder whose path holds "=" is a folder
            folder = item
            path = Path(folder)
            name = path.parent.name if path.name == "adapter" else path.name
        path = Path(folder).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ConfigError("--adapter", item, "a folder holding a saved adapter (adapter_config.json)")
        if name in adapters or name == "base":
            raise ConfigError("--adapter", item, "a name not used twice (and not 'base'); give NAME=DIR")
        adapters[name] = path
    return adapters


def trained_base_model(adapters: dict[str, Path]) -> str:
    """The base model the adapters were trained on (their run records), "embedded" when none says."""
    from lib.evaluation import trained_config

    models = set()
    for name, folder in adapters.items():
        base_model = trained_config(folder).get("base_model")
        if base_model:
            models.add(base_model)
        else:
            print(f"note: adapter {name!r} has no run record; assuming the embedded base model and the tags "
                  "prompt format", file=sys.stderr)
    if len(models) > 1:
        raise ConfigError("--adapter", sorted(models), "adapters trained on one base model (score the others "
                                                       "in a separate run, or give --base-model)")
    return models.pop() if models else "embedded"


def score_file(args: argparse.Namespace) -> dict:
    """Base, adapters and baselines scored on the file's first rows; the report metrics.json holds."""
    from lib.data import read_rows
    from lib.evaluation import BASE, Evaluator
    from lib.models import resolve_base_model
    from lib.tasks import get_task

    task = get_task(args.task)
    column_map = json.loads(args.column_map)
    if not isinstance(column_map, dict):
        raise ConfigError("--column-map", args.column_map, 'a JSON object of file columns to fields, e.g. {"q": "question"}')
    if args.rows < 1:
        raise ConfigError("--rows", args.rows, "a positive number of rows")
    rows = read_rows(args.data, task, column_map)[:args.rows]
    data_warnings = task.data_warnings(rows, f"the scored rows of {args.data}")
    for warning in data_warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    adapters = named_adapters(args.adapter)
    base_model = args.base_model or trained_base_model(adapters)
    evaluator = Evaluator(resolve_base_model(base_model), load_in_4bit=not args.no_4bit)
    for name, folder in adapters.items():
        try:
            evaluator.attach(name, folder)
        except (OSError, RuntimeError, ValueError) as error:
            raise ConfigError("--adapter", str(folder), f"an adapter trained on {base_model} ({error})") from None
    formats = sorted({*evaluator.adapter_formats.values()} or {args.prompt_format})
    scores, answers = {}, {}
    for fmt_name in formats:  # the base model answers in each format an adapter uses, so each has its pair
        label = BASE if len(formats) == 1 else f"{BASE} ({fmt_name})"
        answers[label] = evaluator.answers(evaluator.prompt_format(task, fmt_name), rows, BASE)
        scores[label] = task.score(answers[label], rows)
    for name in adapters:
        answers[name] = evaluator.answers(evaluator.adapter_format(task, name), rows, name)
        scores[name] = task.score(answers[name], rows)
    first_label = next(iter(scores))
    first_format = evaluator.prompt_format(task, formats[0])
    return {
        "task": task.name,
        "data": str(args.data),
        "rows": len(rows),
        "base_model": base_model,
        "headline_metric": task.headline_metric,
        "base_label": first_label,
        "base": scores.pop(first_label),
        "adapters": scores,
        "adapter_dirs": {name: str(folder) for name, folder in adapters.items()},
        "prompt_formats": {BASE: formats, **evaluator.adapter_formats},
        "baselines": {name: task.score(predictions, rows) for name, predictions in task.baselines(rows).items()},
        "data_check": task.data_check(rows),
        "warnings": data_warnings,
        "examples": [{"prompt": first_format.prompt(row), "reference": row[task.answer_field],
                      **{label: texts[index] for label, texts in answers.items()}}
                     for index, row in enumerate(rows[:args.examples])],
        "date": time.strftime("%Y-%m-%d"),
    }


def main(argv: list[str] | None = None) -> int:
    from lib import plots, runs
    from lib.data import DataError
    from lib.evaluation import comparison_table

    args = parse_arguments(argv)
    try:
        report = score_file(args)
    except (ConfigError, DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir or f"runs/eval-{args.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    output_dir.mkdir(parents=True, exist_ok=True)
    runs.write_json_atomic(output_dir / runs.METRICS, report)
    plots.metrics_chart(report, output_dir / "metrics.png")
    print(f"{report['task']} on {report['rows']} rows of {report['data']}")
    print(comparison_table(report))
    print(f"metrics: {output_dir / runs.METRICS}\nchart:   {output_dir / 'metrics.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
