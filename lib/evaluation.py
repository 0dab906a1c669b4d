"""Base model vs adapters on held-out rows, with one base model in memory.

    evaluator = Evaluator(model_path, load_in_4bit=True)
    evaluator.attach("sql", "runs/sql-demo/adapter")
    report = evaluator.compare(get_task("sql"), eval_rows, adapter="sql")

The base model is loaded once; adapters are attached to it by name and
switched with PEFT, and the base answers come from the same weights with every
adapter disabled. Decoding is greedy and stops at the end of the answer line;
base and adapter answers are cleaned the same way before scoring.
"""

from __future__ import annotations

from pathlib import Path

from lib.models import load_base_model, load_tokenizer
from lib.tasks import Task

BASE = "base"


class Evaluator:
    def __init__(self, model_path: str, load_in_4bit: bool = True, batch_size: int = 16):
        self.tokenizer = load_tokenizer(model_path)
        self.tokenizer.padding_side = "left"  # generated tokens must follow the prompt directly
        self.model = load_base_model(model_path, load_in_4bit)
        self.model.eval()
        self.batch_size = batch_size
        self.adapters: dict[str, str] = {}

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

    def answers(self, task: Task, rows: list[dict], adapter: str = BASE, progress: bool = True) -> list[str]:
        """Cleaned greedy answers for the rows' prompts, from the base model or a named adapter."""
        prompts = [task.prompt(row) for row in rows]
        return [task.clean(text) for text in self.generate(prompts, task.max_new_tokens, adapter, progress)]

    def generate(self, prompts: list[str], max_new_tokens: int, adapter: str = BASE,
                 progress: bool = False) -> list[str]:
        """Raw greedy continuations of the prompts."""
        from tqdm.auto import tqdm

        batches = range(0, len(prompts), self.batch_size)
        texts = []
        with self._adapter(adapter):
            for start in tqdm(batches, desc=f"generating ({adapter})", disable=not progress, leave=False):
                texts += self._generate_batch(prompts[start:start + self.batch_size], max_new_tokens)
        return texts

    def _generate_batch(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        import torch

        inputs = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, stop_strings=["\n"],
                tokenizer=self.tokenizer, pad_token_id=self.tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1]:]
        return self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

    def _adapter(self, adapter: str):
        """A context in which the model answers as `adapter` (or as the bare base model)."""
        from contextlib import nullcontext

        if adapter == BASE:
            return self.model.disable_adapter() if self.adapters else nullcontext()
        if adapter not in self.adapters:
            raise ValueError(f"unknown adapter {adapter!r}; attached: {[BASE, *self.adapters]}")
        self.model.set_adapter(adapter)
        return nullcontext()

    def compare(self, task: Task, rows: list[dict], adapter: str, examples: int = 5) -> dict:
        """Base vs adapter metrics on the rows, and a few example answers side by side."""
        base_answers = self.answers(task, rows, BASE)
        adapter_answers = self.answers(task, rows, adapter)
        return {
            "task": task.name,
            "rows": len(rows),
            "headline_metric": task.headline_metric,
            "base": task.score(base_answers, rows),
            "adapter": task.score(adapter_answers, rows),
            "examples": [{"prompt": task.prompt(row), "reference": row[task.answer_field],
                          "base": base, "adapter": tuned}
                         for row, base, tuned in list(zip(rows, base_answers, adapter_answers))[:examples]],
        }


def comparison_table(report: dict) -> str:
    """A plain-text table: one line per metric, base beside adapter."""
    lines = [f"{'metric':<18}{'base':>10}{'adapter':>10}"]
    for metric, base_value in report["base"].items():
        lines.append(f"{metric:<18}{base_value:>10.3f}{report['adapter'][metric]:>10.3f}")
    return "\n".join(lines)
