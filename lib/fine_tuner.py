"""FineTuner: one QLoRA fine-tuning run, from a RunConfig to a saved adapter with its run record.

    tuner = FineTuner(RunConfig(task="sql", max_steps=20))
    result = tuner.run()          # setup() + train() + save()
    result.adapter_dir            # runs/<run_name>/adapter

TRL's SFTTrainer does the QLoRA wiring: it receives the 4-bit base model and
the LoRA config once, wraps the model, packs the examples and trains. This
class decides what to train on, where results go, and what is recorded.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

from lib import memory, plan as runtime_plan, progress, runs, tracking
from lib.config import ConfigError, RunConfig
from lib.data import load_splits, to_prompt_completion
from lib.models import load_base_model, load_tokenizer, resolve_base_model
from lib.prompts import PromptFormat
from lib.stopping import StopOnSignal, TrainingStopped
from lib.tasks import get_task


MAX_DROPPED_SHARE = 0.1  # more training rows than this losing their answer to max_seq_length is an error
FAR_BEYOND_MACHINE = 4  # an estimate this many times the device's whole memory cannot train: refuse, not crash
SPACE_MARGIN_BYTES = 32 * 2**20  # tokenizer files, trainer state, RNG states, JSON records


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    record: dict


class FineTuner:
    def __init__(self, config: RunConfig, train_dataset: list[dict] | None = None):
        """`train_dataset`: pre-tokenized rows ({"input_ids": [...]}, e.g. fixed-length token blocks for
        benchmarks) to train on instead of the task's data."""
        self.config = config.validate().with_run_name()
        self.task = get_task(self.config.task)
        self.train_dataset = train_dataset
        self.trainer = None
        self.lock = None  # runs.RunLock held from setup() to the end of train()

    # ---- setup: everything that can fail on bad input happens before the run folder exists ----

    def setup(self) -> "FineTuner":
        config = self.config
        if self.lock is None and int(os.environ.get("RANK", "0")) == 0:  # one lock per run: the main process's
            self.lock = runs.RunLock(config).acquire()
        try:
            self._setup()
        except BaseException:
            self.release_lock()
            raise
        return self

    def release_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _setup(self) -> None:
        config = self.config
        runs.check_run_dir(config)
        self.model_path = resolve_base_model(config.base_model)
        self.shapes = shapes = memory.read_shapes(self.model_path)  # the model's layers, read once without weights
        self.target_modules = shapes.resolve(config.target_module_list())
        if self.train_dataset is None:
            self.train_rows, self.eval_rows = load_splits(config)
        else:
            self.train_rows, self.eval_rows = self.train_dataset, []
        self.tokenizer = load_tokenizer(self.model_path)
        self.format = PromptFormat.build(config.prompt_format, self.task, self.tokenizer)
        self.truncation = self._check_truncation()
        plan = runtime_plan.decide(config, shapes, longest_example=self._longest_example())
        self.plan = runtime_plan.with_threads(plan, config)  # on a CPU: threads from the cores free now
        if self.plan.threads:
            import torch

            torch.set_num_threads(self.plan.threads)
        self._check_memory(shapes)
        self.space_needed = self._check_free_space(memory.trainable_parameters(shapes, config.lora_r, self.target_modules))
        model = load_base_model(self.model_path, config.load_in_4bit, attention=self.plan.attention,
                                precision=self.plan.precision, sharded=self.plan.sharded)
        self.quantization_config = getattr(model.config, "quantization_config", None)  # BitsAndBytesConfig or None
        self.lora_config = self._lora_config()
        self.trainer = self._build_trainer(model)
        if self.trainer.is_world_process_zero():
            runs.start_run_dir(config)

    def _check_free_space(self, trainable: int) -> int:
        """Refuse before training when the output folder cannot hold a checkpoint and the adapter; the bytes needed.
        A checkpoint holds the adapter (4 bytes a trainable parameter) and AdamW's two moments (8 more), the
        adapter folder the adapter and the tokenizer; rotation writes the next checkpoint before dropping one."""
        needed = trainable * (12 + 4) + SPACE_MARGIN_BYTES
        free = runs.free_bytes(self.config.run_dir)
        if free < needed:
            raise ConfigError("output_dir", self.config.output_dir,
                              f"a folder with at least {needed / 2**20:,.1f} MiB free for a checkpoint and the adapter "
                              f"of this run; {free / 2**20:,.1f} MiB are free there")
        return needed

    def _check_memory(self, shapes: memory.ModelShapes) -> None:
        """Refuse a plan whose memory estimate is far beyond the machine; warn when it is over the budget."""
        config, plan = self.config, self.plan
        size, estimate = plan.micro_batch_size, plan.estimated_gib * 2**30
        machine = memory.machine_bytes(plan)
        if estimate > FAR_BEYOND_MACHINE * machine:
            parts = memory.training_memory(shapes, config, plan, size)
            parts.pop("CPU workspace", None)  # a share of the others: name the largest of those
            largest = max(parts, key=parts.get)
            setting = {"activations": "max_seq_length", "attention scores": "max_seq_length",
                       "base weights": "base_model"}.get(largest, "lora_r")
            raise ConfigError(setting, getattr(config, setting),
                              f"a value whose training fits this machine: {size} sequence(s) a pass are estimated at "
                              f"{estimate / 2**30:,.0f} GiB ({largest}: {parts[largest] / 2**30:,.0f} GiB), "
                              f"over {FAR_BEYOND_MACHINE}x its {machine / 2**30:,.0f} GiB")
        memory.check_sharded_loading(shapes, config, plan)
        if plan.estimated_gib > plan.budget_gib:
            warnings.warn(f"a micro-batch of {size} sequence(s) is estimated to need {plan.estimated_gib:.1f} GiB, "
                          f"over the memory budget of {plan.budget_gib:.1f} GiB (memory_budget_gib="
                          f"{config.memory_budget_gib!r}); training may run out of memory", stacklevel=3)

    def _check_truncation(self) -> dict:
        """Count the training rows that max_seq_length cuts: an answer cut short teaches a wrong ending,
        and a prompt that fills the whole sequence leaves no answer (the trainer then drops the row).
        Refuse when more than MAX_DROPPED_SHARE of the rows would lose their answer; warn otherwise."""
        if self.train_dataset is not None or not self.train_rows:
            return {"rows": len(self.train_rows), "answers_cut": 0, "answers_lost": 0}
        limit = self.config.max_seq_length
        prompts = self.tokenizer([self.format.prompt(row) for row in self.train_rows])["input_ids"]
        texts = self.tokenizer([self.format.text(row) for row in self.train_rows])["input_ids"]
        lost = sum(len(ids) >= limit for ids in prompts)
        cut = sum(len(ids) + 1 > limit for ids in texts) - lost  # + the end-of-text token
        longest = max(len(ids) + 1 for ids in texts)
        summary = {"rows": len(texts), "answers_cut": cut, "answers_lost": lost, "longest_example_tokens": longest}
        if lost > MAX_DROPPED_SHARE * len(texts):
            raise ConfigError("max_seq_length", limit, f"at least {max(len(ids) for ids in prompts) + 1} (the longest "
                                                     f"prompt) so that answers survive: {lost} of {len(texts)} "
                                                     f"training rows have prompts of {limit} tokens or more and "
                                                     f"would be dropped; {longest} fits every row")
        if lost or cut:
            warnings.warn(f"max_seq_length={limit}: {lost} of {len(texts)} training rows lose their answer "
                          f"(dropped) and {cut} have it cut short; {longest} tokens would fit every row",
                          stacklevel=2)
        return summary

    def _longest_example(self) -> int:
        """Tokens of the longest training example (prompt and answer), as the trainer will see it (0: unknown)."""
        if self.train_dataset is not None:
            return max((len(row["input_ids"]) for row in self.train_dataset if "input_ids" in row), default=0)
        return self.truncation.get("longest_example_tokens", 0)  # with the end-of-text token; 0: nothing known

    def _build_trainer(self, model):
        from datasets import Dataset

        from lib.trainer import QLoRATrainer

        rows = to_prompt_completion(self.train_rows, self.format) if self.train_dataset is None else self.train_dataset
        args = self._training_args()
        use_one_gpu(args)
        trainer = QLoRATrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             processing_class=self.tokenizer, peft_config=self.lora_config)
        if self.plan.fused_lora:
            from lib import fused_lora

            fused_lora.install(trainer.model, mlps=self.config.fused_lora != "layers", liger=self.plan.liger)
        if trainer.args.fp16:  # fp16 loss scaling unscales fp32 gradients only; TRL casts 4-bit adapters to bf16
            for parameter in trainer.model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
        return trainer

    def _lora_config(self):
        from peft import LoraConfig

        config = self.config
        return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=self.target_modules, bias="none", task_type="CAUSAL_LM")

    def _training_args(self):
        from trl import SFTConfig

        config, plan = self.config, self.plan
        return SFTConfig(
            output_dir=str(config.run_dir / runs.CHECKPOINTS),
            per_device_train_batch_size=plan.micro_batch_size,
            gradient_accumulation_steps=plan.grad_accum,
            learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler,
            warmup_steps=warmup_share(config.warmup_ratio),
            num_train_epochs=config.num_epochs,
            max_steps=config.max_steps,
            max_grad_norm=config.max_grad_norm,
            gradient_checkpointing=plan.checkpointing,
            bf16=plan.precision == "bf16",
            fp16=plan.precision == "fp16",
            use_cpu=not plan.on_gpu,
            optim=plan.optimizer,
            use_liger_kernel=plan.liger,
            # packed examples share a row: only models that read position_ids keep them apart (not bloom)
            packing=plan.packed,
            max_length=config.max_seq_length,
            completion_only_loss=config.completion_only_loss,
            logging_steps=config.logging_steps,
            logging_first_step=True,  # a short run still has a point on its loss curve
            save_steps=config.save_steps,
            save_total_limit=2,
            seed=config.seed,
            data_seed=config.seed,
            include_num_input_tokens_seen="non_padding",
            logging_nan_inf_filter=False,  # its check reads the loss back every pass; a NaN loss shows in the log
            ddp_find_unused_parameters=False,  # only LoRA weights train; every one gets a gradient
            ddp_broadcast_buffers=False,  # buffers (rotary tables) never change: no broadcast, no meeting, per pass
            report_to="none",
        )

    # ---- train and save ----------------------------------------------------------------------

    def run(self) -> TrainResult:
        return self.setup().train()

    def train(self) -> TrainResult:
        """Train (resuming from the run folder's last checkpoint), then save the adapter. A stop signal
        (SIGTERM) saves a checkpoint and raises TrainingStopped; a full disk raises runs.StorageError after
        removing partial files; the run lock is released however training ends."""
        if self.trainer is None:
            self.setup()
        resume_from = runs.last_checkpoint(self.config.run_dir)
        if resume_from and self.trainer.args.device.type == "cpu":
            allow_indexed_cpu_locations()
        stop = StopOnSignal()
        callbacks = [stop, progress.LogLastStep()]
        if progress.wanted():  # plain lines for logs nobody watches live (a CML Job, papermill)
            callbacks.append(progress.ProgressLines())
        if tracking.enabled(self.config) and self.trainer.is_world_process_zero():
            callbacks.append(tracking.MlflowTracking(self.config, self.plan))
        self.resident = ResidentAtStart()  # after MLflow's start: its libraries are part of the process's peak
        callbacks.append(self.resident)
        if not self.plan.on_gpu:
            callbacks.append(ReleaseFreedMemory())
        if self.plan.checkpointing and self.config.checkpointed_layers != "all":
            callbacks.append(CheckpointFirstLayers(self.config.checkpointed_layers))
        if self.plan.fused_lora:
            callbacks.append(FusedStepsAtStart(mlps=self.config.fused_lora != "layers", liger=self.plan.liger))
        for callback in callbacks:
            self.trainer.add_callback(callback)
        started = time.perf_counter()
        try:
            with stop.installed(), frozen_heap():
                output = self.trainer.train(resume_from_checkpoint=resume_from)
            if stop.stopped_at is not None:
                self.trainer.accelerator.wait_for_everyone()
                raise TrainingStopped(stop.signal_name, stop.stopped_at, runs.last_checkpoint(self.config.run_dir))
            wall_s = time.perf_counter() - started
            record = self._run_record(output.metrics, wall_s, resume_from)
            adapter_weights = self._gathered_adapter()  # every process takes part when the adapter is sharded
            if self.trainer.is_world_process_zero():
                self._save_adapter(record, adapter_weights)
                tracking.log_results(self.config, record=record)
            self.trainer.accelerator.wait_for_everyone()
        except Exception as error:
            failure = runs.storage_failure(error)
            if failure is None:
                raise
            runs.remove_partial_writes(self.config.run_dir)
            raise runs.StorageError(self.config.run_dir, failure, self.space_needed) from error
        finally:
            for callback in callbacks:
                self.trainer.remove_callback(callback)
            self.release_lock()
        run_dir = self.config.run_dir
        return TrainResult(run_dir=run_dir, adapter_dir=run_dir / runs.ADAPTER, record=record)

    def _gathered_adapter(self) -> dict | None:
        """Under FSDP each process holds a shard of the adapter: its whole weights, gathered on rank 0's CPU
        (a collective call: every process makes it). Trainable weights only, so the sharded 4-bit base is not
        gathered. None without sharding: save_pretrained reads the weights from the model."""
        if not self.plan.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        return get_model_state_dict(self.trainer.model_wrapped, options=options)

    def _save_adapter(self, record: dict, adapter_weights: dict | None = None) -> None:
        """Write the adapter into a staging folder, then rename it into place: complete or absent."""
        run_dir = self.config.run_dir
        staging = run_dir / f"{runs.STAGING_PREFIX}{time.time_ns()}-{runs.ADAPTER}"
        gathered = {"state_dict": adapter_weights} if adapter_weights is not None else {}  # FSDP: whole, gathered
        self.trainer.model.save_pretrained(staging, **gathered)
        self.tokenizer.save_pretrained(staging)
        runs.write_json_atomic(staging / runs.RUN_RECORD, record)
        runs.publish_dir(staging, run_dir / runs.ADAPTER)
        runs.write_json_atomic(run_dir / runs.RUN_RECORD, record)

    def _run_record(self, train_metrics: dict, wall_s: float, resumed_from: str | None) -> dict:
        state, model = self.trainer.state, self.trainer.model
        tokens = int(state.num_input_tokens_seen or 0)
        trainable, total = model.get_nb_trainable_parameters()
        return {
            "config": self.config.to_dict(),
            "task": self.task.name,
            "base_model_path": self.model_path,
            "target_modules": self.target_modules,
            "train_rows": len(self.train_rows) - self.truncation["answers_lost"],
            "truncation": self.truncation,  # rows as loaded, answers cut short and answers lost (dropped)
            "eval_rows": len(self.eval_rows),
            "trainable_parameters": trainable,
            "total_parameters": total,
            "global_step": state.global_step,
            "resumed_from": resumed_from,
            "loss_history": loss_history(state.log_history),
            "train_metrics": train_metrics,
            "wall_time_s": round(wall_s, 2),
            "train_tokens": tokens,
            "tokens_per_s": round(tokens / train_metrics["train_runtime"], 1) if train_metrics.get("train_runtime") else None,
            "peak_memory_gib": peak_memory_gib(),
            "estimated_peak_gib": self._estimated_peak_gib(),  # what peak_memory_gib was expected to read
            "plan": self.plan.to_dict(),  # every "auto" as decided (lib.plan), with the micro-batch
            "fused_lora_layers": self._fused_lora_layers(),
            "fused_mlps": self._fused_lora_layers(mlps=True),  # MLPs that took lib.fused_lora's MLP step
            # FSDP: the embedding and the head kept sharded (lib.sharded_vocab)
            "sharded_vocab": getattr(self.trainer, "sharded_vocab", False),
            "world_size": self.trainer.accelerator.num_processes,
            "rank_shares": self._rank_shares(),
            "device": device_name(),
            "versions": library_versions(),
        }

    def _fused_lora_layers(self, mlps: bool = False) -> int:
        """LoRA layers (or with `mlps`, MLPs) that trained with the fused step (lib.fused_lora): 0 where the plan
        left it off."""
        if not self.plan.fused_lora:
            return 0
        from lib import fused_lora

        return (fused_lora.mlps_served if mlps else fused_lora.served)(self.trainer.model)

    def _estimated_peak_gib(self) -> float | None:
        """The estimate of this process's peak_memory_gib: on a GPU the training estimate (allocated tensors);
        on a CPU the resident memory when training started + the training estimate beyond the loaded weights."""
        if self.plan.on_gpu or self.resident.bytes is None:
            return self.plan.estimated_gib
        parts = memory.training_memory(self.shapes, self.config, self.plan, self.plan.micro_batch_size)
        return round(memory.process_peak(parts, self.resident.bytes) / 2**30, 3)

    def _rank_shares(self) -> list[dict]:
        """How many packed sequences and batches each process trained on per epoch."""
        from accelerate.utils import gather_object

        accelerator = self.trainer.accelerator
        batches = len(self.trainer.get_train_dataloader())
        share = {"rank": accelerator.process_index, "batches_per_epoch": batches,
                 "sequences_per_epoch": batches * self.plan.micro_batch_size,
                 "peak_memory_gib": peak_memory_gib(), "estimated_peak_gib": self._estimated_peak_gib()}
        return sorted(gather_object([share]), key=lambda item: item["rank"])


class ResidentAtStart(TrainerCallback):
    """This process's resident memory when training starts (lib.memory.process_peak's measured part)."""

    bytes: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if args.device.type == "cpu":
            memory.release_freed_memory()  # what setup freed would otherwise count here and be reused unseen
        self.bytes = memory.resident_bytes()


class CheckpointFirstLayers(TrainerCallback):
    """Gradient checkpointing for the first `count` decoder layers only: the Trainer has just turned it on
    for all of them (transformers' GradientCheckpointingLayer flags); the later ones keep their activations,
    so backward does not recompute them. transformers' own `every_n_layers` frees only every n-th layer's
    activations at a time (half of them at n=2), too coarse to fill a budget one layer at a time."""

    def __init__(self, count: int):
        self.count = count

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from transformers.modeling_layers import GradientCheckpointingLayer

        layers = [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]
        for index, layer in enumerate(layers):
            layer.gradient_checkpointing = layer.gradient_checkpointing and index < self.count


class FusedStepsAtStart(TrainerCallback):
    """lib.fused_lora's steps installed again as training starts: the Trainer applies Liger's kernels in train(),
    after the steps were installed with the trainer, and Liger binds LigerSwiGLUMLP's forward on every SwiGLU MLP,
    over the MLP step (which then never ran on a GPU: run F34 recorded fused_mlps 0). Installing again puts the
    step back over Liger's forward, which stays the fallback."""

    def __init__(self, mlps: bool, liger: bool):
        self.mlps, self.liger = mlps, liger

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from lib import fused_lora

        fused_lora.install(model, mlps=self.mlps, liger=self.liger)


class ReleaseFreedMemory(TrainerCallback):
    """After each CPU training step, the allocator's freed pages go back to the OS (lib.memory)."""

    def on_step_end(self, args, state, control, **kwargs):
        memory.release_freed_memory()


def use_one_gpu(args) -> None:
    """A process outside a distributed launch that sees several GPUs (a notebook, `python -m lib.train --gpus 1`)
    trains on the first: the Trainer would otherwise wrap the model in DataParallel, which TRL refuses and which
    was slower than one GPU (DESIGN.md). `python -m lib.train` and lib.launcher start one process per GPU."""
    if args.n_gpu > 1:
        print(f"{args.n_gpu} GPUs visible to this one process: training on the first only (one process per GPU: "
              "python -m lib.train or lib.launcher)", flush=True)
        args._n_gpu = 1  # what the Trainer itself sets for a model placed across several GPUs


@contextlib.contextmanager
def frozen_heap():
    """Training with Python's garbage collector leaving alone every object made before it (gc.freeze): its
    full collections otherwise walk all the objects of the loaded libraries, the model and the data, pausing
    a step now and then; with several processes each pause holds the others at the next gradient exchange."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def warmup_share(ratio: float) -> float:
    """warmup_ratio as transformers 5 takes it: its `warmup_steps` reads a float below 1 as a share of the
    total steps (the separate warmup_ratio argument is deprecated)."""
    return float(ratio)


def allow_indexed_cpu_locations() -> None:
    """Let torch.load map storages to "cpu:N": a CPU process of a multi-process launch has device cpu:N,
    which the Trainer passes as map_location when it resumes the optimizer state, and torch only knows "cpu"."""
    import torch

    global _INDEXED_CPU_REGISTERED
    if not _INDEXED_CPU_REGISTERED:
        torch.serialization.register_package(  # priority 11: asked right after torch's own "cpu" (10)
            11, lambda obj: None, lambda storage, location: storage.cpu() if location.startswith("cpu:") else None)
        _INDEXED_CPU_REGISTERED = True


_INDEXED_CPU_REGISTERED = False


def loss_history(log_history: list[dict]) -> list[dict]:
    """The logged training loss per step, in step order."""
    return [{"step": entry["step"], "loss": entry["loss"], "learning_rate": entry.get("learning_rate")}
            for entry in log_history if "loss" in entry]


def peak_memory_gib() -> float:
    """Peak GPU memory allocated by this process, or its peak resident memory on CPU."""
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # ru_maxrss is in KiB


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets")
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
