"""Render the task notebooks (01-03) and their jobs from one source, or check the committed ones match it.

    python tools/render_notebooks.py            # write notebooks/0N_*.ipynb and jobs/finetune_<task>.py
    python tools/render_notebooks.py --check    # exit 1 naming every file that differs from its rendering

The source: notebooks/templates/task.ipynb (every cell the task notebooks share, with {{placeholders}}),
notebooks/templates/<task>/*.md (the prose that differs: intro, data, metrics, an optional packing_note) and
optional task-only cells (data_check.md and data_check.py: a cell left empty is dropped),
the task's CPU recipe (lib/tasks: the defaults of the parameters cell) and JOB_TEMPLATE below. Edit
those, then render; tests/test_notebooks.py fails while a committed notebook or job differs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lib.config import RunConfig  # noqa: E402
from lib.tasks import TASKS  # noqa: E402

TEMPLATES = ROOT / "notebooks" / "templates"
PARTS = {"intro": "intro.md", "data": "data.md", "metrics": "metrics.md", "packing_note": "packing_note.md",
         "data_check_md": "data_check.md", "data_check_code": "data_check.py"}  # in notebooks/templates/<task>/ ("" when absent)
RECIPE_PARAMETERS = ("task", "train_rows", "learning_rate", "num_epochs", "batch_size", "max_seq_length", "packing")
COMMENT_COLUMN = 36  # where the parameters cell's comments start
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
PARAMETER_LINE = re.compile(r"^(\S.*?)\s+# (.*)$")

JOB_TEMPLATE = '''"""CML Job: fine-tune the {title} adapter by running notebooks/{notebook} headless.

    python jobs/finetune_{task}.py                          # {default_note}
    python jobs/finetune_{task}.py --set max_steps=20 --run-name {task}-quick
    QLORA_MAX_STEPS=20 python jobs/finetune_{task}.py       # how a CML Job passes settings
    python jobs/finetune_{task}.py --help                   # every parameter with its default and meaning

Writes a new folder under runs/ with the executed notebook, the adapter, the run record, metrics
and plots; exits non-zero with the failing cell's error. Details: jobs/run_notebook.py.
Rendered by tools/render_notebooks.py: edit the template there, not this file.
"""

import sys

from run_notebook import run_job

if __name__ == "__main__":
    sys.exit(run_job("{notebook}", sys.argv[1:]))
'''
DEMO_TASK = "sql"  # ./dev.sh demo runs this task's job


def literal(value) -> str:
    """A parameter default as the parameters cell writes it (strings in double quotes)."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def values(task: str) -> dict[str, str]:
    config = RunConfig.for_task(task, "cpu")
    found = {name: literal(getattr(config, name)) for name in RECIPE_PARAMETERS}
    for part, file_name in PARTS.items():
        path = TEMPLATES / task / file_name
        text = path.read_text(encoding="utf-8").rstrip("\n") if path.is_file() else ""
        found[part] = ("\n\n" + text) if part == "packing_note" and text else text
    return found


def fill(text: str, found: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda match: found[match.group(1)], text)


def aligned(cell_text: str) -> str:
    """The parameters cell with every comment starting at COMMENT_COLUMN (or two spaces after the code)."""
    lines = []
    for line in cell_text.split("\n"):
        match = PARAMETER_LINE.match(line)
        if match:
            code, comment = match.groups()
            line = f"{code.ljust(COMMENT_COLUMN - 2)}  # {comment}"
        lines.append(line)
    return "\n".join(lines)


def render_notebook(task: str) -> str:
    notebook = json.loads((TEMPLATES / "task.ipynb").read_text(encoding="utf-8"))
    found = values(task)
    cells = []
    for cell in notebook["cells"]:
        text = fill("".join(cell["source"]), found)
        if not text.strip():
            continue  # a task-only cell this task does not have
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            text = aligned(text)
        cell["source"] = text.splitlines(keepends=True)
        cells.append(cell)
    notebook["cells"] = cells
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def render_job(task: str) -> str:
    spec = TASKS[task]
    note = "the project's demo (./dev.sh demo), task recipe defaults" if task == DEMO_TASK else "the task recipe defaults"
    return JOB_TEMPLATE.format(title=spec.title, notebook=spec.notebook, task=task, default_note=note)


def rendered() -> dict[Path, str]:
    files = {}
    for task, spec in TASKS.items():
        files[ROOT / "notebooks" / spec.notebook] = render_notebook(task)
        files[ROOT / "jobs" / f"finetune_{task}.py"] = render_job(task)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    stale = []
    for path, text in rendered().items():
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            continue
        if args.check:
            stale.append(path.relative_to(ROOT))
        else:
            path.write_text(text, encoding="utf-8")
            print(f"rendered {path.relative_to(ROOT)}")
    if stale:
        print("differ from their rendering (run python tools/render_notebooks.py): "
              + ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
