"""CPU threads: seconds per training step at 1 thread, all cores and "auto", on an idle machine and with
other work keeping cores busy; what "auto" chose each time.

    python tools/thread_runs.py --out docs/thread_runs_cpu.json
    python tools/thread_runs.py --threads 1,auto --busy 0,1 --steps 6 --repeats 1

Each run is `python -m lib.train --task sql` (the CPU recipe, MLflow off) in a fresh process with
`--set cpu_threads=N`; OMP_NUM_THREADS is removed from its environment so only the setting decides.
"Busy" cores are that many processes spinning in a Python loop, started before the run and stopped after
it: the load another job, a second notebook or a test suite puts on a shared machine. Seconds per step
are the trainer's train_runtime over its steps (the first step, slower, included alike in every run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPIN = "while True: pass"


def one_run(threads: str, busy: int, steps: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(busy)]
    try:
        time.sleep(1.0 if busy else 0)  # the load is running before the run looks at the cores
        with tempfile.TemporaryDirectory(prefix="thread-runs-") as folder:
            argv = [sys.executable, "-m", "lib.train", "--task", "sql", "--set", f"max_steps={steps}",
                    "--set", f"cpu_threads={threads}", "--set", "tracking=off", "--set", "eval_rows=1",
                    "--set", f"output_dir={folder}", "--set", "run_name=threads"]
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"threads={threads} busy={busy} failed:\n{(done.stdout + done.stderr)[-3000:]}")
            record = json.loads((Path(folder) / "threads" / "run_record.json").read_text(encoding="utf-8"))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    runtime = record["train_metrics"]["train_runtime"]
    return {"threads_setting": threads, "threads_used": record["plan"]["threads"], "busy_cores": busy,
            "cores": len(os.sched_getaffinity(0)), "steps": record["global_step"],
            "s_per_step": round(runtime / record["global_step"], 2), "tokens_per_s": record["tokens_per_s"],
            "device": record["device"], "date": time.strftime("%Y-%m-%d"),
            "command": " ".join(["python", *argv[1:-4]])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cores = len(os.sched_getaffinity(0))
    parser.add_argument("--threads", default=f"1,{cores},auto", help="comma-separated cpu_threads values")
    parser.add_argument("--busy", default="0,1", help="comma-separated numbers of busy cores")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", help="JSON list the rows are appended to")
    args = parser.parse_args(argv)
    rows = []
    for repeat in range(args.repeats):
        for busy in [int(value) for value in args.busy.split(",")]:
            for threads in [value.strip() for value in args.threads.split(",") if value.strip()]:
                row = {**one_run(threads, busy, args.steps), "repeat": repeat}
                rows.append(row)
                print(f"busy {busy}, cpu_threads={threads} (used {row['threads_used']}): {row['s_per_step']} s/step",
                      flush=True)
                if args.out:
                    out = Path(args.out)
                    existing = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else []
                    out.write_text(json.dumps(existing + [row], indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
