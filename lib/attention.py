"""Attention for padding-free packed batches: each example attends only to itself, at the cost of its own length.

TRL's padding-free packing puts a whole batch into one row, with `position_ids` restarting at every
example and the example boundaries in `cu_seq_lens_q`. transformers' SDPA path turns that into a dense
(tokens x tokens) block-diagonal mask, so memory and work grow with the square of the whole batch: 16
examples of 1024 tokens make a 16384^2 mask and 16 times the attention work of the examples alone.
PyTorch's variable-length flash attention (`torch.nn.attention.varlen.varlen_attn`, CUDA) reads the
boundaries instead and never computes across them.

`register()` adds this under the name "varlen" to transformers' attention functions. Batches that
are not packed (padded batches, generation) go through SDPA unchanged. A packed batch whose examples all
have one length (fixed-length blocks: the benchmark's rows, text cut into blocks) needs no boundaries: it
goes to SDPA as a batch of causal rows, where Hopper's cuDNN kernel is faster than the varlen one. A packed
batch the flash kernel cannot take (CPU, fp32) gets SDPA with the block-diagonal mask, correct but slow.
Key/value heads shared by several query heads (GQA) are never copied out.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util

VARLEN = "varlen"


def register() -> str:
    """Make "varlen" a valid `attn_implementation` for transformers models; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    return VARLEN


def flash_varlen_available() -> bool:
    """Whether this machine can run the flash kernel: CUDA and a PyTorch that has `varlen_attn`."""
    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("torch.nn.attention.varlen") is not None


def suits(model) -> bool:
    """Whether `model` can use "varlen": its attention goes through transformers' attention functions
    (bloom's ALiBi attention does not) and no layer uses a sliding window, which this kernel call ignores."""
    config = model.config.get_text_config()
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return keeps_packed_examples_apart(model) and not sliding


def keeps_packed_examples_apart(model) -> bool:
    """Whether packed examples in one row stay apart: models on transformers' attention functions read the
    restarting `position_ids` (sdpa/eager build a block-diagonal mask, varlen passes the boundaries); bloom
    and other models with their own attention would attend across examples."""
    return bool(getattr(model, "_supports_attention_backend", False))


def varlen_mask(*args, attention_mask=None, **kwargs):
    """No dense mask for padding-free batches (the kernel reads the boundaries); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


UNSUPPORTED = ("softcap", "s_aux", "sliding_window", "position_bias")  # arguments no path here applies


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, **kwargs):
    """transformers' attention-function interface; query/key/value are (batch, heads, tokens, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unsupported = [name for name in UNSUPPORTED if kwargs.get(name) is not None]
    if unsupported or not getattr(module, "is_causal", True):
        raise ValueError(f'attention="varlen" is causal attention without {", ".join(UNSUPPORTED)}; this model\'s '
                         f"attention passes {unsupported or 'is_causal=False'}: use attention=\"sdpa\" or \"eager\"")
    boundaries = packed_boundaries(query, key, attention_mask, kwargs)
    if boundaries is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cu_seq_lens, max_length = boundaries
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (tensor[0].transpose(0, 1) for tensor in (query, key, value))  # (tokens, heads, head_dim)
    examples = cu_seq_lens.numel() - 1
    equal = q.shape[0] == examples * max_length  # every example as long as the longest: fixed-length blocks
    flash = kernel_usable(q) and dropout == 0
    if equal and (not flash or _cudnn_first(q.device)):
        out = equal_length_sdpa(q, k, v, examples, scale, dropout)
    elif flash:
        out = flash_varlen(q, k, v, cu_seq_lens, max_length, scale)
    else:
        out = masked_sdpa(q, k, v, cu_seq_lens, scale, dropout)
    return out.unsqueeze(0), None  # (1, tokens, heads, head_dim), no attention weights


def packed_boundaries(query, key, attention_mask, kwargs: dict):
    """(cumulative example starts as int32, longest example) of a padding-free batch, else None."""
    import torch

    if attention_mask is not None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        return None
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    if cu_seq_lens is not None:
        return cu_seq_lens.to(device=query.device, dtype=torch.int32), int(kwargs["max_length_q"])
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return None
    starts = (position_ids[0] == 0).nonzero().flatten()
    if starts.numel() == 0 or starts[0] != 0:  # the row opens inside an example: that piece is one too
        starts = torch.cat([starts.new_zeros(1), starts])
    if starts.numel() <= 1:  # one example: plain causal attention
        return None
    cu_seq_lens = torch.cat([starts, starts.new_tensor([position_ids.shape[-1]])]).to(torch.int32)
    return cu_seq_lens, int(cu_seq_lens.diff().max())


def kernel_usable(q) -> bool:
    import torch

    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and q.shape[-1] % 8 == 0 and importlib.util.find_spec("torch.nn.attention.varlen") is not None)


@functools.cache
def _varlen_options() -> tuple[dict, bool]:
    """Keyword arguments for causal attention in this PyTorch's `varlen_attn`, and whether it takes GQA."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return causal, "enable_gqa" in params


def flash_varlen(q, k, v, cu_seq_lens, max_length: int, scale: float):
    """Causal flash attention over (tokens, heads, head_dim) tensors holding several examples back to back."""
    from torch.nn.attention.varlen import varlen_attn

    causal, takes_gqa = _varlen_options()
    if k.shape[1] == q.shape[1] or takes_gqa:
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        return varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scale, **causal, **gqa)
    return flash_varlen_gqa(q, k, v, cu_seq_lens, max_length, scale)


def flash_varlen_gqa(q, k, v, cu_seq_lens, max_length: int, scale: float):
    """The kernel under `varlen_attn`, called directly where this PyTorch's `varlen_attn` has no GQA (torch
    2.11): the kernel shares key/value heads itself. Copying them out for `varlen_attn` instead cost 1.61 ms
    against 1.43 ms a layer's forward and backward (H100, Llama-1B's 32/8 heads, 16,384 tokens of 29 examples;
    tools/attention_speed.py)."""
    import torch

    return torch.ops.aten._flash_attention_forward(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, 0.0,
                                                   True, False, scale=scale)[0]


def equal_length_sdpa(q, k, v, examples: int, scale: float, dropout: float = 0.0):
    """Causal attention over (tokens, heads, head_dim) tensors holding `examples` examples of one length back to
    back, as one batch of rows through SDPA: no mask, and key/value heads shared without copies (GQA).

    On Hopper, cuDNN's kernel goes first: on an H100 (torch 2.11, Llama-1B's 32/8 heads of 64, 16 x 1024
    tokens) forward and backward took 1.01 ms against 1.69 ms for the flash varlen kernel with the key/value
    heads copied out and 1.34 ms for SDPA's flash kernel (docs/BENCHMARKS.md, tools/attention_speed.py)."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    tokens, heads, head_dim = q.shape
    rows = (t.view(examples, tokens // examples, t.shape[1], head_dim).transpose(1, 2) for t in (q, k, v))
    priority = _sdpa_priority() if _cudnn_first(q.device) else None
    with sdpa_kernel(priority, set_priority=True) if priority else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(*rows, is_causal=True, scale=scale, dropout_p=dropout,
                                             enable_gqa=k.shape[1] != heads)
    return out.transpose(1, 2).reshape(tokens, heads, head_dim)


def _cudnn_first(device) -> bool:
    """Whether equal-length rows go to cuDNN's kernel first: on Hopper (where it was measured; on Blackwell a
    cuDNN GQA fault is reported open, pytorch#193893) and unless the user switched cuDNN's SDPA off."""
    import torch

    return _hopper(device) and torch.backends.cuda.cudnn_sdp_enabled()


@functools.cache
def _hopper(device) -> bool:
    import torch

    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def _sdpa_priority() -> list:
    """SDPA's kernels the user left on, cuDNN first: the context costs about 20 us a call (felt by a small
    model's step), so it is entered only where cuDNN goes first."""
    import torch
    from torch.nn.attention import SDPBackend

    switches = ((SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled),
                (SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled),
                (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled),
                (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled))
    return [backend for backend, enabled in switches if enabled()]


def masked_sdpa(q, k, v, cu_seq_lens, scale: float, dropout: float = 0.0):
    """The same result as `flash_varlen` through SDPA with a dense block-diagonal causal mask."""
    import torch
    import torch.nn.functional as F

    tokens = q.shape[0]
    example = torch.repeat_interleave(torch.arange(cu_seq_lens.numel() - 1, device=q.device),
                                      cu_seq_lens.diff().to(q.device).long())
    position = torch.arange(tokens, device=q.device)
    mask = (example[:, None] == example[None, :]) & (position[:, None] >= position[None, :])
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale, dropout_p=dropout)
    return out.transpose(0, 1)
