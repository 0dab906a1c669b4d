"""Tables for the notebooks and job logs: what a person wants to see of settings, data, runs and results.

    from lib.display import metrics_table, examples_table
    metrics_table(report)      # HTML in a notebook, aligned text in a job's log

Every table is a `Table`: it shows as HTML in JupyterLab and as plain text where a headless run
logs cell outputs (papermill with log_output), and long text wraps instead of being cut.
"""

from __future__ import annotations

from pathlib import Path

from lib.config import RunConfig
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


def run_summary_table(record: dict) -> Table:
    return Table([
        {"quantity": "optimizer steps", "value": record["global_step"]},
        {"quantity": "training tokens", "value": record["train_tokens"]},
        {"quantity": "training loss (mean)", "value": f"{record['train_metrics'].get('train_loss', float('nan')):.3f}"},
        {"quantity": "wall time", "value": f"{record['wall_time_s']} s"},
        {"quantity": "tokens per second", "value": record["tokens_per_s"]},
        {"quantity": "peak memory (measured)", "value": f"{record['peak_memory_gib']} GiB"},
        {"quantity": "peak memory (estimated)", "value": f"{record.get('estimated_peak_gib')} GiB"},
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
    return Table([{"prompt": example["prompt"], "reference": example["reference"],
                   "base model": example["base"] or EMPTY_ANSWER, "with adapter": example["adapter"] or EMPTY_ANSWER}
                  for example in report["examples"]])


# A small base model often ends at once on a prompt format it was never taught (its first token is the
# end-of-text); say so rather than show a blank cell.
EMPTY_ANSWER = "(empty: the model ended its answer at once)"


def files_table(run_dir: str | Path) -> Table:
    """What a run folder holds, with sizes (a folder's files summed)."""
    run_dir = Path(run_dir)
    rows = []
    for path in sorted(run_dir.iterdir()):
        files = [path] if path.is_file() else [item for item in path.rglob("*") if item.is_file()]
        rows.append({"path": path.name + ("/" if path.is_dir() else ""), "files": len(files),
                     "size": f"{sum(item.stat().st_size for item in files) / 2**20:.2f} MiB"})
    return Table(rows)


def log_tails_table(logs: dict, lines: int = 4) -> Table:
    """The last lines of every worker's log."""
    from lib.launcher import log_tail

    return Table([{"rank": rank, "log": str(path), "last lines": log_tail(path, lines)} for rank, path in logs.items()])


def hf_objects_table(tuner) -> Table:
    """The transformers, PEFT and TRL objects a FineTuner built, with the fields that make them QLoRA."""
    def fields(obj, names) -> str:
        return ", ".join(f"{name}={_short(getattr(obj, name, None))}" for name in names)

    bnb, args, plan = tuner.quantization_config, tuner.trainer.args, tuner.plan
    rows = [
        {"object": "transformers.BitsAndBytesConfig", "settings": fields(bnb, (
            "load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"))
         if bnb is not None else "none: load_in_4bit=False keeps the base in 16/32 bit"},
        {"object": "peft.LoraConfig", "settings": fields(tuner.lora_config, (
            "r", "lora_alpha", "lora_dropout", "target_modules", "task_type"))},
        {"object": f"trl.{type(args).__name__}", "settings": fields(args, (
            "per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type",
            "optim", "bf16", "fp16", "gradient_checkpointing", "packing", "max_length", "completion_only_loss"))},
        {"object": f"trl.{type(tuner.trainer).__name__}", "settings":
            f"model={type(tuner.trainer.model).__name__} (the 4-bit base wrapped with the adapters), "
            f"train_dataset={len(tuner.trainer.train_dataset)} rows"},
        {"object": "lib.plan.Plan (tuner.plan)", "settings": fields(plan, (
            "precision", "attention", "optimizer", "checkpointing", "liger", "packed", "micro_batch_size",
            "grad_accum", "estimated_gib"))},
    ]
    return Table(rows)


def _short(value) -> str:
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    text = str(value).replace("torch.", "")
    return text if len(text) <= 60 else text[:57] + "..."


def schema_check_table(splits: dict[str, list[dict]]) -> Table:
    """SQL rows: the schema leak check of each split (lib/tasks/sql_schema.py), with its verdict."""
    from lib.tasks.sql_schema import check_schemas

    lines = []
    for label, rows in splits.items():
        check = check_schemas(rows)
        lines.append({"rows": label, "count": check.rows, "with an unused column": check.unused_share,
                      "columns a row": check.mean_columns, "unused a row": check.mean_unused,
                      "verdict": "looks pruned: scores here reward using every column" if check.looks_pruned
                      else "whole tables"})
    return Table(lines)


def pruned_vs_whole_table(row: dict) -> Table:
    """One SQL row with its whole table beside the same row pruned as sql-create-context prunes it."""
    from lib.tasks.sql_schema import prune_schema, unused_columns

    pruned = prune_schema(row)
    return Table([{"schema": "whole table (as a user gives it)", "context": row["context"],
                   "columns the answer does not use": ", ".join(unused_columns(row)) or "-"},
                  {"schema": "pruned (sql-create-context)", "context": pruned["context"],
                   "columns the answer does not use": ", ".join(unused_columns(pruned)) or "-"},
                  {"schema": "question / answer", "context": f"{row['question']}\n{row['answer']}",
                   "columns the answer does not use": ""}])
