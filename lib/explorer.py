"""The adapter explorer (notebook 05): find the trained adapters, compare them with the base model side by
side, and try prompts in a small playground.

    from lib.explorer import find_adapters, side_by_side, playground
"""

from __future__ import annotations

from pathlib import Path

from lib import runs
from lib.config import TASK_NAMES
from lib.display import Table

def find_adapters(output_dir: str | Path, adapters_dir: str | Path, base_model: str,
                  latest_per_task: bool = True) -> tuple[list[dict], list[dict]]:
    """(usable, skipped) adapters: finished runs under output_dir (<run>/adapter) and adapter folders
    under adapters_dir. The task comes from the adapter's run record, else from a folder name that
    starts with a task's name; adapters trained on another base model are skipped."""
    finished = sorted(Path(output_dir).glob(f"*/{runs.ADAPTER}"), key=lambda path: path.stat().st_mtime)
    candidates = [(path.parent.name, path, "runs") for path in finished]  # oldest first
    candidates += [(path.name, path, "adapters folder") for path in sorted(Path(adapters_dir).glob("*"))
                   if (path / "adapter_config.json").is_file()]
    usable, skipped = [], []
    for name, path, source in candidates:
        found = {"name": name, "adapter_dir": str(path), "source": source, **_adapter_origin(path, name)}
        if found["task"] is None:
            skipped.append({**found, "reason": "no run record and no task name at the start of its folder name"})
        elif found["base_model"] not in (None, base_model):
            skipped.append({**found, "reason": f"trained on base model {found['base_model']!r}, not {base_model!r}"})
        else:
            usable.append(found)
    if latest_per_task:  # runs come oldest first, so the last of a task is its newest
        newest = {item["task"]: item for item in usable if item["source"] == "runs"}
        skipped += [{**item, "reason": "an older run of its task (latest_per_task)"} for item in usable
                    if item["source"] == "runs" and newest[item["task"]] is not item]
        usable = [item for item in usable if item["source"] != "runs" or newest[item["task"]] is item]
    return usable, skipped


def _adapter_origin(adapter_dir: Path, name: str) -> dict:
    record_path = adapter_dir / runs.RUN_RECORD
    if record_path.is_file():
        record = runs.read_json(record_path)
        return {"task": record["task"], "base_model": record["config"]["base_model"]}
    task = next((task for task in TASK_NAMES if name.startswith(task)), None)
    return {"task": task, "base_model": None}


def side_by_side(evaluator, tasks: dict, rows_by_adapter: dict[str, list[dict]]) -> Table:
    """Each adapter's prompts answered by the base model and by that adapter: the evaluator switches
    adapters between prompts while one base model stays in memory."""
    from lib.evaluation import BASE

    lines = []
    for name, rows in rows_by_adapter.items():
        fmt = evaluator.adapter_format(tasks[name], name)
        base_answers = evaluator.answers(fmt, rows, BASE, progress=False)
        adapter_answers = evaluator.answers(fmt, rows, name, progress=False)
        lines += [{"adapter": name, "prompt": fmt.prompt(row), "reference": row[fmt.task.answer_field],
                   "base model": base, "with adapter": tuned}
                  for row, base, tuned in zip(rows, base_answers, adapter_answers)]
    return Table(lines)


def playground(evaluator, tasks: dict, example_rows: dict[str, dict]):
    """A small panel: pick an adapter, edit the prompt, press Generate to see base and adapter answers."""
    import ipywidgets as widgets

    names = list(tasks)
    chooser = widgets.Dropdown(options=names, description="adapter")
    prompt = widgets.Textarea(layout=widgets.Layout(width="95%", height="6em"))
    button = widgets.Button(description="Generate")
    output = widgets.Output()

    def show_example(change=None):
        fmt = evaluator.adapter_format(tasks[chooser.value], chooser.value)
        prompt.value = fmt.prompt(example_rows[chooser.value])

    def generate(_):
        from lib.evaluation import BASE

        name = chooser.value
        fmt = evaluator.adapter_format(tasks[name], name)
        answers = {label: evaluator.answer_prompts(fmt, [prompt.value], adapter)[0]
                   for label, adapter in (("base model", BASE), ("with adapter", name))}
        output.clear_output()
        with output:
            print("\n".join(f"{label}: {answer}" for label, answer in answers.items()))

    chooser.observe(show_example, names="value")
    button.on_click(generate)
    show_example()
    return widgets.VBox([chooser, prompt, button, output])
