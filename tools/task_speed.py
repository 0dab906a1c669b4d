"""A task's recipe on this machine: training tokens/s and the time to evaluate held-out rows, measured.

    python tools/task_speed.py --task sql --max-steps 40 --eval-rows 200 --repeats 3 --out speed.json
    python tools/task_speed.py --task sql --set max_seq_length=2048     # a variant of the recipe

Trains the task's recipe for this device (the GPU recipe where CUDA is present) on the embedded model for
--max-steps steps, through the FineTuner as the notebooks do, then answers --eval-rows held-out rows with
the adapter (and with the base model) --repeats times, timing each. Rows (one per repeat) go to --out as a
JSON list: tokens/s of the run record, seconds per evaluation, rows a batch, the device, the date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="sql")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--eval-rows", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a recipe setting")
    parser.add_argument("--output-dir", default="runs/task-speed")
    parser.add_argument("--out", help="JSON file the rows are appended to")
    parser.add_argument("--compare-4bit", action="store_true",
                        help="also answer --repeats times with the base kept 4-bit (where evaluation dequantizes "
                             "it), same rows a batch: times, scores and the share of answers that agree, in the "
                             "last row")
    args = parser.parse_args(argv)

    from lib.config import RunConfig, parse_overrides
    from lib.evaluation import BASE, Evaluator
    from lib.fine_tuner import FineTuner, device_name
    from lib.tasks import get_task

    overrides = parse_overrides(args.set)
    config = RunConfig.for_task(args.task, "auto", **{"max_steps": args.max_steps, "eval_rows": args.eval_rows,
                                             "output_dir": args.output_dir, "tracking": "off",
                                             "run_name": f"{args.task}-{time.strftime('%H%M%S')}", **overrides})
    tuner = FineTuner(config)
    result = tuner.run()
    record = result.record
    task = get_task(config.task)
    rows = tuner.eval_rows[:args.eval_rows]
    evaluator = Evaluator(tuner.model_path, config.load_in_4bit)
    evaluator.attach(config.task, result.adapter_dir)
    fmt = evaluator.adapter_format(task, config.task)
    out = []
    for repeat in range(args.repeats):
        timings, answers = {}, {}
        for name in (config.task, BASE):
            started = time.perf_counter()
            answers[name] = evaluator.answers(fmt, rows, adapter=name, progress=False)
            timings[name] = round(time.perf_counter() - started, 2)
        scores = task.compute_metrics(answers[config.task], rows)
        row = {"task": config.task, "repeat": repeat, "device": device_name(), "date": datetime.date.today().isoformat(),
               "settings": {k: v for k, v in config.to_dict().items() if k in (
                   "batch_size", "max_seq_length", "packing", "max_steps", "prompt_format", *overrides)},
               "plan": {k: record["plan"][k]
                        for k in ("micro_batch_size", "grad_accum", "packed", "attention", "fused_lora")},
               "fused_lora_layers": record["fused_lora_layers"],
               "train_tokens_per_s": record["tokens_per_s"], "train_tokens": record["train_tokens"],
               "train_s": record["train_metrics"].get("train_runtime"), "peak_memory_gib": record["peak_memory_gib"],
               "eval_rows": len(rows), "eval_batch": evaluator.batch_size, "eval_dequantized": evaluator.dequantized,
               "eval_s_adapter": timings[config.task],
               "eval_s_base": timings[BASE], "scores": scores}
        print(json.dumps(row), flush=True)
        out.append(row)
    if args.compare_4bit:  # the same rows a batch, the same repeats (the first includes the warm-up)
        import gc

        import torch

        batch_size = evaluator.batch_size
        del evaluator
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        kept = Evaluator(tuner.model_path, config.load_in_4bit, batch_size=batch_size, dequantize=False)
        kept.attach(config.task, result.adapter_dir)
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            four_bit = kept.answers(fmt, rows, adapter=config.task, progress=False)
            seconds.append(round(time.perf_counter() - started, 2))
        out[-1]["four_bit"] = {"eval_s_adapter": seconds, "eval_batch": batch_size,
                               "scores": task.compute_metrics(four_bit, rows),
                               "same_answers": sum(a == b for a, b in zip(four_bit, answers[config.task])) / len(rows)}
        print(json.dumps(out[-1]["four_bit"]), flush=True)
    if args.out:
        path = Path(args.out)
        rows_before = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(rows_before + out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
