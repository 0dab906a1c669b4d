"""Fault runs of a distributed launch (docs/RELIABILITY.md, "GPU fault runs"): two workers train; one is
killed, or the launch is stopped, mid-run; how long until every process is gone, and where the relaunch
resumes. Developer tooling, not part of the product: it drives `python -m lib.launcher` as a user would.

    python tools/fault_run.py --workers 2 --out fault_run.json [--set max_steps=300 ...]

Two scenarios, each a launch then the same launch again:
  kill-rank-1  SIGKILL to rank 1's training process after the first checkpoint (a worker lost)
  sigterm      SIGTERM to the launcher after the first checkpoint (a CML Job stopped by its user)
Recorded per scenario: seconds from the fault until the launcher had exited, training processes left
over, the launcher's exit status and last line, and the relaunch's exit status, resume step and steps.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
from lib import runs  # noqa: E402

DEFAULTS = {"task": "sql", "max_steps": 300, "save_steps": 20, "logging_steps": 10, "train_rows": 2000,
            "eval_rows": 2}


def launcher_argv(workers: int, settings: dict) -> list[str]:
    pairs = [argument for name, value in settings.items() for argument in ("--set", f"{name}={value}")]
    return [sys.executable, "-m", "lib.launcher", "--workers", str(workers), "--backend", "local", *pairs]


def training_processes(run_dir: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if str(run_dir) in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def rank_process(run_dir: Path, rank: int) -> psutil.Process:
    for process in training_processes(run_dir):
        try:
            if process.environ().get("RANK") == str(rank):
                return process
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    raise RuntimeError(f"rank {rank}'s training process was not found")


def said(line: str) -> str:
    """The launcher's own one-line outcome ("error: ..." or "stopped: ..."), after any progress bar on that line."""
    match = re.search(r"(error|stopped): .*", line)
    return match.group(0) if match else ""


def scenario(name: str, workers: int, settings: dict, log_dir: Path) -> dict:
    run_dir = Path(settings["output_dir"]) / settings["run_name"]
    argv = launcher_argv(workers, settings)
    log = log_dir / f"{name}-first.log"
    with open(log, "wb") as handle:
        launcher = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
    started = time.monotonic()
    while runs.last_checkpoint(run_dir) is None:
        if launcher.poll() is not None:
            raise RuntimeError(f"the launch ended before its first checkpoint: {log.read_text()[-2000:]}")
        time.sleep(0.1)
    checkpoint_at_s = time.monotonic() - started
    fault_at = time.monotonic()
    if name == "kill-rank-1":
        rank_process(run_dir, 1).kill()
    else:
        launcher.send_signal(signal.SIGTERM)
    code = launcher.wait(600)
    stopped_s = time.monotonic() - fault_at
    time.sleep(1)
    left = [process.pid for process in training_processes(run_dir)]
    first_lines = log.read_text(errors="replace").strip().splitlines()
    stopped_at = runs.last_checkpoint(run_dir)

    relaunch_log = log_dir / f"{name}-relaunch.log"
    again_started = time.monotonic()
    with open(relaunch_log, "wb") as handle:
        again = subprocess.run(argv, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT, timeout=1800)
    record = runs.read_json(run_dir / runs.RUN_RECORD) if (run_dir / runs.RUN_RECORD).is_file() else {}
    steps = [point["step"] for point in record.get("loss_history", [])]
    return {"scenario": name, "first_checkpoint_after_s": round(checkpoint_at_s, 1),
            "launcher_exit": code, "stopped_within_s": round(stopped_s, 2), "processes_left": left,
            "launcher_said": next((said(line) for line in first_lines if said(line)), ""),
            "checkpoint_kept": stopped_at, "relaunch_exit": again.returncode,
            "relaunch_s": round(time.monotonic() - again_started, 1), "resumed_from": record.get("resumed_from"),
            "global_step": record.get("global_step"), "world_size": record.get("world_size"),
            "loss_steps_without_gap": steps == sorted(set(steps)) and bool(steps),
            "device": record.get("device"), "tokens_per_s": record.get("tokens_per_s")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="fault_run.json")
    parser.add_argument("--output-dir", default="runs/fault-runs")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--scenarios", default="kill-rank-1,sigterm")
    args = parser.parse_args(argv)
    from lib.config import parse_overrides

    settings = {**DEFAULTS, **parse_overrides(args.set), "output_dir": str(Path(args.output_dir).resolve())}
    log_dir = Path(args.out).resolve().parent
    results = []
    for name in args.scenarios.split(","):
        run_settings = {**settings, "run_name": f"{name}-{time.strftime('%H%M%S')}"}
        results.append(scenario(name, args.workers, run_settings, log_dir))
        print(json.dumps(results[-1]), flush=True)
    report = {"date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "settings": settings, "workers": args.workers, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
