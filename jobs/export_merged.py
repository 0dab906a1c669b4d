"""CML Job: merge a trained adapter into a 16-bit copy of its base model (a checkpoint that loads without PEFT).

    python jobs/export_merged.py                               # the newest finished adapter under QLORA_OUTPUT_DIR
    python jobs/export_merged.py runs/sql-demo/adapter --out merged-sql
    QLORA_ADAPTER=runs/sql-demo/adapter python jobs/export_merged.py
    python jobs/export_merged.py --help

The merged model goes to merged/ beside the adapter unless --out says otherwise. Details: lib/export.py.
"""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lib.export import main  # noqa: E402


def newest_adapter(output_dir: Path) -> str | None:
    adapters = sorted(output_dir.glob("*/adapter/adapter_config.json"), key=lambda path: path.stat().st_mtime)
    return str(adapters[-1].parent) if adapters else None


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if not any(not argument.startswith("-") for argument in arguments) and "-h" not in arguments \
            and "--help" not in arguments:
        adapter = os.environ.get("QLORA_ADAPTER") or newest_adapter(REPO_ROOT / os.environ.get("QLORA_OUTPUT_DIR", "runs"))
        if adapter is None:
            sys.exit("error: no finished adapter under QLORA_OUTPUT_DIR; train one first or name one")
        arguments = [adapter, *arguments]
    sys.exit(main(arguments))
