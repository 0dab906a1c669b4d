"""Recipe study: train and evaluate variants of a task's recipe through the project's own path.

    python tools/recipe_study.py --task sql --variant baseline --variant lr1e-3:learning_rate=1e-3
    python tools/recipe_study.py --task sql --recipe gpu --set data=train.jsonl --set eval_data=dev.jsonl \
        --train-label "sql-create-context (WikiSQL rows)" --eval-label "WikiSQL dev" \
        --variant tags --variant chat:prompt_format=chat --out docs/quality_runs.jsonl

A variant is NAME or NAME:setting=value,setting=value on top of the task's recipe for --recipe (cpu, gpu, or
auto) and the --set overrides. Each one trains with the FineTuner, scores base model, adapter and the task's
baselines on the same held-out rows, and appends one JSON line to --out in the shape of docs/quality.json
(task, model, trained_on, evaluated_on, recipe, metrics, date) plus the settings, steps, tokens and timings.
With --test FILE the adapter is also scored, once, on that file's first --test-rows rows (the untouched split,
for the final adapters only); the row keeps it apart, under "test".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.config import RunConfig, parse_overrides, task_recipe  # noqa: E402
from lib.evaluation import evaluate_run  # noqa: E402
from lib.fine_tuner import FineTuner  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    return name, parse_overrides([item for item in settings.split(",") if item])


def run_variant(args: argparse.Namespace, name: str, overrides: dict) -> dict:
    settings = {**parse_overrides(args.set), **overrides}
    config = RunConfig.from_dict({"task": args.task, **task_recipe(args.task, args.recipe), "output_dir": args.output_dir,
                                  "run_name": f"{args.task}-{name}-{int(time.time())}", **settings})
    started = time.perf_counter()
    tuner = FineTuner(config).setup()
    result = tuner.train()
    trained_s = time.perf_counter() - started
    report = evaluate_run(tuner.config, tuner.eval_rows, tuner.model_path)
    record = result.record
    config = tuner.config
    test = score_test(args, tuner) if args.test else None
    row = {
        "task": args.task, "variant": name,
        "model": config.base_model if config.base_model != "embedded" else "SmolLM2-135M-Instruct (embedded)",
        "trained_on": {"source": args.train_label or config.data, "rows": record["train_rows"]},
        "evaluated_on": {"source": args.eval_label or config.eval_data or f"held-out split of {config.data}",
                         "split": args.eval_split, "rows": report["rows"]},
        "recipe": args.recipe, "prompt_format": config.prompt_format, "overrides": settings,
        "metrics": {"base": report["base"], "adapter": report["adapter"], **report["baselines"]},
        "data_check": report.get("data_check", {}),
        "steps": record["global_step"], "train_tokens": record["train_tokens"],
        "train_wall_s": round(trained_s, 1), "total_wall_s": round(time.perf_counter() - started, 1),
        "tokens_per_s": record["tokens_per_s"], "peak_memory_gib": record["peak_memory_gib"],
        "device": record["device"], "date": time.strftime("%Y-%m-%d"), "examples": report["examples"][:3],
    }
    if test:
        row["test"] = test
    return row


def score_test(args: argparse.Namespace, tuner: FineTuner) -> dict:
    """Base and adapter on the test file's first --test-rows rows, in the adapter's prompt format."""
    from lib.data import read_rows
    from lib.evaluation import Evaluator
    from lib.tasks import get_task

    task = get_task(args.task)
    rows = read_rows(args.test, task, tuner.config.column_map)[:args.test_rows]
    evaluator = Evaluator(tuner.model_path, tuner.config.load_in_4bit)
    evaluator.attach(args.task, tuner.config.run_dir / "adapter")
    report = evaluator.compare(task, rows, adapter=args.task, prompt_format=tuner.config.prompt_format)
    return {"source": args.test_label or args.test, "split": "test", "rows": len(rows),
            "metrics": {"base": report["base"], "adapter": report["adapter"], **report["baselines"]},
            "data_check": report["data_check"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME or NAME:setting=value,...")
    parser.add_argument("--recipe", default="cpu", choices=("cpu", "gpu", "auto"))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="for every variant")
    parser.add_argument("--train-label", default="", help="what the training data is, for the record")
    parser.add_argument("--eval-label", default="", help="what the evaluation data is, for the record")
    parser.add_argument("--eval-split", default="dev", help="which split the evaluation rows are")
    parser.add_argument("--test", default="", help="a test file the adapter is also scored on, once, at the end")
    parser.add_argument("--test-rows", type=int, default=1000, help="rows of --test scored (its first ones)")
    parser.add_argument("--test-label", default="", help="what the test data is, for the record")
    parser.add_argument("--output-dir", default="runs/recipe-study")
    parser.add_argument("--out", default="docs/quality_runs.jsonl")
    args = parser.parse_args(argv)
    if args.test and len(args.variant) > 1:
        parser.error("--test scores one final adapter once: give one --variant (choose among variants on dev rows)")
    if args.test_rows < 1:
        parser.error("--test-rows must be at least 1")
    for text in args.variant:
        name, overrides = parse_variant(text)
        row = run_variant(args, name, overrides)
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{args.task} {name}: {json.dumps(row['metrics'])} ({row['train_tokens']} tokens, "
              f"{row['steps']} steps, {row['train_wall_s']} s, {row['tokens_per_s']} tokens/s)"
              + (f"; test: {json.dumps(row['test']['metrics']['adapter'])}" if "test" in row else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
