"""One run configuration, shared by notebooks, widgets, jobs, the CLI and launched processes.

Every setting is defined once, below, with its meaning. Papermill parameters,
widget values, a JSON file and `--set name=value` on the command line all
become the same `RunConfig`, and `validate()` checks it before anything
expensive starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib.tasks import TASK_NAMES, TASKS

PROMPT_FORMATS = ("tags", "chat")
DATA_FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
TARGET_PRESETS = ("all-linear", "attention")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTENTIONS = ("auto", "varlen", "sdpa", "eager", "flex")
OPTIMIZERS = ("auto", "adamw_torch", "adamw_torch_fused", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit")
SWITCHES = ("auto", "on", "off")
DISTRIBUTED = ("auto", "ddp", "fsdp")
# "auto" (checkpointed_layers: "all") or a number, which text may spell ("4")
AUTO_OR_NUMBER = ("micro_batch_size", "memory_budget_gib", "cpu_threads", "checkpointed_layers")
NAME_MAX_BYTES = 255  # longest file or folder name, in bytes, on common file systems (ext4, xfs, APFS)


RECIPE_DEVICES = ("auto", "cpu", "gpu")


def task_recipe(task: str, device: str = "auto") -> dict:
    """The settings of a task's recipe for a device ("auto": "gpu" when CUDA is present, else "cpu")."""
    if task not in TASKS:
        raise ConfigError("task", task, f"one of {', '.join(TASK_NAMES)}")
    _check_choice("recipe", device, RECIPE_DEVICES)
    if device == "auto":
        import torch

        device = "gpu" if torch.cuda.is_available() else "cpu"
    return dict(TASKS[task].recipes[device])


class ConfigError(ValueError):
    """A setting has a value that is not accepted; the message names both and what would be."""

    def __init__(self, setting: str, value: Any, accepted: str):
        self.setting, self.value, self.accepted = setting, value, accepted
        super().__init__(f"setting {setting!r} has value {value!r}: expected {accepted}")


@dataclass
class RunConfig:
    # what to fine-tune, on what
    task: str = "sql"                     # instruction | sql | detox
    base_model: str = "embedded"          # "embedded" (SmolLM2-135M-Instruct, offline), a Hub id, or a model directory
    data: str = "embedded"                # "embedded" (offline generator), "hub" (the task's Hub dataset) or a local file
    eval_data: str = ""                   # "": hold out eval_rows of `data`; or a file (same formats and column_map)
    column_map: dict = field(default_factory=dict)  # file column -> task field, when a file uses other column names
    train_rows: int = 1000                # training rows (generated, or taken from the file or Hub dataset)
    eval_rows: int = 100                  # held-out rows, disjoint from training, for base vs adapter evaluation
    prompt_format: str = "tags"           # tags: the seed's "<TABLE>: ..." prompts | chat: the base model's chat template
    seed: int = 42                        # seeds data, split, LoRA initialisation and trainer: same seed, same run
    # QLoRA: a frozen 4-bit base model plus small trainable low-rank adapters
    load_in_4bit: bool = True             # NF4 base weights with double quantization; False keeps the base in 16/32 bit
    lora_r: int = 16                      # adapter rank: higher = more capacity, more memory, bigger adapter
    lora_alpha: int = 32                  # the adapter's update is scaled by alpha / r
    lora_dropout: float = 0.05            # dropout on the adapter's input; regularises small data sets
    target_modules: Any = "all-linear"    # "all-linear", "attention", or linear layer names ("q_proj,v_proj" or a list)
    # training
    learning_rate: float = 2e-4           # peak learning rate of the adapter weights
    lr_scheduler: str = "cosine"          # constant | constant_with_warmup | linear | cosine
    warmup_ratio: float = 0.05            # share of steps spent warming the learning rate up
    num_epochs: float = 1.0               # passes over the training rows (ignored when max_steps > 0)
    max_steps: int = -1                   # > 0: stop after this many optimizer steps (smoke runs, quick demos)
    batch_size: int = 16                  # sequences (packed, or one example each) per process per optimizer step
    micro_batch_size: Any = "auto"        # sequences a pass, divides batch_size (rest accumulates); auto: largest that fits
    memory_budget_gib: Any = "auto"       # training memory a process may fill (lib/memory.py); auto: 80% of GPU, 75% of RAM
    cpu_threads: Any = "auto"             # CPU threads of a training process; auto: its share of the cores not busy now
    max_seq_length: int = 512             # tokens per packed sequence; longer examples are truncated
    packing: bool = True                  # pack several examples into one sequence, attention kept within each example
    completion_only_loss: bool = True     # learn from the answer tokens only, not from the prompt
    gradient_checkpointing: Any = "auto"  # auto (on with CUDA) | true | false: recompute activations, less memory
    checkpointed_layers: Any = "all"      # with checkpointing: "all", or how many decoder layers (the first) recompute;
                                          # the rest keep their activations: faster, more memory (0: no checkpointing)
    precision: str = "auto"               # auto (bf16 if supported, else fp16 GPU/fp32 CPU) | bf16 | fp16 | fp32
    attention: str = "auto"               # auto (varlen flash kernel on CUDA, else sdpa; bloom: flex on CUDA in bf16,
                                          # else eager) | varlen | sdpa | eager
                                          # | flex (bloom: ALiBi with packed examples kept apart, lib/alibi.py)
    optimizer: str = "auto"               # auto (fused AdamW on GPU, AdamW on CPU) or one of OPTIMIZERS
    liger_kernel: str = "auto"            # auto (on with CUDA + liger-kernel) | on | off: fused norm/RoPE/SwiGLU
    fused_lora: str = "auto"              # auto (on a GPU, 4-bit weights) | on | off | layers: LoRA on a 4-bit
                                          # layer as one autograd step, a SwiGLU MLP's three as one where none
                                          # has dropout (lib/fused_lora.py); layers: as auto, without the MLP
                                          # step; off: PEFT's own forward
    max_grad_norm: float = 0.3            # gradient clipping, as in the QLoRA paper
    distributed: str = "auto"             # several processes: ddp (each holds the whole model) | fsdp (weights sharded
                                          # over them) | auto (fsdp on GPUs when the model does not fit one whole)
    logging_steps: int = 5                # record the loss every N steps
    save_steps: int = 50                  # write a resumable checkpoint every N steps
    # where results go
    tracking: str = "auto"                # MLflow: auto/on (MLFLOW_TRACKING_URI, else <output_dir>/mlflow.db) | off
    output_dir: str = "runs"              # parent folder of run folders
    run_name: str = ""                    # run folder under output_dir; "" names it <task>-<date>-<time>
    overwrite: bool = False               # allow replacing the adapter of an existing run folder

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        """A config from a mapping; unknown keys are an error, not silently ignored."""
        if not isinstance(values, dict):
            raise ConfigError("config", values, "a mapping of setting names to values")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ConfigError(str(key), values[key], f"a known setting, one of {sorted(known)}")
        return cls(**{key: _auto_or_number(value) if key in AUTO_OR_NUMBER else value for key, value in values.items()})

    @classmethod
    def for_task(cls, task: str, device: str = "cpu", **overrides) -> "RunConfig":
        """The task's recipe for `device` (cpu, gpu or auto), with `overrides` on top."""
        return cls.from_dict({"task": task, **task_recipe(task, device), **overrides})

    @classmethod
    def from_namespace(cls, namespace: dict) -> "RunConfig":
        """A config from the settings found in a namespace, e.g. a notebook's `globals()` after its
        parameters cell; names that are not settings are left alone."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({name: value for name, value in namespace.items() if name in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "RunConfig":
        try:
            values = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError("config file", str(path), f"a readable JSON file ({error})") from None
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def with_run_name(self) -> "RunConfig":
        """The same config with `run_name` fixed, so every process of a run writes to one folder."""
        if self.run_name:
            return self
        return self.replace(run_name=f"{self.task}-{time.strftime('%Y%m%d-%H%M%S')}")

    @property
    def run_dir(self) -> Path:
        if not self.run_name:
            raise ConfigError("run_name", self.run_name, "a folder name; call with_run_name() first")
        return Path(self.output_dir) / self.run_name

    def target_module_list(self) -> list[str]:
        """`target_modules` as a list of names or presets."""
        names = self.target_modules.split(",") if isinstance(self.target_modules, str) else self.target_modules
        return [name.strip() for name in names if name.strip()]  # as validate() reads them

    # ---- checking ---------------------------------------------------------------------------

    def validate(self) -> "RunConfig":
        """Raise ConfigError for the first bad setting; return self so calls can be chained."""
        _check_choice("task", self.task, TASK_NAMES)
        _check_text("base_model", self.base_model)
        _check_data(self.data)
        if self.eval_data != "":
            _check_data(self.eval_data, "eval_data", sources="'' (a split of data)")
        _check_choice("prompt_format", self.prompt_format, PROMPT_FORMATS)
        _check_column_map(self.column_map)
        for name in ("train_rows", "eval_rows", "lora_r", "lora_alpha", "batch_size",
                     "logging_steps", "save_steps"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("seed", self.seed, low=0)
        _check_int("max_seq_length", self.max_seq_length, low=16, high=131072)
        _check_int("max_steps", self.max_steps, low=-1)
        if self.max_steps == 0:
            raise ConfigError("max_steps", 0, "-1 (train num_epochs) or a positive number of steps")
        for name in ("load_in_4bit", "packing", "completion_only_loss", "overwrite"):
            _check_bool(name, getattr(self, name))
        if self.micro_batch_size != "auto":
            _check_int("micro_batch_size", self.micro_batch_size, low=1)
            if self.batch_size % self.micro_batch_size:
                raise ConfigError("micro_batch_size", self.micro_batch_size,
                                  f'"auto" or a divisor of batch_size ({self.batch_size})')
        if self.memory_budget_gib != "auto":
            _check_float("memory_budget_gib", self.memory_budget_gib, low=0.01, high=1e6)
        if self.cpu_threads != "auto":
            _check_int("cpu_threads", self.cpu_threads, low=1, high=4096)
        if self.gradient_checkpointing != "auto":
            _check_bool("gradient_checkpointing", self.gradient_checkpointing)
        layers = self.checkpointed_layers
        if layers != "all" and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 0):
            raise ConfigError("checkpointed_layers", layers, '"all" or a number of decoder layers (0 or more)')
        _check_float("lora_dropout", self.lora_dropout, low=0.0, high=0.9)
        _check_float("learning_rate", self.learning_rate, low=1e-8, high=1.0)
        _check_float("warmup_ratio", self.warmup_ratio, low=0.0, high=0.5)
        _check_float("num_epochs", self.num_epochs, low=0.01, high=1000.0)
        _check_float("max_grad_norm", self.max_grad_norm, low=0.0, high=1e6)
        _check_choice("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("liger_kernel", self.liger_kernel, SWITCHES)
        _check_choice("fused_lora", self.fused_lora, SWITCHES + ("layers",))
        _check_choice("tracking", self.tracking, SWITCHES)
        _check_choice("distributed", self.distributed, DISTRIBUTED)
        _check_targets(self.target_modules)
        _check_path("output_dir", self.output_dir)
        _check_run_name(self.run_name)
        return self


def parse_value(text: str) -> Any:
    """A value written on a command line (`--set name=VALUE`, a variant): JSON when it parses
    (numbers, true/false, lists, mappings), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_setting(item: str) -> tuple[str, str]:
    """One `--set name=value` item as (name, value text)."""
    name, equals, text = item.partition("=")
    if not equals or not name.strip():
        raise ConfigError("--set", item, "name=value")
    return name.strip(), text


def parse_overrides(items: list[str]) -> dict:
    """`name=value` items (the CLI's repeated `--set`) as a mapping of settings; a later item wins.
    The one --set parser: lib.train, lib.launcher, the jobs (jobs/run_notebook.py) and tools use it."""
    values = {}
    for item in items:
        name, text = split_setting(item)
        values[name] = parse_value(text.strip())
    return values


def _auto_or_number(value: Any) -> Any:
    """A number written as text ("4", "7.5": a notebook's str parameter, an environment variable) as the
    number; anything else unchanged, for validate() to judge."""
    if isinstance(value, str) and value != "auto":
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(name, value, "a non-empty string")
    if "\x00" in value or "\n" in value or not _encodable(value):
        raise ConfigError(name, value, "a string without NUL, newline or lone surrogate characters")


def _encodable(value: str) -> bool:
    """Whether the OS can take `value` as (part of) a file name: lone surrogates make os calls raise."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_path(name: str, value: Any) -> None:
    _check_text(name, value)
    if any(len(part.encode("utf-8")) > NAME_MAX_BYTES for part in Path(value).parts):
        raise ConfigError(name, value, f"a path whose folder names are at most {NAME_MAX_BYTES} bytes each")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(name, value, f"one of {', '.join(choices)}")


def _check_int(name: str, value: Any, low: int, high: int = 10**9) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(name, value, f"an integer from {low} to {high}")


def _check_float(name: str, value: Any, low: float, high: float) -> None:
    # an int is finite however large; math.isfinite would overflow converting it to float
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and (isinstance(value, int) or math.isfinite(value)))
    if not ok or not low <= value <= high:
        raise ConfigError(name, value, f"a number from {low:g} to {high:g}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(name, value, "true or false")


def _check_data(value: Any, name: str = "data", sources: str = "'embedded', 'hub'") -> None:
    _check_text(name, value)
    if name == "data" and value in ("embedded", "hub"):
        return
    path = Path(value)
    if path.suffix.lower() not in DATA_FILE_SUFFIXES:
        raise ConfigError(name, value, f"{sources} or a file ending in {', '.join(DATA_FILE_SUFFIXES)}")
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError as error:  # e.g. a name longer than the file system allows
        raise ConfigError(name, value, f"a path to an existing file ({error.strerror})") from None
    if is_dir:
        raise ConfigError(name, value, "a data file (this is a directory)")
    if not is_file:
        raise ConfigError(name, value, "an existing file (this one is missing)")


def _check_column_map(value: Any) -> None:
    ok = isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) and k and v
                                         for k, v in value.items())
    if not ok:
        raise ConfigError("column_map", value, "a mapping of file column names to task field names")


def _check_targets(value: Any) -> None:
    accepted = f"{' or '.join(TARGET_PRESETS)}, or linear layer names separated by commas"
    if isinstance(value, str):
        names = [name.strip() for name in value.split(",") if name.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(name, str) for name in value):
        names = [name.strip() for name in value if name.strip()]
    else:
        raise ConfigError("target_modules", value, accepted)
    if not names:
        raise ConfigError("target_modules", value, accepted)
    presets = [name for name in names if name in TARGET_PRESETS]
    if presets and len(names) > 1:
        raise ConfigError("target_modules", value, f"a preset ({presets[0]}) alone, not mixed with layer names")
    for name in names:
        if not name.replace("_", "").replace(".", "").replace("-", "").isalnum():
            raise ConfigError("target_modules", value, accepted)


def _check_run_name(value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError("run_name", value, "a folder name (a string)")
    if value and (value in (".", "..") or "/" in value or "\\" in value or "\x00" in value or len(value) > 200
                  or not _encodable(value) or len(value.encode("utf-8")) > NAME_MAX_BYTES):
        raise ConfigError("run_name", value, "a plain folder name without slashes, at most 200 characters "
                                             f"and {NAME_MAX_BYTES} bytes")
