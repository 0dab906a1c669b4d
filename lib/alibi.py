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
attention dropout while training) keep bloom's own forward.
"""

from __future__ import annotations

import functools
import warnings

FLEX = "flex"

_HOLDERS: dict[int, "_Packing"] = {}  # id(model config) -> the packing of the batch in flight


class _Packing:
    """What the patched attention layers of one model read: the example index of every token of the batch in
    flight (batch, tokens), or None; ALiBi's slopes (one per head)."""

    def __init__(self, slopes):
        self.slopes = slopes
        self.documents = None
        self.outer_position_ids = None


def suits(model) -> bool:
    """Whether `install` can give this model the flex attention: bloom (its ALiBi attention)."""
    return getattr(model.config, "model_type", None) == "bloom"


def install(model) -> int:
    """Patch a bloom model's attention layers; returns how many."""
    import torch
    from transformers.models.bloom import modeling_bloom

    if not suits(model):
        raise ValueError(f"the flex attention is for ALiBi models (bloom), not {model.config.model_type!r}")
    _patch_mask_builder(modeling_bloom)
    slopes = modeling_bloom.build_alibi_tensor(torch.ones(1, 2), model.config.n_head, torch.float32)[:, 0, 1]
    packing = _HOLDERS.setdefault(id(model.config), _Packing(slopes))
    backbone = getattr(model, "transformer", model)
    if not getattr(backbone, "_qlora_flex", False):
        if backbone is not model:  # bloom's causal LM drops position_ids before calling its backbone: kept here
            model.forward = functools.partial(_keeping_position_ids, model.forward, packing)
        backbone.register_forward_pre_hook(functools.partial(_read_packing, packing), with_kwargs=True)
        backbone._qlora_flex = True
    patched = 0
    for module in model.modules():
        if isinstance(module, modeling_bloom.BloomAttention) and not hasattr(module, "_bloom_forward"):
            module._bloom_forward = module.forward
            module.forward = functools.partial(_flex_forward, module, packing)
            patched += 1
    return patched


def _keeping_position_ids(forward, packing, *args, **kwargs):
    packing.outer_position_ids = kwargs.get("position_ids")
    try:
        return forward(*args, **kwargs)
    finally:
        packing.outer_position_ids = None


def _read_packing(packing, module, args, kwargs):
    """The backbone's pre-hook: the example index of each token, from position_ids (its own or its causal LM's),
    for training batches (no cache); None otherwise."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        position_ids = packing.outer_position_ids
    cached = kwargs.get("past_key_values") is not None or kwargs.get("use_cache")
    packing.documents = None if position_ids is None or cached else documents(position_ids,
                                                                              kwargs.get("attention_mask"))


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
        if packing is not None and packing.documents is not None:
            return None
        return original(*args, **kwargs)

    create_causal_mask._qlora_flex = True
    modeling_bloom.create_causal_mask = create_causal_mask


def _flex_forward(module, packing, hidden_states, residual, alibi, attention_mask, layer_past=None,
                  use_cache=False, output_attentions=False, **kwargs):
    from transformers.models.bloom.modeling_bloom import dropout_add

    dropout = module.attention_dropout.p if module.training else 0.0
    exact_tp = module.pretraining_tp > 1 and module.slow_but_exact
    if packing.documents is None or layer_past is not None or output_attentions or dropout > 0 or exact_tp:
        return module._bloom_forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                     use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch, tokens, _ = hidden_states.shape
    query, key, value = module._reshape(module.query_key_value(hidden_states))  # (batch, heads, tokens, head_dim)
    context = attend(query, key, value, packing.documents.to(query.device), packing.slopes.to(query.device),
                     module.inv_norm_factor)
    context = context.transpose(1, 2).reshape(batch, tokens, module.num_heads * module.head_dim)
    output = dropout_add(module.dense(context), residual, module.hidden_dropout, module.training)
    return output, None


def attend(query, key, value, documents, slopes, scale: float, flex: bool | None = None):
    """Causal attention within each example with ALiBi's bias; (batch, heads, tokens, head_dim) tensors,
    `documents` (batch, tokens) example indices (-1: padding), `slopes` (heads,). flex (default: on CUDA):
    flex_attention; else SDPA with the bias and the mask as one dense (tokens x tokens) matrix per head, as
    bloom's own attention builds (flex_attention has no backward on a CPU)."""
    import torch

    flex = query.is_cuda if flex is None else flex
    batch, heads, tokens, _ = query.shape
    if not flex:
        position = torch.arange(tokens, device=query.device)
        allowed = ((documents[:, :, None] == documents[:, None, :]) & (position[:, None] >= position[None, :])
                   | torch.eye(tokens, dtype=torch.bool, device=query.device))  # padding attends to itself only
        bias = slopes[:, None, None] * (position[None, :] - position[:, None])  # (heads, query, key)
        mask = bias[None].to(query.dtype).masked_fill(~allowed[:, None], float("-inf"))
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)

    kernel, make_mask = _kernels(query.is_cuda)

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx).to(score.dtype)

    def same_example_causal(b, h, q_idx, kv_idx):
        return (documents[b, q_idx] == documents[b, kv_idx]) & (documents[b, q_idx] >= 0) & (q_idx >= kv_idx)

    block_mask = make_mask(same_example_causal, batch, None, tokens, tokens, device=query.device)
    with torch.autocast(query.device.type, enabled=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile")  # CPU: known
        return kernel(query, key, value, score_mod=alibi, block_mask=block_mask, scale=scale)


@functools.cache
def _kernels(cuda: bool):
    """flex_attention and create_block_mask: compiled on CUDA (fused kernel, no score matrices), as they are
    elsewhere (PyTorch's reference implementation)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not cuda:
        return flex_attention, create_block_mask
    return torch.compile(flex_attention, dynamic=True), functools.partial(create_block_mask, _compile=True)
