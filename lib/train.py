"""Process entry point for one fine-tuning run; `accelerate launch` starts this on every process.

One process (CPU or one GPU), the task's recipe for this device (the GPU recipe when CUDA is present,
the CPU recipe otherwise; --recipe picks one) with overrides:
    python -m lib.train --task sql --set max_steps=20
    python -m lib.train --task sql --set data=train.jsonl --set eval_data=dev.jsonl --evaluate
On a host with several GPUs the same command trains with one process per GPU: it launches itself
through lib.launcher (accelerate launch, the multi_gpu template, one worker of N processes); --gpus 1
(or QLORA_GPUS=1) keeps one process on the first GPU instead:
    python -m lib.train --task sql --gpus 1
Several processes, one per GPU (or gloo on CPU), by hand:
    accelerate launch --config_file accelerate_configs/<rendered>.yaml -m lib.train --config run.json
A saved config plus overrides:
    python -m lib.train --config run.json --set lora_r=8 --set target_modules=attention --evaluate

Every process trains its share of the data; only the main process writes the
adapter, the run record, the metrics and the plots.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lib import runs
from lib.config import RECIPE_DEVICES, TASK_NAMES, ConfigError, RunConfig, parse_overrides, task_recipe

GPUS_VARIABLE = "QLORA_GPUS"  # the GPUs one `python -m lib.train` trains on: "auto" (all it sees) or a number


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, bool]:
    parser = argparse.ArgumentParser(prog="python -m lib.train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="a RunConfig JSON file (settings not in it keep their defaults)")
    parser.add_argument("--task", help="shortcut for --set task=NAME")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="override one setting; VALUE is read as JSON when it parses, else as text")
    parser.add_argument("--recipe", choices=RECIPE_DEVICES, default="auto",
                        help="which measured recipe to start from without --config (auto: gpu with CUDA, else cpu)")
    parser.add_argument("--evaluate", action="store_true", help="compare base model and adapter afterwards")
    parser.add_argument("--gpus", help=f'python -m lib.train on several GPUs: "auto" (one process each, the default) '
                                       f"or how many to use (1: this process, on the first); default ${GPUS_VARIABLE}")
    args = parser.parse_args(argv)
    values = RunConfig.from_json(args.config).to_dict() if args.config else {}
    if args.task:
        values["task"] = args.task
    values.update(parse_overrides(args.set))
    if not args.config:  # without a saved config, start from the task's measured recipe
        task = values.get("task", RunConfig.task)
        recipe = task_recipe(task, args.recipe) if task in TASK_NAMES else {}  # validate() names a bad task
        values = {**recipe, **values}
    return RunConfig.from_dict(values), args.evaluate


def training_processes(gpus: str | int | None = None) -> int:
    """How many processes `python -m lib.train` trains with: `gpus` (--gpus; None: QLORA_GPUS; "auto" or unset:
    every GPU visible), 1 without several GPUs, and 1 inside a distributed launch, whose processes are each
    one of those (WORLD_SIZE or LOCAL_RANK set)."""
    if "WORLD_SIZE" in os.environ or "LOCAL_RANK" in os.environ:
        return 1
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    setting = "--gpus"
    if gpus is None:
        gpus, setting = os.environ.get(GPUS_VARIABLE, "auto"), GPUS_VARIABLE
    text = str(gpus).strip()
    if text == "auto":
        return max(visible, 1)
    if not text.isdigit() or not 1 <= int(text) <= max(visible, 1):
        raise ConfigError(setting, gpus, f'"auto" (every visible GPU) or a number of GPUs from 1 to {max(visible, 1)} '
                                         f"({visible} visible)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    gpus_parser = argparse.ArgumentParser(add_help=False)
    gpus_parser.add_argument("--gpus")
    gpus, argv = gpus_parser.parse_known_args(argv)
    try:
        processes = training_processes(gpus.gpus)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if processes > 1:
        # One process seeing several GPUs would make the Trainer fall back to DataParallel (refused by TRL,
        # slower than one GPU): start one process per GPU instead, as lib.launcher does for a worker.
        from lib import launcher

        print(f"{processes} GPUs: training with one process per GPU (accelerate launch, multi_gpu)", flush=True)
        return launcher.main(["--workers", "1", "--backend", "local", "--processes-per-worker", str(processes), *argv])
    from lib.fine_tuner import FineTuner
    from lib.stopping import TrainingStopped

    try:
        config, evaluate = parse_config(argv)
        tuner = FineTuner(config).setup()
    except (ConfigError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        result = tuner.train()
    except TrainingStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr, flush=True)
        # Under a launcher (torchrun) a clean stop is a success, so it does not report a crash of its own;
        # run alone, the shell's status for SIGTERM says the work is not done.
        return 0 if "TORCHELASTIC_RUN_ID" in os.environ else stopped.exit_code
    except runs.StorageError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    if not tuner.trainer.is_world_process_zero():
        return 0
    from lib import plots

    plots.loss_curve(result.record["loss_history"], result.run_dir / "loss_curve.png",
                     title=f"{config.task}: training loss")
    from lib import tracking

    tracking.log_results(tuner.config)  # the loss curve, beside what training logged
    print(summary(result.record, result.run_dir))
    if evaluate:
        from lib.evaluation import comparison_table, evaluate_run

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
