"""CML Job: score the base model and saved adapters on a data file, without training.

    python jobs/evaluate_adapters.py --task sql --data dev.jsonl --adapter runs/sql-demo/adapter
    python jobs/evaluate_adapters.py --help          # every option (they are those of python -m lib.evaluate)

A CML Job passes its arguments in the job's "Arguments" field. Prints the table (base, each adapter, the
task's baselines) and writes metrics.json and metrics.png into --output-dir (default runs/eval-<task>-<time>).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
