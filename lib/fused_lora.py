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

The MLP step: a SwiGLU MLP, down(silu(gate(x)) * up(x)), whose three projections the fused step would each
serve without dropout and without bias, runs as one autograd function. It keeps x and gate's and up's
outputs for backward, not their product (the down projection's input, which the layers one by one keep as
the down adapter's input): backward recomputes it, with Liger's SwiGLU kernels where the plan turns Liger on.
One inner-width tensor a token and layer less; the same products. `mlps_served(model)` counts them.
"""

from __future__ import annotations

import functools

import torch

from lib.memory import CUSTOM_KERNEL_TOKENS  # on CUDA, smaller passes keep PEFT's path (see there)


def install(model, mlps: bool = True, liger: bool = False) -> int:
    """Give every PEFT LoRA layer on a bitsandbytes 4-bit layer the fused training step, and with `mlps` every
    SwiGLU MLP of three such layers the fused MLP step (with `liger`, its SwiGLU through Liger's kernels where
    installed, as the plan's Liger setting says); returns how many layers it patched. Calling it again patches
    only what lost its step since: a module whose forward was rebound after install (the Trainer applies Liger
    in train(), binding LigerSwiGLUMLP's forward on every MLP) gets the step again, over the new forward."""
    global _PARAMS4BIT, _DEQUANTIZE
    try:
        import bitsandbytes
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes: no 4-bit layers
        return 0
    _PARAMS4BIT, _DEQUANTIZE = bitsandbytes.nn.Params4bit, bitsandbytes.functional.dequantize_4bit
    patched = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and not _patched(module):
            _patch(module, _forward)
            patched += 1
    for module in model.modules() if mlps else ():
        if mlp_suits(module) and all(isinstance(getattr(module, name), Linear4bit) for name in MLP_PROJECTIONS) \
                and not _patched(module):
            _patch(module, _mlp_forward)
            module._fused_liger = liger
    return patched


def _patched(module) -> bool:
    """Whether the module's forward is the fused step's (not rebound since install)."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func in (_forward, _mlp_forward)


def _patch(module, forward):
    """Put `forward` on the module, keeping the one it had (an instance's own, e.g. Liger's patch of an MLP
    built before it, or its class's) to call where the fused step does not serve and to give back."""
    module._own_forward = "forward" in module.__dict__
    module._peft_forward = module.forward
    module.forward = functools.partial(forward, module)


MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def mlp_suits(module) -> bool:
    """Whether `module` is a SwiGLU MLP, down(silu(gate(x)) * up(x)) (Llama's, Mistral's, Qwen's; Liger's
    LigerSwiGLUMLP), that the fused MLP step can run when its three projections are LoRA 4-bit layers."""
    if not all(hasattr(module, name) for name in MLP_PROJECTIONS):
        return False
    if type(module).__name__ == "LigerSwiGLUMLP":
        return True
    return type(module).__name__ in SWIGLU_CLASSES \
        and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")


# transformers' MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (read in transformers 5.x)
SWIGLU_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def served(model) -> int:
    """How many layers of `model` the fused step has served at least once (the rest ran PEFT's forward)."""
    return sum(1 for module in model.modules()
               if getattr(module, "_fused_served", False) and not hasattr(module, "gate_proj"))


def mlps_served(model) -> int:
    """How many MLPs of `model` the fused MLP step has served at least once."""
    return sum(1 for module in model.modules()
               if getattr(module, "_fused_served", False) and hasattr(module, "gate_proj"))


def uninstall(model) -> int:
    """Give the layers (and MLPs) back PEFT's forward; returns how many layers."""
    restored = 0
    for module in model.modules():
        if hasattr(module, "_peft_forward"):
            if module._own_forward:  # the instance's own forward again
                module.forward = module._peft_forward
            else:  # the class's forward shows again
                del module.forward
            for name in ("_peft_forward", "_own_forward", "_fused_served", "_fused_liger"):
                module.__dict__.pop(name, None)
            restored += not hasattr(module, "gate_proj")
    return restored


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


def _compute_dtype(layer, name, x):
    """The dtype the fused step multiplies in, or None where PEFT would run the adapter in another dtype than
    the 4-bit product."""
    base = layer.get_base_layer()
    if not base.compute_type_is_set:  # as bitsandbytes' own forward: the compute dtype from the first input
        base.set_compute_type(x)
        base.compute_type_is_set = True
    dtype = base.compute_dtype or x.dtype
    adapter_dtype = (torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type)
                     else layer.lora_A[name].weight.dtype)
    return dtype if adapter_dtype == dtype else None


def _small_pass(x) -> bool:
    """Not a training pass, or one bitsandbytes multiplies with its own 4-bit kernel: PEFT's path serves it."""
    return not torch.is_grad_enabled() or (x.is_cuda and x.numel() <= CUSTOM_KERNEL_TOKENS * x.shape[-1])


def _forward(layer, x, *args, **kwargs):
    """The patched forward of one LoRA layer: the fused step for a training pass it can serve, else PEFT's."""
    if args or kwargs or _small_pass(x):
        return layer._peft_forward(x, *args, **kwargs)
    name = _adapter(layer)
    dtype = name and _compute_dtype(layer, name, x)
    if dtype is None:
        return layer._peft_forward(x, *args, **kwargs)
    base = layer.get_base_layer()
    lora_x = layer.lora_dropout[name](x)  # Identity hands back x itself
    shape = x.shape
    flat = x.reshape(-1, shape[-1]).to(dtype)
    flat_lora = flat if lora_x is x else lora_x.reshape(-1, shape[-1]).to(dtype)
    out = _LoRA4bit.apply(flat, flat_lora, base.weight, base.bias, layer.lora_A[name].weight,
                          layer.lora_B[name].weight, float(layer.scaling[name]))
    layer._fused_served = True
    return out.reshape(*shape[:-1], out.shape[-1]).to(x.dtype)


def _mlp_forward(mlp, x):
    """The patched forward of a SwiGLU MLP whose three projections are LoRA 4-bit layers: the fused MLP step
    where every projection can take the fused step without dropout or bias, in one dtype; else the MLP's own
    forward (whose projections may still take the fused step one by one)."""
    layers = [getattr(mlp, name) for name in MLP_PROJECTIONS]
    if _small_pass(x):
        return mlp._peft_forward(x)
    names = [_adapter(layer) for layer in layers]
    hooked = any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)
    if hooked or any(name is None or not isinstance(layer.lora_dropout[name], torch.nn.Identity)
           or layer.get_base_layer().bias is not None for layer, name in zip(layers, names)):
        return mlp._peft_forward(x)
    dtypes = {_compute_dtype(layer, name, x) for layer, name in zip(layers, names)}
    if len(dtypes) != 1 or None in dtypes:
        return mlp._peft_forward(x)
    dtype = dtypes.pop()
    tensors = []
    for layer, name in zip(layers, names):
        tensors += [layer.get_base_layer().weight, layer.lora_A[name].weight, layer.lora_B[name].weight]
    scalings = tuple(float(layer.scaling[name]) for layer, name in zip(layers, names))
    shape = x.shape
    liger = mlp._fused_liger and x.is_cuda and _liger_swiglu() is not None
    out = _LoRAMLP4bit.apply(x.reshape(-1, shape[-1]).to(dtype), (scalings, liger), *tensors)
    for module in (mlp, *layers):
        module._fused_served = True
    return out.reshape(*shape[:-1], out.shape[-1]).to(x.dtype)


def _dequantized(weight, dtype):
    return _DEQUANTIZE(weight.data, weight.quant_state).to(dtype)


def _product(x, x_lora, weight, bias, lora_a, lora_b, scaling):
    """x W^T + bias + scaling (x_lora A^T) B^T in x's dtype; returns it and scaling x_lora A^T (tokens, r),
    which the adapter's gradients need."""
    dtype = x.dtype
    out = torch.nn.functional.linear(x, _dequantized(weight, dtype), None if bias is None else bias.to(dtype))
    xa = torch.mm(x_lora, lora_a.to(dtype).t()).mul_(scaling)  # scaled once here
    out.addmm_(xa, lora_b.to(dtype).t())
    return out, xa


def _product_backward(grad, x_lora, xa, weight, lora_a, lora_b, scaling, needs, grad_x=None, same=True):
    """The gradients of `_product` for `grad` (tokens, out): the input's (added to `grad_x` where given; with
    `same`, x_lora's share included, as x feeds both products), A's and B's; `needs` = (input, A, B)."""
    dtype = x_lora.dtype
    a, b = lora_a.to(dtype), lora_b.to(dtype)
    grad_b = torch.mm(grad.t(), xa).to(lora_b.dtype) if needs[2] else None
    grad_xa = torch.mm(grad, b)  # (tokens, r), unscaled
    grad_a = torch.mm(grad_xa.t(), x_lora).mul_(scaling).to(lora_a.dtype) if needs[1] else None
    if needs[0]:
        weight = _dequantized(weight, dtype)
        grad_x = torch.mm(grad, weight) if grad_x is None else grad_x.addmm_(grad, weight)
        if same:
            grad_x.addmm_(grad_xa, a, alpha=scaling)
    return grad_x, grad_a, grad_b, grad_xa


class _LoRA4bit(torch.autograd.Function):
    """out = x W^T + bias + scaling (x_lora A^T) B^T, with W the dequantized 4-bit weight (out, in);
    x and x_lora are (tokens, in) in the compute dtype (the same tensor without dropout)."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_a, lora_b, scaling):
        with torch.autocast(x.device.type, enabled=False):
            out, xa = _product(x, x_lora, weight, bias, lora_a, lora_b, scaling)
        ctx.same = x_lora is x
        ctx.scaling = scaling
        ctx.weight = weight  # the 4-bit parameter itself (its quantization state rides on it)
        ctx.save_for_backward(x_lora, xa, lora_a, lora_b)
        return out

    @staticmethod
    def backward(ctx, grad):
        x_lora, xa, lora_a, lora_b = ctx.saved_tensors
        needs = ctx.needs_input_grad
        with torch.autocast(grad.device.type, enabled=False):
            grad_x, grad_a, grad_b, grad_xa = _product_backward(
                grad.to(x_lora.dtype), x_lora, xa, ctx.weight, lora_a, lora_b, ctx.scaling,
                (needs[0], needs[4], needs[5]), same=ctx.same)
            grad_x_lora = None
            if needs[1] and not ctx.same:
                grad_x_lora = torch.mm(grad_xa, lora_a.to(x_lora.dtype)).mul_(ctx.scaling)
        return grad_x, grad_x_lora, None, None, grad_a, grad_b, None


def _silu_mul(gate, up, liger=False):
    """silu(gate) * up: with `liger`, Liger's fused kernel (one pass), else PyTorch's."""
    if liger:
        return _liger_swiglu()[0](gate, up)[2]
    return torch.nn.functional.silu(gate).mul_(up)


def _silu_mul_backward(gate, up, grad, liger=False):
    """The gradients of silu(gate) * up for `grad`: (gate's, up's), in gate's dtype as autograd computes them.
    Liger's kernel writes them in place of gate and up, which are not needed after."""
    if liger:
        return _liger_swiglu()[1](gate, up, grad)
    grad_up = torch.nn.functional.silu(gate).mul_(grad)
    return torch.ops.aten.silu_backward(grad * up, gate), grad_up


@functools.cache
def _liger_swiglu():
    """Liger's SwiGLU forward and backward kernels, or None where liger-kernel is not installed."""
    try:
        from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward
    except ImportError:
        return None
    return swiglu_forward, swiglu_backward


class _LoRAMLP4bit(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) for three LoRA 4-bit layers without bias or dropout, x (tokens, hidden) in
    the compute dtype. Keeps x, gate's and up's outputs for backward, not their product (the down
    projection's input, recomputed there): one inner-width tensor a token fewer than the layers one by one."""

    @staticmethod
    def forward(ctx, x, settings, *tensors):
        scalings, liger = settings
        gate_w, gate_a, gate_b, up_w, up_a, up_b, down_w, down_a, down_b = tensors
        with torch.autocast(x.device.type, enabled=False):
            gate, xa_gate = _product(x, x, gate_w, None, gate_a, gate_b, scalings[0])
            up, xa_up = _product(x, x, up_w, None, up_a, up_b, scalings[1])
            hidden = _silu_mul(gate, up, liger)
            out, xa_down = _product(hidden, hidden, down_w, None, down_a, down_b, scalings[2])
        ctx.scalings, ctx.liger = scalings, liger
        ctx.weights = (gate_w, up_w, down_w)
        ctx.save_for_backward(x, gate, up, xa_gate, xa_up, xa_down, gate_a, gate_b, up_a, up_b, down_a, down_b)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # once: Liger's kernel overwrites the saved gate and up
        x, gate, up, xa_gate, xa_up, xa_down, gate_a, gate_b, up_a, up_b, down_a, down_b = ctx.saved_tensors
        gate_w, up_w, down_w = ctx.weights
        s_gate, s_up, s_down = ctx.scalings
        needs = ctx.needs_input_grad  # x, settings, then the nine tensors
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(x.dtype)
            hidden = _silu_mul(gate, up, ctx.liger)  # the down projection's input, recomputed
            _, grad_down_a, grad_down_b, grad_xa = _product_backward(
                grad, hidden, xa_down, down_w, down_a, down_b, s_down, (False, needs[9], needs[10]))
            del hidden
            grad_hidden = torch.mm(grad, _dequantized(down_w, x.dtype))
            grad_hidden.addmm_(grad_xa, down_a.to(x.dtype), alpha=s_down)
            grad_gate, grad_up = _silu_mul_backward(gate, up, grad_hidden, ctx.liger)
            del grad_hidden
            grad_x, grad_gate_a, grad_gate_b, _ = _product_backward(
                grad_gate, x, xa_gate, gate_w, gate_a, gate_b, s_gate, (needs[0], needs[3], needs[4]))
            grad_x, grad_up_a, grad_up_b, _ = _product_backward(
                grad_up, x, xa_up, up_w, up_a, up_b, s_up, (needs[0], needs[6], needs[7]), grad_x=grad_x)
        return (grad_x, None, None, grad_gate_a, grad_gate_b, None, grad_up_a, grad_up_b,
                None, grad_down_a, grad_down_b)
