"""lib/sharded_vocab.py: the embedding and the head of a model sharded by FSDP2, never gathered whole, compute
what the whole matrices compute. Two processes over gloo on the CPU (FSDP2 runs there too)."""

import multiprocessing
import socket
from types import SimpleNamespace

import pytest
import torch

VOCAB, HIDDEN = 37, 8  # 37 rows over 2 processes: 19 and 18, so the last slice is padded


def _spawn(target, *args):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=target, args=(rank, port, results, *args)) for rank in range(2)]
    for process in processes:
        process.start()
    try:
        got = [results.get(timeout=240) for _ in processes]
        for process in processes:
            process.join(60)
            assert process.exitcode == 0
    finally:  # one process failing leaves the other waiting in a collective: never leave it behind
        for process in processes:
            if process.is_alive():
                process.kill()
    return dict(sorted(got))


def _join(rank, port):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))


def _functions(rank, port, results):
    import torch.distributed as dist

    from lib import sharded_vocab

    _join(rank, port)
    try:
        sharded_vocab.SLICE_ROWS, sharded_vocab.TOKEN_TILE = 5, 3  # several slices and token tiles
        whole = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
        local = whole.chunk(2)[rank]  # the rows FSDP2 keeps on this process
        group = dist.group.WORLD
        report = {}
        for case, tokens in (("both", 7 + 4 * rank), ("one empty", 7 * (1 - rank)), ("ties", 3)):
            generator = torch.Generator().manual_seed(10 + rank)
            ids = torch.randint(0, VOCAB, (tokens,), generator=generator)
            ids[:2] = torch.tensor([VOCAB - 1, 0])[:tokens]  # the last row (on the other process) and the first
            hidden = torch.randn(tokens, HIDDEN, generator=generator)
            if case == "ties":  # every logit 0: top-1 is the first id only (TRL's), as argmax says
                hidden.zero_()
                ids = torch.tensor([0, 3, VOCAB - 1])
            hidden.requires_grad_(True)
            weights = torch.randn(tokens, generator=generator)
            log_probs, entropy, top1 = sharded_vocab._HeadLogProbs.apply(hidden, local, ids, VOCAB, group)
            (log_probs * weights).sum().backward()
            reference_hidden = hidden.detach().clone().requires_grad_(True)
            logits = reference_hidden @ whole.T
            reference = logits.log_softmax(-1)
            picked = reference.gather(1, ids.unsqueeze(1)).squeeze(1)
            (picked * weights).sum().backward()
            embedded = sharded_vocab.embedding(ids.view(1, -1), local, VOCAB, group)
            report[case] = dict(
                tokens=tokens,
                log_probs=(log_probs - picked).abs().max().item() if tokens else 0.0,
                entropy=(entropy + (reference.exp() * reference).sum(-1)).abs().max().item() if tokens else 0.0,
                top1=bool(torch.equal(top1, logits.argmax(-1) == ids)),
                grad=(hidden.grad - reference_hidden.grad).abs().max().item() if tokens else 0.0,
                embedding=bool(torch.equal(embedded, whole[ids].view(1, tokens, HIDDEN))),
            )
        try:  # an id past the vocabulary on one process: both refuse, neither waits for the other
            sharded_vocab.embedding(torch.tensor([[VOCAB if rank == 0 else 1]]), local, VOCAB, group)
            report["refused"] = False
        except ValueError as error:
            report["refused"] = f"token id {VOCAB} is outside" in str(error)
        results.put((rank, report))
    finally:
        dist.destroy_process_group()


def test_head_and_embedding_from_shards_equal_the_whole_matrices():
    """Log-probabilities, entropy, top-1 hits and the hidden states' gradient from each process's rows, gathered
    a few rows at a time, equal the whole head's (top-1 among tied logits too); the embedding from each
    process's rows equals the whole matrix's rows. Token counts differ between the processes, and a process with
    no token still takes part; an id past the vocabulary on one process is refused on both."""
    reports = _spawn(_functions)
    for rank, report in reports.items():
        assert report["one empty"]["tokens"] == (7 if rank == 0 else 0)
        assert report.pop("refused") is True
        for case in report.values():
            assert case["log_probs"] < 1e-5 and case["entropy"] < 1e-5 and case["grad"] < 1e-5, (rank, case)
            assert case["top1"] and case["embedding"], (rank, case)


def _tiny_causal_lm(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _model(rank, port, results):
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from trl.trainer.utils import add_fused_lm_head

    from lib import sharded_vocab

    _join(rank, port)
    try:
        sharded_vocab.SLICE_ROWS = 6
        base = _tiny_causal_lm()
        add_fused_lm_head(base)  # as SFTTrainer does: the sharded forward wraps TRL's
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                init_lora_weights=False))
        generator = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, VOCAB, (1, 9 + 3 * rank), generator=generator)
        labels = ids.clone()
        labels[0, :3] = -100  # a prompt, not scored
        reference = model(input_ids=ids, labels=labels)
        reference.loss.backward()
        expected_logits = reference.logits.detach()
        expected = {name: parameter.grad.clone() for name, parameter in model.named_parameters()
                    if parameter.requires_grad}
        for grad in expected.values():  # FSDP averages the processes' gradients
            dist.all_reduce(grad)
            grad /= 2
        model.zero_grad(set_to_none=True)

        inner = model.get_base_model()
        assert sharded_vocab.servable(inner)
        sharded_vocab.shard_vocabulary(inner)
        for layer in inner.model.layers:
            fully_shard(layer)
        fully_shard(model)
        unshards = {}
        for name, module in (("embedding", inner.get_input_embeddings()), ("head", inner.get_output_embeddings()),
                             ("layer", inner.model.layers[0])):
            group = module._get_fsdp_state()._fsdp_param_group
            unshards[name] = 0

            def counted(*args, _name=name, _unshard=group.unshard, **kwargs):
                unshards[_name] += 1
                return _unshard(*args, **kwargs)

            group.unshard = counted
        from torch.distributed.tensor import DTensor

        gathered, whole = [], []  # the head slices gathered; DTensors gathered whole (TRL's head does that)
        real_slice, real_full = sharded_vocab._slice, DTensor.full_tensor
        sharded_vocab._slice = lambda *a, **k: (lambda out: (gathered.append(out.shape), out)[1])(real_slice(*a, **k))
        DTensor.full_tensor = lambda self, *a, **k: (whole.append(self.shape), real_full(self, *a, **k))[1]
        try:
            outputs = model(input_ids=ids, labels=labels, sharded_vocab=True)
            outputs.loss.backward()
        finally:
            sharded_vocab._slice, DTensor.full_tensor = real_slice, real_full
        during_training = dict(unshards, slices=len(gathered), largest_slice=max(rows for rows, _ in gathered),
                               full_tensor=len(whole))
        grads = {name: (parameter.grad.full_tensor() - expected[name]).abs().max().item()
                 for name, parameter in model.named_parameters() if parameter.requires_grad}
        with torch.no_grad():
            logits = model(input_ids=ids).logits  # without the flag: the model's own forward, FSDP gathering
        results.put((rank, dict(
            loss=abs(outputs.loss.item() - reference.loss.item()),
            scored=int(outputs.label_mask.sum()), grads=max(grads.values()), trained=len(grads),
            logits=(logits - expected_logits).abs().max().item(), unshards=during_training)))
    finally:
        dist.destroy_process_group()


def test_a_sharded_model_trains_as_the_whole_one_without_gathering_its_vocabulary():
    """A tiny Llama with LoRA under FSDP2 (each decoder layer a unit, the embedding and the head units of
    sharded_vocab): the loss with sharded_vocab=True equals the unsharded model's on each process's own rows,
    the adapter's gradients equal the average of the unsharded ones, and during that pass FSDP gathered the
    decoder layers but never the embedding or the head. Without the flag the model's own forward runs."""
    reports = _spawn(_model)
    for rank, report in reports.items():
        assert report["scored"] == 9 + 3 * rank - 1 - 2, report  # shifted by one, the prompt's 3 labels left out
        assert report["loss"] < 1e-5 and report["grads"] < 1e-5 and report["trained"] == 8, report
        assert report["logits"] < 1e-5, report
        assert report["unshards"]["embedding"] == 0 and report["unshards"]["head"] == 0, report
        assert report["unshards"]["layer"] >= 1, report
        # the head gathered 6 rows at a time (2 x 3), 7 slices forward and 7 backward; nothing whole by DTensor
        assert report["unshards"]["largest_slice"] == 6 and report["unshards"]["slices"] == 14, report
        assert report["unshards"]["full_tensor"] == 0, report


def test_served_only_for_untied_frozen_unscaled_vocabularies():
    from lib import sharded_vocab

    model = _tiny_causal_lm()
    assert not sharded_vocab.servable(model)  # both matrices train in a plain model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    assert sharded_vocab.servable(model)
    model.config.final_logit_softcapping = 30.0
    assert not sharded_vocab.servable(model)
    model.config.final_logit_softcapping = None
    model.config.model_type = "falcon_h1"  # scales embeddings only when given ids: not served
    assert not sharded_vocab.servable(model)
    tied = _tiny_causal_lm(tied=True)
    for parameter in tied.parameters():
        parameter.requires_grad_(False)
    assert not sharded_vocab.servable(tied)
    # not FSDP2, or no 4-bit weights: nothing changes
    assert not sharded_vocab.install(model, SimpleNamespace(is_fsdp2=False))
    assert not sharded_vocab.install(model, SimpleNamespace(is_fsdp2=True, torch_device_mesh=None))
    assert not hasattr(model, "_forward_before_sharded_vocab")  # its forward not wrapped


def test_the_sharded_forward_wants_token_ids_by_name():
    from lib import sharded_vocab

    with pytest.raises(ValueError, match="input_ids as a keyword"):
        sharded_vocab._forward(SimpleNamespace(), torch.zeros(1, 2, dtype=torch.long), sharded_vocab=True)
