"""The three fine-tuning tasks, by name: instruction following, English to SQL,
and detoxification. Each is a `Task` (see base.py) that formats, generates and
scores rows.

    from lib.tasks import get_task
    task = get_task("sql")
    train_rows, eval_rows = task.embedded_splits(train_rows=500, eval_rows=100, seed=0)
"""

from lib.config import TASK_NAMES, ConfigError

from .base import Task
from .detox import DetoxTask
from .instruction import InstructionTask
from .sql import SqlTask

TASKS: dict[str, Task] = {task.name: task for task in (InstructionTask(), SqlTask(), DetoxTask())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError("task", name, f"one of {', '.join(TASK_NAMES)}")
    return TASKS[name]
