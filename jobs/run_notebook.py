"""Run a notebook headless with papermill into a new run folder: what every CML Job of this project does.

    python jobs/run_notebook.py notebooks/05_adapter_explorer.ipynb --set prompts_per_adapter=2
    python jobs/finetune_sql.py --set max_steps=20 --output-dir runs --run-name sql-try
    QLORA_MAX_STEPS=20 python jobs/finetune_sql.py
    QLORA_PARAMETERS='{"max_steps": 20, "lora_r": 8}' python jobs/finetune_sql.py

Parameters are the names in the notebook's `parameters` cell (`--help` lists them, with their
defaults and meanings). Their values come from, later ones winning:
  1. the notebook's defaults;
  2. QLORA_PARAMETERS, a JSON object of name -> value (how a CML Job can pass several at once);
  3. QLORA_<NAME> for each parameter, e.g. QLORA_MAX_STEPS=20, QLORA_BASE_MODEL=bigscience/bloom-1b1;
  4. --set name=value on the command line (repeatable);
  5. --output-dir and --run-name.
A text value is read as the parameter's declared type: `str` parameters take it verbatim, `bool`
ones accept true/false/1/0/yes/no, others read it as JSON (20, 5e-4, ["q_proj", "v_proj"]) or as
text when it is not JSON. Relative paths are relative to the repository root, where the notebook
runs. A name the notebook does not declare is an error, so a secret can never slip in as a
parameter: secrets (HF_TOKEN) stay in the environment, which the notebook's kernel inherits.

The run goes into a new folder, <output_dir>/<run_name>; an existing folder is never reused (give
another --run-name), except with --resume. The executed notebook is written there beside what the
notebook saved (adapter, run record, metrics, plots). A SIGTERM (a CML Job stopped by its user) is
passed to the kernel: training saves a checkpoint and stops, and the job prints the command that goes
on from there (the same one with --run-name <its folder> --resume). Exit status: 0 when every cell
ran, 1 when a cell failed (its error is printed last), 2 for bad arguments, 143 when stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # jobs run as files (python jobs/<job>.py); lib is at the root
from lib import runs  # noqa: E402
from lib.config import ConfigError, parse_value, split_setting  # noqa: E402
from lib.evaluation import comparison_table  # noqa: E402

NOTEBOOKS = REPO_ROOT / "notebooks"
ENV_PREFIX = "QLORA_"                   # QLORA_<NAME> sets one parameter
ENV_PARAMETERS = "QLORA_PARAMETERS"     # a JSON object of parameters
PROJECT_KERNEL = "qlora-amp"            # registered for this Python when the python3 kernel runs another one
ARTIFACTS = (("adapter", "adapter"), ("run record", "run_record.json"), ("metrics", "metrics.json"),
             ("loss curve", "loss_curve.png"), ("metrics chart", "metrics.png"), ("worker logs", "logs"))
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
STOPPED_EXIT = 128 + signal.SIGTERM     # 143: stopped by SIGTERM (a CML Job stopped by its user)


class UsageError(ValueError):
    """Arguments or environment that cannot make a run; the job exits with status 2."""


# ---- parameters -------------------------------------------------------------------------------

def declared_parameters(notebook: Path) -> dict[str, dict]:
    """The notebook's parameters: name -> {inferred_type_name, default, help} (papermill reads the cell)."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


def read_value(name: str, text: str, type_name: str):
    """A parameter's value from text (an environment variable or --set), as the declared type."""
    if type_name == "str":
        return text
    if type_name == "bool":
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UsageError(f"parameter {name!r} is a bool: give true or false, not {text!r}")
    return parse_value(text)


def collect_parameters(declared: dict[str, dict], environ: dict, settings: list[str]) -> dict:
    """Values from QLORA_PARAMETERS, then QLORA_<NAME>, then `--set name=value` items; unknown names fail."""
    values = {}
    if environ.get(ENV_PARAMETERS):
        try:
            from_json = json.loads(environ[ENV_PARAMETERS])
        except json.JSONDecodeError as error:
            raise UsageError(f"{ENV_PARAMETERS} is not valid JSON ({error})") from None
        if not isinstance(from_json, dict):
            raise UsageError(f"{ENV_PARAMETERS} must be a JSON object of name -> value, not {from_json!r}")
        values.update(from_json)
    for name, info in declared.items():
        variable = ENV_PREFIX + name.upper()
        if variable in environ:
            values[name] = read_value(name, environ[variable], info["inferred_type_name"])
    for item in settings:
        try:
            name, text = split_setting(item)
        except ConfigError:
            raise UsageError(f"--set takes name=value, not {item!r}") from None
        info = declared.get(name, {"inferred_type_name": "None"})
        values[name] = read_value(name, text, info["inferred_type_name"])
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise UsageError(f"unknown parameter(s) {', '.join(unknown)}; this notebook's parameters are: "
                         f"{', '.join(declared)}")
    return values


def default_value(declared: dict, name: str):
    import ast

    return ast.literal_eval(declared[name]["default"])


# ---- the run folder and the kernel ------------------------------------------------------------

def new_run_dir(output_dir: Path, run_name: str, prefix: str, resume: bool = False) -> Path:
    """Create and return a run folder that did not exist: `run_name`, or <prefix>-<date>-<time>[-n].
    resume: `run_name` is the folder of a stopped job to go on with (it must hold that job's settings)."""
    if run_name and (Path(run_name).name != run_name or run_name in (".", "..")):
        raise UsageError(f"run name {run_name!r} must be a plain folder name, without slashes")
    output_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        if not run_name or not (output_dir / run_name / runs.RUN_CONFIG).is_file():
            raise UsageError(f"--resume goes on with a stopped job: give its --run-name; {output_dir / (run_name or '?')} "
                             "holds no stopped run")
        return output_dir / run_name
    if run_name:
        try:
            (output_dir / run_name).mkdir()
        except FileExistsError:
            raise UsageError(f"run folder {output_dir / run_name} exists already; jobs never reuse a run "
                             "folder: give another --run-name (or none for a new dated one)") from None
        return output_dir / run_name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for count in itertools.count():
        path = output_dir / (f"{prefix}-{stamp}" + (f"-{count}" if count else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def kernel_name() -> str:
    """A Jupyter kernel that runs in this very Python (so in this virtualenv).

    The `python3` kernel spec usually does: its command is `python`, which jupyter_client replaces
    by the current interpreter. When python3 names another interpreter, the project's own kernel
    is registered for this one (in this environment's prefix, else the user's) and used instead.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    specs = KernelSpecManager()
    for name in ("python3", PROJECT_KERNEL):
        try:
            if _runs_here(specs.get_kernel_spec(name).argv[0]):
                return name
        except NoSuchKernel:
            continue
    for where in ("--sys-prefix", "--user"):
        install = [sys.executable, "-m", "ipykernel", "install", where, "--name", PROJECT_KERNEL,
                   "--display-name", f"Python ({PROJECT_KERNEL})"]
        if subprocess.run(install, capture_output=True).returncode == 0:
            return PROJECT_KERNEL
    raise UsageError(f"no Jupyter kernel runs {sys.executable} and registering one failed: "
                     f"run {sys.executable} -m ipykernel install --user --name {PROJECT_KERNEL}")


def _runs_here(command: str) -> bool:
    major, minor = sys.version_info[:2]
    if command in ("python", f"python{major}", f"python{major}.{minor}"):
        return True  # jupyter_client starts sys.executable for these
    return os.path.abspath(command) == os.path.abspath(sys.executable)


# ---- the job ----------------------------------------------------------------------------------

def parse_arguments(notebook: Path, argv: list[str] | None, declared: dict) -> argparse.Namespace:
    lines = [f"  {name} ({info['inferred_type_name']}, default {info['default']}): {info['help']}"
             for name, info in declared.items()]
    parser = argparse.ArgumentParser(
        prog=f"python {Path(sys.argv[0]).name}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Run {notebook.relative_to(REPO_ROOT)} headless into a new run folder.",
        epilog="parameters (also QLORA_<NAME>=value, or QLORA_PARAMETERS='{...}'):\n" + "\n".join(lines))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="set one parameter")
    parser.add_argument("--output-dir", help="parent folder of the run folder (default: the output_dir parameter)")
    parser.add_argument("--run-name", help="the new run folder's name (default: <task>-<date>-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="go on with the stopped job of --run-name (same parameters) from its last checkpoint")
    return parser.parse_args(argv)


def prepare(notebook: Path, argv: list[str] | None, environ: dict, label: str = "") -> tuple[Path, dict]:
    """(run folder, parameters to inject) from the arguments and the environment; a new run folder is
    named <label>-<task>-<date>-<time> (parts that are empty left out)."""
    declared = declared_parameters(notebook)
    args = parse_arguments(notebook, argv, declared)
    values = collect_parameters(declared, environ, args.set)
    if args.output_dir is not None:
        values["output_dir"] = args.output_dir
    if args.run_name is not None:
        values["run_name"] = args.run_name
    output_dir = (values.get("output_dir") or environ.get(ENV_PREFIX + "OUTPUT_DIR")
                  or (default_value(declared, "output_dir") if "output_dir" in declared else "runs"))
    task = values.get("task") or (default_value(declared, "task") if "task" in declared else "")
    prefix = "-".join(filter(None, (label, task))) or notebook.stem.lstrip("0123456789_")
    run_dir = new_run_dir(REPO_ROOT / output_dir, values.get("run_name", ""), prefix, resume=args.resume)
    for name, value in (("output_dir", str(run_dir.parent)), ("run_name", run_dir.name)):
        if name in declared:
            values[name] = value
        else:
            values.pop(name, None)
    return run_dir, values


def run_job(notebook: str, argv: list[str] | None = None, label: str = "") -> int:
    """Run notebooks/<notebook> (or a path) as a job; the process's exit status. `label` starts the
    names of new run folders."""
    import papermill

    notebook_path = Path(notebook) if Path(notebook).is_file() else NOTEBOOKS / notebook
    try:
        run_dir, parameters = prepare(notebook_path.resolve(), argv, dict(os.environ), label)
        kernel = kernel_name()
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    executed = run_dir / notebook_path.name
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    print(f"running {notebook_path.name} on kernel {kernel!r} into {run_dir}\nparameters: {parameters}", flush=True)
    os.environ.setdefault("QLORA_PROGRESS", "lines")  # the kernel inherits it: progress lines in the job log
    with ForwardStop() as stop:
        try:
            papermill.execute_notebook(str(notebook_path), str(executed), parameters=parameters, kernel_name=kernel,
                                       cwd=str(REPO_ROOT), log_output=True, progress_bar=False)
        except Exception as error:  # noqa: BLE001 - a stopped job reports the stop whatever the kernel raised
            if stop.received:
                return stopped(error, run_dir, executed)
            if not isinstance(error, papermill.PapermillExecutionError):
                raise
            print(ANSI_ESCAPE.sub("", "\n".join(error.traceback)), file=sys.stderr)
            print(f"\nFAILED: cell {error.exec_count} of {notebook_path.name} raised {error.ename}: {error.evalue}\n"
                  f"executed notebook (with the error): {executed}", file=sys.stderr, flush=True)
            return 1
    print(summary(run_dir, executed))
    return 0


class ForwardStop:
    """While papermill runs, a SIGTERM to the job (a CML Job stopped by its user) goes on to the kernel,
    where training saves a checkpoint and stops (lib.stopping), instead of ending the job at once."""

    def __init__(self):
        self.received, self._previous = False, None

    def __enter__(self) -> "ForwardStop":
        self._previous = signal.signal(signal.SIGTERM, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _forward(self, signum, frame) -> None:
        import psutil

        self.received = True
        print("SIGTERM received: passing it to the notebook's kernel (training saves a checkpoint and stops)",
              flush=True)
        for child in psutil.Process().children():  # the kernel; it passes the stop on to what it started
            try:
                child.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass


def stopped(error: Exception, run_dir: Path, executed: Path) -> int:
    """Report a job stopped by SIGTERM and how to go on with it; the exit status."""
    command = [sys.executable, *sys.argv]
    if "--resume" not in command:
        command += ["--run-name", run_dir.name, "--resume"] if "--run-name" not in command else ["--resume"]
    resumable = runs.last_checkpoint(run_dir) is not None
    detail = getattr(error, "evalue", "") or str(error)
    print(f"\nSTOPPED by SIGTERM: {detail}\nexecuted notebook: {executed}", file=sys.stderr)
    if resumable:
        print(f"to go on from the last checkpoint: {shlex.join(command)}", file=sys.stderr, flush=True)
    return STOPPED_EXIT


def summary(run_dir: Path, executed: Path) -> str:
    """Where the run's artifacts are, and the base vs adapter metrics when the run has them."""
    lines = [f"executed notebook: {executed}"]
    lines += [f"{label + ':':<18} {run_dir / name}" for label, name in ARTIFACTS if (run_dir / name).exists()]
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        report = json.loads(metrics.read_text(encoding="utf-8"))
        lines += ["", f"{report['task']}: base model vs adapter on {report['rows']} held-out rows",
                  comparison_table(report)]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python jobs/run_notebook.py NOTEBOOK [--set name=value ...] [--output-dir DIR] "
                 "[--run-name NAME]")
    sys.exit(run_job(sys.argv[1], sys.argv[2:]))
