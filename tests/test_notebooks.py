"""The notebooks as committed: clean (no outputs), one literal `parameters` cell first, defaults that match
the task recipes. Every notebook is also executed, through its job, in tests/test_jobs.py.

Run: python -m pytest tests/test_notebooks.py
"""

import ast
import dataclasses
import io
import tokenize
from pathlib import Path

import nbformat
import papermill
import pytest

from lib.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ALL = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb"))
REQUIRED = ["00_environment_check.ipynb", "01_instruction_following.ipynb", "02_english_to_sql.ipynb",
            "03_detoxify_text.ipynb", "04_distributed_training.ipynb", "05_adapter_explorer.ipynb"]
TASK_NOTEBOOKS = {"01_instruction_following.ipynb": "instruction", "02_english_to_sql.ipynb": "sql",
                  "03_detoxify_text.ipynb": "detox"}
SETTINGS = {field.name for field in dataclasses.fields(RunConfig)}


def read(name: str):
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def parameters_cell(notebook):
    return next(cell for cell in notebook.cells if cell.cell_type == "code")


def parameter_defaults(name: str) -> dict:
    """The parameters cell's values, read as literals (it may hold nothing else)."""
    tree = ast.parse(parameters_cell(read(name)).source)
    values = {}
    for statement in tree.body:
        assert isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name), \
            f"{name}: the parameters cell holds only `name: type = value` lines, not {ast.unparse(statement)!r}"
        values[statement.target.id] = ast.literal_eval(statement.value)
    return values


def test_every_notebook_of_the_design_exists():
    assert set(REQUIRED) <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_committed_without_outputs_with_tags_and_python3_kernel(name):
    notebook = read(name)
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: a code cell has outputs"
            assert cell.execution_count is None, f"{name}: a code cell has an execution count"
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: {len(tagged)} cells tagged parameters"
    assert tagged[0] is parameters_cell(notebook), f"{name}: the parameters cell must be the first code cell"
    assert notebook.cells[0].cell_type == "markdown", f"{name} must start with prose saying how to run it"
    assert "How to run" in notebook.cells[0].source or "how to run" in notebook.cells[0].source.lower()


@pytest.mark.parametrize("name", ALL)
def test_parameters_are_typed_literals_with_a_meaning_that_papermill_reads(name):
    source = parameters_cell(read(name)).source
    defaults = parameter_defaults(name)
    comments = {token.start[0] for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    lines = [number for number, line in enumerate(source.splitlines(), 1) if line.strip()]
    assert set(lines) <= comments, f"{name}: every parameter line ends with `# meaning`"
    inspected = papermill.inspect_notebook(str(NOTEBOOKS / name))
    assert list(inspected) == list(defaults), f"{name}: papermill does not read every parameter (a '=' in a comment?)"
    for parameter, info in inspected.items():
        assert info["help"], f"{name}: {parameter} has no meaning"
        assert info["inferred_type_name"] == type(defaults[parameter]).__name__, f"{name}: {parameter}'s type"


def test_config_cell_follows_the_parameters_cell():
    for name in ALL:
        cells = [cell for cell in read(name).cells if cell.cell_type == "code"]
        assert "RunConfig.from_namespace(globals())" in cells[1].source, f"{name}: config not built after parameters"


@pytest.mark.parametrize("name", ALL)
def test_task_settings_default_to_the_task_recipe(name):
    """Parameter defaults equal RunConfig.for_task(task) for every setting a notebook lists, so they cannot drift."""
    defaults = parameter_defaults(name)
    recipe = RunConfig.for_task(defaults.get("task", "sql")).to_dict()
    different = {setting: (value, recipe[setting]) for setting, value in defaults.items()
                 if setting in SETTINGS and value != recipe[setting]}
    assert not different, f"{name}: (notebook, recipe) differ: {different}"


@pytest.mark.parametrize("name, task", sorted(TASK_NOTEBOOKS.items()))
def test_task_notebooks_train_their_task_and_list_the_main_settings(name, task):
    defaults = parameter_defaults(name)
    assert defaults["task"] == task
    assert {"base_model", "data", "train_rows", "eval_rows", "lora_r", "lora_alpha", "lora_dropout", "target_modules",
            "learning_rate", "max_steps", "batch_size", "max_seq_length", "output_dir", "run_name"} <= set(defaults)


def test_task_notebooks_and_jobs_equal_what_their_template_renders():
    """Notebooks 01-03 and jobs/finetune_<task>.py come from notebooks/templates (tools/render_notebooks.py);
    an edit to one of them alone fails here."""
    from tools.render_notebooks import rendered

    for path, text in rendered().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} differs from its template: run tools/render_notebooks.py"


def test_every_registered_task_has_its_notebook_job_and_cml_job():
    """The registry (lib/tasks) is the list of tasks: each has its rendered notebook, its job script and the
    AMP's job entry; the parameters cell's defaults are the task's CPU recipe."""
    import yaml

    from lib.config import RunConfig
    from lib.tasks import TASKS

    metadata = yaml.safe_load((REPO / ".project-metadata.yaml").read_text(encoding="utf-8"))
    scripts = {entry.get("script") for entry in metadata["tasks"]}
    for name, task in TASKS.items():
        notebook = nbformat.read(REPO / "notebooks" / task.notebook, as_version=4)
        parameters = next(cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", []))
        recipe = RunConfig.for_task(name, "cpu")
        assert f'task: str = "{name}"' in parameters.source
        assert f"train_rows: int = {recipe.train_rows} " in parameters.source
        assert f"jobs/finetune_{name}.py" in scripts and (REPO / "jobs" / f"finetune_{name}.py").is_file()
