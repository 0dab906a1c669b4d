"""Distributed QLoRA fine-tuning: rank 0 on this machine, the other ranks on CML Workers or local processes.

From a notebook or a job:
    from lib.launcher import launch
    result = launch(RunConfig(task="sql", max_steps=50), num_workers=2)  # None: NUM_GPU_WORKERS from the environment
    result = launch(config, 2, "cml", main_port=29500, resources=WorkerResources(cpu=8, memory_gib=64))
    result.adapter_dir, result.record["world_size"], result.logs[1]
From a shell (same settings as lib.train, plus the launch's own):
    NUM_GPU_WORKERS=2 python -m lib.launcher --task sql --set max_steps=50 [--backend local] [--evaluate]
    QLORA_MAIN_PORT=29400 QLORA_WORKER_GPUS=2 python -m lib.launcher --workers 2 --task sql

What happens: the config gets its run name and is validated, with the run folder and the base
model, before anything starts. Every process reads one config file,
`<run_dir>/launch/run.json`; every worker gets its own accelerate config rendered from
accelerate_configs/ (`<run_dir>/launch/accelerate-<rank>.yaml`: machine rank, main address and
port, number of machines and processes) and runs
`python -m accelerate.commands.launch --config_file <it> -m lib.train --config <run.json>`.
Rank 0 runs here; the others run through a worker backend (lib.workers): CML Workers when
`cml.workers_v1` (or `cdsw`) imports, else separate process trees on this host, each its own
machine rank over 127.0.0.1. Each worker's output goes to `<run_dir>/logs/attempt-<N>/worker-<rank>.log`,
N counting the launches of the run from 1, so a relaunch (to resume a stopped or failed run) keeps the
logs of the attempts before it (rank 0's is echoed here too). If a worker fails, or the workers do not
meet within `join_timeout_s`, every worker is stopped and LaunchError names the rank and shows its log's end.

Rank 0 hosts the rendezvous on `main_port` (default 29500, torch's and accelerate's customary port; or
QLORA_MAIN_PORT): a fixed port, so that a workspace's network policy can open it to the workers. A port
already taken on this host is an error naming the setting, not a silent move to another port (which the
policy would block). Each worker runs `processes_per_worker` training processes (default: one per GPU
visible here, shared out among the workers when they all run on this host; 1 without a GPU).
Before anything starts the run is planned as its processes will plan it (lib.plan, from the model's
shapes): when the plan shards the model (distributed=fsdp, or auto for a model that does not fit one GPU
whole) every worker gets accelerate_configs/fsdp.yaml instead of the data-parallel template.
Only rank 0 writes the adapter and the run record (lib.fine_tuner). Secrets such as HF_TOKEN stay
in the environment: nothing here writes them to a file or a command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import string
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lib import runs
from lib.config import ConfigError, RunConfig
from lib.train import GPUS_VARIABLE
from lib.workers import REPO_ROOT, WorkerResources, start_local, worker_backend

ACCELERATE_CONFIGS = REPO_ROOT / "accelerate_configs"
WORKERS_VARIABLE = "NUM_GPU_WORKERS"
PORT_VARIABLE, DEFAULT_MAIN_PORT = "QLORA_MAIN_PORT", 29500  # rank 0's rendezvous port: open it to the workers
LAUNCH, LOGS = "launch", "logs"  # run-folder subfolders: what every process reads; what every worker printed
ATTEMPT_PREFIX = "attempt-"      # logs/attempt-<N>/: one folder per launch of the run
POLL_S = 0.5                     # how often the workers' states are checked
STOP_TIMEOUT_S = 120             # after a stop signal: how long the workers may take to save a checkpoint and end
LOG_TAIL_LINES = 40              # lines of a failed worker's log shown in LaunchError


@dataclass
class LaunchResult:
    run_dir: Path
    adapter_dir: Path
    record: dict               # the run record rank 0 wrote (world_size, rank_shares, metrics, ...)
    logs: dict[int, Path]      # rank -> that worker's log of this attempt (logs/attempt-<N>/worker-<rank>.log)


class LaunchError(RuntimeError):
    """A worker failed or did not join in time; names its rank and ends with the tail of its log."""

    def __init__(self, rank: int, reason: str, log_path: Path):
        self.rank, self.reason, self.log_path = rank, reason, log_path
        super().__init__(f"worker rank {rank} {reason}; every worker of the run was stopped.\n"
                         f"--- last lines of {log_path} ---\n{log_tail(log_path)}")


class RunStopped(RuntimeError):
    """The launch got a stop signal (SIGTERM: the CML Job was stopped); the workers saved a checkpoint and ended."""

    exit_code = 128 + signal.SIGTERM

    def __init__(self, signal_name: str, run_dir: Path):
        checkpoint = runs.last_checkpoint(run_dir)
        step = checkpoint.rsplit("-", 1)[-1] if checkpoint else None
        saved = f"saved {checkpoint} (step {step})" if checkpoint else "saved no checkpoint (stopped before the first step)"
        super().__init__(f"{signal_name} received: every worker stopped at the end of a step and {saved}; "
                         "launch the same run again to resume")


class StopRequest:
    """While installed, a stop signal to this process is recorded (not fatal) so the launch can pass it on."""

    def __init__(self):
        self.signal_name, self._previous = None, {}

    def __enter__(self) -> "StopRequest":
        import threading

        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._received)}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _received(self, signum, frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name


def workers_from_env(value: str | None = None) -> int:
    """The number of workers from NUM_GPU_WORKERS (or `value`, read the same way)."""
    value = os.environ.get(WORKERS_VARIABLE) if value is None else value
    accepted = f"a whole number of workers, 1 or more (e.g. {WORKERS_VARIABLE}=2)"
    if value is None:
        raise ConfigError(WORKERS_VARIABLE, None, f"{accepted}; the environment variable is not set")
    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(WORKERS_VARIABLE, value, accepted)
    return int(text)


def main_port_from_env(value=None) -> int:
    """Rank 0's rendezvous port: `value` (a launch's main_port), else QLORA_MAIN_PORT, else 29500."""
    setting = "main_port"
    if value is None and os.environ.get(PORT_VARIABLE, "").strip():
        value, setting = os.environ[PORT_VARIABLE], PORT_VARIABLE
    if value is None:
        return DEFAULT_MAIN_PORT
    text = str(value).strip() if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ConfigError(setting, value, f"a TCP port number from 1 to 65535 (default {DEFAULT_MAIN_PORT})")
    return int(text)


def check_port_free(port: int) -> None:
    """Refuse a rendezvous port that something on this host already listens on (another run, say), before
    any worker starts. SO_REUSEADDR as torch's store sets it: a port a finished run left in TIME_WAIT is free."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("", port))
        except OSError as error:
            raise ConfigError("main_port", port, f"a port free on this host ({error.strerror}: another run or program "
                                                 f"listens there); pass main_port= or set {PORT_VARIABLE} to a free "
                                                 "port that the workers may reach") from None


def default_processes_per_worker(num_workers: int, shares_host: bool) -> int:
    """One training process per GPU visible here, shared out among the workers when they all run on this host
    (CML Workers get as many GPUs as rank 0 has); 1 without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return 1
    return max(1, torch.cuda.device_count() // (num_workers if shares_host else 1))


# ---- accelerate configs ---------------------------------------------------------------------------

def accelerate_templates() -> list[str]:
    """Names of the templates in accelerate_configs/."""
    return sorted(path.stem for path in ACCELERATE_CONFIGS.glob("*.yaml"))


def render_accelerate_config(template: str, path, **values) -> Path:
    """Fill a template of accelerate_configs/ (a name such as "multi_cpu", or a file) with `values`, each
    written as a JSON literal, and write it to `path`: a file for `accelerate launch --config_file`."""
    source = Path(template) if Path(template).suffix == ".yaml" else ACCELERATE_CONFIGS / f"{template}.yaml"
    if not source.is_file():
        raise ConfigError("template", template, f"one of {', '.join(accelerate_templates())}, or a .yaml file")
    text = string.Template(source.read_text(encoding="utf-8"))
    wanted = set(text.get_identifiers())
    if set(values) != wanted:
        raise ConfigError("values", sorted(values), f"exactly the placeholders of {source.name}: {sorted(wanted)}")
    for name, value in values.items():
        if not isinstance(value, (bool, int, str)):
            raise ConfigError(name, value, "a number, true/false or a string")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.substitute({name: json.dumps(value) for name, value in values.items()}), encoding="utf-8")
    return path


def topology_template(num_workers: int, processes_per_worker: int, use_gpu: bool, sharded: bool = False) -> str:
    """The accelerate_configs/ template for a run's shape; sharded: the plan shards the model (FSDP)."""
    if num_workers * processes_per_worker == 1:
        return "single_process"
    if sharded:
        return "fsdp"
    if not use_gpu:
        return "multi_cpu"
    return "multi_gpu" if num_workers == 1 else "multi_machine"


def worker_values(template: str, rank: int, num_workers: int, processes_per_worker: int, main_address: str,
                  main_port: int, use_gpu: bool, shares_host: bool, layer_class: str = "") -> dict:
    """The values of worker `rank`'s accelerate config. shares_host: all workers run on this host, so
    each gets its own GPUs. layer_class: the decoder layer FSDP wraps (fsdp only)."""
    if template == "single_process":
        return {"use_cpu": not use_gpu}
    if template == "multi_gpu":
        return {"num_processes": processes_per_worker, "main_process_port": main_port}
    values = {"machine_rank": rank, "num_machines": num_workers, "num_processes": num_workers * processes_per_worker,
              "main_process_ip": main_address, "main_process_port": main_port}
    if template in ("multi_machine", "fsdp"):
        first = rank * processes_per_worker
        own_gpus = shares_host and use_gpu
        values["gpu_ids"] = ",".join(map(str, range(first, first + processes_per_worker))) if own_gpus else "all"
    if template == "fsdp":
        values["layer_class"] = layer_class
    return values


def sharding(config: RunConfig, model_path: str, processes: int, use_gpu: bool) -> tuple[bool, str]:
    """Whether the run's processes will shard the model (lib.plan decides it here as they would, from the
    model's shapes, without loading a weight), and the decoder layer class FSDP wraps."""
    from lib.memory import read_shapes
    from lib.plan import decide

    shapes = read_shapes(model_path)
    return decide(config, shapes, on_gpu=use_gpu, processes=processes).sharded, shapes.layer_class


def accelerate_argv(accelerate_config: Path, run_json: Path, join_timeout_s: float) -> list[str]:
    """The arguments after `python` for one worker; the static rendezvous waits join_timeout_s for all machines."""
    return ["-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
            "--rdzv_conf", f"timeout={math.ceil(join_timeout_s)}",
            "-m", "lib.train", "--config", str(run_json)]


# ---- the launch ---------------------------------------------------------------------------------

def launch(config: RunConfig, num_workers: int | None = None, backend="auto", *, join_timeout_s: float = 300,
           processes_per_worker: int | None = None, main_port: int | None = None,
           resources: WorkerResources | dict | None = None, echo: bool = True) -> LaunchResult:
    """Train `config` on `num_workers` workers of `processes_per_worker` processes each (one per GPU).

    backend: "auto", "local", "cml", or a backend object (lib.workers). join_timeout_s: how long
    the workers may take to meet, and to finish once one has finished. processes_per_worker: None, one
    per GPU visible here. main_port: rank 0's rendezvous port (None: QLORA_MAIN_PORT, else 29500).
    resources: what each CML Worker gets (lib.workers.WorkerResources; unset: QLORA_WORKER_* variables).
    echo: copy rank 0's log here.
    """
    num_workers = workers_from_env() if num_workers is None else _count("num_workers", num_workers)
    if processes_per_worker is not None:
        _count("processes_per_worker", processes_per_worker)
    if isinstance(join_timeout_s, bool) or not isinstance(join_timeout_s, (int, float)) or not join_timeout_s >= 1:
        raise ConfigError("join_timeout_s", join_timeout_s, "a number of seconds, 1 or more")
    main_port = main_port_from_env(main_port)
    config = _with_absolute_paths(config.validate().with_run_name()).validate()
    runs.check_run_dir(config)
    from lib.models import resolve_base_model

    model_path = resolve_base_model(config.base_model)  # fails offline for a Hub id; converts the embedded model once
    workers_backend = worker_backend(backend, resources)
    main_address = workers_backend.main_address() if num_workers > 1 else "127.0.0.1"
    use_gpu, shares_host = _has_gpu(), workers_backend.shares_host
    processes_per_worker = processes_per_worker or default_processes_per_worker(num_workers, shares_host)
    sharded, layer_class = sharding(config, model_path, num_workers * processes_per_worker, use_gpu)
    template = topology_template(num_workers, processes_per_worker, use_gpu, sharded)
    if template != "single_process":
        check_port_free(main_port)

    run_json = write_run_config(config)
    attempt_dir = new_attempt_dir(config.run_dir)
    argv, logs = {}, {}
    for rank in range(num_workers):
        values = worker_values(template, rank, num_workers, processes_per_worker, main_address, main_port,
                               use_gpu, shares_host, layer_class)
        accelerate_config = render_accelerate_config(template, config.run_dir / LAUNCH / f"accelerate-{rank}.yaml",
                                                     **values)
        argv[rank] = accelerate_argv(accelerate_config, run_json, join_timeout_s)
        logs[rank] = new_log(attempt_dir / f"worker-{rank}.log")
    print(f"launching {num_workers} worker(s) x {processes_per_worker} process(es) with {template}.yaml "
          f"({workers_backend.name} backend, rendezvous port {main_port}); logs in {attempt_dir}", flush=True)
    gpus = processes_per_worker if use_gpu else 0
    with StopRequest() as stop:
        failure = run_workers(workers_backend, argv, logs, gpus, join_timeout_s, echo,
                              host_processes=processes_per_worker * (num_workers if shares_host else 1), stop=stop)
    if failure:
        raise LaunchError(failure[0].rank, failure[1], failure[0].log_path)
    if stop.signal_name:
        raise RunStopped(stop.signal_name, config.run_dir)
    return _result(config.run_dir, logs)


def run_workers(workers_backend, argv: dict[int, list[str]], logs: dict[int, Path], gpus: int,
                join_timeout_s: float, echo: bool, host_processes: int, stop: StopRequest | None = None):
    """Start rank 0 here and the others through the backend, wait, and stop them all whatever happens;
    (worker, reason) for a failure, or None. gpus: per worker; host_processes: training processes on this host."""
    local_env = _local_env(host_processes)
    remote_env = local_env if workers_backend.shares_host else {"PYTHONUNBUFFERED": "1"}
    workers = []
    try:
        workers.append(start_local(0, argv[0], local_env, logs[0]))
        for rank in sorted(argv)[1:]:
            workers.append(workers_backend.start(rank, argv[rank], remote_env, logs[rank],
                                                 join_timeout_s=join_timeout_s, gpus=gpus))
        return wait_for_workers(workers, join_timeout_s, echo, stop)
    finally:
        for worker in workers:
            worker.stop()


def write_run_config(config: RunConfig) -> Path:
    """The config file every process of the run reads."""
    run_json = config.run_dir / LAUNCH / "run.json"
    run_json.parent.mkdir(parents=True, exist_ok=True)
    config.to_json(run_json)
    return run_json


def new_attempt_dir(run_dir: Path) -> Path:
    """`<run_dir>/logs/attempt-<N>/`, N one more than the run's last attempt (1 for its first launch): a
    relaunch keeps the logs of the attempts before it."""
    folder = run_dir / LOGS
    numbers = [int(path.name[len(ATTEMPT_PREFIX):]) for path in folder.glob(f"{ATTEMPT_PREFIX}*")
               if path.name[len(ATTEMPT_PREFIX):].isdigit()]
    attempt_dir = folder / f"{ATTEMPT_PREFIX}{max(numbers, default=0) + 1}"
    attempt_dir.mkdir(parents=True, exist_ok=True)
    return attempt_dir


def new_log(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _result(run_dir: Path, logs: dict[int, Path]) -> LaunchResult:
    record_path = run_dir / runs.RUN_RECORD
    if not record_path.is_file():
        raise LaunchError(0, f"finished without writing {record_path}", logs[0])
    return LaunchResult(run_dir=run_dir, adapter_dir=run_dir / runs.ADAPTER, record=runs.read_json(record_path),
                        logs=logs)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(name, value, "a whole number, 1 or more")
    return value


def _with_absolute_paths(config: RunConfig) -> RunConfig:
    """The config with its paths absolute: workers start in the repository root, not in the caller's folder."""
    changes = {"output_dir": str(_expanded("output_dir", config.output_dir).resolve())}
    if config.data not in ("embedded", "hub"):
        changes["data"] = str(Path(config.data).resolve())
    if config.eval_data:  # a held-out file resolves where the caller is, like data (it did not: issue 32)
        changes["eval_data"] = str(_expanded("eval_data", config.eval_data).resolve())
    if _expanded("base_model", config.base_model).is_dir():
        changes["base_model"] = str(_expanded("base_model", config.base_model).resolve())
    return config.replace(**changes)


def _expanded(name: str, value: str) -> Path:
    try:
        return Path(value).expanduser()
    except RuntimeError as error:  # ~user of a user this system does not have
        raise ConfigError(name, value, f"a path whose ~user names a user of this system ({error})") from None


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    """A TCP port free on this host now: for tests that launch in parallel (main_port=free_port())."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _local_env(host_processes: int) -> dict[str, str]:
    """Additions to the environment of processes started on this host: CPU threads and the CPU memory budget
    shared out among the run's processes here (threads unless OMP_NUM_THREADS is set already), unbuffered
    output for the logs, and one GPU per training process (a single-process worker seeing several GPUs uses
    the first, and does not start processes of its own: lib.train)."""
    from lib.memory import HOST_PROCESSES_VARIABLE

    env = {"PYTHONUNBUFFERED": "1", GPUS_VARIABLE: "1", HOST_PROCESSES_VARIABLE: str(host_processes)}
    if "OMP_NUM_THREADS" not in os.environ:
        from lib.plan import usable_cores

        env["OMP_NUM_THREADS"] = str(max(1, len(usable_cores()) // host_processes))
    return env


def wait_for_workers(workers: list, join_timeout_s: float, echo: bool, stop: StopRequest | None = None):
    """Wait until every worker has finished; (worker, reason) for the first failure, or None.
    After a stop signal: pass it on to rank 0's training processes (the ranks agree after every step,
    so all of them save one checkpoint and end) and wait STOP_TIMEOUT_S for them to finish."""
    follower = LogFollower(workers[0].log_path) if echo else None
    finished_at = stopping_since = None
    try:
        while True:
            if stop and stop.signal_name and stopping_since is None:
                stopping_since = time.monotonic()
                print(f"{stop.signal_name} received: asking the workers to save a checkpoint and stop", flush=True)
                signal_training_processes(workers[0], signal.SIGTERM)
            codes = {worker.rank: worker.exit_code() for worker in workers}
            failed = [worker for worker in workers if codes[worker.rank] not in (None, 0)]
            if failed:
                # Rank 0 mostly fails because another rank went away; the other rank's log says why.
                culprit = min(failed, key=lambda worker: (worker.rank == 0, worker.rank))
                return culprit, _failure_reason(culprit, codes[culprit.rank], failed)
            running = [worker for worker in workers if codes[worker.rank] is None]
            if not running:
                return None
            if stopping_since and time.monotonic() - stopping_since > STOP_TIMEOUT_S:
                return running[0], f"did not stop within {STOP_TIMEOUT_S} s of the stop signal"
            if len(running) < len(workers):
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > join_timeout_s:
                    return running[0], f"was still running {join_timeout_s:g} s after another worker had finished"
            if follower:
                follower.echo()
            time.sleep(POLL_S)
    finally:
        if follower:
            follower.echo()


def signal_training_processes(worker, sig: signal.Signals) -> None:
    """Send `sig` to a local worker's training processes (those torchrun started, which have a RANK), not
    to torchrun itself, which would treat it as a crash."""
    import psutil

    try:
        children = psutil.Process(worker.process.pid).children(recursive=True)
    except (psutil.NoSuchProcess, AttributeError):
        return
    for child in children:
        try:
            if "RANK" in child.environ():
                child.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _failure_reason(worker, code: int, failed: list) -> str:
    reason = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    if worker.failure:
        reason += f" ({worker.failure})"
    others = [str(other.rank) for other in failed if other is not worker]
    return reason + (f"; rank(s) {', '.join(others)} failed too" if others else "")


class LogFollower:
    """Copies what a log file gains to stdout."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def echo(self) -> None:
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                new = log.read()
        except FileNotFoundError:
            return
        self.offset += len(new)
        if new:
            sys.stdout.write(new.decode(errors="replace"))
            sys.stdout.flush()


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log: the worker never started)"
    return "\n".join(text.rstrip().splitlines()[-lines:]) or "(empty log)"


def accelerate_config_preview(config: RunConfig, num_workers: int, processes_per_worker: int | None, backend: str,
                              rank: int, main_port: int | None = None) -> str:
    """The accelerate config `launch` would write for one worker's rank of a run of `config`, rendered to a
    scratch file."""
    import tempfile

    from lib.models import resolve_base_model

    use_gpu = _has_gpu()
    workers = worker_backend(backend) if num_workers > 1 else None
    shares_host = workers is None or workers.shares_host
    processes_per_worker = processes_per_worker or default_processes_per_worker(num_workers, shares_host)
    sharded, layer_class = sharding(config, resolve_base_model(config.base_model), num_workers * processes_per_worker,
                                    use_gpu)
    template = topology_template(num_workers, processes_per_worker, use_gpu, sharded)
    values = worker_values(template, rank, num_workers, processes_per_worker,
                           workers.main_address() if workers else "127.0.0.1", main_port_from_env(main_port), use_gpu,
                           shares_host, layer_class)
    path = render_accelerate_config(template, Path(tempfile.mkdtemp()) / f"accelerate-{rank}.yaml", **values)
    return f"# {template}.yaml rendered for rank {rank}\n" + path.read_text(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from lib.evaluation import evaluate_run
    from lib.train import parse_config

    parser = argparse.ArgumentParser(prog="python -m lib.launcher", description=__doc__.split("\n")[0],
                                     epilog="Other arguments are those of python -m lib.train.")
    parser.add_argument("--workers", help=f"number of workers (default: ${WORKERS_VARIABLE})")
    parser.add_argument("--processes-per-worker", type=int, help="one per GPU of a worker (default: the GPUs seen here)")
    parser.add_argument("--backend", default="auto", choices=("auto", "local", "cml"))
    parser.add_argument("--join-timeout", type=float, default=300, help="seconds the workers may take to meet")
    parser.add_argument("--main-port", help=f"rank 0's rendezvous port (default: ${PORT_VARIABLE}, else {DEFAULT_MAIN_PORT})")
    args, rest = parser.parse_known_args(argv)
    try:
        config, evaluate = parse_config(rest)
        result = launch(config, workers_from_env(args.workers), args.backend, join_timeout_s=args.join_timeout,
                        processes_per_worker=args.processes_per_worker, main_port=args.main_port)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunStopped as stopped:
        print(f"stopped: {stopped}", file=sys.stderr)
        return stopped.exit_code
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if evaluate:
        from lib.data import load_splits
        from lib.evaluation import comparison_table
        from lib.models import resolve_base_model

        config = RunConfig.from_dict(result.record["config"])
        report = evaluate_run(config, load_splits(config)[1], resolve_base_model(config.base_model))
        print(comparison_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
