"""What a LoRA config costs, computed from the model's layer shapes without loading a weight.

    shapes = read_shapes(model_path)              # the meta-device model: shapes only
    trainable_parameters(shapes, r=16, targets=["q_proj", "v_proj"])
    plan = lib.plan.decide(config, shapes)        # what the FineTuner will run: dtype, checkpointing, kernels
    training_memory(shapes, config, plan)         # bytes, part by part, for one micro-batch
    micro_batch(shapes, config, plan)             # the largest micro-batch that fits the memory budget

Trainable parameters: LoRA adds A (r x in) and B (out x r) beside each targeted Linear of shape
(out, in), so each one adds r * (in + out); this is exactly what PEFT counts.

Training memory (bytes) of one micro-batch, the tensors training allocates (what
`torch.cuda.max_memory_allocated` counts; not the CUDA context, not the Python process). Notation: d bytes
per value of the compute dtype (2 for bf16/fp16, 4 for fp32); T = micro_batch x max_seq_length tokens (without
packing, rows are padded to the batch's longest example: the longest training example when it is known);
L layers; H hidden size; K the key/value width (kv heads x head dim); I the MLP's inner size; V vocabulary;
P_q the weights of the linear layers (lm_head excluded), which bitsandbytes quantizes; P_o the other base
weights (embeddings, norms); P_l the LoRA weights:

    base weights      4-bit: P_q * (0.5 + 1/64 + 4/(64*256)) + P_o * d      else (P_q + P_o) * d
                      (NF4 is half a byte a weight; double quantization keeps one 8-bit scale per block of
                      64 weights and one fp32 scale per 256 of those; stored in the compute dtype under FSDP,
                      the same bytes)
                      sharded (FSDP, N processes): the above / N, plus two decoder layers' base weights gathered
                      whole at once (the layer computing and the next one, which FSDP prefetches); for 4-bit
                      models whose embedding and head lib.sharded_vocab keeps sharded (untied), nothing more,
                      otherwise the output head gathered whole, V * H * d (accelerate keeps that unit gathered
                      from the loss in forward to its backward; measured on a Llama-3.1-8B shape before
                      lib.sharded_vocab: 4.81 GiB per GPU, the estimate 3.52 without this term, 4.50 with it)
    LoRA weights      P_l * 4            (fp32)                                  sharded: / N
    gradients         P_l * 4            (only the adapters get gradients)       sharded: / N
    optimizer state   P_l * 8            (AdamW: two fp32 moments; 8-bit AdamW: P_l * 2)   sharded: / N
    activations       what backward needs, a = values kept per token and layer:
                        a = (4H + 2K  attention: normed input, queries, keys, values, attention output
                             + 2H     the two norms' inputs (4H without Liger: HF's RMSNorm keeps fp32 copies)
                             + 2I     gated MLP with Liger (gate, up); 3I without (and SiLU(gate)); I ungated
                             + I      where a LoRA targets the MLP's down projection: its input (bitsandbytes'
                                      frozen 4-bit product keeps none))
                                      lib.fused_lora's MLP step (fused LoRA, no dropout, LoRA on gate, up and
                                      down of a SwiGLU MLP) keeps 2I: gate and up, not the down projection's
                                      input (recomputed in backward)
                            * d
                            + (d + 1) * in_features of every targeted layer   (LoRA dropout's output and mask)
                      without gradient checkpointing: T * L * a
                      with it: T * (L * H * d        the layers' inputs, kept (4 bytes, not d, where a LayerNorm
                                                     on the embeddings, bloom's, makes the residual stream
                                                     fp32: autocast runs LayerNorm in fp32; lib.alibi's flex
                                                     path keeps it bf16)
                                    + a              one layer recomputed during backward
                                    + (I + 2H) * d)  that layer's gradients in flight
                      checkpointing the first k layers only (checkpointed_layers): k layers keep their input,
                      the other L - k keep a each (the recomputed layer's a above is one of them)
    attention scores  eager attention keeps each head's softmax in fp32 and in d bytes: one layer's worth is
                      rows * heads * R^2 * (4 + d), R = T when packing puts a micro-batch in one row, else the
                      sequence length; kept for every layer (with checkpointing: for the layers that keep their
                      activations, at least one), plus two layers' worth
                      in flight during backward (the scores' gradients). SDPA on a CPU (its math path) keeps
                      two d-byte copies, rows * heads * R^2 * 2d a layer. Flash and memory-efficient kernels
                      (varlen, SDPA on CUDA) keep none.
    loss              TRL's chunked LM head: one min(T, 4096) x min(V, 32768) logits tile in d bytes, and the
                      fp32 gradient of the last hidden state, T * H * 4. Full logits are never built. On a CPU
                      (no Triton) TRL's torch fallback holds about five fp32 copies of the tile besides.
                      lib.sharded_vocab (FSDP): a slice of SLICE_ROWS head rows in d bytes and three fp32
                      copies of a min(T, TOKEN_TILE) x SLICE_ROWS logits tile, besides the gradient of the
                      last hidden state.
    CPU workspace     on a CPU only: 0.6 x the parts above but the base weights. Measured, not derived: over 60
                      steps of each task's CPU recipe, a process's resident memory rose 1.55-1.66 x those parts
                      above its resident memory at the start (the allocator keeps freed blocks of steps of
                      different shapes; CPU kernels make fp32 temporaries of bf16 tensors; docs/BENCHMARKS.md).
Activations, attention scores and the loss are each process's own: sharding does not divide them. (The
adapters' gathered layers in flight are a few MiB, left out.)

Process peak (what a run record's `peak_memory_gib` reads). On a GPU that is the allocated tensors, so the
estimate above. On a CPU it is the process's peak resident memory (ru_maxrss): the interpreter, the libraries,
the data, the tokenizer, the loaded model and the pages of its checkpoint file, besides training's tensors.
Those are not computed but measured: `process_peak` adds the training estimate (base weights left out: they
are loaded already) to the resident memory of the process when training starts (`resident_bytes`).

Checked against measured peaks in docs/BENCHMARKS.md ("Memory estimate against measurement").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lib.models import empty_model, layer_names, linear_layers, process_device, select_targets

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weight + 8-bit block scale (64) + fp32 scale of 256 scales
LORA_BYTES = 4                             # adapters train and are saved in fp32
ADAM_BYTES = {"adamw_8bit": 2, "paged_adamw_8bit": 2}  # bytes of optimizer state per trainable value; else 8
LOSS_TOKEN_TILE, LOSS_VOCAB_TILE = 4096, 32768     # TRL's chunked log-prob tile
CPU_TILE_TEMPORARIES = 5                           # fp32 copies of a tile TRL's torch fallback holds at once
CPU_WORKSPACE_SHARE = 0.6  # CPU: the allocator's cached blocks and kernels' temporaries, x the parts above (measured)
GPU_BUDGET_SHARE, CPU_BUDGET_SHARE = 0.8, 0.75     # memory_budget_gib "auto"
HOST_PROCESSES_VARIABLE = "QLORA_HOST_PROCESSES"   # training processes on this host, set by lib.launcher
GATHERED_LAYERS = 2  # FSDP: decoder layers whose weights are whole at once (computing, and the next prefetched)


@dataclass(frozen=True)
class ModelShapes:
    linear: tuple[tuple[str, int, int], ...]  # (module path, out_features, in_features), lm_head excluded
    total_parameters: int                     # every base weight, tied weights counted once
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int = 1
    kv_size: int = 0                          # key/value width: kv heads x head dim
    intermediate_size: int = 0                # the MLP's inner width
    gated_mlp: bool = False                   # SwiGLU-style MLP (gate and up projections)
    keeps_examples_apart: bool = True         # attention reads position_ids: packing is padding-free
    flash_capable: bool = True                # runs on transformers' attention functions (varlen/SDPA)
    varlen_capable: bool = True               # ... and has no sliding window: can run lib.attention's varlen
    alibi_capable: bool = False               # ALiBi attention lib.alibi can replace (bloom): the "flex" attention
    layer_class: str = ""                     # the decoder layer's class (LlamaDecoderLayer): FSDP wraps each one
    fp32_stream: bool = False                 # a LayerNorm on the embeddings (bloom): autocast runs it in fp32,
                                              # so the residual stream starts, and stays, fp32 in bf16/fp16 training
    shardable_vocab: bool = False             # untied embedding and head lib.sharded_vocab can keep sharded
    swiglu_mlp: bool = False                  # an MLP lib.fused_lora's fused MLP step can run (Llama's SwiGLU,
                                              # no biases)

    @property
    def linear_paths(self) -> list[str]:
        return [path for path, _, _ in self.linear]

    @property
    def linear_names(self) -> list[str]:
        return layer_names(self.linear_paths)

    @property
    def attention_names(self) -> list[str]:
        return layer_names(self.linear_paths, attention_only=True)

    @property
    def linear_parameters(self) -> int:
        return sum(out * inp for _, out, inp in self.linear)

    def resolve(self, targets: list[str]) -> list[str]:
        """Layer names for a preset ("all-linear", "attention") or a list of names."""
        return select_targets(targets, self.linear_paths)


def read_shapes(model_path: str) -> ModelShapes:
    """The shapes of the model at `model_path`, read from a meta-device copy (no weights loaded)."""
    import torch

    from lib import alibi, fused_lora, sharded_vocab
    from lib.attention import keeps_packed_examples_apart, suits

    model = empty_model(model_path)
    config = model.config.get_text_config()
    linear = tuple((name, module.out_features, module.in_features) for name, module in linear_layers(model))
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    inner = max(inp for _, _, inp in linear)  # the MLP's down projection reads the widest input
    return ModelShapes(
        linear=linear,
        total_parameters=sum(parameter.numel() for parameter in model.parameters()),
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        vocab_size=config.vocab_size,
        num_heads=heads,
        kv_size=kv_heads * head_dim,
        intermediate_size=inner,
        gated_mlp=_gated_mlp(linear, inner),
        keeps_examples_apart=keeps_packed_examples_apart(model),
        flash_capable=bool(getattr(model, "_supports_attention_backend", False)),
        varlen_capable=suits(model),
        alibi_capable=alibi.suits(model),
        layer_class=",".join(getattr(model, "_no_split_modules", None) or []),
        fp32_stream=any(isinstance(module, torch.nn.LayerNorm) and "embed" in name.lower()
                        for name, module in model.named_modules()),
        shardable_vocab=sharded_vocab.suits(model),
        swiglu_mlp=any(fused_lora.mlp_suits(module) and all(getattr(module, name).bias is None
                                                             for name in fused_lora.MLP_PROJECTIONS)
                       for module in model.modules()),
    )


def _gated_mlp(linear: tuple[tuple[str, int, int], ...], inner: int) -> bool:
    """Whether the MLP is gated (SwiGLU: a gate and an up projection, both out to the inner width, in every
    layer) rather than one up projection: count the projections to the inner width in the first layer."""
    first_layer = [out for path, out, _ in linear if _layer_index(path) == 0]
    return sum(1 for out in first_layer if out == inner) >= 2


def _layer_index(path: str) -> int | None:
    """The decoder layer a module path is in ("model.layers.3.mlp.up_proj" -> 3), or None (lm_head, ...)."""
    match = re.search(r"\.(\d+)\.", f".{path}.")
    return int(match.group(1)) if match else None


def _targeted(shapes: ModelShapes, targets: list[str]) -> list[tuple[str, int, int]]:
    names = set(shapes.resolve(targets))
    return [layer for layer in shapes.linear if layer[0].rsplit(".", 1)[-1] in names]


def trainable_parameters(shapes: ModelShapes, r: int, targets: list[str]) -> int:
    """LoRA weights for rank `r` on the targeted layers: r * (in + out) for each."""
    return sum(r * (inp + out) for _, out, inp in _targeted(shapes, targets))


def adapter_bytes(trainable: int) -> int:
    """The adapter's weights on disk (fp32 safetensors; the header and config add a few KiB)."""
    return trainable * LORA_BYTES


def fp32_stream(shapes: ModelShapes, plan) -> bool:
    """Whether the residual stream is fp32 in training: after an fp32 embedding norm (bloom's, under autocast),
    except on lib.alibi's flex path in bf16, which keeps it bf16."""
    return shapes.fp32_stream and not (plan.attention == "flex" and plan.precision == "bf16")


# bitsandbytes multiplies up to this many tokens with its own 4-bit kernel on CUDA (bnb 0.50.2,
# backends/cuda/ops.py, `_gemm_4bit_custom_max_m`), above it with dequantize + F.linear as lib.fused_lora's
# steps do: smaller passes keep PEFT's path and bitsandbytes' choice
CUSTOM_KERNEL_TOKENS = 1536


def fused_mlp(shapes: ModelShapes, config, plan, tokens: int | None = None) -> bool:
    """Whether lib.fused_lora's fused MLP step serves the MLPs of passes of `tokens` tokens: fused LoRA on 4-bit
    weights, not sharded, no dropout, a SwiGLU MLP without biases whose three projections all carry a LoRA
    (and on a GPU more than CUSTOM_KERNEL_TOKENS tokens a pass). It keeps gate's and up's outputs, not the
    down projection's input."""
    projections = {"gate_proj", "up_proj", "down_proj"}
    return bool(plan.fused_lora and config.fused_lora != "layers" and config.load_in_4bit and not plan.sharded
                and config.lora_dropout == 0 and shapes.swiglu_mlp
                and projections <= set(shapes.resolve(config.target_module_list()))
                and (tokens is None or not plan.on_gpu or tokens > CUSTOM_KERNEL_TOKENS))


def training_memory(shapes: ModelShapes, config, plan, micro_batch: int | None = None,
                    stream_fp32: bool | None = None, mlp_step: bool | None = None) -> dict[str, float]:
    """The estimate of the module docstring, part by part, in bytes, for `micro_batch` sequences per pass
    (default: the config's micro_batch_size, or its batch_size when that is "auto"); `stream_fp32` overrides
    `fp32_stream` and `mlp_step` `fused_mlp` (a measured row of older code)."""
    if micro_batch is None:
        micro_batch = config.batch_size if config.micro_batch_size == "auto" else config.micro_batch_size
    d, H, L, I, K = (plan.compute_bytes, shapes.hidden_size, shapes.num_layers, shapes.intermediate_size,
                     shapes.kv_size)
    targeted = _targeted(shapes, config.target_module_list())
    lora = sum(config.lora_r * (inp + out) for _, out, inp in targeted)
    quantized, other = shapes.linear_parameters, shapes.total_parameters - shapes.linear_parameters
    base = quantized * NF4_BYTES + other * d if config.load_in_4bit else shapes.total_parameters * d
    shards = plan.processes if plan.sharded else 1
    vocab_sharded = plan.sharded and config.load_in_4bit and shapes.shardable_vocab  # lib.sharded_vocab serves it
    if plan.sharded:  # each process keeps 1/N of the weights, and gathers whole layers as it computes them
        base = base / shards + GATHERED_LAYERS * (quantized / L) * (NF4_BYTES if config.load_in_4bit else d)
        if not vocab_sharded:
            base += shapes.vocab_size * H * d  # the output head, whole from the loss to its backward

    tokens = micro_batch * plan.row_length(config)
    # gated: gate and up (Liger recomputes their product), without Liger also SiLU(gate); ungated: the
    # activation's input. bitsandbytes' frozen 4-bit product keeps no input; a LoRA on the down projection does
    # lib.fused_lora's MLP step keeps gate and up only
    if fused_mlp(shapes, config, plan, tokens) if mlp_step is None else mlp_step:
        mlp = 2 * I
    else:
        mlp = ((2 if plan.liger else 3) if shapes.gated_mlp else 1) * I
        if any(inp == I for _, _, inp in targeted):
            mlp += I
    norms = (2 if plan.liger else 4) * H
    per_layer = (4 * H + 2 * K + norms + mlp) * d
    if config.lora_dropout > 0:
        per_layer += (d + 1) * sum(inp for _, _, inp in targeted) / L
    recomputed = L if config.checkpointed_layers == "all" else min(L, config.checkpointed_layers)
    if plan.checkpointing:
        stream = 4 if (fp32_stream(shapes, plan) if stream_fp32 is None else stream_fp32) else d  # layer inputs
        # a layer that keeps its activations holds what a recomputed one holds in backward (measured: 16 of 16
        # layers of llama-1b recomputed at 32 sequences 6.06 GiB, 15 of 16 5.93 GiB; docs/BENCHMARKS.md runs A29, B30)
        activations = tokens * (recomputed * H * stream + max(L - recomputed, 1) * per_layer + (I + 2 * H) * d)
    else:
        activations = tokens * L * per_layer

    scores = 0.0
    rows, row = (1, tokens) if plan.packed else (micro_batch, plan.row_length(config))
    kept_layers = max(L - recomputed, 1) if plan.checkpointing else L  # layers whose scores stay until backward
    if plan.attention_kernel == "eager":
        scores = rows * shapes.num_heads * row * row * (4 + d) * (kept_layers + 2)
    elif plan.attention_kernel == "sdpa":
        scores = rows * shapes.num_heads * row * row * 2 * d * kept_layers
    tile = min(tokens, LOSS_TOKEN_TILE) * min(shapes.vocab_size, LOSS_VOCAB_TILE)
    loss = tile * (d if plan.on_gpu else d + CPU_TILE_TEMPORARIES * 4) + tokens * H * 4
    if vocab_sharded:  # a slice of every process's head rows, and its fp32 logits tile, three copies at most
        from lib.sharded_vocab import SLICE_ROWS, TOKEN_TILE  # here: importing lib.memory does not load torch

        columns = shards * min(max(1, SLICE_ROWS // shards), -(-shapes.vocab_size // shards))
        loss = columns * H * d + min(tokens, TOKEN_TILE) * columns * 4 * 3 + tokens * H * 4
    parts = {
        "base weights": base,
        "LoRA weights": lora * LORA_BYTES / shards,
        "gradients": lora * LORA_BYTES / shards,
        "optimizer state": lora * ADAM_BYTES.get(config.optimizer, 8) / shards,
        "activations": activations,
        "attention scores": scores,
        "loss": loss,
    }
    if not plan.on_gpu:
        parts["CPU workspace"] = CPU_WORKSPACE_SHARE * (sum(parts.values()) - base)
    return parts


def budget_bytes(config, plan) -> float:
    """The training memory one process may fill: `memory_budget_gib`, or for "auto" a share of its GPU's
    memory, or on a CPU a share of the machine's memory divided among the training processes on this host
    (host_processes). Both are read from totals, not from what is free now, so every process of a launch
    computes the same budget and chooses the same micro-batch (ranks with different accumulation would pair
    their all-reduces wrongly)."""
    if config.memory_budget_gib != "auto":
        return config.memory_budget_gib * 2**30
    if plan.on_gpu:
        return GPU_BUDGET_SHARE * machine_bytes(plan)
    return CPU_BUDGET_SHARE * machine_bytes(plan) / host_processes()


def host_processes() -> int:
    """Training processes sharing this host: HOST_PROCESSES_VARIABLE (set by lib.launcher, whose local workers
    are separate launches of one process each), else accelerate's LOCAL_WORLD_SIZE, else 1."""
    import os

    for variable in (HOST_PROCESSES_VARIABLE, "LOCAL_WORLD_SIZE"):
        value = os.environ.get(variable, "")
        if value.strip().isdigit() and int(value) >= 1:
            return int(value)
    return 1


def check_sharded_loading(shapes: ModelShapes, config, plan, available: float | None = None) -> float:
    """Sharded 4-bit weights are loaded and quantized on the host by every process of it at once
    (lib.models.load_base_model) before FSDP moves each process's shards to its GPU: refuse, naming the
    setting, when those copies do not fit the host's available memory; the bytes they need (0 when the plan
    loads onto the GPU)."""
    import dataclasses

    import psutil

    from lib.config import ConfigError

    if not (plan.sharded and plan.on_gpu and config.load_in_4bit):
        return 0.0
    whole = training_memory(shapes, config, dataclasses.replace(plan, sharded=False), 1)["base weights"]
    needed = whole * host_processes()
    available = psutil.virtual_memory().available if available is None else available
    if needed > available:
        raise ConfigError("distributed", config.distributed,
                          f"ddp, or a host with more memory: each of the {host_processes()} process(es) on this "
                          f"host loads and quantizes the whole model on the CPU before sharding it "
                          f"({needed / 2**30:,.1f} GiB together), and {available / 2**30:,.1f} GiB are available")
    return needed


def resident_bytes() -> int:
    """This process's resident memory now (RSS): the part of a run's peak the estimate does not compute."""
    import psutil

    return psutil.Process().memory_info().rss


def process_peak(parts: dict[str, float], resident: float) -> float:
    """The peak resident memory of a CPU training process: `resident` (measured when training starts, the
    model loaded) + the training estimate `parts` (training_memory) without the base weights, already in it."""
    return resident + sum(parts.values()) - parts["base weights"]


def machine_bytes(plan) -> float:
    """The whole memory of the device a process trains on: its GPU's, or this machine's RAM."""
    if plan.on_gpu:
        import torch

        return torch.cuda.get_device_properties(process_device()).total_memory
    import psutil

    return psutil.virtual_memory().total


def micro_batch(shapes: ModelShapes, config, plan) -> tuple[int, float, float]:
    """(micro-batch, its estimated bytes, the budget): the config's micro_batch_size, or for "auto" the
    largest divisor of batch_size whose estimate fits the budget (1 when none does)."""
    budget = budget_bytes(config, plan)
    if config.micro_batch_size != "auto":
        size = config.micro_batch_size
    else:
        divisors = [m for m in range(config.batch_size, 0, -1) if config.batch_size % m == 0]
        size = next((m for m in divisors if sum(training_memory(shapes, config, plan, m).values()) <= budget), 1)
    return size, sum(training_memory(shapes, config, plan, size).values()), budget


def release_freed_memory() -> None:
    """Hand the C allocator's free pages back to the OS (glibc `malloc_trim`; nothing elsewhere). Called after
    every CPU training step (lib.fine_tuner.ReleaseFreedMemory): steps of different shapes otherwise leave
    freed blocks resident, and the process grew by 0.2 GiB over 40 steps on the embedded model (measured in
    docs/BENCHMARKS.md, "On CPU, the whole process"), with no measurable cost in step time."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
        except (OSError, AttributeError, TypeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)


_LIBC = None
