"""Padding-free packing: a packed row, as SFTTrainer's collator makes it, gives each example the loss it has alone.

The collator puts a batch into one row, with position_ids restarting at every example and the example
boundaries in cu_seq_lens_q. The model must not attend across those boundaries, whichever attention the
project loads it with (sdpa, eager, or varlen, whose CPU path is SDPA with a block-diagonal mask).
"""

import pytest
import torch
import torch.nn.functional as F

from lib import attention, models

LENGTHS = (37, 12, 51)


@pytest.fixture(scope="module")
def embedded_dir():
    return models.resolve_base_model("embedded")


@pytest.fixture(scope="module")
def examples():
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(10, 40000, (length,), generator=generator).tolist() for length in LENGTHS]


def packed_batch(examples):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)([{"input_ids": ids} for ids in examples])


def losses_per_example(logits, input_ids, lengths):
    """Mean next-token cross-entropy inside each example (no prediction across a boundary)."""
    losses, start = [], 0
    for length in lengths:
        piece_logits, piece_ids = logits[start:start + length - 1], input_ids[start + 1:start + length]
        losses.append(F.cross_entropy(piece_logits.float(), piece_ids))
        start += length
    return torch.stack(losses)


@pytest.mark.parametrize("attention_name", ["sdpa", "eager", "varlen"])
def test_packed_row_gives_each_example_its_own_loss(embedded_dir, examples, attention_name):
    model = models.load_base_model(embedded_dir, load_in_4bit=False, attention=attention_name, precision="fp32").eval()
    batch = packed_batch(examples)
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    assert batch["position_ids"][0].tolist() == [i for length in LENGTHS for i in range(length)]
    with torch.no_grad():
        packed = model(**{key: batch[key] for key in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                                      "max_length_q", "max_length_k")},
                       use_cache=False).logits[0]  # as in training: a cache turns packed-row detection off
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in examples]
    expected = torch.stack([losses_per_example(logits, torch.tensor(ids), [len(ids)])[0]
                            for logits, ids in zip(alone, examples)])
    got = losses_per_example(packed, batch["input_ids"][0], LENGTHS)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert model.config._attn_implementation == attention_name


def test_attending_across_examples_would_be_caught(embedded_dir, examples):
    """The control: the same row without restarting positions (plain causal attention) changes the losses."""
    model = models.load_base_model(embedded_dir, load_in_4bit=False, attention="sdpa", precision="fp32").eval()
    batch = packed_batch(examples)
    with torch.no_grad():
        crossed = model(input_ids=batch["input_ids"]).logits[0]
        alone = [model(input_ids=torch.tensor([ids])).logits[0] for ids in examples]
    expected = torch.stack([losses_per_example(logits, torch.tensor(ids), [len(ids)])[0]
                            for logits, ids in zip(alone, examples)])
    got = losses_per_example(crossed, batch["input_ids"][0], LENGTHS)
    assert not torch.allclose(got[1:], expected[1:], rtol=1e-3, atol=1e-3)


def test_varlen_kernel_call_matches_the_masked_reference():
    """The flash-kernel wrapper (GQA expansion, causal window, layout) against the dense-mask reference,
    with a stand-in kernel on CPU: per example, causal SDPA."""
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3]
    q = torch.randn(sum(lengths), 4, 8, generator=generator)
    k, v = (torch.randn(sum(lengths), 2, 8, generator=generator) for _ in range(2))
    cu_seq_lens = torch.tensor([0, 5, 14, 17], dtype=torch.int32)

    def stand_in(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
        assert window_size == (-1, 0) and q.shape[1] == k.shape[1]
        pieces = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                 v[s:e].transpose(0, 1), is_causal=True, scale=scale).transpose(0, 1)
                  for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]
        return torch.cat(pieces)

    varlen = pytest.importorskip("torch.nn.attention.varlen")
    original = varlen.varlen_attn
    attention._varlen_options.cache_clear()
    try:
        varlen.varlen_attn = stand_in
        got = attention.flash_varlen(q, k, v, cu_seq_lens, max(lengths), 0.3)
    finally:
        varlen.varlen_attn = original
        attention._varlen_options.cache_clear()
    torch.testing.assert_close(got, attention.masked_sdpa(q, k, v, cu_seq_lens, 0.3), rtol=1e-5, atol=1e-5)
