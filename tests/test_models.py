"""Base model resolution (embedded, Hub id, local directory), 4-bit loading, LoRA targets, token agreement."""

import pytest

from lib import models
from lib.config import ConfigError
from lib.tasks import TASKS


@pytest.fixture(scope="module")
def embedded_dir():
    return models.resolve_base_model("embedded")


def test_embedded_model_is_a_converted_checkpoint(embedded_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded_dir)
    assert (config.model_type, config.hidden_size, config.num_hidden_layers) == ("llama", 576, 30)
    assert models.embedded_model_dir() == models.embedded_model_dir()  # cached, converted once


def test_local_directory_is_used_as_is(embedded_dir):
    assert models.resolve_base_model(embedded_dir) == embedded_dir


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="config.json"):
        models.resolve_base_model(str(tmp_path))


def test_missing_local_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="existing model directory"):
        models.resolve_base_model(str(tmp_path / "nope"))


def test_hub_id_offline_fails_at_once_naming_the_default(monkeypatch):
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        models.resolve_base_model("bigscience/bloom-1b1")
    assert time.monotonic() - started < 5
    message = str(error.value)
    assert "bigscience/bloom-1b1" in message and "cannot be reached" in message and "'embedded'" in message


def test_hub_unreachable_without_offline_flag(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens: refused at once
    assert models.hub_reachable(timeout=2) is False


def test_target_presets_and_unknown_names(embedded_dir):
    from lib.memory import read_shapes

    shapes = read_shapes(embedded_dir)
    all_linear = shapes.resolve(["all-linear"])
    assert set(all_linear) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert shapes.resolve(["attention"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    with pytest.raises(ConfigError) as error:
        shapes.resolve(["q_proj", "query_key_value"])
    assert "query_key_value" in str(error.value) and "gate_proj" in str(error.value)


def test_4bit_nf4_double_quant_loads_on_cpu(embedded_dir):
    import bitsandbytes as bnb
    import torch

    model = models.load_base_model(embedded_dir, load_in_4bit=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4" and layer.weight.quant_state.nested
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_sharded_4bit_on_a_gpu_loads_on_the_cpu_and_moves_only_quantization_states(embedded_dir, monkeypatch):
    """FSDP with 4-bit weights: a GPU process loads and quantizes on the CPU; the quantization states go to
    its GPU (here the meta device stands for it), the packed weights stay for FSDP to move shard by shard."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM

    loads, real_load = [], AutoModelForCausalLM.from_pretrained

    def recorded(*args, **kwargs):
        loads.append(kwargs["device_map"])
        if kwargs["device_map"] != {"": "cpu"}:
            raise LookupError("no GPU here")  # only the placement asked for matters
        return real_load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recorded)
    monkeypatch.setattr(models, "process_device", lambda: 1)  # this process's GPU: cuda:1
    moved = []
    monkeypatch.setattr(models, "move_quant_states", lambda model, device: moved.append(device))
    model = models.load_base_model(embedded_dir, load_in_4bit=True, precision="bf16", sharded=True)
    assert loads == [{"": "cpu"}] and moved == ["cuda:1"]
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # packed bytes stored as bf16
    with pytest.raises(LookupError):
        models.load_base_model(embedded_dir, load_in_4bit=True, precision="bf16", sharded=False)
    assert loads[-1] == {"": 1}  # unsharded: straight onto the GPU, as before

    monkeypatch.undo()
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert models.move_quant_states(model, "meta") == len(layers) == 30 * 7
    for layer in layers:
        assert layer.quant_state.absmax.device.type == "meta" and layer.weight.quant_state is layer.quant_state
        assert layer.weight.device.type == "cpu"


def test_quantization_switch_off():
    assert models.quantization_config(False) is None
    config = models.quantization_config(True)
    assert config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_inference_prompt_tokens_are_a_prefix_of_training_tokens(embedded_dir, task_name):
    """The prompt used at inference must tokenize exactly as the start of the training text."""
    task = TASKS[task_name]
    tokenizer = models.load_tokenizer(embedded_dir)
    for row in task.generate(200, seed=11):
        prompt_ids = tokenizer(task.prompt(row)).input_ids
        text_ids = tokenizer(task.text(row)).input_ids
        assert text_ids[:len(prompt_ids)] == prompt_ids, task.prompt(row)


def test_generation_batch_follows_the_key_value_cache_on_a_gpu(monkeypatch):
    """Rows generated together: 16 on a CPU; on a GPU what a fifth of the free memory holds of the cache."""
    from types import SimpleNamespace

    import torch

    from lib import evaluation

    def model_of(device, layers, kv_heads, head_dim, heads=32):
        text = SimpleNamespace(num_attention_heads=heads, head_dim=head_dim, num_key_value_heads=kv_heads,
                               num_hidden_layers=layers, hidden_size=heads * head_dim)
        return SimpleNamespace(device=torch.device(device), dtype=torch.bfloat16,
                               config=SimpleNamespace(get_text_config=lambda: text))

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (100 * 2**30, 140 * 2**30))
    assert evaluation.generation_batch_size(model_of("cpu", 30, 3, 64)) == 16
    assert evaluation.generation_batch_size(model_of("cuda", 30, 3, 64, heads=9)) == 256  # embedded: 23 MB a row
    llama_8b = evaluation.generation_batch_size(model_of("cuda", 32, 8, 128))  # 134 MB a row: 20 GiB hold 160
    assert llama_8b == int(0.2 * 100 * 2**30 // (2 * 32 * 8 * 128 * 2 * 1024)) == 160
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 140 * 2**30))
    assert evaluation.generation_batch_size(model_of("cuda", 32, 8, 128)) == 16  # never below 16


def test_generation_dequantizes_the_4bit_base_where_a_gpu_has_room(monkeypatch, embedded_dir, tmp_path):
    """lib.evaluation: on a GPU the 4-bit base is dequantized for answering when its 16-bit weights take at most a
    quarter of the free memory; never on a CPU. An Evaluator told to dequantize answers with plain Linear layers."""
    from types import SimpleNamespace

    import torch

    from lib import evaluation
    from lib.tasks import get_task

    model = models.load_base_model(embedded_dir, load_in_4bit=True)
    quantized = sum(type(module).__name__ == "Linear4bit" for module in model.modules())
    assert quantized > 0 and evaluation.dequantize_for_generation(model) is False  # a CPU
    weights = sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear4bit")
    on_gpu = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, modules=model.modules)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2 * weights, 140 * 2**30))
    assert evaluation.dequantize_for_generation(on_gpu) is True
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 2 * weights - 1, 140 * 2**30))
    assert evaluation.dequantize_for_generation(on_gpu) is False

    import bitsandbytes
    from peft import LoraConfig, get_peft_model

    layer = model.model.layers[0].self_attn.q_proj
    nf4_values = bitsandbytes.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    adapter_dir = tmp_path / "adapter"
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(adapter_dir))

    evaluator = evaluation.Evaluator(embedded_dir, load_in_4bit=True, dequantize=True)
    assert evaluator.dequantized and not any(type(m).__name__ == "Linear4bit" for m in evaluator.model.modules())
    assert torch.equal(evaluator.model.model.layers[0].self_attn.q_proj.weight, nf4_values.to(evaluator.model.dtype))
    evaluator.attach("sql", adapter_dir)  # an adapter on the dequantized base: PEFT wraps the plain layers
    task = get_task("sql")
    rows = task.generate(2, seed=3)
    answers = evaluator.answers(evaluator.prompt_format(task), rows, adapter="sql", progress=False)
    assert len(answers) == 2 and all(isinstance(answer, str) for answer in answers)
    assert evaluator.compare(task, rows, adapter="sql")["base_dequantized"] is True
