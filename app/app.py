"""The Application: try the trained adapters against the base model in a browser.

    python app/app.py                       # http://127.0.0.1:8080 (CML: CDSW_APP_PORT, the application port)
    python app/app.py --port 7860 --output-dir runs --adapters-dir adapters

Pick an adapter (the newest finished run of each task under QLORA_OUTPUT_DIR, and any adapter folder
under QLORA_ADAPTERS_DIR), fill in the task's fields (an example row is filled in for you), press
Generate: the base model and the adapter answer the same prompt, side by side. One base model is in
memory; the adapters are attached to it by name (lib.evaluation.Evaluator). Built with Gradio, as the
seed AMP's application was; runs offline with the embedded model. `.project-metadata.yaml` starts it as
a CML Application.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from lib.display import EMPTY_ANSWER  # noqa: E402
from lib.evaluation import BASE, Evaluator  # noqa: E402
from lib.explorer import find_adapters  # noqa: E402
from lib.models import resolve_base_model  # noqa: E402
from lib.tasks import TASKS, get_task  # noqa: E402

DEFAULT_PORT = 8080
MAX_FIELDS = max(len(task.fields) for task in TASKS.values())  # input boxes, shown as the chosen task needs


class Playground:
    """The model side of the app: one Evaluator, the usable adapters attached by name."""

    def __init__(self, output_dir: str, adapters_dir: str, base_model: str):
        self.usable, self.skipped = find_adapters(output_dir, adapters_dir, base_model)
        self.evaluator = Evaluator(resolve_base_model(base_model))
        self.by_name = {}
        for item in self.usable:
            self.evaluator.attach(item["name"], item["adapter_dir"])
            self.by_name[item["name"]] = item

    def input_fields(self, adapter: str) -> list[str]:
        task = get_task(self.by_name[adapter]["task"])
        return [field for field in task.fields if field != task.answer_field]

    def example(self, adapter: str) -> dict:
        task = get_task(self.by_name[adapter]["task"])
        return task.embedded_splits(train_rows=1, eval_rows=1, seed=7)[1][0]

    def answer(self, adapter: str, values: dict) -> tuple[str, str]:
        """(base answer, adapter answer) to the prompt the adapter was trained on, built from `values`."""
        task = get_task(self.by_name[adapter]["task"])
        row = {field: values.get(field, "") for field in task.fields}
        fmt = self.evaluator.adapter_format(task, adapter)
        prompt = fmt.prompt(row)
        base = self.evaluator.answer_prompts(fmt, [prompt], BASE)[0]
        tuned = self.evaluator.answer_prompts(fmt, [prompt], adapter)[0]
        return base or EMPTY_ANSWER, tuned or EMPTY_ANSWER


def build(playground: Playground):
    import gradio as gr

    names = list(playground.by_name)
    with gr.Blocks(title="QLoRA adapters: base model vs adapter") as app:
        gr.Markdown("# Base model vs adapter\nPick an adapter, fill in its task's fields, press **Generate**: the "
                    "base model and the adapter answer the same prompt.")
        if not names:
            gr.Markdown("**No adapter found.** Train one first: run a task job (for example "
                        "`python jobs/finetune_sql.py --set max_steps=20`) or a task notebook, then restart this "
                        "application.")
            return app
        adapter = gr.Dropdown(names, value=names[0], label="Adapter", elem_id="adapter")
        boxes = [gr.Textbox(lines=3, elem_id=f"field-{index}") for index in range(MAX_FIELDS)]
        generate = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            base_out = gr.Textbox(label="Base model", lines=4, elem_id="base-answer")
            adapter_out = gr.Textbox(label="Adapter", lines=4, elem_id="adapter-answer")

        def show(name):
            fields, example = playground.input_fields(name), playground.example(name)
            return [gr.update(visible=index < len(fields), label=fields[index] if index < len(fields) else "",
                              value=example.get(fields[index], "") if index < len(fields) else "")
                    for index in range(MAX_FIELDS)]

        def run(name, *texts):
            return playground.answer(name, dict(zip(playground.input_fields(name), texts)))

        adapter.change(show, adapter, boxes)
        app.load(show, adapter, boxes)
        generate.click(run, [adapter, *boxes], [base_out, adapter_out])
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("CDSW_APP_PORT", DEFAULT_PORT)))
    parser.add_argument("--host", default="127.0.0.1", help="CML Applications listen on 127.0.0.1")
    parser.add_argument("--output-dir", default=os.environ.get("QLORA_OUTPUT_DIR", "runs"))
    parser.add_argument("--adapters-dir", default=os.environ.get("QLORA_ADAPTERS_DIR", "adapters"))
    parser.add_argument("--base-model", default=os.environ.get("QLORA_BASE_MODEL", "embedded"))
    args = parser.parse_args(argv)
    playground = Playground(args.output_dir, args.adapters_dir, args.base_model)
    print(f"adapters: {', '.join(playground.by_name) or 'none'}; serving on http://{args.host}:{args.port}",
          flush=True)
    build(playground).launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
