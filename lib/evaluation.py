"""Base model vs adapters on held-out rows, with one base model in memory.

    evaluator = Evaluator(model_path, load_in_4bit=True)
    evaluator.attach("sql", "runs/sql-demo/adapter")
    report = evaluator.compare(get_task("sql"), eval_rows, adapter="sql")

The base model is loaded once; adapters are attached to it by name and
switched with PEFT, and the base answers come from the same weights with every
adapter disabled. On a GPU with room for it, the 4-bit base is dequantized once
to 16 bits (the same NF4 values the 4-bit layers compute with): each generated
token then skips the bitsandbytes call of every layer, which costs the host far
more than the GPU's work on a small model (see `dequantize_for_generation`;
reports say which path answered: `base_dequantized`). Decoding is greedy and
stops at the end-of-text token (and, in the tags format, at the next tag); base
and adapter answers are cleaned the same way before scoring. Every report also scores the task's trivial baselines
(detox: the input copied unchanged), which a useful adapter must beat.

To score saved adapters on a file without training, see lib/evaluate.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from lib import runs, tracking
from lib.models import load_base_model, load_tokenizer
from lib.prompts import PromptFormat
from lib.tasks import Task, get_task

BASE = "base"


class Evaluator:
    def __init__(self, model_path: str, load_in_4bit: bool = True, batch_size: int | None = None,
                 dequantize: bool | None = None):
        """dequantize: answer with the 4-bit base dequantized to 16 bits (None: dequantize_for_generation)."""
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"  # generated tokens must follow the prompt directly
        self.model = load_base_model(model_path, load_in_4bit)
        self.dequantized = load_in_4bit and (dequantize_for_generation(self.model) if dequantize is None
                                             else dequantize)
        if self.dequantized:
            self.model = self.model.dequantize()
        self.model.eval()
        self.batch_size = batch_size or generation_batch_size(self.model)
        self.adapters: dict[str, str] = {}
        self.adapter_formats: dict[str, str] = {}  # adapter name -> the prompt format it was trained with

    def attach(self, name: str, adapter_dir: str | Path) -> None:
        """Load an adapter next to the others; the base weights are shared, not copied."""
        from peft import PeftModel

        if name == BASE or name in self.adapters:
            raise ValueError(f"adapter name {name!r} is taken; names in use: {[BASE, *self.adapters]}")
        if not isinstance(self.model, PeftModel):
            self.model = PeftModel.from_pretrained(self.model, str(adapter_dir), adapter_name=name)
        else:
            self.model.load_adapter(str(adapter_dir), adapter_name=name)
        self.model.eval()
        self.adapters[name] = str(adapter_dir)
        self.adapter_formats[name] = trained_prompt_format(adapter_dir)

    def adapter_format(self, task: Task, adapter: str) -> PromptFormat:
        """The prompt format an attached adapter was trained with."""
        return self.prompt_format(task, self.adapter_formats.get(adapter, "tags"))

    def prompt_format(self, task: Task, name: str = "tags") -> PromptFormat:
        return PromptFormat.build(name, task, self.tokenizer)

    def answers(self, fmt: PromptFormat, rows: list[dict], adapter: str = BASE, progress: bool = True) -> list[str]:
        """Cleaned greedy answers for the rows' prompts in a format, from the base model or a named adapter."""
        return self.answer_prompts(fmt, [fmt.prompt(row) for row in rows], adapter, progress)

    def answer_prompts(self, fmt: PromptFormat, prompts: list[str], adapter: str = BASE,
                       progress: bool = False) -> list[str]:
        """Cleaned greedy answers to prompts already written in a format (e.g. typed into a panel)."""
        texts = self.generate(prompts, fmt.task.max_new_tokens, adapter, progress, fmt.stop_strings)
        return [fmt.clean(text) for text in texts]

    def generate(self, prompts: list[str], max_new_tokens: int, adapter: str = BASE,
                 progress: bool = False, stop_strings: list[str] | None = None) -> list[str]:
        """Raw greedy continuations of the prompts, longest prompts first (less padding per batch)."""
        from tqdm.auto import tqdm

        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        batches = range(0, len(prompts), self.batch_size)
        texts = [""] * len(prompts)
        with self._adapter(adapter):
            for start in tqdm(batches, desc=f"generating ({adapter})", disable=not progress, leave=False):
                chosen = order[start:start + self.batch_size]
                outputs = self._generate_batch([prompts[i] for i in chosen], max_new_tokens, stop_strings)
                for index, text in zip(chosen, outputs):
                    texts[index] = text
        return texts

    def _generate_batch(self, prompts: list[str], max_new_tokens: int, stop_strings: list[str] | None) -> list[str]:
        import torch

        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        stops = {"stop_strings": stop_strings, "tokenizer": self.tokenizer} if stop_strings else {}
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self._end_tokens(),
                pad_token_id=self.tokenizer.pad_token_id, **stops,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def _end_tokens(self) -> list[int]:
        """Tokens that end an answer: the tokenizer's end-of-text (which training appends) and whatever the
        model's generation config already stops at (a chat model's end-of-turn token, e.g. Llama 3's)."""
        configured = self.model.generation_config.eos_token_id
        configured = [configured] if isinstance(configured, int) else list(configured or [])
        return list(dict.fromkeys([self.tokenizer.eos_token_id, *configured]))

    def _adapter(self, adapter: str):
        """A context in which the model answers as `adapter` (or as the bare base model)."""
        from contextlib import nullcontext

        if adapter == BASE:
            return self.model.disable_adapter() if self.adapters else nullcontext()
        if adapter not in self.adapters:
            raise ValueError(f"unknown adapter {adapter!r}; attached: {[BASE, *self.adapters]}")
        self.model.set_adapter(adapter)
        return nullcontext()

    def compare(self, task: Task, rows: list[dict], adapter: str, examples: int = 5,
                prompt_format: str | None = None) -> dict:
        """Base vs adapter metrics on the rows (both prompted in the adapter's format unless
        `prompt_format` says otherwise), the task's baselines, and a few example answers side by side."""
        fmt = self.adapter_format(task, adapter) if prompt_format is None else self.prompt_format(task, prompt_format)
        prompt_format = fmt.name
        for warning in task.data_warnings(rows, "the scored rows"):
            warnings.warn(warning, stacklevel=2)
        base_answers = self.answers(fmt, rows, BASE)
        adapter_answers = self.answers(fmt, rows, adapter)
        return {
            "task": task.name,
            "rows": len(rows),
            "prompt_format": prompt_format,
            "base_dequantized": self.dequantized,
            "headline_metric": task.headline_metric,
            "base": task.score(base_answers, rows),
            "adapter": task.score(adapter_answers, rows),
            "baselines": {name: task.score(answers, rows) for name, answers in task.baselines(rows).items()},
            "data_check": task.data_check(rows),
            "examples": [{"prompt": fmt.prompt(row), "reference": row[task.answer_field],
                          "base": base, "adapter": tuned}
                         for row, base, tuned in list(zip(rows, base_answers, adapter_answers))[:examples]],
        }


CPU_GENERATION_BATCH = 16
GPU_GENERATION_BATCH = (16, 256)   # rows a batch on a GPU: at least, at most
KV_CACHE_SHARE = 0.2               # of the GPU's free memory, for the batch's key/value cache
ROW_TOKENS = 1024                  # prompt and answer tokens a row is planned for


DEQUANTIZE_SHARE = 0.25            # of the GPU's free memory, at most, for the base's 16-bit weights


def dequantize_for_generation(model) -> bool:
    """Whether to answer with the 4-bit base dequantized to its compute dtype: on a GPU, when those weights
    take at most DEQUANTIZE_SHARE of its free memory. Batched generation with bitsandbytes dequantizes every
    layer's NF4 weights to the compute dtype and multiplies; dequantized once, the weights are the same
    values and each token skips one bitsandbytes call per layer (the embedded model on an H200: 200 SQL
    rows in 5.0 s instead of 8.3-10.3 s; 98.5% of the answers identical, the rest differ by rounding;
    docs/task_speed_gpu.json). On a CPU it saves no time and rounds differently: kept 4-bit."""
    import torch

    if model.device.type != "cuda":
        return False
    weights = sum(module.in_features * module.out_features for module in model.modules()
                  if type(module).__name__ == "Linear4bit")
    free, _ = torch.cuda.mem_get_info(model.device)
    return weights * model.dtype.itemsize <= DEQUANTIZE_SHARE * free


def generation_batch_size(model) -> int:
    """Rows generated together: 16 on a CPU; on a GPU as many as KV_CACHE_SHARE of its free memory holds
    the key/value cache for (ROW_TOKENS each), within GPU_GENERATION_BATCH. Greedy decoding costs about the
    same per step for 1 row or 256 on a GPU, so a small model answers 200 rows in one batch; a large one
    gets fewer rows so that its cache fits."""
    import torch

    if model.device.type != "cuda":
        return CPU_GENERATION_BATCH
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    row_bytes = 2 * config.num_hidden_layers * kv_heads * head_dim * model.dtype.itemsize * ROW_TOKENS
    free, _ = torch.cuda.mem_get_info(model.device)
    low, high = GPU_GENERATION_BATCH
    return max(low, min(high, int(KV_CACHE_SHARE * free // row_bytes)))


def trained_config(adapter_dir: str | Path) -> dict:
    """The settings an adapter was trained with, from the run record saved beside it ({} when it has none)."""
    try:
        return runs.read_json(Path(adapter_dir) / runs.RUN_RECORD).get("config", {})
    except (OSError, ValueError, AttributeError):
        return {}


def trained_prompt_format(adapter_dir: str | Path) -> str:
    """The prompt format an adapter was trained with ("tags" for adapters from before formats existed)."""
    return trained_config(adapter_dir).get("prompt_format", "tags")


def report_scores(report: dict) -> dict[str, dict]:
    """Every scored system of a report, by label, in display order: base, adapter(s), baselines."""
    scores = {BASE: report["base"]}
    if "adapter" in report:
        scores["adapter"] = report["adapter"]
    scores.update(report.get("adapters", {}))
    scores.update(report.get("baselines", {}))
    return scores


def comparison_table(report: dict) -> str:
    """A plain-text table: one line per metric, one column per scored system."""
    scores = report_scores(report)
    scores = {report.get("base_label", BASE) if label == BASE else label: values for label, values in scores.items()}
    width = max(12, *(len(label) + 2 for label in scores))
    lines = [f"{'metric':<18}" + "".join(f"{label:>{width}}" for label in scores)]
    for metric in report["base"]:
        lines.append(f"{metric:<18}" + "".join(f"{values[metric]:>{width}.3f}" for values in scores.values()))
    return "\n".join(lines)


def evaluate_run(config, eval_rows: list[dict], model_path: str) -> dict:
    """Base vs the run's adapter on held-out rows; writes metrics.json and metrics.png into the run folder."""
    from lib import plots

    run_dir = config.run_dir
    evaluator = Evaluator(model_path, config.load_in_4bit)
    evaluator.attach(config.task, run_dir / runs.ADAPTER)
    report = evaluator.compare(get_task(config.task), eval_rows, adapter=config.task,
                               prompt_format=config.prompt_format)
    runs.write_json_atomic(run_dir / runs.METRICS, report)
    plots.metrics_chart(report, run_dir / "metrics.png")
    tracking.log_results(config, report=report)  # the base vs adapter metrics and the plots, into MLflow
    return report
