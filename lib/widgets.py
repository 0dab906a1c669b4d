"""The LoRA panel: try adapter settings and see what they cost before training anything.

    from lib.widgets import LoraPanel
    panel = LoraPanel(config, prompt=example_prompt)   # config: the notebook's RunConfig
    panel                                             # shows the controls in JupyterLab
    panel.config                                      # the RunConfig of the current values

While values change, the panel shows the trainable parameters (exact, from the layer shapes), the
adapter's size on disk and an estimate of training memory (formula: lib/memory.py). Nothing waits
for a click: under papermill the panel is built and shown, and the notebook goes on with its
parameters. The Train button runs a short fine-tune with `panel.config`; Compare answers a prompt
with the base model and with the adapter just trained.
"""

from __future__ import annotations

import io
import json

from lib import memory
from lib.config import RunConfig, TARGET_PRESETS
from lib.models import resolve_base_model
from lib.plan import decide

SEQ_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096)  # choices of the sequence-length control


# Where a run goes, not how it trains: a job makes its own new run folder, and a pasted line naming this
# notebook's run would be refused as an existing folder.
RUN_FOLDER_SETTINGS = ("run_name", "output_dir", "overwrite")


def set_lines(config: RunConfig) -> list[str]:
    """`--set name=value` for each training setting that differs from the task's recipe (RunConfig.for_task)."""
    recipe = RunConfig.for_task(config.task).to_dict()
    return [f"--set {name}={_as_text(value)}" for name, value in config.to_dict().items()
            if value != recipe[name] and name not in RUN_FOLDER_SETTINGS]


def job_line(config: RunConfig) -> str:
    """The command of a headless job with the panel's settings, ready to paste into a terminal or a CML Job."""
    import shlex

    return " ".join([f"python jobs/finetune_{config.task}.py",
                     *(f"--set {shlex.quote(line.removeprefix('--set '))}" for line in set_lines(config))])


def _as_text(value) -> str:
    """The value as `--set` reads it back: JSON when it parses, else plain text."""
    if isinstance(value, list):
        value = ",".join(value)
    if isinstance(value, str):
        try:
            return value if json.loads(value) == value else json.dumps(value)
        except json.JSONDecodeError:
            return value
    return json.dumps(value)


def _mib(size: float) -> str:
    return f"{size / 2**20:,.1f} MiB"


class LoraPanel:
    def __init__(self, config: RunConfig, prompt: str = "", model_path: str | None = None):
        import ipywidgets as w

        label = {"style": {"description_width": "initial"}}  # descriptions in full, not cut to a fixed width
        self.base_config = config.validate()
        self.model_path = model_path or resolve_base_model(config.base_model)
        self.shapes = memory.read_shapes(self.model_path)
        self.result = None  # the TrainResult of the Train button
        self.rank = w.IntSlider(config.lora_r, min=1, max=256, description="rank r", **label)
        self.alpha = w.IntSlider(config.lora_alpha, min=1, max=512, description="alpha", **label)
        self.dropout = w.FloatSlider(config.lora_dropout, min=0.0, max=0.5, step=0.01, description="dropout",
                                     **label)
        chosen = self.shapes.resolve(config.target_module_list())
        self.targets = {name: w.Checkbox(name in chosen, description=name, indent=False)
                        for name in self.shapes.linear_names}
        self.attention_button = w.Button(description="attention-only")
        self.all_linear_button = w.Button(description="all-linear")
        self.learning_rate = w.FloatLogSlider(config.learning_rate, base=10, min=-6, max=-1, readout_format=".1e",
                                              description="learning rate", **label)
        self.num_epochs = w.BoundedFloatText(config.num_epochs, min=0.01, max=1000, description="epochs", **label)
        self.max_steps = w.BoundedIntText(config.max_steps, min=-1, max=10**6, description="max steps", **label)
        self.batch_size = w.IntSlider(config.batch_size, min=1, max=64, description="batch size", **label)
        self.max_seq_length = w.Dropdown(options=sorted({*SEQ_LENGTHS, config.max_seq_length}),
                                         value=config.max_seq_length, description="seq length", **label)
        self.load_in_4bit = w.Checkbox(config.load_in_4bit, description="4-bit base (QLoRA)")
        self.summary = w.HTML()
        self.set_text = w.Textarea(layout=w.Layout(width="100%", height="8em"), disabled=True)
        self._build_training_widgets(w, prompt)
        self._connect()
        self._update()
        self.widget = w.VBox([
            w.HTML("<b>LoRA</b>"), w.HBox([self.rank, self.alpha, self.dropout]),
            w.HBox([w.Label("target modules:", layout=w.Layout(min_width="9em", flex="0 0 auto")),  # never cut short
                    *self.targets.values()]),
            w.HBox([self.attention_button, self.all_linear_button]),
            w.HTML("<b>Training</b>"), w.HBox([self.learning_rate, self.num_epochs, self.max_steps]),
            w.HBox([self.batch_size, self.max_seq_length, self.load_in_4bit]),
            self.summary, w.HTML("<b>The same training as a headless job</b> (paste into a terminal or a CML Job; only the settings "
                   "that differ from the task recipe)"),
            self.set_text, w.HBox([self.train_button, self.progress]), self.loss_output,
            w.HTML("<b>Compare</b>"), self.prompt, self.compare_button, self.answers,
        ])

    def _build_training_widgets(self, w, prompt: str) -> None:
        self.train_button = w.Button(description="Train", button_style="primary")
        self.progress = w.IntProgress(value=0, min=0, max=1, description="steps")
        self.loss_output = w.Output()
        self.prompt = w.Textarea(prompt, layout=w.Layout(width="100%", height="6em"), description="prompt")
        self.compare_button = w.Button(description="Compare", disabled=True)
        self.answers = w.Output()

    def _connect(self) -> None:
        controls = [self.rank, self.alpha, self.dropout, self.learning_rate, self.num_epochs, self.max_steps,
                    self.batch_size, self.max_seq_length, self.load_in_4bit, *self.targets.values()]
        for control in controls:
            control.observe(lambda change: self._update(), names="value")
        self.attention_button.on_click(lambda button: self.choose_targets(self.shapes.attention_names))
        self.all_linear_button.on_click(lambda button: self.choose_targets(self.shapes.linear_names))
        self.train_button.on_click(lambda button: self.train())
        self.compare_button.on_click(lambda button: self.compare())

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    # ---- values --------------------------------------------------------------------------------

    def choose_targets(self, names: list[str]) -> None:
        """Tick exactly `names` (a preset's layers or any choice)."""
        for name, box in self.targets.items():
            box.value = name in names

    @property
    def target_modules(self):
        """The ticked layers, written as a preset when they are exactly one."""
        chosen = [name for name, box in self.targets.items() if box.value]
        for preset in TARGET_PRESETS:
            if chosen == self.shapes.resolve([preset]):
                return preset
        return ",".join(chosen)

    @property
    def config(self) -> RunConfig:
        """The RunConfig of the current values: the notebook's config with the panel's settings on top."""
        micro = self.base_config.micro_batch_size  # a fixed micro-batch that no longer divides the batch: auto
        if micro != "auto" and self.batch_size.value % micro:
            micro = "auto"
        return self.base_config.replace(
            micro_batch_size=micro, lora_r=self.rank.value, lora_alpha=self.alpha.value, lora_dropout=round(self.dropout.value, 4),
            target_modules=self.target_modules, learning_rate=float(f"{self.learning_rate.value:.3g}"),
            num_epochs=float(self.num_epochs.value), max_steps=self.max_steps.value, batch_size=self.batch_size.value,
            max_seq_length=self.max_seq_length.value, load_in_4bit=self.load_in_4bit.value)

    def estimate(self) -> dict:
        """Trainable parameters, their share, adapter bytes, the micro-batch the FineTuner would choose on this
        machine if every row were max_seq_length tokens long (the panel has no data), and the training-memory
        parts at that micro-batch, for `config`."""
        config = self.config
        trainable = memory.trainable_parameters(self.shapes, config.lora_r, config.target_module_list())
        plan = decide(config, self.shapes)
        micro_batch, budget = plan.micro_batch_size, plan.budget_gib * 2**30
        parts = memory.training_memory(self.shapes, config, plan, micro_batch)
        return {"trainable": trainable, "share": trainable / (self.shapes.total_parameters + trainable),
                "adapter_bytes": memory.adapter_bytes(trainable), "memory": parts,
                "memory_total": sum(parts.values()), "micro_batch": micro_batch, "budget": budget}

    def _update(self) -> None:
        estimate = self.estimate()
        rows = [("trainable parameters", f"{estimate['trainable']:,}"),
                ("share of the model", f"{estimate['share']:.2%}"),
                ("adapter on disk", _mib(estimate["adapter_bytes"])),
                ("micro-batch", f"{estimate['micro_batch']} of {self.config.batch_size} sequences"),
                ("training memory (estimate)", _mib(estimate["memory_total"])),
                *((f"&nbsp;&nbsp;{part}", _mib(size)) for part, size in estimate["memory"].items())]
        cells = "".join(f"<tr><td style='text-align:left'>{name}</td><td class='{_css(name)}' "
                        f"style='text-align:right'>{value}</td></tr>" for name, value in rows)
        self.summary.value = f"<table class='lora-summary'>{cells}</table>"
        self.set_text.value = job_line(self.config)
        self.train_button.disabled = not self.targets or not any(box.value for box in self.targets.values())

    # ---- training and comparing ------------------------------------------------------------------

    def train(self):
        """A fine-tune with `config` (in a new run folder), with live progress and loss curve."""
        from lib.fine_tuner import FineTuner

        self.train_button.disabled = True
        try:
            tuner = FineTuner(self.config.replace(run_name="")).setup()
            tuner.trainer.add_callback(_progress_callback(self))
            self.result = tuner.train()
        finally:
            self.train_button.disabled = False
        self.compare_button.disabled = False
        return self.result

    def compare(self) -> tuple[str, str]:
        """The base model's and the adapter's answers to the prompt, shown side by side."""
        import html

        from IPython.display import HTML

        from lib.evaluation import BASE, Evaluator
        from lib.tasks import get_task

        evaluator = Evaluator(self.model_path, self.result.record["config"]["load_in_4bit"])
        evaluator.attach("adapter", self.result.adapter_dir)
        fmt = evaluator.adapter_format(get_task(self.base_config.task), "adapter")
        base, tuned = (evaluator.answer_prompts(fmt, [self.prompt.value], name)[0] for name in (BASE, "adapter"))
        self.answers.outputs = ()  # set directly, not captured with `with`: it then also works outside a kernel
        self.answers.append_display_data(HTML(
            f"<table><tr><th>base model</th><th>with adapter</th></tr><tr><td><pre>{html.escape(base)}</pre></td>"
            f"<td><pre>{html.escape(tuned)}</pre></td></tr></table>"))
        return base, tuned


def _css(name: str) -> str:
    return name.replace("&nbsp;", "").replace(" ", "-").replace("(", "").replace(")", "")


def _progress_callback(panel: LoraPanel):
    """A TrainerCallback that moves the panel's progress bar and redraws its loss curve at each log."""
    from IPython.display import Image
    from transformers import TrainerCallback

    from lib import plots
    from lib.fine_tuner import loss_history

    class PanelProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            panel.progress.max, panel.progress.value = max(state.max_steps, 1), state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            panel.progress.value = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            history = loss_history(state.log_history)
            if history:
                png = io.BytesIO()
                plots.loss_curve(history, title="training loss (panel run)").savefig(png, format="png")
                panel.loss_output.outputs = ()
                panel.loss_output.append_display_data(Image(data=png.getvalue(), format="png"))

    return PanelProgress()
