"""LoRA on a 4-bit linear layer as one autograd step: fewer Python calls and kernels per layer and pass.

PEFT's LoRA on a bitsandbytes 4-bit layer runs, for every layer and pass, the 4-bit layer (its own checks,
casts and autograd function), a clone of its output, the dropout module, the `lora_A` and `lora_B` modules,
a scaling and an addition: five autograd nodes and a dozen Python calls. On a GPU the host launching those
small steps is what a training step waits for on small models (docs/BENCHMARKS.md, "Where the time goes":
the embedded model spent 1.90 s of host time against 0.17 s of GPU kernels over 3 steps). `install(model)`
replaces the forward of each such layer by one autograd function that dequantizes the weight (bitsandbytes'
own `dequantize_4bit`, as bitsandbytes' matmul does for large passes), multiplies, and adds the adapter's
product in place (`addmm_`); its backward dequantizes again and makes the input's and the adapter's gradients with five
matrix products. Same products in the same dtype as PEFT: the step serves a layer only where PEFT too would
run the adapter in the 4-bit layer's compute dtype (under autocast on a GPU, or adapters in that dtype);
tests/test_fused_lora.py compares outputs and gradients.

The fused step serves training passes only (gradients enabled) of a layer with one active plain LoRA
adapter (no DoRA or other variant, no adapter bias, not merged, adapters enabled, no hooks on its modules)
whose weight is an unsharded bitsandbytes 4-bit parameter and whose bias, if any, is frozen; on CUDA only
passes of more than CUSTOM_KERNEL_TOKENS tokens, where bitsandbytes too dequantizes and calls F.linear.
Everything else (generation, small passes, several adapters, FSDP's sharded weights) goes to PEFT's forward
unchanged; `served(model)` counts the layers the fused step ran (the run record keeps it). LoRA dropout is
applied to the adapter's input before the step, as PEFT does, and autograd carries its gradient.
"""

from __future__ import annotations

import functools

import torch


def install(model) -> int:
    """Give every PEFT LoRA layer on a bitsandbytes 4-bit layer the fused training step; returns how many.
    Calling it again changes nothing."""
    global _PARAMS4BIT, _DEQUANTIZE
    try:
        import bitsandbytes
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    _PARAMS4BIT, _DEQUANTIZE = bitsandbytes.nn.Params4bit, bitsandbytes.functional.dequantize_4bit
    patched = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = functools.partial(_forward, module)
            patched += 1
    return patched


def served(model) -> int:
    """How many layers of `model` the fused step has served at least once (the rest ran PEFT's forward)."""
    return sum(1 for module in model.modules() if getattr(module, "_fused_served", False))


def uninstall(model) -> int:
    """Give the layers back PEFT's forward; returns how many."""
    restored = 0
    for module in model.modules():
        if hasattr(module, "_peft_forward"):
            del module.forward  # the instance attribute: the class's forward shows again
            del module._peft_forward
            module.__dict__.pop("_fused_served", None)
            restored += 1
    return restored


# bitsandbytes multiplies up to this many tokens with its own 4-bit kernel on CUDA (bnb 0.50.2,
# backends/cuda/ops.py, `_gemm_4bit_custom_max_m`), above it with dequantize + F.linear as this step does:
# smaller passes keep PEFT's path and bitsandbytes' choice
CUSTOM_KERNEL_TOKENS = 1536
_PARAMS4BIT = _DEQUANTIZE = None  # bitsandbytes' parameter class and dequantize_4bit, set by install


def _adapter(layer):
    """The one active plain adapter the fused step can run, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}) \
            or getattr(layer, "lora_bias", {}).get(name, False):
        return None
    base = layer.get_base_layer()
    for module in (base, layer.lora_A[name], layer.lora_B[name]):
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return None  # e.g. accelerate's offloading hooks: they run only through the modules' own calls
    weight = base.weight
    if not isinstance(weight, _PARAMS4BIT) or getattr(weight, "quant_state", None) is None \
            or getattr(weight.quant_state, "packing_format_for_cpu", False):
        return None  # e.g. FSDP's shards; bitsandbytes' CPU inference layout
    if base.bias is not None and base.bias.requires_grad:
        return None
    return name


def _forward(layer, x, *args, **kwargs):
    """The patched forward of one LoRA layer: the fused step for a training pass it can serve, else PEFT's."""
    if args or kwargs or not torch.is_grad_enabled() \
            or (x.is_cuda and x.numel() <= CUSTOM_KERNEL_TOKENS * x.shape[-1]):
        return layer._peft_forward(x, *args, **kwargs)
    name = _adapter(layer)
    if name is None:
        return layer._peft_forward(x, *args, **kwargs)
    base = layer.get_base_layer()
    if not base.compute_type_is_set:  # as bitsandbytes' own forward: the compute dtype from the first input
        base.set_compute_type(x)
        base.compute_type_is_set = True
    dtype = base.compute_dtype or x.dtype
    adapter_dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                     else layer.lora_A[name].weight.dtype)
    if adapter_dtype != dtype:  # PEFT would run the adapter in another dtype than the 4-bit product
        return layer._peft_forward(x)
    lora_x = layer.lora_dropout[name](x)  # Identity hands back x itself
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).to(dtype)
    flat_lora = flat if lora_x is x else lora_x.reshape(-1, shape[-1]).to(dtype)
    out = _LoRA4bit.apply(flat, flat_lora, base.weight, base.bias, layer.lora_A[name].weight,
                          layer.lora_B[name].weight, float(layer.scaling[name]))
    layer._fused_served = True
    return out.reshape(*shape[:-1], out.shape[-1]).to(x.dtype)


def _dequantized(weight, dtype):
    return _DEQUANTIZE(weight.data, weight.quant_state).to(dtype)


class _LoRA4bit(torch.autograd.Function):
    """out = x W^T + bias + scaling (x_lora A^T) B^T, with W the dequantized 4-bit weight (out, in);
    x and x_lora are (tokens, in) in the compute dtype (the same tensor without dropout)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling):
        dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            out = torch.nn.functional.linear(x, _dequantized(weight, dtype), None if bias is None else bias.to(dtype))
            xa = torch.mm(x_lora, a.t()).mul_(scaling)  # (tokens, r), scaled once here
            out.addmm_(xa, b.t())
        ctx.same = x_lora is x
        ctx.scaling = scaling
        ctx.weight = weight  # the 4-bit parameter itself (its quantization state rides on it)
        ctx.save_for_backward(x_lora, xa, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_lora, xa, lora_a, lora_b = ctx.saved_tensors
        weight = ctx.weight
        dtype = x_lora.dtype
        needs_x, needs_x_lora = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(dtype)
            a, b = lora_a.to(dtype), lora_b.to(dtype)
            grad_b = torch.mm(grad.t(), xa).to(lora_b.dtype) if ctx.needs_input_grad[5] else None
            grad_xa = torch.mm(grad, b)  # (tokens, r), unscaled
            grad_a = torch.mm(grad_xa.t(), x_lora).mul_(ctx.scaling).to(lora_a.dtype) \
                if ctx.needs_input_grad[4] else None
            grad_x = grad_x_lora = None
            if needs_x:
                grad_x = torch.mm(grad, _dequantized(weight, dtype))
                if ctx.same:  # x feeds both products: one gradient
                    grad_x.addmm_(grad_xa, a, alpha=ctx.scaling)
            if needs_x_lora and not ctx.same:
                grad_x_lora = torch.mm(grad_xa, a).mul_(ctx.scaling)
        return grad_x, grad_x_lora, None, None, grad_a, grad_b, None
