"""The runtime plan: every "auto" setting decided once, from the config, the model's shapes and the device.

    plan = decide(config, shapes)       # precision, attention, optimizer, checkpointing, Liger, packing,
                                        # micro-batch and accumulation, processes, sharding
    plan.to_dict()                      # what the run record keeps under "plan"

Model loading (lib.models.load_base_model) and the trainer's arguments (lib.fine_tuner) read the plan;
the memory estimate (lib.memory) reads it too. Nothing else decides an "auto".

| setting                    | "auto" means                                                                  |
|----------------------------|-------------------------------------------------------------------------------|
| precision                  | bf16 where the hardware computes it natively; fp16 on older GPUs; else fp32   |
| attention                  | varlen flash attention on CUDA where the model's attention allows it; SDPA;   |
|                            | for bloom (ALiBi, no transformers attention functions) "flex", its packed     |
|                            | path (lib/alibi.py), on CUDA in bf16 with Triton; else eager                  |
| optimizer                  | fused AdamW on a GPU, plain AdamW on a CPU                                    |
| gradient_checkpointing     | on a GPU (trades ~30% speed for activations), off on a CPU; with it,          |
|                            | checkpointed_layers=N recomputes only the first N layers (0: off)             |
| liger_kernel               | on where its Triton kernels run (CUDA, liger-kernel installed)               |
| fused_lora                 | on a GPU for 4-bit weights that are not sharded (lib/fused_lora.py); off on a |
|                            | CPU, where it measured 4-17% slower (docs/task_speed_cpu.json); with it, a    |
|                            | SwiGLU MLP whose three projections carry a LoRA without dropout runs as one   |
|                            | step ("layers": each projection on its own)                                   |
| packing (asked)            | kept only for models that read position_ids (packed examples stay apart), and |
|                            | for bloom with attention="flex" (lib/alibi.py keeps them apart)               |
| micro_batch_size           | the largest divisor of batch_size whose estimate fits memory_budget_gib       |
| cpu_threads (CPU only)     | this process's share of the cores (OMP_NUM_THREADS, else cores / processes   |
|                            | on this host), less the cores other programs keep busy when training starts   |
| distributed                | fsdp (weights sharded over the processes) on GPUs, with several processes,    |
|                            | when one sequence a pass with the whole model does not fit memory_budget_gib; |
|                            | else ddp. A process of a launch follows its accelerate config (FSDP or not)   |
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lib.alibi import FLEX
from lib.attention import VARLEN, flash_varlen_available
from lib.config import ConfigError

COMPUTE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Plan:
    on_gpu: bool
    precision: str              # "bf16" | "fp16" | "fp32": what the model computes in
    attention: str              # the attn_implementation the model runs: "varlen" | "sdpa" | "eager" | "flex"
    optimizer: str              # the trainer's `optim`
    checkpointing: bool         # gradient checkpointing
    liger: bool                 # Liger's fused kernels
    packed: bool                # padding-free packing: a micro-batch is one row
    processes: int = 1          # processes training together (WORLD_SIZE)
    sharded: bool = False       # FSDP: base weights, adapters, gradients and optimizer state divided among them
    longest_example: int | None = None  # tokens of the longest training example, when known: unpacked rows
                                        # are padded to their batch's longest, not to max_seq_length
    micro_batch_size: int | None = None  # sequences per forward pass, and passes per optimizer step
    grad_accum: int | None = None
    estimated_gib: float | None = None   # the memory estimate of one micro-batch, and the budget it had to fit
    budget_gib: float | None = None
    threads: int | None = None           # CPU threads of a CPU training process (with_threads); None on a GPU
    fused_lora: bool = False             # LoRA on 4-bit layers as one autograd step (lib/fused_lora.py)

    @property
    def compute_bytes(self) -> int:
        return COMPUTE_BYTES[self.precision]

    @property
    def attention_kernel(self) -> str:
        """What the memory estimate needs to know of the attention: "eager" keeps every head's scores;
        on CUDA SDPA and varlen run flash or memory-efficient kernels ("flash", none kept); "sdpa" on a CPU
        (its math path) keeps the scores in the compute dtype."""
        if self.attention == "eager":
            return "eager"
        return "flash" if self.on_gpu else "sdpa"

    @property
    def dtype(self):
        return torch_dtype(self.precision)

    def row_length(self, config) -> int:
        """Tokens of one row: max_seq_length when packed (or nothing is known), else the longest example."""
        if self.packed or not self.longest_example:
            return config.max_seq_length
        return min(config.max_seq_length, self.longest_example)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def decide(config, shapes, on_gpu: bool | None = None, longest_example: int | None = None,
           processes: int | None = None) -> Plan:
    """The plan for `config` on the model of `shapes` (lib.memory.read_shapes), on this machine's device
    (`on_gpu` overrides it for estimates of a GPU run made elsewhere) and `processes` (default WORLD_SIZE; the
    launcher plans a run before starting it), sharded or not, with the micro-batch fitted."""
    import torch

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    precision = resolve_precision(config.precision, on_gpu)
    attention = decide_attention(config.attention, shapes, on_gpu, precision)
    plan = Plan(
        on_gpu=on_gpu,
        precision=precision,
        attention=attention,
        optimizer=config.optimizer if config.optimizer != "auto" else
        ("adamw_torch_fused" if on_gpu else "adamw_torch"),
        checkpointing=bool(on_gpu if config.gradient_checkpointing == "auto" else config.gradient_checkpointing)
        and config.checkpointed_layers != 0,  # none of the layers recomputes: no checkpointing
        liger=liger_enabled(config.liger_kernel, on_gpu),
        packed=bool(config.packing and (shapes.keeps_examples_apart or attention == FLEX)),
        processes=processes or max(int(os.environ.get("WORLD_SIZE", 1)), 1),
        longest_example=longest_example or None,
    )
    sharded = decide_sharding(plan, config, shapes)
    fused = config.fused_lora == "on" or (config.fused_lora in ("auto", "layers") and on_gpu
                                           and config.load_in_4bit and not sharded)
    plan = dataclasses.replace(plan, sharded=sharded, fused_lora=fused)
    return fit_micro_batch(plan, config, shapes)


def decide_sharding(plan: Plan, config, shapes) -> bool:
    """Whether the processes shard the model (FSDP). A process of a launch follows its accelerate config
    (accelerate sets ACCELERATE_USE_FSDP), which must agree with `distributed`; otherwise (the launcher planning
    a run) `distributed` decides: "auto" shards on GPUs, with several processes, when one sequence a pass
    with the whole model on each GPU does not fit the memory budget."""
    if "WORLD_SIZE" in os.environ and plan.processes > 1:
        launched = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        if config.distributed != "auto" and launched != (config.distributed == "fsdp"):
            raise ConfigError("distributed", config.distributed,
                              f"{'fsdp or auto' if launched else 'ddp or auto'}: this process was launched with "
                              f"{'an FSDP' if launched else 'a DDP'} accelerate config (lib.launcher renders "
                              "accelerate_configs/fsdp.yaml for distributed=fsdp)")
        return launched
    if plan.processes < 2 or config.distributed == "ddp":
        return False
    if config.distributed == "fsdp" and not plan.on_gpu:
        raise ConfigError("distributed", "fsdp", "ddp or auto on CPUs: accelerate shards a model (FSDP) over GPU "
                                                 "processes only; on CPUs it would train unsharded")
    if config.distributed == "fsdp":
        return True
    return plan.on_gpu and not fits_whole(plan, config, shapes)


def fits_whole(plan: Plan, config, shapes) -> bool:
    """Whether one sequence a pass fits the memory budget with the whole model in every process (True when
    the budget is unknown: a GPU estimate made without a GPU and without memory_budget_gib)."""
    import torch

    from lib import memory

    if plan.on_gpu and not torch.cuda.is_available() and config.memory_budget_gib == "auto":
        return True
    whole = dataclasses.replace(plan, sharded=False)
    return sum(memory.training_memory(shapes, config, whole, 1).values()) <= memory.budget_bytes(config, whole)


def fit_micro_batch(plan: Plan, config, shapes) -> Plan:
    """The plan with its micro-batch: the largest that fits the memory budget (lib.memory). An estimate of a
    GPU run made without a GPU has no GPU memory to fit unless memory_budget_gib is given: left unfitted."""
    import torch

    from lib import memory

    if plan.on_gpu and not torch.cuda.is_available() and config.memory_budget_gib == "auto":
        return plan
    size, estimate, budget = memory.micro_batch(shapes, config, plan)
    return dataclasses.replace(plan, micro_batch_size=size, grad_accum=config.batch_size // size,
                               estimated_gib=round(estimate / 2**30, 3), budget_gib=round(budget / 2**30, 3))


def with_threads(plan: Plan, config) -> Plan:
    """The plan with the CPU threads a CPU training process uses (None on a GPU): `cpu_threads`, or for
    "auto" its share of the cores (cpu_share) less the cores busy with other work now (idle_cores), at least
    1. Measured (docs/BENCHMARKS.md, "CPU threads"): with another program keeping one of 2 cores busy, two
    threads were several times slower than one (each step waits for the thread that gets no core)."""
    if plan.on_gpu:
        return plan
    threads = config.cpu_threads if config.cpu_threads != "auto" else max(1, min(cpu_share(), round(idle_cores())))
    return dataclasses.replace(plan, threads=threads)


def cpu_share() -> int:
    """The threads this process may use: OMP_NUM_THREADS when set (by the user, or by lib.launcher for its
    local processes), else this process's usable cores divided by the training processes on this host."""
    from lib.memory import host_processes

    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value.isdigit() and int(value) >= 1:
        return int(value)
    return max(1, len(usable_cores()) // host_processes())


def usable_cores() -> list[int]:
    """The CPU cores this process may run on (its affinity; every core where the OS has no affinity)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def idle_cores(sample_s: float = 0.5) -> float:
    """Cores of this process's affinity left idle by everything running, over `sample_s` seconds."""
    import psutil

    busy = psutil.cpu_percent(interval=sample_s, percpu=True)
    return sum(100.0 - busy[core] for core in usable_cores() if core < len(busy)) / 100.0


def resolve_precision(precision: str, on_gpu: bool | None = None) -> str:
    """`precision`, or for "auto" bf16 where the hardware computes it natively, fp16 on older GPUs, fp32 on
    CPUs without bf16 instructions."""
    if precision != "auto":
        return precision
    import torch

    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    if on_gpu:
        # an estimate for a GPU made on a machine without one assumes a current card (bf16)
        return "bf16" if not torch.cuda.is_available() or torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if _cpu_has_bf16() else "fp32"


def torch_dtype(precision: str = "auto"):
    """The torch dtype of a precision name ("auto" resolved for this machine)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[resolve_precision(precision)]


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def decide_attention(requested: str, shapes, on_gpu: bool, precision: str = "bf16") -> str:
    """The attention implementation: `requested`, or for "auto" varlen on CUDA where the model allows it
    (packed batches then cost only their examples' lengths), else SDPA. Models whose attention is their own
    (bloom's ALiBi), which transformers' attention functions cannot replace, get lib/alibi.py's "flex" on
    CUDA in bf16 with Triton (packed, bf16 stream: 7.0x the seed's speed at 68% of its memory, run C31 in
    docs/BENCHMARKS.md), else eager: on a CPU flex_attention has no backward and its stand-in holds a dense
    bias per head; in fp16 the stream stays fp32 (run U's 6.7 GiB)."""
    if requested == VARLEN and not shapes.varlen_capable:
        raise ConfigError("attention", requested, "auto, sdpa or eager: this model's attention cannot use varlen")
    if requested == FLEX and not shapes.alibi_capable:
        raise ConfigError("attention", requested, "auto, varlen, sdpa or eager: flex is for ALiBi models (bloom)")
    if requested != "auto":
        return requested
    if not shapes.flash_capable:  # bloom's ALiBi
        flex = on_gpu and precision == "bf16" and triton_available()
        return FLEX if flex and shapes.alibi_capable else "eager"
    if shapes.varlen_capable and on_gpu and flash_varlen_available():
        return VARLEN
    return "sdpa"


def triton_available() -> bool:
    """Whether Triton is installed: flex_attention compiles its CUDA kernel with it."""
    return importlib.util.find_spec("triton") is not None


def liger_enabled(liger_kernel: str, on_gpu: bool) -> bool:
    """Liger's Triton kernels run on CUDA only; "auto" turns them on where they can run."""
    if liger_kernel != "auto":
        return liger_kernel == "on"
    return on_gpu and importlib.util.find_spec("liger_kernel") is not None
