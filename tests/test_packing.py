"""Padding-free packing: a packed row, as SFTTrainer's collator makes it, gives each example the loss it has alone.

The collator puts a batch into one row, with position_ids restarting at every example and the example
boundaries in cu_seq_lens_q. The model must not attend across those boundaries, whichever attention the
project loads it with (sdpa, eager, or varlen, whose CPU path is SDPA with a block-diagonal mask).
"""

import functools

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


def per_example_causal(q, k, v, cu_q, scale):
    """Causal SDPA example by example, key/value heads shared (GQA): what the flash varlen kernel computes."""
    pieces = [F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                             is_causal=True, scale=scale, enable_gqa=True).transpose(0, 1)
              for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist())]
    return torch.cat(pieces)


@pytest.mark.parametrize("kernel_takes_gqa", [True, False])
def test_varlen_kernel_call_matches_the_masked_reference(monkeypatch, kernel_takes_gqa):
    """The flash-kernel wrapper (causal window, layout, GQA without copies: varlen_attn's enable_gqa where it has
    one, else the kernel under it) against the dense-mask reference, with stand-in kernels on CPU."""
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 9, 3]
    q = torch.randn(sum(lengths), 4, 8, generator=generator)
    k, v = (torch.randn(sum(lengths), 2, 8, generator=generator) for _ in range(2))
    cu_seq_lens = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    calls = []

    def with_gqa(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1), enable_gqa=False):
        assert window_size == (-1, 0) and enable_gqa and k.shape[1] == 2
        calls.append("varlen_attn")
        return per_example_causal(q, k, v, cu_q, scale)

    def without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
        pytest.fail("key/value heads would have to be copied out for a varlen_attn without GQA")

    def kernel(q, k, v, cu_q, max_length, scale):
        assert k.shape[1] == 2 and max_length == 9
        calls.append("kernel")
        return per_example_causal(q, k, v, cu_q, scale)

    varlen = pytest.importorskip("torch.nn.attention.varlen")
    monkeypatch.setattr(varlen, "varlen_attn", with_gqa if kernel_takes_gqa else without_gqa)
    monkeypatch.setattr(attention, "flash_varlen_gqa", kernel)
    attention._varlen_options.cache_clear()
    try:
        got = attention.flash_varlen(q, k, v, cu_seq_lens, max(lengths), 0.3)
    finally:
        attention._varlen_options.cache_clear()
    assert calls == ["varlen_attn" if kernel_takes_gqa else "kernel"]
    torch.testing.assert_close(got, attention.masked_sdpa(q, k, v, cu_seq_lens, 0.3), rtol=1e-5, atol=1e-5)


def test_packed_row_of_equal_examples_gives_each_its_own_loss(embedded_dir):
    """Examples all of one length (fixed-length blocks) take the unmasked batch path of "varlen"."""
    generator = torch.Generator().manual_seed(2)
    examples = [torch.randint(10, 40000, (20,), generator=generator).tolist() for _ in range(3)]
    model = models.load_base_model(embedded_dir, load_in_4bit=False, attention="varlen", precision="fp32").eval()
    batch = packed_batch(examples)
    with torch.no_grad():
        packed = model(**{key: batch[key] for key in ("input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                                                      "max_length_q", "max_length_k")},
                       use_cache=False).logits[0]  # TRL's keys, as in training
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits[0] for ids in examples])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_equal_examples_go_to_one_unmasked_batch_and_match_the_masked_reference(monkeypatch):
    """The batch path (rows of one length, GQA without copies) against the dense-mask reference, and the
    dispatch: equal lengths never reach the masked or flash varlen paths."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 18, 8, generator=generator, requires_grad=True)
    k, v = (torch.randn(1, 2, 18, 8, generator=generator, requires_grad=True) for _ in range(2))
    position_ids = torch.arange(6).repeat(3)[None]
    cu_seq_lens = torch.tensor([0, 6, 12, 18], dtype=torch.int32)
    flat = [t[0].transpose(0, 1) for t in (q, k, v)]
    expected = attention.masked_sdpa(*flat, cu_seq_lens, 0.3)
    grads_expected = torch.autograd.grad(expected.square().sum(), (q, k, v))
    for path in ("masked_sdpa", "flash_varlen"):
        monkeypatch.setattr(attention, path, lambda *args, path=path: pytest.fail(f"equal lengths went to {path}"))
    got, _ = attention.varlen_attention_forward(None, q, k, v, None, scaling=0.3, position_ids=position_ids)
    assert got.shape == (1, 18, 4, 8)
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)
    for grad, want in zip(torch.autograd.grad(got.square().sum(), (q, k, v)), grads_expected):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capability, cudnn_on, first", [((9, 0), True, "CUDNN_ATTENTION"), ((9, 0), False, None),
                                                          ((10, 0), True, None), ((8, 0), True, None)])
def test_cudnn_goes_first_on_hopper_only_and_only_while_switched_on(monkeypatch, capability, cudnn_on, first):
    """cuDNN's kernel was measured faster on an H100 only; elsewhere, or where the user switched cuDNN's SDPA
    off, equal rows keep the flash varlen kernel and no context overrides the user's switches."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: cudnn_on)
    monkeypatch.setattr(torch.backends.cuda, "mem_efficient_sdp_enabled", lambda: False)  # switched off by the user
    attention._hopper.cache_clear()
    try:
        chosen = attention._cudnn_first(torch.device("cuda", 0))
    finally:
        attention._hopper.cache_clear()
    assert chosen == (first is not None)
    if chosen:
        assert [backend.name for backend in attention._sdpa_priority()] == ["CUDNN_ATTENTION", "FLASH_ATTENTION",
                                                                          "MATH"]


def call_varlen(q, k, v, dropout=0.0, **kwargs):
    return attention.varlen_attention_forward(None, q, k, v, None, dropout=dropout, scaling=0.3, **kwargs)[0]


def qkv(tokens, seed=6):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, tokens, 8, generator=generator), *(torch.randn(1, 2, tokens, 8, generator=generator)
                                                                 for _ in range(2)))


def test_ragged_examples_never_take_the_equal_length_path(monkeypatch):
    monkeypatch.setattr(attention, "equal_length_sdpa", lambda *args: pytest.fail("ragged rows went to the batch"))
    q, k, v = qkv(17)
    cu_seq_lens = torch.tensor([0, 6, 12, 17], dtype=torch.int32)
    got = call_varlen(q, k, v, cu_seq_lens_q=cu_seq_lens, max_length_q=6)  # TRL's keys, as in training
    flat = [t[0].transpose(0, 1) for t in (q, k, v)]
    torch.testing.assert_close(got[0], per_example_causal(*flat, cu_seq_lens, 0.3), rtol=1e-5, atol=1e-5)


def test_a_row_opening_inside_an_example_keeps_that_piece_apart():
    """position_ids 7, 8, 9, 0..4, 0..1: three pieces (the first continues an example begun in another row)."""
    q, k, v = qkv(10)
    got = call_varlen(q, k, v, position_ids=torch.tensor([[7, 8, 9, 0, 1, 2, 3, 4, 0, 1]]))
    flat = [t[0].transpose(0, 1) for t in (q, k, v)]
    want = per_example_causal(*flat, torch.tensor([0, 3, 8, 10]), 0.3)
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lengths, path", [((6, 6, 6), "equal_length_sdpa"), ((6, 7, 5), "masked_sdpa")])
def test_attention_dropout_keeps_packed_examples_apart(monkeypatch, lengths, path):
    """A model with attention dropout in training: the packed row still goes through a path that keeps the
    examples apart (not SDPA over the whole row), with the dropout passed on."""
    calls = []
    original = getattr(attention, path)

    def spy(*args):
        calls.append(args[-1])
        return original(*args)

    monkeypatch.setattr(attention, path, spy)
    q, k, v = qkv(sum(lengths))
    cu_seq_lens = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    torch.manual_seed(0)
    got = call_varlen(q, k, v, dropout=0.5, cu_seq_lens_q=cu_seq_lens, max_length_q=max(lengths))
    assert calls == [0.5]
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :lengths[0]] += 1.0  # change the first example: the later ones' outputs must not move
    v2[:, :, :lengths[0]] += 1.0
    torch.manual_seed(0)
    again = call_varlen(q, k2, v2, dropout=0.5, cu_seq_lens_q=cu_seq_lens, max_length_q=max(lengths))
    assert not torch.allclose(again[0, :lengths[0]], got[0, :lengths[0]])
    torch.testing.assert_close(again[0, lengths[0]:], got[0, lengths[0]:])


@pytest.mark.parametrize("argument", [{"softcap": 30.0}, {"sliding_window": 4096}, {"s_aux": torch.zeros(4)}])
def test_arguments_varlen_cannot_apply_are_refused_by_name(argument):
    q, k, v = qkv(12)
    with pytest.raises(ValueError, match=next(iter(argument))):
        call_varlen(q, k, v, position_ids=torch.arange(6).repeat(2)[None], **argument)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_equal_examples_match_the_flash_varlen_kernel():
    """bf16 on the GPU: the batch path (cuDNN first on Hopper) is as close to an fp32 reference as the flash
    varlen kernel is, forward and backward, at Llama-1B's heads (32 query, 8 key/value, 64 wide)."""
    generator = torch.Generator(device="cuda").manual_seed(4)
    tokens, length = 4096, 1024
    q = torch.randn(tokens, 32, 64, device="cuda", dtype=torch.bfloat16, generator=generator, requires_grad=True)
    k, v = (torch.randn(tokens, 8, 64, device="cuda", dtype=torch.bfloat16, generator=generator, requires_grad=True)
            for _ in range(2))
    grad_out = torch.randn(tokens, 32, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    cu_seq_lens = torch.arange(0, tokens + 1, length, device="cuda", dtype=torch.int32)

    def run(path, *inputs):
        out = path(*inputs)
        return [t.float() for t in (out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype)))]

    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference = run(lambda *t: attention.masked_sdpa(*t, cu_seq_lens, 0.125), *fp32)
    batched = run(lambda *t: attention.equal_length_sdpa(*t, tokens // length, 0.125), q, k, v)
    flash = run(lambda *t: attention.flash_varlen(*t, cu_seq_lens, length, 0.125), q, k, v)
    expanded = run(lambda q, k, v: attention.flash_varlen(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                          cu_seq_lens, length, 0.125), q, k, v)
    for name, want, got, kernel, copied in zip(("out", "dq", "dk", "dv"), reference, batched, flash, expanded):
        error, kernel_error = (got - want).abs().max().item(), (kernel - want).abs().max().item()
        copied_error = (copied - want).abs().max().item()
        print(f"{name}: batch path {error:.4f}, flash varlen {kernel_error:.4f}, heads copied {copied_error:.4f}")
        assert error <= 2 * copied_error + 1e-3 and kernel_error <= 2 * copied_error + 1e-3, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_ragged_examples_match_the_dense_reference():
    """bf16 on the GPU: packed examples of different lengths through the flash varlen kernel, key/value heads
    shared (GQA) without copies, against an fp32 dense-mask reference, forward and backward."""
    generator = torch.Generator(device="cuda").manual_seed(5)
    lengths = [700, 64, 1024, 311, 997, 1]
    cu_seq_lens = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
    tokens = sum(lengths)
    q = torch.randn(tokens, 32, 64, device="cuda", dtype=torch.bfloat16, generator=generator, requires_grad=True)
    k, v = (torch.randn(tokens, 8, 64, device="cuda", dtype=torch.bfloat16, generator=generator, requires_grad=True)
            for _ in range(2))
    grad_out = torch.randn(tokens, 32, 64, device="cuda", dtype=torch.bfloat16, generator=generator)
    fp32 = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = attention.masked_sdpa(*fp32, cu_seq_lens, 0.125)
    got = attention.flash_varlen(q, k, v, cu_seq_lens, max(lengths), 0.125)
    assert got.shape == (tokens, 32, 64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), (got, *torch.autograd.grad(got, (q, k, v), grad_out)),
                          (want, *torch.autograd.grad(want, fp32, grad_out.float()))):
        error = (a.float() - b).abs().max().item()
        print(f"{name}: {error:.4f} from fp32 (largest {b.abs().max().item():.2f})")
        assert error <= 0.02 * b.abs().max().item() + 0.02, name


@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory):
    from tools import benchmark_core

    return str(benchmark_core.build_random_model("tiny-bloom", tmp_path_factory.mktemp("tiny-bloom")))


def test_bloom_flex_keeps_packed_examples_apart_forward_and_backward(tiny_bloom, examples):
    """bloom with attention="flex" (lib/alibi.py): a packed row gives each example its loss alone, and the same
    gradients; bloom's own attention on the same row (no position_ids) would not."""
    model = models.load_base_model(tiny_bloom, load_in_4bit=False, attention="flex", precision="fp32")
    examples = [[token % 500 + 2 for token in ids] for ids in examples]  # the tiny vocabulary
    batch = packed_batch(examples)

    def loss_and_grads(run):
        model.zero_grad()
        losses = run()
        losses.sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if "query_key_value" in name}
        return losses.detach(), grads

    packed_loss, packed_grads = loss_and_grads(lambda: losses_per_example(
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0],
        batch["input_ids"][0], LENGTHS))
    alone_loss, alone_grads = loss_and_grads(lambda: torch.stack([losses_per_example(
        model(input_ids=torch.tensor([ids]), use_cache=False).logits[0], torch.tensor(ids), [len(ids)])[0]
        for ids in examples]))
    torch.testing.assert_close(packed_loss, alone_loss, rtol=1e-4, atol=1e-4)
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-3, atol=1e-5)
    with torch.no_grad():  # the control: bloom's own attention over the same row attends across examples
        crossed = losses_per_example(model(input_ids=batch["input_ids"], use_cache=False).logits[0],
                                     batch["input_ids"][0], LENGTHS)
    # (random small weights attend almost evenly, so attending across examples moves the loss only a little)
    assert (crossed - alone_loss)[1:].abs().max() > max(1e-5, 100 * (packed_loss - alone_loss).abs().max())


def test_bloom_trains_packed_with_flex(tiny_bloom, tmp_path):
    """Through the FineTuner: attention="flex" keeps packing on for bloom (auto turns it off), and trains."""
    from lib.config import ConfigError, RunConfig
    from lib.fine_tuner import FineTuner

    rows = [{"input_ids": list(range(2, 2 + length))} for length in (20, 35, 12, 40, 25, 18, 30, 22)]
    settings = dict(base_model=tiny_bloom, max_steps=3, batch_size=2, max_seq_length=64, logging_steps=1,
                    tracking="off", output_dir=str(tmp_path))
    tuner = FineTuner(RunConfig(attention="flex", run_name="flex", **settings), train_dataset=rows).setup()
    assert (tuner.plan.attention, tuner.plan.packed) == ("flex", True)
    result = tuner.train()
    losses = [entry["loss"] for entry in result.record["loss_history"]]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses)
    assert FineTuner(RunConfig(run_name="auto", **settings), train_dataset=rows).setup().plan.packed is False
    with pytest.raises(ConfigError, match="flex is for ALiBi models"):
        FineTuner(RunConfig(task="sql", attention="flex", tracking="off", output_dir=str(tmp_path))).setup()


def test_alibi_flex_kernel_matches_the_dense_reference():
    """lib.alibi.attend: the flex_attention call (score modification, example mask) against the dense SDPA
    path (what CPUs train with), on rows of several examples and a padded tail."""
    from lib import alibi

    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 24, 8, generator=generator) for _ in range(3))
    position_ids = torch.tensor([list(range(10)) + list(range(14)), list(range(6)) + list(range(18))])
    padding = torch.ones(2, 24, dtype=torch.long)
    padding[1, -3:] = 0
    documents = alibi.documents(position_ids, padding)
    assert documents[0].tolist() == [0] * 10 + [1] * 14 and documents[1, -3:].tolist() == [-1] * 3
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    dense = alibi.attend(q, k, v, alibi.example_mask(documents, slopes, q.dtype, False), slopes, 8 ** -0.5, False)
    flex = alibi.attend(q, k, v, alibi.example_mask(documents, slopes, q.dtype, True), slopes, 8 ** -0.5, True)
    kept = documents >= 0  # padded queries' outputs are never used
    torch.testing.assert_close(flex.transpose(1, 2)[kept], dense.transpose(1, 2)[kept], rtol=1e-4, atol=1e-5)


def test_alibi_flex_runs_in_the_autocast_dtype(monkeypatch):
    """bloom's projections come out in fp32: under autocast the flex kernel is given q/k/v in the autocast
    dtype (fp32 flex took 154 ms a call on an H200 against 3.1 ms in bf16) and its output comes back in the
    query's dtype; without autocast the inputs' own dtype."""
    from lib import alibi

    seen = []

    def kernel(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return q.clone()

    monkeypatch.setattr(alibi, "_kernel", lambda cuda: kernel)
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = alibi.attend(q, k, v, None, torch.ones(2), 0.5, True)
    assert seen == [(torch.bfloat16,) * 3] and out.dtype == torch.float32
    alibi.attend(q, k, v, None, torch.ones(2), 0.5, True)
    assert seen[-1] == (torch.float32,) * 3


def test_bloom_flex_leaves_other_forwards_to_bloom(tiny_bloom, examples):
    """Forwards the flex attention does not serve (a cache, attention weights asked for) are bloom's own,
    with bloom's own causal mask, even with position_ids given; installing twice patches nothing more."""
    from transformers import AutoModelForCausalLM

    from lib import alibi

    plain = AutoModelForCausalLM.from_pretrained(tiny_bloom, dtype=torch.float32).eval()
    flex = models.load_base_model(tiny_bloom, load_in_4bit=False, attention="flex", precision="fp32").eval()
    assert alibi.install(flex) == 0
    ids = torch.tensor([[token % 500 + 2 for token in examples[2]]])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        for options in ({}, {"use_cache": True}, {"output_attentions": True}):  # bloom's config: use_cache on
            got = flex(input_ids=ids, position_ids=positions, **options).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        served = flex(input_ids=ids, position_ids=positions, use_cache=False).logits  # the flex path, one example
    torch.testing.assert_close(served, expected, rtol=1e-4, atol=1e-4)


def test_document_block_mask_matches_torchs_create_block_mask():
    """lib.alibi.document_block_mask (built from per-block example ranges) visits the same blocks as torch's
    create_block_mask evaluating the token-level rule, with the same blocks visited whole; rows of many
    examples across block borders, a length that is not a multiple of the block, a padded tail; and flex
    attention with it equals the dense reference."""
    from torch.nn.attention.flex_attention import create_block_mask

    from lib import alibi

    generator = torch.Generator().manual_seed(3)
    rows = []
    for _ in range(2):
        lengths = torch.randint(1, 300, (12,), generator=generator).tolist()
        rows.append([i for length in lengths for i in range(length)][:700])
    position_ids = torch.tensor(rows)
    padding = torch.ones(2, 700, dtype=torch.long)
    padding[1, -90:] = 0
    documents = alibi.documents(position_ids, padding)
    ours = alibi.document_block_mask(documents)

    def rule(b, h, q_idx, kv_idx):
        return (documents[b, q_idx] == documents[b, kv_idx]) & (documents[b, q_idx] >= 0) & (q_idx >= kv_idx)

    reference = create_block_mask(rule, 2, None, 700, 700, device="cpu")
    assert torch.equal(ours.to_dense(), reference.to_dense())
    assert torch.equal(ours.full_kv_num_blocks, reference.full_kv_num_blocks) and ours.full_kv_num_blocks.sum() > 0
    assert ours.to_dense().sum() < ours.to_dense().numel() / 2  # blocks are skipped, not all visited

    q, k, v = (torch.randn(2, 2, 700, 8, generator=generator) for _ in range(3))
    slopes = torch.tensor([0.5, 0.125])
    dense = alibi.attend(q, k, v, alibi.example_mask(documents, slopes, q.dtype, False), slopes, 8 ** -0.5, False)
    flex = alibi.attend(q, k, v, ours, slopes, 8 ** -0.5, True)
    kept = documents >= 0
    torch.testing.assert_close(flex.transpose(1, 2)[kept], dense.transpose(1, 2)[kept], rtol=1e-4, atol=1e-5)


def test_bloom_flex_keeps_the_bf16_stream_and_bloom_s_gelu(tiny_bloom, examples):
    """lib.alibi.install: bloom's LayerNorms return bf16 for bf16 inputs (computed as fp32 LayerNorm rounded
    once; CUDA's autocast would return fp32 and make the whole residual stream fp32), leave fp32 inputs to bloom's
    own, and the fused tanh GeLU equals bloom's GeLU and its gradient."""
    from transformers.models.bloom import modeling_bloom

    from lib import alibi

    model = models.load_base_model(tiny_bloom, load_in_4bit=False, attention="flex", precision="bf16")
    norm = model.transformer.h[0].input_layernorm
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2), norm.bias.normal_(0.0, 0.2)
    hidden = torch.randn(3, 7, norm.normalized_shape[0]) * 3 + 1
    reference = torch.nn.functional.layer_norm(hidden, norm.normalized_shape, norm.weight.float(),
                                               norm.bias.float(), norm.eps)
    assert norm.forward.func is alibi._layer_norm
    bloom_calls = []
    bloom_forward = norm.forward.args[1]
    norm.forward = functools.partial(alibi._layer_norm, norm, lambda h: bloom_calls.append(h) or bloom_forward(h))
    got = norm(hidden.bfloat16())
    assert got.dtype == torch.bfloat16 and bloom_calls == []  # not bloom's own (under CUDA's autocast: fp32)
    torch.testing.assert_close(got.float(), reference, rtol=2e-2, atol=2e-2)
    fp32_norm = models.load_base_model(tiny_bloom, load_in_4bit=False, attention="flex",
                                       precision="fp32").transformer.h[0].input_layernorm
    with torch.no_grad():
        fp32_norm.weight.copy_(norm.weight), fp32_norm.bias.copy_(norm.bias)
    torch.testing.assert_close(fp32_norm(hidden), reference, rtol=0, atol=0)  # not bf16: bloom's own
    ids = torch.tensor([[token % 500 + 2 for token in examples[0][:30]]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, position_ids=torch.arange(30)[None], use_cache=False, output_hidden_states=True)
    assert {state.dtype for state in out.hidden_states} == {torch.bfloat16}
    gelu = model.transformer.h[0].mlp.gelu_impl
    assert gelu.forward is alibi._gelu
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64, requires_grad=True)
    ours, bloom = gelu(x), modeling_bloom.GeLUFunction.apply(x)
    torch.testing.assert_close(ours, bloom, rtol=0, atol=1e-8)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(bloom.sum(), x)[0],
                               rtol=0, atol=1e-8)
