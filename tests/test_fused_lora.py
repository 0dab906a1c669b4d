"""The fused LoRA step on 4-bit layers (lib/fused_lora.py) gives PEFT's outputs and gradients, on the real
embedded model with bitsandbytes' NF4 weights, and leaves PEFT's path to everything it does not serve."""

import functools
from types import SimpleNamespace

import pytest

from lib import fused_lora, models


@pytest.fixture(scope="module")
def peft_model():
    import torch
    from peft import LoraConfig, get_peft_model

    model = models.load_base_model(models.resolve_base_model("embedded"), load_in_4bit=True, precision="fp32")
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(0)
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give it values, or its products would be trivially equal
            torch.nn.init.normal_(parameter, std=0.02)
    return peft_model


def loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_the_whole_model_gives_peft_loss_and_gradients(peft_model):
    import torch

    ids = torch.randint(2, 4000, (2, 24), generator=torch.Generator().manual_seed(1))
    peft_model.train()
    reference_loss, reference = loss_and_grads(peft_model, ids, ids)
    patched = fused_lora.install(peft_model)
    try:
        assert patched == 30 * 7  # every linear layer of the 30 decoder layers
        assert fused_lora.install(peft_model) == 0  # again: nothing more
        assert fused_lora.served(peft_model) == 0
        loss, grads = loss_and_grads(peft_model, ids, ids)
        assert fused_lora.served(peft_model) == patched  # every layer took the fused step
        assert fused_lora.mlps_served(peft_model) == 30  # gate, up and down through the MLP step
    finally:
        assert fused_lora.uninstall(peft_model) == patched
    assert fused_lora.served(peft_model) == 0
    assert reference_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    assert reference.keys() == grads.keys() and len(grads) == 2 * 210
    for name, expected in reference.items():
        assert torch.allclose(grads[name], expected, rtol=1e-3, atol=1e-6), name
    # a control: a wrong scaling would be caught
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    layer.scaling["default"] *= 2
    try:
        fused_lora.install(peft_model)
        _, wrong = loss_and_grads(peft_model, ids, ids)
    finally:
        fused_lora.uninstall(peft_model)
        layer.scaling["default"] /= 2
    name = next(n for n in reference if "layers.0.self_attn.q_proj.lora_A" in n)
    assert not torch.allclose(wrong[name], reference[name], rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("dtype,input_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                               ("bfloat16", "float32")])
def test_one_layer_with_dropout_and_bf16(peft_model, dtype, input_dtype, monkeypatch):
    """Dropout on the adapter's input (same random mask both ways), and a bf16 compute dtype under autocast
    as on a GPU, with bf16 inputs or fp32 ones (bloom's, after its LayerNorms): the fused step's output and
    gradients against PEFT's."""
    import torch

    layer = peft_model.base_model.model.model.layers[3].mlp.down_proj
    dropout = layer.lora_dropout["default"]
    layer.lora_dropout["default"] = torch.nn.Dropout(0.3)
    layer.train()
    monkeypatch.setattr(layer.get_base_layer(), "compute_dtype", getattr(torch, dtype))
    fused_calls = []
    apply = fused_lora._LoRA4bit.apply
    monkeypatch.setattr(fused_lora._LoRA4bit, "apply", lambda *args: fused_calls.append(1) or apply(*args))
    try:
        x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
        x = x.to(getattr(torch, input_dtype))
        runs = []
        for fused in (False, True):
            if fused:
                fused_lora.install(layer)
            inputs = x.clone().requires_grad_(True)
            torch.manual_seed(7)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                out = layer(inputs)
            out.float().square().sum().backward()
            runs.append((out.detach().float(), inputs.grad.float(), layer.lora_A["default"].weight.grad.clone(),
                         layer.lora_B["default"].weight.grad.clone()))
            layer.zero_grad(set_to_none=True)
            fused_lora.uninstall(layer)
    finally:
        layer.lora_dropout["default"] = dropout
    assert fused_calls == [1]
    tolerance = 1e-4 if dtype == "float32" else 1e-2  # relative to the tensor's size: summation order differs
    for expected, got in zip(runs[0], runs[1]):
        assert got.dtype == expected.dtype
        assert ((got - expected).norm() / expected.norm()).item() < tolerance


def test_peft_path_kept_where_the_fused_step_does_not_serve(peft_model, monkeypatch):
    import torch

    layer = peft_model.base_model.model.model.layers[0].self_attn.k_proj
    peft_model.train()  # in eval mode bitsandbytes repacks CPU weights for inference (the fused step then declines)
    calls = []
    fused_lora.install(layer)
    peft_forward = layer._peft_forward
    monkeypatch.setattr(layer, "_peft_forward", lambda *a, **k: calls.append(1) or peft_forward(*a, **k))
    monkeypatch.setattr(fused_lora._LoRA4bit, "apply",
                        lambda *args: calls.append("fused") or torch.zeros(3, layer.out_features))
    x = torch.randn(1, 3, layer.in_features)
    try:
        with torch.no_grad():  # generation and evaluation
            layer(x)
        assert calls == [1]
        with peft_model.disable_adapter():
            layer(x)
        assert calls == [1, 1]
        layer.merged_adapters.append("default")  # merged weights
        try:
            layer(x)
        finally:
            layer.merged_adapters.remove("default")
        assert calls == [1, 1, 1]
        layer(x)  # a training pass: the fused step
        assert calls[-1] == "fused"
        calls.clear()
        with monkeypatch.context() as patch:  # two active adapters
            patch.setattr(layer, "_active_adapter", ["default", "other"])
            layer(x)
        with monkeypatch.context() as patch:  # DoRA or another variant
            patch.setitem(layer.lora_variant, "default", SimpleNamespace(forward=lambda *a, result, **k: result))
            layer(x)
        with monkeypatch.context() as patch:  # an adapter bias
            patch.setitem(layer.lora_bias, "default", True)
            layer(x)
        handle = layer.get_base_layer().register_forward_pre_hook(lambda *args: None)  # e.g. offloading hooks
        try:
            layer(x)
        finally:
            handle.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the adapter in bf16, the 4-bit product in fp32
            layer(x)
        assert calls == [1] * 5
        layer(x)
        assert calls[-1] == "fused"
    finally:
        monkeypatch.undo()
        fused_lora.uninstall(layer)


def test_the_run_record_counts_the_layers_the_fused_step_served(monkeypatch, tmp_path):
    """fused_lora="on" on a CPU (auto leaves it off there): the FineTuner installs it, every targeted layer
    trains through it, and the run record says how many; "off" leaves PEFT's forward and records 0."""
    from lib.config import RunConfig
    from lib.fine_tuner import FineTuner

    counts = {}
    for switch in ("on", "off"):
        config = RunConfig.for_task("sql", "cpu", train_rows=8, eval_rows=1, max_steps=1, batch_size=2,
                                    max_seq_length=128, lora_dropout=0.0, target_modules="attention",
                                    fused_lora=switch, tracking="off", output_dir=str(tmp_path), run_name=switch)
        tuner = FineTuner(config).setup()
        assert tuner.plan.fused_lora == (switch == "on")
        counts[switch] = tuner.train().record["fused_lora_layers"]
    assert counts == {"on": 30 * 4, "off": 0}


def test_the_mlp_step_serves_after_the_trainer_applies_liger(monkeypatch, tmp_path):
    """The Trainer applies Liger in train(), after the FineTuner installed the steps, binding LigerSwiGLUMLP's
    forward on every MLP instance (liger_kernel's _patch_swiglu_module); the steps are installed again as
    training begins, so every MLP still trains through the MLP step, with the rebound forward as its fallback.
    (Run F34 on an H100 recorded fused_mlps 0 before this.) Liger cannot run on a CPU: a stand-in binds the
    MLPs' forward as Liger does."""
    import transformers.trainer
    from transformers.models.llama.modeling_llama import LlamaMLP

    from lib.config import RunConfig
    from lib.fine_tuner import FineTuner

    rebound = []

    def liger_like(model, config=None):
        for module in model.modules():
            if isinstance(module, LlamaMLP):
                module.__dict__["forward"] = LlamaMLP.forward.__get__(module, LlamaMLP)
                rebound.append(module)

    monkeypatch.setattr(transformers.trainer, "apply_liger_kernel", liger_like)
    config = RunConfig.for_task("sql", "cpu", train_rows=8, eval_rows=1, max_steps=1, batch_size=2, max_seq_length=128,
                                lora_dropout=0.0, target_modules="all-linear", fused_lora="on", tracking="off",
                                output_dir=str(tmp_path), run_name="liger")
    tuner = FineTuner(config).setup()
    tuner.trainer.args.use_liger_kernel = True
    record = tuner.train().record
    assert len(rebound) == 30
    assert record["fused_mlps"] == 30 and record["fused_lora_layers"] == 30 * 7
    mlp = rebound[0]
    assert mlp._own_forward and mlp._peft_forward.__func__ is LlamaMLP.forward  # the rebound forward: the fallback
    fused_lora.uninstall(tuner.trainer.model)
    assert mlp.forward.__func__ is LlamaMLP.forward


def _inner_width_saves(mlp, x):
    """The MLP's output for `x` and how many (tokens, inner width) tensors its forward keeps for backward."""
    import torch

    inner, tokens, saved = mlp.down_proj.in_features, x.shape[0] * x.shape[1], []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = mlp(x)
    return out, sum(1 for numel in saved if numel == tokens * inner)


def test_the_mlp_step_keeps_gate_and_up_but_not_their_product(peft_model):
    """The MLP step's forward keeps two inner-width tensors a token (gate's and up's outputs); the layers one
    by one keep the down projection's input besides (and PyTorch's SiLU its own); same output and gradients."""
    import torch

    peft_model.train()
    mlp = peft_model.base_model.model.model.layers[2].mlp
    assert fused_lora.mlp_suits(mlp)
    x = torch.randn(2, 20, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(3))
    runs = []
    for fused in (False, True):
        if fused:
            fused_lora.install(mlp)
        inputs = x.clone().requires_grad_(True)
        out, kept = _inner_width_saves(mlp, inputs)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in mlp.parameters() if p.requires_grad]
        runs.append((kept, out.detach(), inputs.grad, grads))
        mlp.zero_grad(set_to_none=True)
    try:
        assert fused_lora.mlps_served(mlp) == 1
    finally:
        fused_lora.uninstall(mlp)
    (plain_kept, *plain), (fused_kept, *fused) = runs
    assert (plain_kept, fused_kept) == (4, 2)  # one by one: SiLU's input, its output, up's output, down's input
    assert len(fused[2]) == 6
    for got, expected in zip([fused[0], fused[1], *fused[2]], [plain[0], plain[1], *plain[2]]):
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5  # summation order differs


def test_the_mlp_step_leaves_mlps_with_dropout_or_hooks_to_the_layers(peft_model):
    """Dropout on a projection's adapter input or a hook on a projection: the MLP runs its own forward, and
    each projection still takes the fused step one by one."""
    import torch

    peft_model.train()
    mlp = peft_model.base_model.model.model.layers[4].mlp
    x = torch.randn(1, 6, mlp.gate_proj.in_features)
    fused_lora.install(mlp)
    try:
        identity = mlp.down_proj.lora_dropout["default"]
        mlp.down_proj.lora_dropout["default"] = torch.nn.Dropout(0.1)
        try:
            mlp(x)
        finally:
            mlp.down_proj.lora_dropout["default"] = identity
        assert fused_lora.mlps_served(mlp) == 0 and fused_lora.served(mlp) == 3
        handle = mlp.up_proj.register_forward_hook(lambda *args: None)
        try:
            mlp(x)
        finally:
            handle.remove()
        assert fused_lora.mlps_served(mlp) == 0
        mlp(x)
        assert fused_lora.mlps_served(mlp) == 1
    finally:
        fused_lora.uninstall(mlp)


def test_uninstall_gives_back_an_instance_s_own_forward(peft_model):
    """An MLP whose instance carries its own forward (as Liger's patch of an already built model does) gets
    that forward back, not its class's."""
    mlp = peft_model.base_model.model.model.layers[5].mlp
    own = mlp.forward
    mlp.forward = lambda x: own(x)
    patched = mlp.forward
    try:
        fused_lora.install(mlp, liger=True)
        assert mlp._fused_liger and mlp.forward is not patched
        fused_lora.uninstall(mlp)
        assert mlp.forward is patched and not hasattr(mlp, "_fused_liger")
    finally:
        del mlp.forward
    fused_lora.install(mlp, mlps=False)  # "layers": the projections only
    try:
        assert "forward" not in mlp.__dict__ and "forward" in mlp.down_proj.__dict__
    finally:
        fused_lora.uninstall(mlp)
    assert "forward" not in mlp.down_proj.__dict__


def test_silu_product_gradients_of_the_fallback_match_autograd():
    """The PyTorch fallback of the SwiGLU backward (used where Liger's kernel is not installed) against autograd."""
    import torch

    generator = torch.Generator().manual_seed(4)
    gate, up, grad = (torch.randn(2, 64, generator=generator) for _ in range(3))
    gate, up = gate.requires_grad_(True), up.requires_grad_(True)
    (torch.nn.functional.silu(gate) * up).backward(grad)
    assert torch.equal(fused_lora._silu_mul(gate.detach(), up.detach()),
                       torch.nn.functional.silu(gate.detach()) * up.detach())
    grad_gate, grad_up = fused_lora._silu_mul_backward(gate.detach().clone(), up.detach().clone(), grad)
    assert torch.equal(grad_gate, gate.grad) and torch.equal(grad_up, up.grad)  # autograd's own kernels


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs CUDA, bitsandbytes' GPU kernels")
def test_on_a_gpu_the_mlp_step_matches_the_layers_one_by_one(tmp_path):
    """On CUDA in bf16 (Liger's SwiGLU kernels where installed) a small Llama's loss and adapter gradients with
    the MLP step against the fused layers one by one; the MLP step keeps less memory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device_map={"": 0},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.train()
    ids = torch.randint(0, 512, (4, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    fused_lora.install(model, liger=True)  # Liger's SwiGLU kernels where installed, as the GPU plan does
    runs = []
    try:
        for mlp_step in (False, True):
            for layer in model.base_model.model.model.layers:
                layer.mlp.forward = functools.partial(fused_lora._mlp_forward, layer.mlp) if mlp_step \
                    else layer.mlp._peft_forward
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
            runs.append((loss.item(), grads, torch.cuda.max_memory_allocated()))
            model.zero_grad(set_to_none=True)
        assert fused_lora.mlps_served(model) == 2
    finally:
        fused_lora.uninstall(model)
    (loss0, grads0, peak0), (loss1, grads1, peak1) = runs
    assert loss1 == pytest.approx(loss0, rel=1e-3)
    for name, expected in grads0.items():
        assert ((grads1[name] - expected).norm() / expected.norm()).item() < 2e-2, name
    assert peak1 < peak0
