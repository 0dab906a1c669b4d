"""The script a CML Worker runs for lib.launcher: one machine rank of a distributed run.

lib.workers.CmlWorkers starts it through
`cml.workers_v1.launch_workers(n=1, ..., script="lib/worker_entry.py", env={...})`. To repeat a
worker's launch by hand, from the repository root, with the values from that call:

    QLORA_WORKER_ARGV='["-m", "accelerate.commands.launch", "--config_file", ...]' \\
    QLORA_WORKER_LOG=runs/<run>/logs/attempt-1/worker-1.log QLORA_WORKER_CWD=. python lib/worker_entry.py

From its environment it reads QLORA_WORKER_ARGV (the arguments after `python`, a JSON list of
strings, built by lib.launcher), QLORA_WORKER_LOG (this rank's log in the run folder, on the shared
project file system) and QLORA_WORKER_CWD (the repository root). It runs `python <argv>` there,
copies the output to the log and to the worker's console, and raises when the command fails, so
that CML marks the worker failed. Standard library only: the worker's Python runs it as a file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def worker_argv() -> list[str]:
    argv = json.loads(os.environ["QLORA_WORKER_ARGV"])
    if not isinstance(argv, list) or not all(isinstance(item, str) for item in argv):
        raise ValueError(f"QLORA_WORKER_ARGV must be a JSON list of strings, not {argv!r}")
    return argv


def main() -> int:
    """Run the worker's command; its exit code."""
    argv = worker_argv()
    with open(os.environ["QLORA_WORKER_LOG"], "ab") as log:
        child = subprocess.Popen([sys.executable, *argv], cwd=os.environ["QLORA_WORKER_CWD"],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for line in child.stdout:
            log.write(line)
            log.flush()
            sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()
        return child.wait()


if __name__ == "__main__":
    code = main()
    if code != 0:
        raise RuntimeError(f"worker rank {os.environ.get('QLORA_WORKER_RANK')}: python {' '.join(worker_argv())} "
                           f"exited with code {code}; log: {os.environ['QLORA_WORKER_LOG']}")
