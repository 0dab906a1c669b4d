"""A local STAND-IN for CML's Workers API (`cml.workers_v1`), for tests: it is not the service.

Use: put tests/cml_standin first on sys.path; then `import cml.workers_v1` finds this module, and
code written for CML (lib.workers.CmlWorkers) runs unchanged. The calls have the documented
signatures (see CML.md); each "worker" is a real local process instead of a CML engine:
`script` (a Python file, relative to the project root, which is the current folder here as
/home/cdsw is in CML) runs with this interpreter, `code` as `python -c`, or, with a leading "!",
as a command through /bin/sh, as CML does. A worker's environment is this process's plus `env`,
and its output goes to this process's console, as a CML worker's goes to its session's.
cpu, memory, nvidia_gpu, kernel, accelerator_label_id, resource_profile_id and resource_group_id are
recorded, not enforced.
"""

import os
import subprocess
import sys
import threading
import time
import uuid

import psutil

_workers = {}            # id -> {"worker": the dict callers see, "process": subprocess.Popen}
_lock = threading.Lock()
_POLL_S = 0.2


def launch_workers(n, cpu, memory, nvidia_gpu=0, kernel="python3", script="", code="", accelerator_label_id=None,
                   resource_profile_id=None, resource_group_id=None, env={}):
    """Start n workers; a list of worker dicts with at least `id`. The signature of CML's documentation
    (cloud): accelerator_label_id picks the GPU type, resource_profile_id and resource_group_id a profile."""
    if script:
        command = [sys.executable, os.path.join(os.getcwd(), script)]
    elif code.startswith("!"):
        command = ["/bin/sh", "-c", code[1:]]
    else:
        command = [sys.executable, "-c", code]
    launched = []
    for _ in range(n):
        process = subprocess.Popen(command, env={**os.environ, **env}, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        worker = {"id": uuid.uuid4().hex[:12], "status": "running", "ip_address": "127.0.0.1", "cpu": cpu,
                  "memory": memory, "nvidia_gpu": nvidia_gpu, "kernel": kernel, "script": script, "code": code,
                  "accelerator_label_id": accelerator_label_id, "resource_profile_id": resource_profile_id,
                  "resource_group_id": resource_group_id}
        with _lock:
            _workers[worker["id"]] = {"worker": worker, "process": process}
        launched.append(dict(worker))
    return launched


def _refresh(entry):
    code = entry["process"].poll()
    if code is not None and entry["worker"]["status"] == "running":
        entry["worker"]["status"] = "succeeded" if code == 0 else "failed"
    return entry["worker"]["status"]


def await_workers(ids, wait_for_completion=True, timeout_seconds=60):
    """Wait until the workers run (or, with wait_for_completion, have ended); timeout 0 waits without limit.
    Returns {"workers": [those that got there], "failures": [those that failed, were stopped or timed out]}."""
    ids = [item["id"] if isinstance(item, dict) else item for item in ids]
    deadline = time.monotonic() + timeout_seconds if timeout_seconds else None
    while True:
        with _lock:
            states = {worker_id: _refresh(_workers[worker_id]) for worker_id in ids}
        waiting = [worker_id for worker_id, status in states.items()
                   if status == "running" and wait_for_completion]
        if not waiting or (deadline and time.monotonic() > deadline):
            break
        time.sleep(_POLL_S)
    reached = ("succeeded",) if wait_for_completion else ("running", "succeeded")
    with _lock:
        workers = [dict(_workers[worker_id]["worker"]) for worker_id in ids]
    return {"workers": [worker for worker in workers if worker["status"] in reached],
            "failures": [worker for worker in workers if worker["status"] not in reached]}


def stop_workers(*ids):
    """Stop the given workers (all when none are given), with every process they started."""
    with _lock:
        entries = [_workers[worker_id] for worker_id in (ids or list(_workers))]
        for entry in entries:
            if _refresh(entry) == "running":
                entry["worker"]["status"] = "stopped"
    for entry in entries:
        process = entry["process"]
        try:
            descendants = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        if process.poll() is None:
            process.kill()
        for descendant in descendants:
            try:
                descendant.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(descendants, timeout=10)
        process.wait()
    return [dict(entry["worker"]) for entry in entries]


def list_workers():
    with _lock:
        return [dict(entry["worker"]) for entry in _workers.values() if _refresh(entry) == "running"]
