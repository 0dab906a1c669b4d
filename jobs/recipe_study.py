"""Recipe study: train and evaluate variants of a task's recipe through the project's own path.

    python jobs/recipe_study.py --task sql --variant baseline --variant lr1e-3:learning_rate=1e-3
    python jobs/recipe_study.py --task sql --variant whole-text:completion_only_loss=false --out docs/quality_runs.jsonl

A variant is NAME or NAME:setting=value,setting=value on top of the task's
default recipe (`RunConfig.for_task`). Each one trains with the FineTuner,
compares base model and adapter on the same held-out rows, and appends one JSON
line (settings, metrics, training tokens, wall time, device) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.config import RunConfig  # noqa: E402
from lib.fine_tuner import FineTuner  # noqa: E402
from lib.train import _parse_value, evaluate_run  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    overrides = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        overrides[key.strip()] = _parse_value(value.strip())
    return name, overrides


def run_variant(task: str, name: str, overrides: dict, output_dir: str) -> dict:
    config = RunConfig.for_task(task, output_dir=output_dir, run_name=f"{task}-{name}-{int(time.time())}",
                                **overrides)
    started = time.perf_counter()
    tuner = FineTuner(config).setup()
    result = tuner.train()
    trained_s = time.perf_counter() - started
    report = evaluate_run(tuner.config, tuner.eval_rows, tuner.model_path)
    record = result.record
    return {"task": task, "variant": name, "overrides": overrides, "base": report["base"],
            "adapter": report["adapter"], "train_rows": record["train_rows"], "eval_rows": report["rows"],
            "steps": record["global_step"], "train_tokens": record["train_tokens"],
            "train_wall_s": round(trained_s, 1), "total_wall_s": round(time.perf_counter() - started, 1),
            "tokens_per_s": record["tokens_per_s"], "device": record["device"],
            "date": time.strftime("%Y-%m-%d"), "examples": report["examples"][:3]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--variant", action="append", required=True)
    parser.add_argument("--output-dir", default="runs/recipe-study")
    parser.add_argument("--out", default="docs/quality_runs.jsonl")
    args = parser.parse_args(argv)
    for text in args.variant:
        name, overrides = parse_variant(text)
        row = run_variant(args.task, name, overrides, args.output_dir)
        with open(args.out, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        print(f"{name}: base {row['base']} -> adapter {row['adapter']} "
              f"({row['train_tokens']} tokens, {row['train_wall_s']} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
