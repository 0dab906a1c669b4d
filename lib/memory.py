"""What a LoRA config costs, computed from the model's layer shapes without loading a weight.

    shapes = read_shapes(model_path)              # the meta-device model: shapes only
    trainable_parameters(shapes, r=16, targets=["q_proj", "v_proj"])
    training_memory(shapes, config)               # bytes, part by part

Trainable parameters: LoRA adds A (r x in) and B (out x r) beside each targeted Linear of shape
(out, in), so each one adds r * (in + out); this is exactly what PEFT counts.

Training memory (bytes), an estimate. P_q: weights of the linear layers (lm_head excluded), which
bitsandbytes quantizes; P_o: the other base weights (embeddings, norms); P_l: LoRA weights; d: bytes
per value of the compute dtype (2 for bf16/fp16, 4 for fp32); B: batch_size; S: max_seq_length;
H: hidden size; L: layers; V: vocabulary:

    base weights   4-bit: P_q * (0.5 + 1/64 + 4/(64*256)) + P_o * d     else: (P_q + P_o) * d
                   (NF4 is 0.5 byte a weight; double quantization keeps one 8-bit scale per block of
                   64 weights and one fp32 scale per 256 such scales)
    LoRA weights   P_l * 4                      (fp32)
    gradients      P_l * 4                      (only the adapters get gradients)
    optimizer      P_l * 8                      (AdamW: two fp32 moments per LoRA weight)
    activations    B * S * H * L * k            k = 17 * d kept for backward (Korthikanti et al. 2022: 34 bytes
                                                a hidden value a layer in 16 bit); with gradient checkpointing
                                                k = d (layer inputs only) plus one layer recomputed
                   + B * S * sum(in_features of every targeted layer) * d * 2   (LoRA: dropped-out input, A x)
    logits         B * S * V * 4 * 2            (fp32 logits and their gradient)

Measured on a CPU the process holds about twice this (docs/BENCHMARKS.md): a lower bound, good for
comparing settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from lib.models import empty_model, layer_names, linear_layers, select_targets

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit weight + 8-bit block scale (64) + fp32 scale of 256 scales
ACTIVATION_FACTOR = 17                     # k / d without gradient checkpointing
LORA_BYTES = 4                             # adapters train and are saved in fp32
ADAM_BYTES = 8                             # two fp32 moments per trainable value


@dataclass(frozen=True)
class ModelShapes:
    linear: tuple[tuple[str, int, int], ...]  # (module path, out_features, in_features), lm_head excluded
    total_parameters: int                     # every base weight, tied weights counted once
    hidden_size: int
    num_layers: int
    vocab_size: int

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
    model = empty_model(model_path)
    model_config = model.config
    linear = tuple((name, module.out_features, module.in_features) for name, module in linear_layers(model))
    return ModelShapes(
        linear=linear,
        total_parameters=sum(parameter.numel() for parameter in model.parameters()),
        hidden_size=model_config.hidden_size,
        num_layers=model_config.num_hidden_layers,
        vocab_size=model_config.vocab_size,
    )


def _targeted(shapes: ModelShapes, targets: list[str]) -> list[tuple[str, int, int]]:
    names = set(shapes.resolve(targets))
    return [layer for layer in shapes.linear if layer[0].rsplit(".", 1)[-1] in names]


def trainable_parameters(shapes: ModelShapes, r: int, targets: list[str]) -> int:
    """LoRA weights for rank `r` on the targeted layers: r * (in + out) for each."""
    return sum(r * (inp + out) for _, out, inp in _targeted(shapes, targets))


def adapter_bytes(trainable: int) -> int:
    """The adapter's weights on disk (fp32 safetensors; the header and config add a few KiB)."""
    return trainable * LORA_BYTES


def training_memory(shapes: ModelShapes, config, compute_bytes: int, checkpointing: bool) -> dict[str, float]:
    """The estimate of the module docstring, part by part, in bytes, for a RunConfig `config`."""
    targets = config.target_module_list()
    lora = trainable_parameters(shapes, config.lora_r, targets)
    quantized, other = shapes.linear_parameters, shapes.total_parameters - shapes.linear_parameters
    if config.load_in_4bit:
        base = quantized * NF4_BYTES + other * compute_bytes
    else:
        base = shapes.total_parameters * compute_bytes
    tokens = config.batch_size * config.max_seq_length
    per_layer = compute_bytes * (1 + ACTIVATION_FACTOR / shapes.num_layers if checkpointing else ACTIVATION_FACTOR)
    lora_inputs = sum(inp for _, _, inp in _targeted(shapes, targets))  # over all layers
    return {
        "base weights": base,
        "LoRA weights": lora * LORA_BYTES,
        "gradients": lora * LORA_BYTES,
        "optimizer state": lora * ADAM_BYTES,
        "activations": tokens * shapes.hidden_size * shapes.num_layers * per_layer
                       + tokens * lora_inputs * compute_bytes * 2,
        "logits": tokens * shapes.vocab_size * 4 * 2,
    }
