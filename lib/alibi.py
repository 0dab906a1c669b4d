"""Packed training for ALiBi models (bloom): each example attends only to itself, with ALiBi's bias, and no
dense mask.

bloom does not use transformers' attention functions: its attention adds ALiBi's linear bias (one slope per
head, times the key's position) to a dense (tokens x tokens) score matrix per head, and it cannot see where
packed examples begin, so packing would let examples attend to each other (lib.plan turns packing off for
it). `install(model)` gives a bloom model the attention named "flex": PyTorch's `flex_attention` with
ALiBi as a score modification, slope x (key index - query index), and a block mask that keeps each query to
the earlier tokens of its own example (the examples read from the restarting `position_ids` of TRL's
padding-free rows). Per query row, slope x (key - query) differs from bloom's slope x key by a constant,
which softmax ignores: the same attention as bloom's own, example by example (tests/test_packing.py). On
CUDA the kernel is compiled (torch.compile, once a process) and never builds the score matrices; on a CPU
(where flex_attention has no backward) the same bias and mask go to SDPA as one dense matrix per head.

Batches without packing information (padded rows, generation with a cache, attention weights asked for,
attention dropout while training) keep bloom's own attention.

`install` also keeps bf16 training's residual stream in bf16 (bloom's LayerNorms return their input's dtype,
as Llama's RMSNorm does; autocast would make them fp32) and runs bloom's tanh GeLU as PyTorch's fused one.
"""

from __future__ import annotations

import functools
import warnings

FLEX = "flex"

_HOLDERS: dict[int, "_Packing"] = {}  # id(model config) -> its model's packing; dropped with the config


class _Packing:
    """What one model's patched attention layers read: the example index of every token of the batch the
    flex attention serves (batch, tokens), else None; ALiBi's slopes (one per head); the batch's mask, made
    once for all layers. `documents` stays set after the forward: gradient checkpointing recomputes the
    layers during backward, with the same batch."""

    def __init__(self, slopes):
        self.slopes = {slopes.device: slopes}
        self.documents = None
        self.masks = {}
        self.outer_position_ids = None
        self.in_forward = False  # the backbone's forward is running (its mask builder is being asked)

    def slopes_on(self, device):
        if device not in self.slopes:  # copied once, not in every layer (each copy would wait for the GPU)
            self.slopes[device] = next(iter(self.slopes.values())).to(device)
        return self.slopes[device]


def suits(model) -> bool:
    """Whether `install` can give this model the flex attention: bloom (its ALiBi attention)."""
    return getattr(model.config, "model_type", None) == "bloom"


def install(model) -> int:
    """Patch a bloom model's attention layers; returns how many (0 when it already has them)."""
    import weakref

    import torch
    from transformers.models.bloom import modeling_bloom

    if not suits(model):
        raise ValueError(f"the flex attention is for ALiBi models (bloom), not {model.config.model_type!r}")
    backbone = getattr(model, "transformer", model)
    if getattr(backbone, "_qlora_flex", False):
        return 0
    _patch_mask_builder(modeling_bloom)
    slopes = modeling_bloom.build_alibi_tensor(torch.ones(1, 2), model.config.n_head, torch.float32)[:, 0, 1]
    packing = _HOLDERS[id(model.config)] = _Packing(slopes)
    weakref.finalize(model.config, _HOLDERS.pop, id(model.config), None)
    if backbone is not model:  # bloom's causal LM drops position_ids before calling its backbone: kept here
        model.forward = functools.partial(_keeping_position_ids, model.forward, packing)
    backbone.register_forward_pre_hook(functools.partial(_read_packing, packing), with_kwargs=True)
    backbone.register_forward_hook(functools.partial(_forward_done, packing))
    backbone._qlora_flex = True
    patched = 0
    for module in model.modules():
        if isinstance(module, modeling_bloom.BloomAttention):
            module._bloom_forward = module.forward
            module.forward = functools.partial(_flex_forward, module, packing)
            patched += 1
        elif isinstance(module, torch.nn.LayerNorm):
            module.forward = functools.partial(_layer_norm, module, module.forward)
        elif isinstance(module, modeling_bloom.BloomGelu):
            module.forward = _gelu
    return patched


def _layer_norm(module, bloom_forward, hidden):
    """bloom's LayerNorm, in bf16 training returning bf16 (computed in fp32 inside the kernel). Under autocast
    LayerNorm returns fp32, so bloom's residual stream, every projection's output (bitsandbytes returns its
    input's dtype) and the MLP's 4 x hidden activations would be fp32: twice the bytes to move and keep. This
    is how bf16 Llama-type models keep theirs (their RMSNorm casts back to the input's dtype). fp16 and fp32
    keep bloom's own: an fp16 stream could overflow."""
    import torch

    if hidden.dtype != torch.bfloat16:
        return bloom_forward(hidden)
    weight, bias = module.weight, module.bias
    weight = weight.to(hidden.dtype) if weight is not None else None
    bias = bias.to(hidden.dtype) if bias is not None else None
    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.layer_norm(hidden, module.normalized_shape, weight, bias, module.eps)


def _gelu(hidden):
    """bloom's tanh GeLU (0.79788456 = sqrt(2 / pi) to 8 digits) as PyTorch's one fused kernel each way,
    instead of bloom's autograd function of about 9 elementwise kernels forward and 15 backward."""
    import torch

    return torch.nn.functional.gelu(hidden, approximate="tanh")


def _keeping_position_ids(forward, packing, *args, **kwargs):
    packing.outer_position_ids = kwargs.get("position_ids")
    try:
        return forward(*args, **kwargs)
    finally:
        packing.outer_position_ids = None


def _read_packing(packing, module, args, kwargs):
    """The backbone's pre-hook: decides, once for the whole forward, whether the flex attention serves it (a
    training-style batch: position_ids, its own or its causal LM's; no cache; no attention weights asked
    for; no attention dropout; bloom's exact tensor-parallel path off). Otherwise every layer runs bloom's
    own attention with bloom's own mask."""
    config = module.config
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = packing.outer_position_ids
    use_cache = kwargs.get("use_cache")
    if use_cache is None:  # bloom's own rule: the config's, off while checkpointing in training
        use_cache = config.use_cache and not (getattr(module, "gradient_checkpointing", False) and module.training)
    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        output_attentions = config.output_attentions
    serves = (position_ids is not None and kwargs.get("past_key_values") is None and not use_cache
              and not output_attentions and not (module.training and config.attention_dropout > 0)
              and not (config.pretraining_tp > 1 and config.slow_but_exact))
    packing.documents = documents(position_ids, kwargs.get("attention_mask")) if serves else None
    packing.masks = {}
    packing.in_forward = True


def _forward_done(packing, module, args, output):
    packing.in_forward = False


def documents(position_ids, attention_mask=None):
    """The example index of each token of padding-free rows (position_ids restart at 0 for each example);
    padded tokens (attention_mask 0) get -1."""
    import torch

    index = torch.cumsum((position_ids == 0).to(torch.int32), dim=-1) - 1
    if attention_mask is not None:
        index = torch.where(attention_mask.bool(), index, torch.full_like(index, -1))
    return index


def _patch_mask_builder(modeling_bloom) -> None:
    """bloom's forward builds a dense (tokens x tokens) causal mask for its own attention: skipped (None) while
    the flex attention serves the batch, which needs none."""
    original = modeling_bloom.create_causal_mask
    if getattr(original, "_qlora_flex", False):
        return

    @functools.wraps(original)
    def create_causal_mask(*args, **kwargs):
        config = kwargs.get("config", args[0] if args else None)
        packing = _HOLDERS.get(id(config))
        if packing is not None and packing.in_forward and packing.documents is not None:
            return None
        return original(*args, **kwargs)

    create_causal_mask._qlora_flex = True
    modeling_bloom.create_causal_mask = create_causal_mask


def _flex_forward(module, packing, hidden_states, residual, alibi, attention_mask, layer_past=None,
                  use_cache=False, output_attentions=False, **kwargs):
    from transformers.models.bloom.modeling_bloom import dropout_add

    if packing.documents is None:  # decided for the whole forward by _read_packing
        return module._bloom_forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                     use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch, tokens, _ = hidden_states.shape
    query, key, value = module._reshape(module.query_key_value(hidden_states))  # (batch, heads, tokens, head_dim)
    flex = query.is_cuda
    slopes = packing.slopes_on(query.device)
    mask_key = (query.device, query.dtype, flex)
    if mask_key not in packing.masks:  # one mask for every layer of the batch
        packing.masks[mask_key] = example_mask(packing.documents.to(query.device), slopes, query.dtype, flex)
    context = attend(query, key, value, packing.masks[mask_key], slopes, module.inv_norm_factor, flex)
    context = context.transpose(1, 2).reshape(batch, tokens, module.num_heads * module.head_dim)
    output = dropout_add(module.dense(context), residual, module.hidden_dropout, module.training)
    return output, None


def example_mask(documents, slopes, dtype, flex: bool):
    """What `attend` needs besides the tensors: for flex_attention a block mask (causal, same example;
    padding, index -1, attends to nothing); for SDPA one dense (batch, heads, tokens, tokens) matrix holding
    ALiBi's bias where attending is allowed and -inf elsewhere (padding attends to itself only)."""
    import torch

    if flex:
        return document_block_mask(documents)
    tokens = documents.shape[1]
    position = torch.arange(tokens, device=documents.device)
    allowed = ((documents[:, :, None] == documents[:, None, :]) & (position[:, None] >= position[None, :])
               | torch.eye(tokens, dtype=torch.bool, device=documents.device))
    bias = slopes[:, None, None] * (position[None, :] - position[:, None])  # (heads, query, key)
    return bias[None].to(dtype).masked_fill(~allowed[:, None], float("-inf"))


MASK_BLOCK = 128  # flex_attention's block size (tokens) in both directions


def document_block_mask(documents):
    """flex_attention's BlockMask for causal attention within each example, built from the example index of
    every token (`documents`, -1 for padding) with a few small tensor operations on MASK_BLOCK-token blocks:
    a block pair is skipped when their examples cannot meet (or the key block comes later), visited whole
    when both blocks hold one and the same example and the key block comes earlier, else visited with the
    token-level rule. torch's create_block_mask evaluates that rule for every (query, key) pair instead: with
    it (compiled), bloom-1b1 training on 16,384-token rows was still building the first mask after 220 s on an
    H200 (2026-11-30); with this one the first step took 35 s (compiling), then 29,182 tokens/s in bf16 (run U)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention.flex_attention import BlockMask

    batch, tokens = documents.shape
    blocks = -(-tokens // MASK_BLOCK)
    padded = F.pad(documents, (0, blocks * MASK_BLOCK - tokens), value=-1)

    def same_example_causal(b, h, q_idx, kv_idx):
        return (padded[b, q_idx] == padded[b, kv_idx]) & (padded[b, q_idx] >= 0) & (q_idx >= kv_idx)

    grouped = padded.view(batch, blocks, MASK_BLOCK)
    real = grouped >= 0
    big = torch.iinfo(grouped.dtype).max
    low = torch.where(real, grouped, big).amin(-1)      # first and last example of each block (padding left out)
    high = torch.where(real, grouped, -1).amax(-1)
    single = real.all(-1) & (low == high)                # one example, no padding
    index = torch.arange(blocks, device=documents.device)
    earlier_or_same = index[:, None] >= index[None, :]   # (query block, key block)
    meet = (low[:, :, None] <= high[:, None, :]) & (low[:, None, :] <= high[:, :, None]) & earlier_or_same
    whole = (meet & (index[:, None] > index[None, :]) & single[:, :, None] & single[:, None, :]
             & (low[:, :, None] == low[:, None, :]))
    partial = meet & ~whole

    def listed(chosen):  # counts and key-block indices (chosen ones first) per query block, one head for all
        order = torch.argsort(chosen.to(torch.int8), dim=-1, descending=True, stable=True)
        return chosen.sum(-1).to(torch.int32)[:, None], order.to(torch.int32)[:, None]

    counts, indices = listed(partial)
    full_counts, full_indices = listed(whole)
    return BlockMask.from_kv_blocks(counts, indices, full_counts, full_indices, BLOCK_SIZE=MASK_BLOCK,
                                    mask_mod=same_example_causal, seq_lengths=(tokens, tokens))


def attend(query, key, value, mask, slopes, scale: float, flex: bool):
    """Causal attention within each example with ALiBi's bias, for (batch, heads, tokens, head_dim) tensors
    and `example_mask`'s mask: flex_attention (on CUDA), else SDPA with the dense bias (flex_attention has
    no backward on a CPU)."""
    import torch

    if not flex:
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)
    kernel = _kernel(query.is_cuda)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx).to(score.dtype)

    # in fp16 training bloom's projections come out in fp32 (its residual stream is fp32 there: autocast's
    # LayerNorm; `_layer_norm` keeps bf16's bf16); under autocast its own attention multiplies in the autocast
    # dtype, and so does this. flex_attention in fp32 took 154 ms a call against
    # 3.1 ms in bf16 for 16,384 tokens (H200, 2026-11-30; docs/BENCHMARKS.md, run U)
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    with torch.autocast(device, enabled=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")  # CPU: known
        out = kernel(query.to(dtype), key.to(dtype), value.to(dtype), score_mod=alibi, block_mask=mask, scale=scale)
    return out.to(query.dtype)


@functools.cache
def _kernel(cuda: bool):
    """flex_attention: compiled on CUDA (fused kernel, no score matrices), PyTorch's reference elsewhere."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if cuda else flex_attention
