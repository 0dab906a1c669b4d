"""Prompt formats: how a task's row becomes the text the model is trained on and prompted with.

    fmt = PromptFormat.build("chat", get_task("sql"), tokenizer)
    fmt.prompt(row)        # what the model sees at inference, ending where the answer starts
    fmt.completion(row)    # the answer as trained (the trainer appends the end-of-text token)
    fmt.clean(generated)   # the answer inside a raw generation

Two formats:
- "tags": the seed's own prompts ("<TABLE>: ...\\n<QUESTION>: ...\\n<SQL>:"), for any base model.
- "chat": the task's request as one user turn of the base model's chat template (SmolLM2-Instruct and most
  instruct models on the Hub have one), the answer as the assistant's turn.

In both, training ends the answer with the tokenizer's end-of-text token and generation stops there, so
answers may span several lines; the tags format also stops at the next tag, in case a model keeps going.
Training text and inference prompt agree token for token: the prompt is a prefix of prompt + completion.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lib.config import PROMPT_FORMATS, ConfigError
from lib.tasks import Task


@dataclass
class PromptFormat:
    name: str  # one of PROMPT_FORMATS
    task: Task
    tokenizer: object = None  # needed by "chat" only

    @classmethod
    def build(cls, name: str, task: Task, tokenizer=None) -> "PromptFormat":
        if name not in PROMPT_FORMATS:
            raise ConfigError("prompt_format", name, f"one of {', '.join(PROMPT_FORMATS)}")
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt_format", name, "tags: this base model's tokenizer has no chat template")
        return cls(name, task, tokenizer)

    def prompt(self, row: dict) -> str:
        if self.name == "tags":
            return self.task.prompt(row)
        message = [{"role": "user", "content": self.task.chat_request.format(**row).strip()}]
        return self.tokenizer.apply_chat_template(message, add_generation_prompt=True, tokenize=False)

    def completion(self, row: dict) -> str:
        if self.name == "tags":
            return self.task.completion(row)
        return row[self.task.answer_field]

    def text(self, row: dict) -> str:
        """Prompt and completion, without the end-of-text token the trainer appends."""
        return self.prompt(row) + self.completion(row)

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end a generated answer besides the end-of-text token: the tags format's next tag."""
        return tag_markers(self.task.prompt_template) if self.name == "tags" else []

    def clean(self, generated: str) -> str:
        """The answer inside raw generated text: up to the first stop string, trimmed, line ends unified."""
        for stop in self.stop_strings:
            generated = generated.split(stop, 1)[0]
        return self.task.clean(generated.replace("\r\n", "\n"))


def tag_markers(template: str) -> list[str]:
    """The tags of a tags-format template, e.g. ["<TABLE>:", "<QUESTION>:", "<SQL>:"]."""
    return re.findall(r"<[^<>\s]+>:", template)
