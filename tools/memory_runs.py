"""Peak memory of real runs, as their run records measure it, against the estimate the run made.

    OMP_NUM_THREADS=1 python tools/memory_runs.py --out docs/memory_runs_cpu.json   # all runs below, one epoch
    python tools/memory_runs.py --only sql,two-processes --max-steps 5              # some of them, shorter

Runs, one after another, each a fresh process the way users start them:
  - each task notebook (01-03) at its default settings, through jobs/run_notebook.py (papermill, a Jupyter
    kernel: what a job or a workshop attendee runs), eval_rows lowered (evaluation comes after the record);
  - the SQL task on 2 local processes through the launcher (python -m lib.launcher --backend local).
Each run record holds `peak_memory_gib` (ru_maxrss on a CPU, max_memory_allocated on a GPU) and
`estimated_peak_gib` (lib.memory.process_peak), per rank under `rank_shares`. Rows: one per process, with
estimate / measured; --out appends them to a JSON list. Unpacked rows are padded to their batch's longest
example, so a short run may miss the batch the estimate plans for: --max-steps -1 (the default) trains the
notebooks' whole epoch.
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
sys.path.insert(0, str(ROOT))

NOTEBOOKS = {"instruction": "notebooks/01_instruction_following.ipynb", "sql": "notebooks/02_english_to_sql.ipynb",
             "detox": "notebooks/03_detoxify_text.ipynb"}
RUNS = [*NOTEBOOKS, "two-processes"]


def command(run: str, output_dir: Path, max_steps: int, eval_rows: int) -> tuple[list[str], dict]:
    """The command line and extra environment of one run; its run folder is <output_dir>/<run>."""
    settings = [f"max_steps={max_steps}", f"eval_rows={eval_rows}", "tracking=auto"]
    if run in NOTEBOOKS:
        argv = [sys.executable, "jobs/run_notebook.py", NOTEBOOKS[run], "--output-dir", str(output_dir),
                "--run-name", run]
        return argv + [part for setting in settings for part in ("--set", setting)], {}
    argv = [sys.executable, "-m", "lib.launcher", "--task", "sql", "--backend", "local",
            "--set", f"output_dir={output_dir}", "--set", f"run_name={run}"]
    return argv + [part for setting in settings for part in ("--set", setting)], {"NUM_GPU_WORKERS": "2"}


def measure(run: str, output_dir: Path, max_steps: int, eval_rows: int) -> list[dict]:
    argv, extra = command(run, output_dir, max_steps, eval_rows)
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, env={**os.environ, **extra}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{run} failed (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    record = json.loads((output_dir / run / "run_record.json").read_text(encoding="utf-8"))
    date, device = time.strftime("%Y-%m-%d"), record["device"]
    return [{"run": run, "rank": share["rank"], "processes": record["world_size"],
             "micro_batch_size": record["plan"]["micro_batch_size"], "packed": record["plan"]["packed"],
             "training_estimate_gib": record["plan"]["estimated_gib"],
             "estimated_peak_gib": share["estimated_peak_gib"], "measured_peak_gib": share["peak_memory_gib"],
             "ratio": round(share["estimated_peak_gib"] / share["peak_memory_gib"], 3),
             "steps": record["global_step"], "wall_s": round(time.perf_counter() - started, 1),
             "device": device, "threads": os.environ.get("OMP_NUM_THREADS", "auto"), "date": date,
             "command": " ".join(["NUM_GPU_WORKERS=2"] * bool(extra) + argv[1:])}
            for share in record["rank_shares"]]


def markdown(rows: list[dict]) -> str:
    lines = ["| run | rank | processes | micro-batch | packed | training estimate GiB | estimated peak GiB | "
             "measured peak GiB | estimate / measured |", "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {row['run']} | {row['rank']} | {row['processes']} | {row['micro_batch_size']} | {row['packed']} | "
              f"{row['training_estimate_gib']} | {row['estimated_peak_gib']} | {row['measured_peak_gib']} | "
              f"{row['ratio']} |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(RUNS), help=f"comma-separated, from: {', '.join(RUNS)}")
    parser.add_argument("--max-steps", type=int, default=-1, help="-1: the notebooks' default (one epoch)")
    parser.add_argument("--eval-rows", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each, one after another")
    parser.add_argument("--out", help="JSON list the rows are appended to")
    args = parser.parse_args(argv)
    wanted = [run.strip() for run in args.only.split(",") if run.strip()]
    unknown = sorted(set(wanted) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    rows = []
    for repeat in range(args.repeats):
        for run in wanted:
            with tempfile.TemporaryDirectory(prefix="memory-runs-") as folder:
                new = [{**row, "repeat": repeat} for row in measure(run, Path(folder), args.max_steps, args.eval_rows)]
            rows += new
            for row in new:
                print(f"{run} rank {row['rank']}: estimated {row['estimated_peak_gib']} GiB, measured "
                      f"{row['measured_peak_gib']} GiB, ratio {row['ratio']} ({row['wall_s']} s)", flush=True)
            if args.out:
                out = Path(args.out)
                existing = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else []
                out.write_text(json.dumps(existing + new, indent=1) + "\n", encoding="utf-8")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
