"""Process entry point for one fine-tuning run; `accelerate launch` starts this on every process.

One process (CPU or one GPU), the task's recipe (RunConfig.for_task) with overrides:
    python -m lib.train --task sql --set max_steps=20
Several processes, one per GPU (or gloo on CPU):
    accelerate launch --config_file accelerate_configs/<rendered>.yaml -m lib.train --config run.json
A saved config plus overrides:
    python -m lib.train --config run.json --set lora_r=8 --set target_modules=attention --evaluate

Every process trains its share of the data; only the main process writes the
adapter, the run record, the metrics and the plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lib import runs
from lib.config import TASK_RECIPES, ConfigError, RunConfig


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m lib.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a RunConfig JSON file (settings not in it keep their defaults)")
    parser.add_argument("--task", help="shortcut for --set task=NAME")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override one setting; VALUE is read as JSON when it parses, else as text")
    parser.add_argument("--evaluate", action="store_true", help="compare base model and adapter afterwards")
    args = parser.parse_args(argv)
    values = RunConfig.from_json(args.config).to_dict() if args.config else {}
    if args.task:
        values["task"] = args.task
    for item in args.set:
        name, _, text = item.partition("=")
        values[name.strip()] = _parse_value(text)
    if not args.config:  # without a saved config, start from the task's measured recipe
        values = {**TASK_RECIPES.get(values.get("task", RunConfig.task), {}), **values}
    return RunConfig.from_dict(values), args.evaluate


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def evaluate_run(config: RunConfig, eval_rows: list[dict], model_path: str) -> dict:
    """Base vs adapter on the held-out rows; writes metrics.json and both charts into the run folder."""
    from lib import plots
    from lib.evaluation import Evaluator
    from lib.tasks import get_task

    run_dir = config.run_dir
    evaluator = Evaluator(model_path, config.load_in_4bit)
    evaluator.attach(config.task, run_dir / runs.ADAPTER)
    report = evaluator.compare(get_task(config.task), eval_rows, adapter=config.task)
    runs.write_json_atomic(run_dir / runs.METRICS, report)
    plots.metrics_chart(report, run_dir / "metrics.png")
    return report


def main(argv: list[str] | None = None) -> int:
    from lib.fine_tuner import FineTuner

    try:
        config, evaluate = parse_config(argv)
        tuner = FineTuner(config).setup()
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = tuner.train()
    if not tuner.trainer.is_world_process_zero():
        return 0
    from lib import plots

    plots.loss_curve(result.record["loss_history"], result.run_dir / "loss_curve.png",
                     title=f"{config.task}: training loss")
    print(summary(result.record, result.run_dir))
    if evaluate:
        from lib.evaluation import comparison_table

        report = evaluate_run(tuner.config, tuner.eval_rows, tuner.model_path)
        print(comparison_table(report))
    return 0


def summary(record: dict, run_dir: Path) -> str:
    return (f"trained {record['task']} adapter: {record['global_step']} steps, {record['train_tokens']} tokens, "
            f"{record['wall_time_s']} s ({record['tokens_per_s']} tokens/s), "
            f"peak memory {record['peak_memory_gib']} GiB, world size {record['world_size']}\n"
            f"adapter:    {run_dir / runs.ADAPTER}\nrun record: {run_dir / runs.RUN_RECORD}\n"
            f"loss curve: {run_dir / 'loss_curve.png'}")


if __name__ == "__main__":
    sys.exit(main())
