"""Under FSDP, the input embedding and the output head are not gathered during training: each process uses its rows.

A Llama-3.1-8B shape has two 128,256 x 4,096 vocabulary matrices (0.98 GiB each in bf16). Under accelerate's
FSDP2 each is a unit that is gathered whole when it computes: the embedding at the start of forward, and the
head from the loss until its backward (TRL's fused LM head reads `lm_head.weight` and gathers it with
`full_tensor()`, and accelerate keeps that unit unsharded after forward). On two GPUs that gathered head alone
was 0.98 of the 4.81 GiB a GPU held (docs/BENCHMARKS.md, run N): more than the half of the model sharding saves.

`install(model, accelerator)` makes both their own FSDP units (so accelerate leaves them out of its own) whose
forward is never called, and adds `sharded_vocab=True` to the model's forward, which the trainer passes instead
of TRL's `fused_lm_head=True`:

- embedding: the processes exchange their token ids (a few KiB), each looks up the rows it owns for every
  process's tokens (zeros for the others), and one reduce-scatter gives each process its own tokens'
  embeddings: exact (each sum has one non-zero term), about (N + 1) x tokens x hidden values in flight for N
  processes. A token id outside the vocabulary is refused, as nn.Embedding would.
- head: the per-token log-probabilities, entropy and top-1 hit (TRL's fused head's outputs) are computed from
  the process's rows of the head, gathered a slice at a time (SLICE_ROWS rows, every process's share), with
  a running log-sum-exp over the slices; backward gathers the slices again for the hidden states' gradient.
  A slice is SLICE_ROWS rows whatever the number of processes (each gives SLICE_ROWS / N of its own).
  Nothing but the hidden states and one log-sum-exp per token is kept between forward and backward.
  Top-1 is TRL's: the label is the first of the most likely tokens.

While FSDP shards the two matrices (once, before training) each is moved to the GPU whole and cut there, as
accelerate does every decoder layer: one matrix at a time.

Both are frozen in QLoRA: no weight gradient is made (a trainable embedding or head is not served). Served:
FSDP2 through accelerate, 4-bit weights (QLoRA; accelerate's loading of 16-bit models re-reads whole state
dicts, left as it is), the model types of SERVED_MODEL_TYPES (their decoders treat embeddings passed in as
looked-up ids: some others scale or re-read the ids only when given ids), an untied plain `nn.Embedding` and
bias-free head, no logit scaling or soft-capping, and the trainer's plain loss (lib/trainer.py).
Anything else keeps TRL's path. Generation and other calls without `sharded_vocab=True` run the model's own
forward, where FSDP gathers both units as usual. tests/test_sharded_vocab.py compares log-probabilities,
entropy and gradients with an unsharded model over two processes.
"""

from __future__ import annotations

import functools
import types

import torch

SLICE_ROWS = 16384   # head rows gathered at a time, every process's share together: x 4,096 bf16 = 128 MiB
TOKEN_TILE = 4096    # tokens scored at a time: a tile of 4,096 x 16,384 fp32 logits is 256 MiB
SERVED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")  # embeddings passed in = ids looked up
SCALING_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                      "logits_scaling")  # config fields that change the logits (TRL's fused head reads them)


def install(model, accelerator) -> bool:
    """Shard the embedding and the head of `model` (a PEFT model or a transformers one) as their own FSDP units
    and add `sharded_vocab=True` to its forward, when served (module docstring); returns whether it did.
    Call it before accelerate prepares the model."""
    if not getattr(accelerator, "is_fsdp2", False) or getattr(accelerator, "torch_device_mesh", None) is not None:
        return False  # not FSDP2, or accelerate's parallelism config made a device mesh (other groups, not ours)
    if not any(type(parameter).__name__ == "Params4bit" for parameter in model.parameters()):
        return False
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not servable(inner):
        return False
    shard_vocabulary(inner)
    return True


def servable(model) -> bool:
    """Whether `model` (a transformers causal LM) has what the sharded embedding and head compute exactly, both
    frozen and not sharded yet."""
    from torch.distributed.fsdp import FSDPModule

    if not suits(model):
        return False
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed.weight.requires_grad or head.weight.requires_grad:
        return False  # trained
    return not isinstance(embed, FSDPModule) and not isinstance(head, FSDPModule)


def suits(model) -> bool:
    """The model's shapes allow it (lib.memory reads this from a meta-device copy): a served model type, an
    untied plain embedding, a bias-free linear head, logits neither scaled nor soft-capped."""
    text_config = model.config.get_text_config()
    if getattr(text_config, "model_type", None) not in SERVED_MODEL_TYPES:
        return False
    try:
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    except NotImplementedError:  # a model without the accessors
        return False
    if type(embed) is not torch.nn.Embedding or not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return False
    if embed.weight is head.weight or embed.max_norm is not None:
        return False  # tied
    return all(getattr(text_config, name, None) in (None, 1.0) for name in SCALING_ATTRIBUTES)


def shard_vocabulary(model) -> None:
    """Make the embedding and the head of `model` FSDP units of their own, and wrap its forward."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.get_input_embeddings(), reshard_after_forward=True)
    fully_shard(model.get_output_embeddings(), reshard_after_forward=True)
    model._forward_before_sharded_vocab = model.forward

    @functools.wraps(type(model).forward)  # the signature transformers reads (columns kept, generate's checks)
    def forward(self, *args, **kwargs):
        return _forward(self, *args, **kwargs)

    model.forward = types.MethodType(forward, model)


def _forward(self, *args, sharded_vocab=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
    if not sharded_vocab:
        for name, value in (("labels", labels), ("shift_labels", shift_labels),
                            ("num_items_in_batch", num_items_in_batch)):
            if value is not None:
                kwargs[name] = value
        return self._forward_before_sharded_vocab(*args, **kwargs)
    from trl.trainer.utils import FusedCausalLMOutput

    if args or kwargs.pop("inputs_embeds", None) is not None:
        raise ValueError("sharded_vocab=True takes input_ids as a keyword (every process must exchange its tokens)")
    embed_weight, head_weight = self.get_input_embeddings().weight, self.get_output_embeddings().weight
    input_ids = kwargs.pop("input_ids")
    inputs_embeds = embedding(input_ids, embed_weight.to_local(), embed_weight.shape[0],
                              embed_weight.device_mesh.get_group())
    if torch.is_grad_enabled():  # what PEFT's input hook does, for reentrant checkpointing
        inputs_embeds = inputs_embeds.detach().requires_grad_(True)
    kwargs["use_cache"] = False
    hidden = getattr(self, self.base_model_prefix)(inputs_embeds=inputs_embeds, **kwargs).last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    mask = labels != -100
    log_probs, entropy, is_top1 = _HeadLogProbs.apply(hidden[mask], head_weight.to_local(), labels[mask],
                                                      head_weight.shape[0], head_weight.device_mesh.get_group())
    # masked_scatter keeps the graph connected when a process has no scored token (TRL's fused head does the same)
    log_probs, entropy, is_top1 = (value.new_zeros(mask.shape).masked_scatter(mask, value)
                                   for value in (log_probs, entropy, is_top1))
    scored = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(loss=-log_probs.sum() / scored, log_probs=log_probs, entropy=entropy,
                               is_top1=is_top1, label_mask=mask)


def rows_per_process(vocab: int, world: int) -> int:
    """Rows of a vocabulary matrix each process keeps: FSDP2 shards dimension 0 as torch.chunk does (the last
    processes may keep fewer)."""
    return -(-vocab // world)


@torch.no_grad()
def embedding(input_ids, local_rows, vocab: int, group):
    """The embeddings of this process's `input_ids`, each process holding rows [rank x S, (rank + 1) x S)."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(group), dist.get_rank(group)
    per = rows_per_process(vocab, world)
    ids = input_ids.reshape(-1)
    sizes = torch.stack([ids.new_tensor(ids.numel()), ids.max() if ids.numel() else ids.new_tensor(-1)]).long()
    every_count = sizes.new_empty(world * 2)
    dist.all_gather_into_tensor(every_count, sizes, group=group)
    longest, largest = every_count.view(world, 2).max(0).values.tolist()  # one read a pass: buffers need one size
    if largest >= vocab:
        raise ValueError(f"token id {largest} is outside the vocabulary of {vocab} (the embedding's rows)")
    padded = torch.cat([ids, ids.new_full((longest - ids.numel(),), -1)])
    every = padded.new_empty(world * longest)
    dist.all_gather_into_tensor(every, padded, group=group)
    local = every - rank * per
    mine = (every >= 0) & (local >= 0) & (local < local_rows.size(0))
    if local_rows.size(0):
        looked_up = local_rows[local.clamp(0, local_rows.size(0) - 1)] * mine.unsqueeze(1).to(local_rows.dtype)
    else:  # this process keeps no rows (a vocabulary smaller than the processes)
        looked_up = local_rows.new_zeros(world * longest, local_rows.size(1))
    own = looked_up.new_empty(longest, looked_up.size(1))
    dist.reduce_scatter_tensor(own, looked_up, group=group)
    return own[:ids.numel()].view(*input_ids.shape, local_rows.size(1))


def _slice(local_rows, start: int, rows: int, group, world: int):
    """Every process's rows [start, start + rows) of its shard, gathered: (world x rows, hidden), padded with
    zero rows where a process keeps fewer."""
    import torch.distributed as dist

    piece = local_rows[start:start + rows]
    if piece.size(0) < rows:
        piece = torch.cat([piece, piece.new_zeros(rows - piece.size(0), local_rows.size(1))])
    gathered = piece.new_empty(world * rows, local_rows.size(1))
    dist.all_gather_into_tensor(gathered, piece.contiguous(), group=group)
    return gathered


def _logit_tiles(x, local_rows, labels, vocab: int, group):
    """Walk the head a slice at a time (every process the same slices, in order: each is a collective) and the
    tokens a tile at a time; yield (token tile, the slice's rows, fp32 logits with rows past the vocabulary at
    -inf, the vocabulary id of each column, the label's column in them, whether the label is in this slice,
    the mask of rows past the vocabulary or None). The consumer drops what it holds before the next one."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    per = rows_per_process(vocab, world)
    share = max(1, SLICE_ROWS // world)  # each process's rows in a slice
    owner, offset = labels // per, labels % per
    for start in range(0, per, share):
        rows = min(share, per - start)
        weight = _slice(local_rows, start, rows, group, world)
        ids = (torch.arange(world, device=x.device).unsqueeze(1) * per + start
               + torch.arange(rows, device=x.device)).reshape(-1)
        invalid = ids >= vocab if (world - 1) * per + start + rows > vocab else None  # the last process's padding
        hit = (offset >= start) & (offset < start + rows)
        column = (owner * rows + offset - start).clamp(0, world * rows - 1)
        for t in range(0, x.size(0), TOKEN_TILE):
            tile = slice(t, t + TOKEN_TILE)
            logits = (x[tile] @ weight.T).float()
            if invalid is not None:
                logits.masked_fill_(invalid, float("-inf"))
            yield tile, weight, logits, ids, column[tile].unsqueeze(1), hit[tile], invalid
            del logits  # before the next tile's: one tile alive at a time
        del weight  # before the next slice is gathered


class _HeadLogProbs(torch.autograd.Function):
    """log p(label), entropy and top-1 hit per token, from each process's rows of the head (module docstring)."""

    @staticmethod
    def forward(ctx, hidden, local_rows, labels, vocab, group):
        x = hidden.to(local_rows.dtype)
        n = x.size(0)
        running_max = torch.full((n,), float("-inf"), device=x.device)
        running_sum = torch.zeros(n, device=x.device)      # sum of exp(logit - running_max)
        running_dot = torch.zeros(n, device=x.device)      # sum of exp(logit - running_max) * logit
        target = torch.zeros(n, device=x.device)
        best = torch.full((n,), vocab, dtype=torch.long, device=x.device)  # first vocabulary id at the max
        for tile, weight, logits, ids, column, hit, invalid in _logit_tiles(x, local_rows, labels, vocab, group):
            tile_max = logits.max(1).values
            # the smallest id among this slice's columns at its max (columns are not in vocabulary order)
            tile_best = torch.where(logits == tile_max.unsqueeze(1), ids, vocab).min(1).values
            new_max = torch.maximum(running_max[tile], tile_max)
            best[tile] = torch.where(tile_max > running_max[tile], tile_best,
                                     torch.where(tile_max == running_max[tile],
                                                 torch.minimum(best[tile], tile_best), best[tile]))
            scale = torch.exp(running_max[tile] - new_max)
            exp = torch.exp(logits - new_max.unsqueeze(1))
            products = exp * (logits if invalid is None else logits.masked_fill(invalid, 0.0))
            running_sum[tile] = running_sum[tile] * scale + exp.sum(1)
            running_dot[tile] = running_dot[tile] * scale + products.sum(1)
            running_max[tile] = new_max
            target[tile] = torch.where(hit, logits.gather(1, column).squeeze(1), target[tile])
            del weight, logits, exp, products, tile_best  # before the next tile is computed
        log_sum_exp = running_max + torch.log(running_sum)
        ctx.save_for_backward(hidden, local_rows, labels, log_sum_exp)
        ctx.vocab, ctx.group = vocab, group
        entropy, is_top1 = log_sum_exp - running_dot / running_sum, best == labels  # TRL's: the first argmax
        ctx.mark_non_differentiable(entropy, is_top1)
        return target - log_sum_exp, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, _grad_entropy, _grad_top1):
        """d log p(y) / d h = W_y - sum_v p_v W_v, scaled by the incoming gradient; the weights are frozen."""
        hidden, local_rows, labels, log_sum_exp = ctx.saved_tensors
        x = hidden.to(local_rows.dtype)
        g = grad_log_probs.float()
        grad = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for tile, weight, logits, _, column, hit, _ in _logit_tiles(x, local_rows, labels, ctx.vocab, ctx.group):
            coefficient = torch.exp(logits - log_sum_exp[tile].unsqueeze(1)).mul_(-g[tile].unsqueeze(1))
            del logits
            coefficient.scatter_add_(1, column, (g[tile] * hit).unsqueeze(1))
            grad[tile] += (coefficient.to(weight.dtype) @ weight).float()
            del weight, coefficient  # before the next tile is computed
        return grad.to(hidden.dtype), None, None, None, None
