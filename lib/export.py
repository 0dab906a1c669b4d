"""Merged export: an adapter folded into a 16-bit copy of its base model, saved as a plain Hugging Face
checkpoint (config, safetensors weights, tokenizer) that transformers, vLLM, a CML Model or llama.cpp's
converter load without PEFT.

    python -m lib.export runs/sql-demo/adapter                 # -> runs/sql-demo/merged
    python -m lib.export runs/sql-demo/adapter --out merged-sql --precision fp32

The adapter was trained against the 4-bit (NF4) base, so the base is loaded as it was trained, its 4-bit
weights dequantized to 16 bits (transformers' `dequantize()`), and only then is the LoRA update added
(PEFT's `merge_and_unload`): the merged weights compute what base + adapter computed. (Merging into a
4-bit model instead would round the update away again, the known pitfall; merging into the original
16-bit weights would give a model the adapter never saw.) The folder appears complete or not at all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lib import runs
from lib.config import ConfigError, RunConfig
from lib.evaluation import trained_config
from lib.models import load_base_model, load_tokenizer, resolve_base_model
from lib.plan import resolve_precision

MERGED = "merged"
EXPORT_RECORD = "export_record.json"


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path | None = None, precision: str = "auto",
                  overwrite: bool = False) -> Path:
    """Merge the adapter in `adapter_dir` into its base model and save the result in `out_dir` (default:
    `merged/` beside the adapter); the folder written. precision: the merged weights' dtype (bf16, fp16,
    fp32; "auto": bf16 where this machine computes it natively, else fp32)."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir).expanduser()
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError("adapter", str(adapter_dir), "a folder holding a saved adapter (adapter_config.json)")
    out_dir = Path(out_dir).expanduser() if out_dir else adapter_dir.parent / MERGED
    if out_dir.exists() and not overwrite:
        raise ConfigError("out", str(out_dir), "a folder that does not exist yet (or --overwrite)")
    settings = RunConfig.from_dict(trained_config(adapter_dir) or {})
    precision = resolve_precision(precision)
    if precision == "fp16" and resolve_precision("auto") == "fp32":
        precision = "fp32"  # CPU kernels without half precision: fp32 keeps the merged model usable here
    base_path = resolve_base_model(settings.base_model)
    started = time.perf_counter()
    model = load_base_model(base_path, settings.load_in_4bit, precision=precision)
    if settings.load_in_4bit:
        model = model.dequantize()  # the NF4 weights the adapter was trained against, as 16/32-bit Linear layers
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.config.quantization_config = None  # nothing quantized is left; loaders must not expect bitsandbytes
    if hasattr(merged.config, "_pre_quantization_dtype"):
        del merged.config._pre_quantization_dtype
    staging = out_dir.with_name(f"{runs.STAGING_PREFIX}{time.time_ns()}-{out_dir.name}")
    merged.save_pretrained(staging, safe_serialization=True)
    load_tokenizer(str(adapter_dir) if (adapter_dir / "tokenizer_config.json").is_file() else base_path
                   ).save_pretrained(staging)
    runs.write_json_atomic(staging / EXPORT_RECORD, {
        "adapter": str(adapter_dir.resolve()), "base_model": settings.base_model, "base_model_path": base_path,
        "dequantized_from_4bit": settings.load_in_4bit, "precision": precision, "task": settings.task,
        "prompt_format": settings.prompt_format, "seconds": round(time.perf_counter() - started, 1)})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    runs.publish_dir(staging, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lib.export", description=__doc__.split("\n")[0])
    parser.add_argument("adapter", help="a saved adapter folder (runs/<run>/adapter)")
    parser.add_argument("--out", help="where to write the merged model (default: merged/ beside the adapter)")
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="dtype of the merged weights (auto: bf16 where native, else fp32)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    try:
        out = merge_adapter(args.adapter, args.out, args.precision, args.overwrite)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"merged model: {out}\nload it without PEFT: AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
