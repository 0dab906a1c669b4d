"""Training speed of the project's own path (FineTuner -> SFTTrainer) on randomly initialised models of real shapes.

Speed does not depend on the weight values, so a model built from its architecture's config (nothing to
download) trained on fixed-length blocks of random token ids measures what users pay for. Each
configuration runs in its own process (a clean GPU and a clean peak-memory count) for `warmup + steps`
optimizer steps and gives one row:

    tokens_per_s   tokens per optimizer step / median seconds per step, warm-up steps left out
    s_per_step     median seconds per optimizer step (all micro-batches, the optimizer, the data loader)
    peak_mem_gib   torch.cuda.max_memory_allocated over the whole process (model load included);
                   on CPU the process's peak resident memory; with several processes the largest of them
                   (each one's in peak_mem_gib_per_rank)
    mfu            model FLOPs per second / the card's dense bf16 peak (PEAK_FLOPS, datasheet)

Data parallel (`accelerate launch` of tools/benchmark.py, one process per GPU): every rank trains the same
number of steps on its own share of the blocks, so a step's tokens are seq_len x batch x accum x world size
and tokens_per_s is the whole group's; `gpus` is the world size, and only rank 0 writes rows.

Model FLOPs per token, QLoRA with a frozen base (`model_flops_per_token`):
    4·N + 6·N_lora + 6·L·s·d
N is the number of weights used in matrix products (every linear layer, the output head included; the
embedding lookup is not a product): 2·N forward and 2·N backward for the input gradients, no weight
gradients. LoRA's N_lora weights take the usual 6·N_lora. Causal attention over s tokens costs 2·s·d per
token and layer forward (QK^T and AV, half the square), twice that backward. Recomputation by gradient
checkpointing is not counted: MFU is useful work, so checkpointing lowers it.

The Unsloth reference (`run_unsloth`) trains the same model, blocks, LoRA rank and targets with
Unsloth's FastLanguageModel in a separate process (Unsloth patches transformers when imported).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from lib import memory
from lib.config import RunConfig

# Real architectures, by shape; "tiny-*" are for tests on CPU.
ARCHITECTURES = {
    "llama-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192, head_dim=64,
                     tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0),
    "bloom-1b1": dict(model_type="bloom", vocab_size=250880, hidden_size=1536, n_layer=24, n_head=16,
                      tie_word_embeddings=True),
    # sharding checks: Llama-3.1-8B's shape, and 70B's (too big to build here whole: slices of it below)
    "llama-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, head_dim=128,
                     tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=500000.0),
    "llama-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, intermediate_size=28672, head_dim=128,
                      tie_word_embeddings=False, max_position_embeddings=131072, rope_theta=500000.0),
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                       tie_word_embeddings=True),
    "tiny-bloom": dict(model_type="bloom", vocab_size=512, hidden_size=64, n_layer=2, n_head=4,
                       tie_word_embeddings=True),
}

# A slice of the 70B shape: its embeddings and head with a few of its 80 decoder layers; the difference
# between two slices' peaks is the measured memory of the layers in between.
ARCHITECTURES.update({f"llama-70b-{n}layers": {**ARCHITECTURES["llama-70b"], "num_hidden_layers": n} for n in (2, 4)})
ARCHITECTURES["llama-8b-2layers"] = {**ARCHITECTURES["llama-8b"], "num_hidden_layers": 2}  # a quick sharding check

# Dense bf16/fp16 tensor-core peak from the datasheets (SXM parts), by a name fragment of the card.
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}

# The seed AMP's training settings, written as project settings.
SEED = dict(precision="fp16", attention="eager", optimizer="paged_adamw_32bit", liger_kernel="off",
            batch_size=4, micro_batch_size=1, gradient_checkpointing=False, fused_lora="off")


def fast(batch: int, **changes) -> dict:
    """bf16, fused AdamW and `batch` sequences in one micro-batch, with `changes` on top."""
    return {**dict(precision="bf16", optimizer="adamw_torch_fused", liger_kernel="off", gradient_checkpointing=False,
                   batch_size=batch, micro_batch_size=batch), **changes}


# The step-by-step changes that led from the seed to the defaults.
CONFIGS = {
    "seed": SEED,
    "bf16": {**SEED, "precision": "bf16"},
    "bf16-sdpa": {**SEED, "precision": "bf16", "attention": "sdpa"},
    "b4-sdpa-packed": fast(4, attention="sdpa"),
    "b4-varlen": fast(4, attention="varlen"),
    "b4-varlen-liger": fast(4, attention="varlen", liger_kernel="on"),
    "b8-varlen-liger": fast(8, attention="varlen", liger_kernel="on"),
    "b8-varlen-ckpt": fast(8, attention="varlen", gradient_checkpointing=True),
    "b8-varlen-ckpt-liger": fast(8, attention="varlen", gradient_checkpointing=True, liger_kernel="on"),
    "b16-varlen-ckpt": fast(16, attention="varlen", gradient_checkpointing=True),
    "b16-varlen-ckpt-liger": fast(16, attention="varlen", gradient_checkpointing=True, liger_kernel="on"),
    "b32-varlen-ckpt-liger": fast(32, attention="varlen", gradient_checkpointing=True, liger_kernel="on"),
    "b16-varlen-ckpt-liger-nodrop": fast(16, attention="varlen", gradient_checkpointing=True, liger_kernel="on",
                                         lora_dropout=0.0),
    "b32-varlen-ckpt-liger-nodrop": fast(32, attention="varlen", gradient_checkpointing=True, liger_kernel="on",
                                         lora_dropout=0.0),
    # best speed under a memory budget: LoRA dropout 0 (as Unsloth's fast path), checkpointing only the first
    # N of llama-1b's 16 layers (the others keep their activations), or none
    **{f"b{batch}-ckpt{layers}-nodrop": fast(batch, attention="varlen", gradient_checkpointing=True,
                                             checkpointed_layers=layers, liger_kernel="on", lora_dropout=0.0)
       for batch in (8, 16, 24, 32) for layers in (4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)},
    "b8-nockpt-nodrop": fast(8, attention="varlen", liger_kernel="on", lora_dropout=0.0),
    # LoRA on every linear layer (the RunConfig default) without dropout: the MLP step (lib/fused_lora.py)
    # against each projection's fused step on its own ("layers")
    **{f"b{batch}-all-ckpt{layers}-nodrop{suffix}": fast(
        batch, attention="varlen", gradient_checkpointing=True, checkpointed_layers=layers, liger_kernel="on",
        lora_dropout=0.0, target_modules="all-linear", **({"fused_lora": "layers"} if suffix else {}))
       for batch in (16, 32) for layers in (8, 12, 13, 16) for suffix in ("", "-layers")},
    # bloom with its own (eager) attention, which cannot keep packed examples apart (packing turns itself off)
    "b4": fast(4, attention="eager"),
    "b8-ckpt": fast(8, gradient_checkpointing=True, attention="eager"),
    "b8-ckpt-liger": fast(8, gradient_checkpointing=True, liger_kernel="on", attention="eager"),
    "b16-ckpt": fast(16, gradient_checkpointing=True, attention="eager"),
    "b32-ckpt": fast(32, gradient_checkpointing=True, attention="eager"),
    "default-eager": {"attention": "eager"},  # bloom's shipped defaults before they chose flex (runs F, G, P)
    # bloom with lib/alibi.py's flex attention: packed rows, examples kept apart, no score matrices on CUDA
    # (what "default" chooses for bloom on CUDA in bf16 since run C31)
    "default-flex": {"attention": "flex"},
    "micro1": {"batch_size": 4, "micro_batch_size": 1},  # DDP against FSDP at the same micro-batch
    "default-nofused": {"fused_lora": "off"},  # the defaults with PEFT's own LoRA forward (lib/fused_lora.py off)
    "default": {},  # RunConfig's defaults: 16 sequences a step, the micro-batch chosen to fit the GPU
    # the defaults held to a memory budget: the micro-batch shrinks, accumulation makes up the step
    "default-budget-3gib": {"memory_budget_gib": 3.0},
    "default-budget-4.8gib": {"memory_budget_gib": 4.8},
    "default-budget-5gib": {"memory_budget_gib": 5.0},
}
# Unsloth's recommended fast path: its gradient checkpointing, LoRA dropout 0; batch size per name.
UNSLOTH_CONFIGS = {"unsloth-b8": 8, "unsloth-b16": 16, "unsloth-b32": 32, "unsloth-b64": 64}
REQUIRED_KEYS = ("card", "date", "arch", "config", "gpus", "seq_len", "tokens_per_s", "peak_mem_gib", "mfu")


def settings(arch: str, config: str, model_dir: str, seq_len: int, max_steps: int, output_dir: str,
             logging_steps: int = 1) -> RunConfig:
    """The RunConfig of one benchmark configuration: same model, data and LoRA (r=16, on the attention
    projections unless the configuration says otherwise) for every configuration; the configuration's
    overrides on top of RunConfig's defaults."""
    return RunConfig(**{**dict(base_model=model_dir, target_modules="attention", lora_r=16, lora_alpha=32,
                               max_seq_length=seq_len, max_steps=max_steps, logging_steps=logging_steps,
                               save_steps=10**6, output_dir=output_dir, run_name=f"{arch}-{config}",
                               overwrite=True), **CONFIGS[config]})


def build_random_model(arch: str, model_dir: str | Path) -> Path:
    """A randomly initialised model of `arch` in bf16 with a tokenizer covering its vocabulary, saved to
    `model_dir` so the FineTuner (and Unsloth) load it by path like any checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(ARCHITECTURES[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    word_level_tokenizer(config.vocab_size).save_pretrained(model_dir)
    return Path(model_dir)


def word_level_tokenizer(vocab_size: int):
    """A tokenizer whose vocabulary is one word per token id ("t0", "t1", ...): training reads ids, not text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0", pad_token="t0", eos_token="t1")


def token_blocks(vocab_size: int, seq_len: int, rows: int, seed: int = 0) -> list[dict]:
    """`rows` fixed-length blocks of random token ids (the special ids 0 and 1 left out)."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(2, vocab_size, size=(rows, seq_len))
    return [{"input_ids": row.tolist()} for row in ids]


def matmul_weights(model_dir: str | Path) -> tuple[int, int, int]:
    """(weights used in matrix products incl. the output head, layers, hidden size), read without loading."""
    import torch
    from transformers import AutoConfig

    from lib.models import empty_model

    config = AutoConfig.from_pretrained(model_dir)
    model = empty_model(str(model_dir))
    weights = sum(module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear))
    return weights, config.num_hidden_layers, config.hidden_size


def model_flops_per_token(matmul: int, lora: int, layers: int, hidden: int, seq_len: int) -> float:
    """4·N + 6·N_lora + 6·L·s·d: see the module docstring."""
    return 4 * matmul + 6 * lora + 6 * layers * seq_len * hidden


def step_timer(window: tuple[int, int] | None = None):
    """A trainer callback marking when training starts and when each optimizer step ends, after the GPU
    has finished it; `step_seconds()` gives the steps' durations. window=(first, last): synchronise only at
    the end of steps `first` and `last` (the other marks are when the CPU got there), so that the timing
    adds no synchronisation inside the measured steps; `window_seconds()` is their total time."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []
            self.window: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self._mark(0)

        def on_step_end(self, args, state, control, **kwargs):
            self._mark(state.global_step)

        def _mark(self, step: int):
            if torch.cuda.is_available() and (window is None or step in window):
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())
            if window is not None and step in window:
                self.window[step] = self.marks[-1]

        def window_seconds(self) -> float | None:
            return self.window[window[1]] - self.window[window[0]] if window and len(self.window) == 2 else None

        def step_seconds(self) -> list[float]:
            return [later - earlier for earlier, later in zip(self.marks, self.marks[1:])]

    return StepTimer()


def measure(arch: str, config: str, engine: str, timer, warmup: int, tokens_per_step: int,
            seq_len: int, model_dir: str, lora_weights: int, world_size: int, details: dict,
            steps: int | None = None) -> dict:
    """One result row from a finished run's step times and the process's peak memory (steps: how many steps
    after the warm-up were measured; any after them, profiled ones, are left out)."""
    import torch

    from lib.fine_tuner import device_name, library_versions, peak_memory_gib

    measured = timer.step_seconds()[warmup:warmup + steps] if steps else timer.step_seconds()[warmup:]
    s_per_step = statistics.median(measured)
    window_s = timer.window_seconds()
    if window_s:  # timing "window": the measured steps' total time, no synchronisation inside it
        s_per_step = window_s / len(measured)
        details = {**details, "timing": "window"}
    tokens_per_s = tokens_per_step / s_per_step
    matmul, layers, hidden = matmul_weights(model_dir)
    flops_per_token = model_flops_per_token(matmul, lora_weights, layers, hidden, seq_len)
    card = device_name()
    on_gpu = torch.cuda.is_available()
    peak = next((flops for name, flops in PEAK_FLOPS.items() if name in card), None) if on_gpu else None
    reserved = round(torch.cuda.max_memory_reserved() / 2**30, 3) if on_gpu else None
    peaks = per_rank(max(peak_memory_gib(), details.pop("own_setup_peak_gib", 0)))  # training or loading, larger
    return {
        "card": card, "date": time.strftime("%Y-%m-%d"), "arch": arch, "config": config, "engine": engine,
        "gpus": world_size, "seq_len": seq_len, "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(tokens_per_s, 1), "s_per_step": round(s_per_step, 4),
        "steps_measured": len(measured), "step_s_min_max": [round(min(measured), 4), round(max(measured), 4)],
        "peak_mem_gib": max(peaks), "peak_mem_gib_per_rank": peaks, "peak_reserved_gib": reserved,
        "mfu": round(flops_per_token * tokens_per_s / peak, 4) if peak else None,
        "model_tflops_per_s": round(flops_per_token * tokens_per_s / 1e12, 1),
        "flops_per_token": flops_per_token, "matmul_weights": matmul, "lora_weights": lora_weights,
        "peak_flops": peak, "status": "ok", **details, "versions": library_versions(),
    }


# Kernel families of a step's profile, by a fragment of the kernel's name (first match wins).
KERNEL_FAMILIES = (
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "attention", "flex")),
    ("optimizer", ("multi_tensor", "adam")),
    ("dequantize 4-bit", ("dequantize", "kdequant")),
    ("matrix products", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_", "ampere_", "wgmma", "gemv",
                         "aten::mm", "aten::addmm", "aten::bmm", "matmul")),
    ("norm, SwiGLU, RoPE, loss (Triton)", ("triton", "rms_norm", "swiglu", "rope", "cross_entropy", "liger")),
    ("dropout", ("bernoulli", "dropout")),
    ("copies and casts", ("copy", "memcpy", "cast", "cat_", "catarray", "to_copy")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "fill", "where", "aten::add", "aten::mul", "aten::sub",
                     "aten::div", "aten::exp", "aten::neg", "bitwise", "silu", "sigmoid")),
    ("reductions", ("reduce", "sum", "norm", "logsumexp", "softmax")),
    ("memset", ("memset",)),
)


def kernel_family(name: str) -> str:
    """The family (KERNEL_FAMILIES) a kernel's name falls in, else "other"."""
    lower = name.lower()
    return next((family for family, fragments in KERNEL_FAMILIES if any(part in lower for part in fragments)),
                "other")


def profile_summary(events, steps: int, wall_s: float, top: int = 15) -> dict:
    """Per optimizer step: the device time of each kernel family and of the `top` kernels, from a profiler's
    key_averages(); busy = the kernels' total, idle = wall time minus busy (launch gaps, synchronisation,
    the CPU's own work; can be negative where kernels overlap). On CPU (no device kernels), the operators'
    own CPU time instead."""
    def device_us(event) -> float:
        return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0) or 0

    kernels = [event for event in events if device_us(event) > 0 and getattr(event, "device_type", None) is not None
               and "cuda" in str(event.device_type).lower()]
    on_device = bool(kernels)
    if not on_device:  # CPU: the operators' own time (top-level aten calls)
        kernels = [event for event in events if event.self_cpu_time_total > 0]
    own = device_us if on_device else (lambda event: event.self_cpu_time_total)
    families: dict[str, float] = {}
    for event in kernels:
        family = kernel_family(event.key)
        families[family] = families.get(family, 0.0) + own(event) / 1e3 / steps
    busy = sum(families.values())
    ranked = sorted(kernels, key=own, reverse=True)[:top]
    return {
        "steps": steps, "clock": "device" if on_device else "cpu", "wall_ms_per_step": round(1e3 * wall_s / steps, 2),
        "busy_ms_per_step": round(busy, 2), "idle_ms_per_step": round(1e3 * wall_s / steps - busy, 2),
        "families_ms_per_step": {family: round(ms, 2) for family, ms in
                                 sorted(families.items(), key=lambda item: item[1], reverse=True)},
        "top_kernels": [{"name": event.key[:120], "family": kernel_family(event.key),
                         "calls_per_step": round(event.count / steps, 1),
                         "ms_per_step": round(own(event) / 1e3 / steps, 3)} for event in ranked],
    }


def step_profiler(first: int, steps: int):
    """A trainer callback profiling optimizer steps first+1 .. first+steps with torch.profiler (CPU and
    CUDA activities), synchronised at both ends; `summary()` gives profile_summary() of them."""
    import torch
    from transformers import TrainerCallback

    class StepProfiler(TrainerCallback):
        def __init__(self):
            self.profiler = None
            self.started = self.wall_s = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == first:
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.start()
                self.started = time.perf_counter()
            elif state.global_step == first + steps and self.profiler is not None:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.wall_s = time.perf_counter() - self.started
                self.profiler.stop()

        def summary(self) -> dict | None:
            if self.profiler is None or self.wall_s is None:
                return None
            return profile_summary(self.profiler.key_averages(), steps, self.wall_s)

    return StepProfiler()


PACKING_CHECK_LENGTHS = (211, 64, 389)  # tokens of the examples packed into one row by packing_check


def packing_check(model, vocab: int) -> dict:
    """Packing on this device, after training: random examples packed into one row by TRL's padding-free
    collator (as in training) against each example alone, through the trained model. Reports the largest
    difference of the examples' mean next-token losses and of their logits, and the control: the same row
    as one example (positions not restarted), where attending across examples moves the later examples'
    logits. `ok`: packed differs from alone by under a tenth of what attending across examples does."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    generator = torch.Generator().manual_seed(1)
    examples = [torch.randint(2, vocab, (length,), generator=generator).tolist() for length in PACKING_CHECK_LENGTHS]
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    device = next(p for p in model.parameters() if p.device.type != "meta").device

    def logits_of(rows: list[list[int]]):
        """The logits of `rows` packed into one row."""
        batch = {key: value.to(device) if torch.is_tensor(value) else value
                 for key, value in collate([{"input_ids": ids} for ids in rows]).items() if key != "labels"}
        return model(**batch, use_cache=False).logits[0].float()

    def loss(logits, ids) -> float:
        return F.cross_entropy(logits[:-1], torch.tensor(ids[1:], device=logits.device)).item()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            packed = logits_of(examples).split(PACKING_CHECK_LENGTHS)
            alone = [logits_of([ids]) for ids in examples]
            crossed = logits_of([[token for ids in examples for token in ids]]).split(PACKING_CHECK_LENGTHS)
    finally:
        model.train(was_training)
    loss_diff = max(abs(loss(p, ids) - loss(a, ids)) for p, a, ids in zip(packed, alone, examples))
    logits_diff = max((p - a).abs().max().item() for p, a in zip(packed, alone))
    crossed_diff = max((c - a).abs().max().item() for c, a in zip(crossed[1:], alone[1:]))
    return {"lengths": list(PACKING_CHECK_LENGTHS), "loss_max_diff": round(loss_diff, 5),
            "logits_max_diff": round(logits_diff, 4), "crossed_logits_max_diff": round(crossed_diff, 4),
            "ok": logits_diff < crossed_diff / 10}


def run_project(arch: str, config: str, model_dir: str, seq_len: int, steps: int, warmup: int,
                output_dir: str, logging_steps: int = 1, timeout_row_file: str | None = None,
                timing: str = "step", profile_steps: int = 0) -> dict:
    """Train one configuration through the FineTuner and measure it; with packed rows, then check packing on
    this device (packing_check; the row is measured first, so the check moves neither its time nor its peak,
    and is written to `timeout_row_file` first, so a check that runs out of time loses only itself).
    profile_steps: that many more steps after the measured ones, under torch.profiler (the row's `profile`:
    device time per step by kernel family and the top kernels); they are not part of the measurement."""
    import torch

    from lib import memory
    from lib.fine_tuner import FineTuner, peak_memory_gib

    run_config = settings(arch, config, model_dir, seq_len, warmup + steps + profile_steps, output_dir, logging_steps)
    rows = run_config.batch_size * (warmup + steps + profile_steps) * world_size()
    tuner = FineTuner(run_config, train_dataset=token_blocks(vocab_size(model_dir), seq_len, rows)).setup()
    setup_peak = peak_memory_gib()  # loading the model (and, sharded, before it is divided)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the training peak alone from here; the row keeps the larger
    timer = step_timer((warmup, warmup + steps) if timing == "window" else None)
    tuner.trainer.add_callback(timer)
    profiler = step_profiler(warmup + steps, profile_steps) if profile_steps else None
    if profiler:
        tuner.trainer.add_callback(profiler)
    result = tuner.train()
    args, model = tuner.trainer.args, tuner.trainer.model
    details = {"batch_size": args.per_device_train_batch_size, "grad_accum": args.gradient_accumulation_steps,
               "gradient_checkpointing": args.gradient_checkpointing, "precision": run_config.precision,
               "resolved_precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
               "attention": tuner.plan.attention, "packing": args.packing,
               "liger": args.use_liger_kernel, "optimizer": getattr(args.optim, "value", args.optim),
               "lora_dropout": run_config.lora_dropout, "logging_steps": logging_steps, "loss_last": result.record["loss_history"][-1]["loss"],
               "estimated_gib": tuner.plan.estimated_gib, "sharded": tuner.plan.sharded,
               "fused_lora": tuner.plan.fused_lora, "fused_lora_layers": result.record["fused_lora_layers"],
               "fused_mlps": result.record["fused_mlps"],
               "sharded_vocab": result.record["sharded_vocab"],
               "fp32_stream": memory.fp32_stream(tuner.shapes, tuner.plan),
               "setup_peak_gib_per_rank": per_rank(setup_peak), "train_peak_gib_per_rank": per_rank(peak_memory_gib()),
               "own_setup_peak_gib": setup_peak,
               "overrides": CONFIGS[config]}
    tokens_per_step = seq_len * args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size()
    row = measure(arch, config, "project", timer, warmup, tokens_per_step, seq_len, model_dir,
                  result.record["trainable_parameters"], world_size(), details, steps=steps)
    if profiler:
        row["profile"] = profiler.summary()
    if tuner.plan.packed:
        if timeout_row_file:
            Path(timeout_row_file).write_text(json.dumps({**row, "packing_check": {"status": "timeout"}}))
        row["packing_check"] = packing_check(model, vocab_size(model_dir))
    return row


def run_unsloth(arch: str, config: str, model_dir: str, seq_len: int, steps: int, warmup: int,
                output_dir: str, logging_steps: int = 1, timing: str = "step") -> dict:
    """Train the same model, blocks, LoRA rank and targets with Unsloth (import it before transformers), logged
    and timed as the project's rows of the same call."""
    import unsloth  # noqa: F401  (patches transformers and trl on import)
    from unsloth import FastLanguageModel

    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lib.memory import read_shapes

    batch_size = UNSLOTH_CONFIGS[config]
    model, tokenizer = FastLanguageModel.from_pretrained(model_dir, max_seq_length=seq_len, dtype=torch.bfloat16,
                                                         load_in_4bit=True, local_files_only=True)
    targets = read_shapes(model_dir).attention_names
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=42)
    blocks = token_blocks(vocab_size(model_dir), seq_len, batch_size * (warmup + steps))
    args = SFTConfig(output_dir=output_dir, per_device_train_batch_size=batch_size, gradient_accumulation_steps=1,
                     max_steps=warmup + steps, learning_rate=2e-4, lr_scheduler_type="constant", bf16=True,
                     optim="adamw_torch_fused", logging_steps=logging_steps, save_strategy="no", report_to="none",
                     max_length=seq_len, packing=False, dataset_num_proc=1, seed=42)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=Dataset.from_list(blocks), args=args)
    timer = step_timer((warmup, warmup + steps) if timing == "window" else None)
    trainer.add_callback(timer)
    trainer.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    details = {"batch_size": batch_size, "grad_accum": 1, "gradient_checkpointing": "unsloth", "precision": "bf16",
               "resolved_precision": "bf16", "attention": getattr(model.config, "_attn_implementation", None),
               "packing": False, "liger": False, "optimizer": "adamw_torch_fused", "lora_dropout": 0.0,
               "loss_last": losses[-1] if losses else None, "unsloth": unsloth.__version__,
               "logging_steps": logging_steps}
    return measure(arch, config, "unsloth", timer, warmup, seq_len * batch_size, seq_len, model_dir, trainable, 1,
                   details)


def loss_curves(output_dir: str, steps: int = 30, seq_len: int = 256) -> dict[str, list[dict]]:
    """Training loss of the seed's settings and of the defaults on the same data (embedded model, sql task),
    with the same number of sequences per optimizer step (seed: 1 x 4 accumulated; defaults: 4 x 1).
    Without CUDA the seed's fp16 and paged optimizer map to fp32 and AdamW (same update; CPUs have no
    fast fp16 matrix products: a step took minutes)."""
    import torch

    from lib.fine_tuner import FineTuner

    seed = SEED if torch.cuda.is_available() else {**SEED, "precision": "fp32", "optimizer": "adamw_torch"}

    common = dict(task="sql", train_rows=600, eval_rows=1, max_seq_length=seq_len, max_steps=steps,
                  target_modules="attention", logging_steps=1, save_steps=10**6, output_dir=output_dir,
                  overwrite=True)
    runs = {"seed settings": RunConfig(run_name="loss-seed", **common, **seed),
            "defaults": RunConfig(run_name="loss-default", **common, batch_size=4)}
    return {name: FineTuner(config).run().record["loss_history"] for name, config in runs.items()}


def memory_check(overrides: dict, output_dir: str, steps: int = 3) -> dict:
    """Estimated against measured training memory of a short run on the embedded model (sql task), on
    whatever device this is. On a GPU, measured = torch.cuda.max_memory_allocated. On a CPU the allocator
    keeps no such count, so measured = the bytes of the loaded model's tensors + the growth of the
    process's resident memory while it trains (sampled every 10 ms) above what it held after setup, once
    the allocator has handed freed pages back: the interpreter, the libraries, the tokenizer and the data
    are left out, as the estimate leaves them."""
    import threading

    import psutil
    import torch

    from lib.fine_tuner import FineTuner

    config = RunConfig.for_task("sql", **{"train_rows": 200, "eval_rows": 1, "max_steps": steps, "logging_steps": 1,
                                          "save_steps": 10**6, "output_dir": output_dir, "overwrite": True,
                                          "run_name": "memory-check", **overrides})
    tuner = FineTuner(config).setup()
    model = tuner.trainer.model
    tensors = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    process, peak, done = psutil.Process(), [0], threading.Event()
    memory.release_freed_memory()  # what loading freed goes back to the OS, so training's growth shows in RSS
    after_setup = process.memory_info().rss

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], process.memory_info().rss)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    result = tuner.train()
    done.set()
    sampler.join()
    if torch.cuda.is_available():
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = tensors + max(peak[0] - after_setup, 0)
    plan = tuner.plan.to_dict()
    return {"overrides": overrides, "micro_batch_size": plan["micro_batch_size"], "grad_accum": plan["grad_accum"],
            "estimated_gib": plan["estimated_gib"], "measured_gib": round(measured / 2**30, 3),
            "ratio": round(plan["estimated_gib"] / (measured / 2**30), 3), "model_tensors_gib": round(tensors / 2**30, 3),
            "steps": result.record["global_step"], "device": result.record["device"], "date": time.strftime("%Y-%m-%d")}


def estimate_gib(row: dict, shapes_dir: str) -> float | None:
    """The memory estimate (lib/memory.py) for a result row of the project's path, from the model's shapes
    (`shapes_dir` holds its config.json) and what the row ran: its attention, micro-batch and whether Liger
    was on."""
    import dataclasses

    from lib import memory
    from lib.plan import decide

    if row.get("engine") != "project" or row.get("config") not in CONFIGS or not row.get("batch_size"):
        return None
    run_config = settings(row["arch"], row["config"], shapes_dir, row["seq_len"], 1, "/tmp")
    if row.get("attention"):  # what it ran (rows before 2026-11-30 evening: the model config's name for it)
        run_config = run_config.replace(attention=row["attention"])
    shapes = memory.read_shapes(shapes_dir)
    plan = dataclasses.replace(decide(run_config, shapes, on_gpu=True), liger=bool(row["liger"]))
    # rows before lib.alibi kept bloom's stream bf16 (2026-12-01) had it fp32, as its eager rows do
    stream = row.get("fp32_stream", shapes.fp32_stream)
    # rows before lib.fused_lora's MLP step (2026-12-07) record no fused_mlps: their MLPs ran layer by layer
    mlp_step = bool(row.get("fused_mlps", 0))
    parts = memory.training_memory(shapes, run_config, plan, row["batch_size"], stream, mlp_step)
    return round(sum(parts.values()) / 2**30, 3)


def shapes_dir(arch: str, folder: str | Path) -> Path:
    """A folder holding only the config.json of `arch`: enough for shapes and estimates, no weights."""
    from transformers import AutoConfig

    spec = dict(ARCHITECTURES[arch])
    AutoConfig.for_model(spec.pop("model_type"), **spec).save_pretrained(folder)
    return Path(folder)


def vocab_size(model_dir: str | Path) -> int:
    return json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]


def world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", 1))


def per_rank(value) -> list:
    """`value` of every rank of the process group, in rank order (`[value]` without one); every rank calls it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def failed_row(arch: str, config: str, seq_len: int, status: str, log_tail: str) -> dict:
    """The row of a configuration that did not finish (out of memory, error, time-out): no numbers."""
    from lib.fine_tuner import device_name

    return {"card": device_name(), "date": time.strftime("%Y-%m-%d"), "arch": arch, "config": config,
            "engine": "unsloth" if config in UNSLOTH_CONFIGS else "project", "gpus": world_size(),
            "seq_len": seq_len, "tokens_per_s": None, "peak_mem_gib": None, "mfu": None, "status": status,
            "log_tail": log_tail[-2000:]}


def merge_rows(existing: list[dict], new: list[dict]) -> list[dict]:
    """`existing` with each row of `new` replacing the one of the same card, arch, config, sequence length,
    number of GPUs, run label (`run`), repeat and sharding (where a row has them)."""
    key = lambda row: (row["card"], row["arch"], row["config"], row["seq_len"], row.get("gpus", 1),  # noqa: E731
                       row.get("run"), row.get("repeat"), row.get("sharded"))
    replaced = {key(row) for row in new}
    return [row for row in existing if key(row) not in replaced] + list(new)


def repeat_summary(rows: list[dict], baseline: str) -> str:
    """Rounds of interleaved configurations (rows with `repeat`) as a markdown table: per configuration the
    median tokens/s with its min-max and highest peak, and its speed against `baseline` both as the ratio of
    the medians and as the median (min-max) of the per-round ratios (the baseline's row of the same round)."""
    import statistics

    ok = [row for row in rows if row.get("status") == "ok"]
    by_round = {(row["config"], row.get("repeat")): row["tokens_per_s"] for row in ok}
    base = [row["tokens_per_s"] for row in ok if row["config"] == baseline]
    lines = [f"| config | rounds | tokens/s median (min-max) | peak GiB | x {baseline} (medians) | "
             f"x {baseline} per round, median (min-max) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for config in dict.fromkeys(row["config"] for row in rows):
        speeds = [row["tokens_per_s"] for row in ok if row["config"] == config]
        failed = sum(1 for row in rows if row["config"] == config and row.get("status") != "ok")
        if not speeds:
            lines.append(f"| {config} | 0 ({failed} failed) | | | | |")
            continue
        ratios = [by_round[config, repeat] / by_round[baseline, repeat] for (name, repeat) in by_round
                  if name == config and (baseline, repeat) in by_round]
        median = statistics.median(speeds)
        of_medians = f"{median / statistics.median(base):.2f}" if base else ""
        per_round = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else ""
        peak = max(row["peak_mem_gib"] for row in ok if row["config"] == config)
        rounds = f"{len(speeds)}" + (f" ({failed} failed)" if failed else "")
        lines.append(f"| {config} | {rounds} | {median:,.0f} ({min(speeds):,.0f}-{max(speeds):,.0f}) | {peak:.2f} | "
                     f"{of_medians} | {per_round} |")
    return "\n".join(lines)


# ---- the report: a README-ready table and a chart ----------------------------------------------------------

def profile_table(profile: dict) -> str:
    """A row's `profile` as markdown: milliseconds per step by kernel family, then the top kernels."""
    wall = profile["wall_ms_per_step"]
    lines = [f"profile of {profile['steps']} steps ({profile['clock']} time): {wall:.1f} ms a step, "
             f"kernels {profile['busy_ms_per_step']:.1f} ms, idle {profile['idle_ms_per_step']:.1f} ms",
             "", "| family | ms a step | share of the step |", "| --- | ---: | ---: |"]
    lines += [f"| {family} | {ms:.2f} | {100 * ms / wall:.1f}% |" for family, ms in profile["families_ms_per_step"].items()]
    lines += ["", "| kernel | family | calls a step | ms a step |", "| --- | --- | ---: | ---: |"]
    lines += [f"| `{kernel['name'][:80]}` | {kernel['family']} | {kernel['calls_per_step']} | {kernel['ms_per_step']:.3f} |"
              for kernel in profile["top_kernels"]]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """One table per card and architecture: every configuration against that card's seed row (a row's
    `run`, where given, names the session it was measured in)."""
    lines = []
    groups = {}
    for row in rows:
        groups.setdefault((row.get("run"), row["card"], row["arch"], row["seq_len"], row.get("gpus", 1)), []).append(row)
    for (run, card, arch, seq_len, gpus), group in groups.items():
        seed = next((row for row in group if row["config"] == "seed" and row.get("tokens_per_s")), None)
        cards = f"{gpus} x {card} (data parallel)" if gpus > 1 else card
        label = f", run {run}" if run else ""
        lines += [f"**{arch}**, seq {seq_len}, {cards}{label}, {group[0]['date']}", "",
                  "| config | batch x accum | ckpt | attention | liger | tokens/s | x seed | s/step "
                  "| peak GiB | estimate GiB | MFU |",
                  "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in group:
            lines.append(_table_line(row, seed))
        lines.append("")
    return "\n".join(lines)


def _table_line(row: dict, seed: dict | None) -> str:
    if not row.get("tokens_per_s"):
        return f"| {row['config']} | | | | | {row['status']} | | | | | |"
    speedup = f"{row['tokens_per_s'] / seed['tokens_per_s']:.2f}" if seed else ""
    mfu = f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "n/a"
    estimate = f"{row['estimated_gib']:.2f}" if row.get("estimated_gib") else ""
    return (f"| {row['config']} | {row['batch_size']} x {row['grad_accum']} "
            f"| {row['gradient_checkpointing']} | {row['attention']} | {row['liger']} "
            f"| {row['tokens_per_s']:,.0f} | {speedup} "
            f"| {row['s_per_step']:.3f} | {row['peak_mem_gib']:.2f} | {estimate} | {mfu} |")


def chart(rows: list[dict], path: str | Path):
    """Tokens/s per configuration (bars), one panel per architecture and sequence length. Repeated rows of a
    configuration (--repeats) make one bar: their median, with a line from the slowest to the fastest round;
    the label gives the peak memory (and the rounds)."""
    import statistics

    from matplotlib.figure import Figure

    measured = [row for row in rows if row.get("tokens_per_s")]
    panels = list(dict.fromkeys((row["arch"], row["seq_len"]) for row in measured))
    groups = {}  # (arch, seq) -> {bar name: its rows}, in the rows' order
    for row in measured:
        first = next(r for r in measured if (r["arch"], r["seq_len"]) == (row["arch"], row["seq_len"]))
        # rows of other cards or GPU counts share a panel: their bars say so (repeated names would overlap)
        name = (row["config"] + (f" x{row['gpus']} GPUs" if row.get("gpus", 1) > 1 else "")
                + (f" ({row['card']})" if row["card"] != first["card"] else ""))
        groups.setdefault((row["arch"], row["seq_len"]), {}).setdefault(name, []).append(row)
    bars_total = sum(len(group) for group in groups.values())
    figure = Figure(figsize=(7.5, 2.2 + 1.8 * max(len(panels), 1) + 0.22 * bars_total), dpi=110)
    heights = [len(groups[panel]) for panel in panels] or [1]
    axes_list = figure.subplots(max(len(panels), 1), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for axes, panel in zip(axes_list, panels):
        group = groups[panel]
        names = list(group)
        speeds = [[row["tokens_per_s"] / 1000 for row in group[name]] for name in names]
        medians = [statistics.median(values) for values in speeds]
        colours = ["tab:orange" if group[name][0]["engine"] == "unsloth" else "tab:grey"
                   if group[name][0]["config"] == "seed" else "tab:green" if group[name][0]["config"] == "default"
                   else "tab:blue" for name in names]
        axes.barh(names, medians, color=colours, height=0.6)
        for index, values in enumerate(speeds):
            if len(values) > 1:
                axes.plot([min(values), max(values)], [index, index], color="black", linewidth=1.2)
        labels = [f"{max(row['peak_mem_gib'] for row in group[name]):.1f} GiB"
                  + (f", {len(group[name])} rounds" if len(group[name]) > 1 else "") for name in names]
        right = max((max(values) for values in speeds), default=1)
        for index, (values, label) in enumerate(zip(speeds, labels)):  # past the bar and its line
            axes.text(max(values) + right * 0.015, index, label, va="center", fontsize=7)
        axes.invert_yaxis()
        card = group[names[0]][0]["card"]
        axes.set_title(f"{panel[0]}, seq {panel[1]}, {card}", fontsize=9)
        axes.set_xlabel("thousand tokens / s (median of rounds, line: slowest to fastest; label: peak GPU memory)",
                        fontsize=8)
        axes.tick_params(labelsize=7)
        axes.set_xlim(0, right * 1.3)
        axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return figure
