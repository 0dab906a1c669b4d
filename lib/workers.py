"""Worker backends for lib.launcher: where the processes of a distributed run are started.

    from lib.workers import worker_backend
    backend = worker_backend("auto")        # CmlWorkers inside CML, LocalWorkers elsewhere
    backend = worker_backend("cml", WorkerResources(cpu=8, memory_gib=64, gpus=2))  # what each CML Worker gets
    worker = backend.start(rank, argv, env, log_path, join_timeout_s=300, gpus=0)
    worker.exit_code()                      # None while running, then 0 or the failure's code
    worker.stop()                           # stops the worker and everything it started

lib.launcher.launch is the usual way in; it starts rank 0 with `start_local` and
the other ranks with a backend:
- `LocalWorkers`: each rank is its own `accelerate launch` process tree on this
  host (its own machine rank; the machines meet over 127.0.0.1).
- `CmlWorkers`: each rank is a CML Worker (`cml.workers_v1.launch_workers`, or
  the older `cdsw` module) running lib/worker_entry.py, which runs the same
  argument list and writes the same log file on the shared project file system.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_ENTRY = Path(__file__).with_name("worker_entry.py")
# Set in this session but maybe not in the project's environment (e.g. a token set from a notebook):
# handed to CML Workers through the API, never written to a file or a command line.
PASSED_TO_CML_WORKERS = ("HF_TOKEN", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                         "QLORA_AMP_CACHE")
STOP_GRACE_S = 10  # SIGTERM first (torchrun then stops its own children), SIGKILL whatever is left after this


@dataclass(frozen=True)
class WorkerResources:
    """What each CML Worker asks CML for. A field left None is read from its environment variable (below),
    else it takes the default; lib.workers.worker_resources fills and checks them."""
    cpu: float | None = None                 # vCPUs per worker (QLORA_WORKER_CPU; default 4)
    memory_gib: float | None = None          # GiB of memory per worker (QLORA_WORKER_MEMORY_GIB; default 16)
    gpus: int | None = None                  # GPUs per worker (QLORA_WORKER_GPUS; default: one per training process
                                             # when this session has GPUs, else 0)
    accelerator_label_id: int | None = None  # CML's id of the GPU type to ask for (QLORA_ACCELERATOR_LABEL_ID;
                                             # default: none asked, the workspace's default GPU type)


RESOURCE_VARIABLES = {"cpu": "QLORA_WORKER_CPU", "memory_gib": "QLORA_WORKER_MEMORY_GIB", "gpus": "QLORA_WORKER_GPUS",
                      "accelerator_label_id": "QLORA_ACCELERATOR_LABEL_ID"}
RESOURCE_DEFAULTS = {"cpu": 4, "memory_gib": 16, "gpus": None, "accelerator_label_id": None}


def worker_resources(resources: WorkerResources | dict | None = None) -> WorkerResources:
    """`resources` (a WorkerResources, a mapping of its fields, or None) with every unset field read from its
    environment variable or given its default, each checked: ConfigError names the setting (the variable when
    the value came from there), the value and what is accepted."""
    from lib.config import ConfigError

    if isinstance(resources, dict):
        unknown = sorted(set(resources) - set(RESOURCE_VARIABLES))
        if unknown:
            raise ConfigError(unknown[0], resources[unknown[0]], f"a worker resource, one of {sorted(RESOURCE_VARIABLES)}")
        resources = WorkerResources(**resources)
    resources = resources or WorkerResources()
    values = {}
    for name, variable in RESOURCE_VARIABLES.items():
        value, setting = getattr(resources, name), f"resources.{name}"
        if value is None and os.environ.get(variable, "").strip():
            value, setting = os.environ[variable].strip(), variable
        values[name] = RESOURCE_DEFAULTS[name] if value is None else _resource_value(name, setting, value)
    return WorkerResources(**values)


def _resource_value(name: str, setting: str, value) -> float | int:
    """One resource as a number, from a number or its text (an environment variable)."""
    from lib.config import ConfigError

    whole = name in ("gpus", "accelerator_label_id")
    accepted = {"cpu": "a number of vCPUs above 0 (e.g. 4 or 0.5)", "memory_gib": "a number of GiB above 0 (e.g. 16)",
                "gpus": "a whole number of GPUs, 0 or more",
                "accelerator_label_id": "a whole number: the id of a CML accelerator label (Site Administration)"}[name]
    try:
        number = (int if whole else float)(value) if isinstance(value, str) else value
    except ValueError:
        raise ConfigError(setting, value, accepted) from None
    if isinstance(number, bool) or not isinstance(number, (int, float)) or (whole and not isinstance(number, int)):
        raise ConfigError(setting, value, accepted)
    lowest = 1 if name == "accelerator_label_id" else 0  # label ids start at 1; 0 GPUs is a CPU worker
    if not (number >= lowest if whole else 0 < number < float("inf")):
        raise ConfigError(setting, value, accepted)
    return number


class LocalProcess:
    """One worker on this host: `python <argv>` in its own process group with this process's environment
    plus `env`, output into its log."""

    failure = ""  # nothing to add to the exit code and the log

    def __init__(self, rank: int, argv: list[str], env: dict[str, str], log_path: Path):
        self.rank, self.log_path = rank, log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, *argv], cwd=REPO_ROOT, env={**os.environ, **env},
                                            stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def exit_code(self) -> int | None:
        return self.process.poll()

    def stop(self) -> None:
        stop_process_tree(self.process)


def stop_process_tree(process: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop a child, its process group and every descendant, even those in sessions of their own
    (torchrun starts each training process with start_new_session, so a group kill alone misses them):
    SIGTERM first, SIGKILL for whatever is left after `grace_s`."""
    descendants = _descendants(process.pid)  # listed before any dies: an orphan loses its link to us
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is None:
            _signal_group(process.pid, sig)
            process.send_signal(sig)
        for descendant in descendants:
            _signal(descendant, sig)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        _, descendants = psutil.wait_procs(descendants, timeout=grace_s)
        descendants += _descendants(process.pid)  # started while we waited
        if not descendants and process.poll() is not None:
            return


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(process: psutil.Process, sig: signal.Signals) -> None:
    try:
        process.send_signal(sig)
    except psutil.NoSuchProcess:
        pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_local(rank: int, argv: list[str], env: dict[str, str], log_path: Path) -> LocalProcess:
    """Rank 0, which always runs on this host, whatever the backend of the others."""
    return LocalProcess(rank, argv, env, log_path)


class LocalWorkers:
    """Every rank a separate process tree on this host, each its own machine rank, meeting over loopback."""

    name = "local"
    shares_host = True  # all workers compete for this host's cores (and GPUs)

    def main_address(self) -> str:
        return "127.0.0.1"

    def start(self, rank: int, argv: list[str], env: dict[str, str], log_path: Path, *,
              join_timeout_s: float, gpus: int) -> LocalProcess:
        return LocalProcess(rank, argv, env, log_path)


class CmlWorkers:
    """Every rank but 0 a CML Worker running lib/worker_entry.py; rank 0 stays in this session."""

    name = "cml"
    shares_host = False

    def __init__(self, resources: WorkerResources | dict | None = None, api=None):
        self.resources = worker_resources(resources)
        self.api = api or cml_api()

    def main_address(self) -> str:
        from lib.config import ConfigError

        address = os.environ.get("CDSW_IP_ADDRESS", "")
        if not address:
            raise ConfigError("CDSW_IP_ADDRESS", address or None,
                              "this engine's IP address, which CML sets in every session and job "
                              "(the CML backend runs inside CML only; use backend='local' elsewhere)")
        return address

    def start(self, rank: int, argv: list[str], env: dict[str, str], log_path: Path, *,
              join_timeout_s: float, gpus: int) -> "CmlWorker":
        passed = {name: os.environ[name] for name in PASSED_TO_CML_WORKERS if name in os.environ}
        worker_env = {**passed, **env, "QLORA_WORKER_RANK": str(rank), "QLORA_WORKER_ARGV": json.dumps(argv),
                      "QLORA_WORKER_LOG": str(log_path), "QLORA_WORKER_CWD": str(REPO_ROOT)}
        resources = self.resources
        asked = {"accelerator_label_id": resources.accelerator_label_id} if resources.accelerator_label_id is not None else {}
        # accelerator_label_id only when asked: older CML versions (and cdsw) have no such parameter
        launched = self.api.launch_workers(n=1, cpu=resources.cpu, memory=resources.memory_gib,
                                           nvidia_gpu=gpus if resources.gpus is None else resources.gpus,
                                           script=str(WORKER_ENTRY.relative_to(REPO_ROOT)), env=worker_env, **asked)
        return CmlWorker(self.api, rank, launched[0]["id"], log_path, join_timeout_s)


class CmlWorker:
    """A launched CML Worker; a thread waits on it with the documented await_workers calls."""

    def __init__(self, api, rank: int, worker_id: str, log_path: Path, join_timeout_s: float):
        self.api, self.rank, self.id, self.log_path = api, rank, worker_id, log_path
        self.failure, self._code = "", None
        threading.Thread(target=self._watch, args=(join_timeout_s,), daemon=True,
                         name=f"cml-worker-{rank}").start()

    def _watch(self, join_timeout_s: float) -> None:
        try:
            started = self.api.await_workers([self.id], wait_for_completion=False,
                                             timeout_seconds=max(1, math.ceil(join_timeout_s)))
            if started["failures"]:
                self.failure = f"CML did not start it within {join_timeout_s:g} s ({_status(started['failures'])})"
                self._code = 1
                return
            finished = self.api.await_workers([self.id], wait_for_completion=True, timeout_seconds=0)
            if finished["failures"]:
                self.failure = f"CML reports it failed ({_status(finished['failures'])})"
            self._code = 1 if finished["failures"] else 0
        except Exception as error:  # an API error ends the run like a failed worker
            self.failure, self._code = f"the CML Workers API failed: {error!r}", 1

    def exit_code(self) -> int | None:
        return self._code

    def stop(self) -> None:
        if self._code is None:
            self.api.stop_workers(self.id)


def _status(workers: list[dict]) -> str:
    return ", ".join(str(worker.get("status", "no status")) for worker in workers)


def cml_api():
    """The CML Workers API module: `cml.workers_v1`, else the older `cdsw`; None outside CML."""
    for name in ("cml.workers_v1", "cdsw"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def worker_backend(backend="auto", resources: WorkerResources | dict | None = None):
    """A backend by name: "auto" (CML when its Workers API imports, else local), "local", "cml";
    a backend object passes through. resources: what each CML Worker gets (worker_resources)."""
    from lib.config import ConfigError

    resources = worker_resources(resources)  # checked whichever backend runs, before anything starts
    if not isinstance(backend, str):
        return backend
    if backend == "local":
        return LocalWorkers()
    if backend in ("cml", "auto"):
        api = cml_api()
        if api is not None:
            return CmlWorkers(resources, api=api)
        if backend == "auto":
            return LocalWorkers()
        raise ConfigError("backend", backend, "'local' or 'auto' here: neither cml.workers_v1 nor cdsw imports")
    raise ConfigError("backend", backend, "'auto', 'local' or 'cml'")
