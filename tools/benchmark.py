"""Benchmark: training speed of the project's path (FineTuner -> SFTTrainer) per configuration, and Unsloth's.

One architecture per call, every configuration in its own process, one card (tools/benchmark_core.py says what is
measured and how; CONFIGS there names the configurations):
    python tools/benchmark.py --arch llama-1b --configs seed,default,b16-varlen-ckpt --out docs/benchmarks.json
    python tools/benchmark.py --arch llama-1b --configs unsloth-b16 --unsloth-path /tmp/site-unsloth --out rows.json
The table and the chart from the collected rows:
    python tools/benchmark.py --report docs/benchmarks.json --chart docs/benchmark_tokens_per_s.png
Memory estimate against measurement on the embedded model, one short run per JSON of overrides, each in its
own process (CPU or GPU, whichever this machine has):
    python tools/benchmark.py --memory-check '{}' --memory-check '{"batch_size": 4}' --out docs/memory_check.json
Loss of the seed's settings against the defaults on the embedded model (CPU is fine), plotted:
    python tools/benchmark.py --loss-curves docs/loss_seed_vs_default.png
Side by side with repeats (issue 18: every ratio the median of >= 3 rounds in one call, interleaved):
    python tools/benchmark.py --arch bloom-1b1 --configs seed,default,default-flex --repeats 3 --run P --out rows.json
Where a step's time goes: 2 more steps after the measured ones under torch.profiler, printed by kernel family
and kept in the row's `profile`:
    python tools/benchmark.py --arch llama-1b --configs b32-ckpt13-nodrop --profile 2 --out rows.json
CPU smoke run (what tests/test_benchmark.py does):
    python tools/benchmark.py --arch tiny-llama --configs default --steps 2 --warmup 1 --seq-len 64 --out /tmp/rows.json
Data parallel, one process per GPU (accelerate_configs/multi_gpu.yaml rendered with num_processes=N):
    accelerate launch --config_file multi_gpu-2.yaml tools/benchmark.py --arch llama-1b --configs default --out rows.json
Every rank runs each configuration in its own child process (which joins the process group); rank 0 builds the
model while the others wait for it, and only rank 0 prints and writes rows (`gpus` = world size, tokens/s of all).

The model is built once per architecture with random weights under --model-dir and loaded by path with
4-bit quantization, like any checkpoint. Rows are merged into --out after every configuration, so a
configuration that runs out of time or memory leaves the others' rows (and its own failure row).
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

from tools import benchmark_core as benchmark  # noqa: E402


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", choices=sorted(benchmark.ARCHITECTURES))
    parser.add_argument("--configs", default="seed,default",
                        help=f"comma-separated, from: {', '.join([*benchmark.CONFIGS, *benchmark.UNSLOTH_CONFIGS])}")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per block")
    parser.add_argument("--steps", type=int, default=6, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of the timing")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per configuration")
    parser.add_argument("--logging-steps", type=int, default=1,
                        help="the trainer's logging_steps (1: a loss per step; 5: the shipped default, fewer syncs)")
    parser.add_argument("--timing", choices=("step", "window"), default="step",
                        help="step: the GPU synchronised after every step, tokens/s from the median step; window: "
                             "synchronised only around the measured steps, tokens/s from their total time")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="the project's configurations: profile this many more steps after the measured ones "
                             "(torch.profiler; the row's `profile` gives device time per step by kernel family)")
    parser.add_argument("--model-dir", help="where the random model is built (default: a folder under /tmp)")
    parser.add_argument("--unsloth-path", help="site folder holding Unsloth and its pins, for unsloth-* configs")
    parser.add_argument("--out", help="JSON file of rows; this run's rows replace earlier ones of the same key "
                                      "(--memory-check rows are appended)")
    parser.add_argument("--report", help="print the markdown table of this JSON file of rows")
    parser.add_argument("--chart", help="with --report: also draw the tokens/s chart to this PNG")
    parser.add_argument("--runs", help="with --report: only rows of these runs (comma-separated `run` labels)")
    parser.add_argument("--memory-check", action="append", metavar="JSON",
                        help="settings on top of the sql recipe; compare estimated and measured training memory")
    parser.add_argument("--loss-curves", help="plot seed settings vs defaults on the embedded model to this PNG")
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # internal: build the model
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration here
    parser.add_argument("--row-file", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of all --configs, interleaved (seed, default, seed, default, ...); rows get "
                             "`repeat`; a summary gives medians, min-max and ratios to the first configuration")
    parser.add_argument("--run", help="a label written into every row's `run`")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)  # internal: one memory check here
    return parser.parse_args(argv)


def run_worker(args) -> int:
    """In the configuration's own process: train, measure, write the row."""
    run = benchmark.run_unsloth if args.worker in benchmark.UNSLOTH_CONFIGS else benchmark.run_project
    with tempfile.TemporaryDirectory(prefix="bench-run-") as output_dir:
        extra = ({"timeout_row_file": args.row_file, "profile_steps": args.profile}
                 if run is benchmark.run_project else {})
        row = run(args.arch, args.worker, args.model_dir, args.seq_len, args.steps, args.warmup, output_dir,
                  logging_steps=args.logging_steps, timing=args.timing, **extra)
    Path(args.row_file).write_text(json.dumps(row), encoding="utf-8")
    return 0


def child(args, extra: list[str], env: dict | None = None, timeout: int | None = None):
    command = [sys.executable, str(Path(__file__).resolve()), "--arch", args.arch, "--seq-len", str(args.seq_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--model-dir", args.model_dir,
               "--logging-steps", str(args.logging_steps), "--timing", args.timing, "--profile", str(args.profile),
               *extra]
    return subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True, cwd=ROOT)


def run_config(args, config: str) -> dict:
    """One configuration in a child process, with a time limit; a failure becomes a row saying why."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if config in benchmark.UNSLOTH_CONFIGS:
        if not args.unsloth_path:
            return benchmark.failed_row(args.arch, config, args.seq_len, "skipped", "no --unsloth-path given")
        env.update(PYTHONPATH=f"{args.unsloth_path}:{ROOT}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.NamedTemporaryFile(suffix=".json") as row_file:
        try:
            done = child(args, ["--worker", config, "--row-file", row_file.name], env, args.timeout)
        except subprocess.TimeoutExpired as error:
            measured = Path(row_file.name).read_text(encoding="utf-8")
            if measured:  # trained and measured; the packing check after it ran out of time
                return json.loads(measured)
            tail = (error.stdout or b"")[-1000:] + (error.stderr or b"")[-2000:]
            return benchmark.failed_row(args.arch, config, args.seq_len, "timeout",
                                        tail.decode(errors="replace") if isinstance(tail, bytes) else tail)
        log = done.stdout[-1000:] + done.stderr[-3000:]
        if done.returncode != 0:
            status = "out of memory" if "OutOfMemoryError" in log or "out of memory" in log else "failed"
            return benchmark.failed_row(args.arch, config, args.seq_len, status, log)
        return json.loads(Path(row_file.name).read_text(encoding="utf-8"))


def rank() -> int:
    """This process's rank under `accelerate launch` (torchrun sets RANK), 0 when alone."""
    return int(os.environ.get("RANK", 0))


def ensure_model(args, wait_s: float = 600) -> bool:
    """The random model in args.model_dir: rank 0 builds it in a side folder and renames it into place (one
    atomic step), the other ranks wait for it to appear."""
    ready = lambda: (Path(args.model_dir) / "config.json").is_file()  # noqa: E731
    if ready():
        return True
    if rank() != 0:
        deadline = time.monotonic() + wait_s
        while not ready():
            if time.monotonic() > deadline:
                print(f"error: rank {rank()}: no model in {args.model_dir} after {wait_s:g} s", file=sys.stderr)
                return False
            time.sleep(1)
        return True
    Path(args.model_dir).parent.mkdir(parents=True, exist_ok=True)
    side = tempfile.mkdtemp(prefix=f".{Path(args.model_dir).name}-", dir=Path(args.model_dir).parent)
    built = child(args, ["--build", "--model-dir", side])
    if built.returncode != 0:
        print(built.stderr[-3000:], file=sys.stderr)
        return False
    os.replace(side, args.model_dir)
    return True


def save_rows(path: str, rows: list[dict]) -> None:
    out = Path(path)
    existing = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else []
    out.write_text(json.dumps(benchmark.merge_rows(existing, rows), indent=1) + "\n", encoding="utf-8")


def plot_loss_curves(path: str) -> int:
    from lib import plots

    with tempfile.TemporaryDirectory(prefix="bench-loss-") as output_dir:
        curves = benchmark.loss_curves(output_dir)
    (seed_name, seed), (other_name, other) = curves.items()
    figure = plots.loss_curve(seed, None, title="embedded model, sql task: seed settings vs defaults",
                              others={other_name: other})
    axes = figure.axes[0]
    axes.lines[0].set_label(seed_name)  # loss_curve calls the first curve "this run"
    axes.legend()
    figure.savefig(path)
    for name, history in curves.items():
        print(name, " ".join(f"{point['loss']:.3f}" for point in history))
    return 0


def memory_checks(args) -> int:
    """Each --memory-check in its own process (a clean peak); rows appended to --out."""
    rows = []
    for overrides in args.memory_check:
        with tempfile.NamedTemporaryFile(suffix=".json") as row_file:
            done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-worker", overrides,
                                   "--row-file", row_file.name], capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(Path(row_file.name).read_text(encoding="utf-8")))
        row = rows[-1]
        print(f"{row['overrides']}: micro-batch {row['micro_batch_size']} x {row['grad_accum']}, estimated "
              f"{row['estimated_gib']} GiB, measured {row['measured_gib']} GiB (ratio {row['ratio']})", flush=True)
        if args.out:
            out = Path(args.out)
            existing = json.loads(out.read_text(encoding="utf-8")) if out.is_file() else []
            out.write_text(json.dumps(existing + [row], indent=1) + "\n", encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        rows = json.loads(Path(args.report).read_text(encoding="utf-8"))
        if args.runs:
            rows = [row for row in rows if row.get("run") in args.runs.split(",")]
        print(benchmark.markdown_table(rows))
        if args.chart:
            benchmark.chart(rows, args.chart)
        return 0
    if args.loss_curves:
        return plot_loss_curves(args.loss_curves)
    if args.memory_worker:
        with tempfile.TemporaryDirectory(prefix="memory-check-") as output_dir:
            row = benchmark.memory_check(json.loads(args.memory_worker), output_dir)
        Path(args.row_file).write_text(json.dumps(row), encoding="utf-8")
        return 0
    if args.memory_check:
        return memory_checks(args)
    if args.arch is None:
        print("error: --arch is required (or --report)", file=sys.stderr)
        return 2
    args.model_dir = args.model_dir or str(Path(tempfile.gettempdir()) / "qlora-bench" / args.arch)
    if args.build:
        benchmark.build_random_model(args.arch, args.model_dir)
        return 0
    if args.worker:
        return run_worker(args)
    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in configs if name not in benchmark.CONFIGS and name not in benchmark.UNSLOTH_CONFIGS]
    if unknown:
        print(f"error: unknown configurations {unknown}", file=sys.stderr)
        return 2
    if not ensure_model(args):
        return 1
    rows = []
    rounds = [(repeat, config) for repeat in range(1, args.repeats + 1) for config in configs]
    for repeat, config in rounds:
        rows.append(run_config(args, config))
        row = rows[-1]
        if args.repeats > 1:
            row["repeat"] = repeat
        if args.run:
            row["run"] = args.run
        if rank() != 0:  # rank 0's row stands for the group; another rank only says when it failed
            if row["status"] != "ok":
                print(f"rank {rank()} {args.arch} {config}: {row['status']}\n{row.get('log_tail', '')[-1500:]}",
                      flush=True)
            continue
        label = f" round {repeat}" if args.repeats > 1 else ""
        print(f"{args.arch} {config}{label}: {row['status']} {row.get('tokens_per_s')} tokens/s on {row.get('gpus')} "
              f"process(es), peak {row.get('peak_mem_gib')} GiB, mfu {row.get('mfu')}", flush=True)
        check = row.get("packing_check")
        if check and check.get("status") == "timeout":
            print("  packing check: ran out of time after the measurement", flush=True)
        elif check:
            print(f"  packing check ({'ok' if check['ok'] else 'FAILED'}): examples of {check['lengths']} tokens "
                  f"packed vs alone, loss max |diff| {check['loss_max_diff']}, logits max |diff| "
                  f"{check['logits_max_diff']} (attending across examples: {check['crossed_logits_max_diff']})",
                  flush=True)
        if row.get("profile"):
            print(benchmark.profile_table(row["profile"]), flush=True)
        if row["status"] != "ok":
            print(row.get("log_tail", "")[-1500:], flush=True)
        if args.out:
            save_rows(args.out, [row])
    if rank() == 0:
        print(benchmark.markdown_table(rows) if args.repeats == 1 else benchmark.repeat_summary(rows, configs[0]))
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
