"""The three fine-tuning tasks, by name: instruction following, English to SQL,
and detoxification. Each is a `Task` (see base.py) that formats, generates and
scores rows.

    from lib.tasks import get_task
    task = get_task("sql")
    train_rows, eval_rows = task.embedded_splits(train_rows=500, eval_rows=100, seed=0)
"""

from .base import Task
from .detox import DetoxTask
from .instruction import InstructionTask
from .sql import SqlTask

# The registry: the only list of tasks. A new task is a module here with its Task subclass (format,
# generator, metrics, recipes, chart scale) added below, its notebook rendered by tools/render_notebooks.py,
# and its job entry in .project-metadata.yaml.
TASKS: dict[str, Task] = {task.name: task for task in (InstructionTask(), SqlTask(), DetoxTask())}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        from lib.config import ConfigError  # lib.config reads this registry: imported here, not at the top

        raise ConfigError("task", name, f"one of {', '.join(TASK_NAMES)}")
    return TASKS[name]
