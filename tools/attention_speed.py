"""Attention kernels for packed rows on one GPU: one layer's forward and forward + backward, in milliseconds.

    python3 tools/attention_speed.py                                  # Llama-1B's heads, 16 x 1024 tokens
    python3 tools/attention_speed.py --heads 9 --kv-heads 3 --out attention.json   # SmolLM2-135M's heads

Two batches of the same tokens: examples of one length (fixed-length blocks) and examples of random lengths
(as padding-free packing of real data makes them). For each, lib/attention.py's path against the
alternatives it was chosen over: the flash varlen kernel with the key/value heads copied out (what torch
2.11's `varlen_attn` needs for GQA), and for equal lengths SDPA's flash and cuDNN kernels on a batch of rows.
Every variant's output and input gradients are compared with the first variant's (max |difference|).
Needs a CUDA GPU; timings are means over --iters calls after 3 warm-up calls.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lib import attention  # noqa: E402


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=16, help="examples of one length in the equal batch")
    parser.add_argument("--length", type=int, default=1024, help="tokens per example in the equal batch")
    parser.add_argument("--heads", type=int, default=32, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=8, help="key/value heads (GQA when fewer than --heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--iters", type=int, default=20, help="timed calls per variant")
    parser.add_argument("--out", help="write the rows to this JSON file")
    return parser.parse_args(argv)


def ragged_lengths(tokens: int, longest: int, seed: int = 1) -> list[int]:
    """Random example lengths between 64 and `longest` that add up to `tokens` (the last one shorter)."""
    import random

    generator, lengths = random.Random(seed), []
    while sum(lengths) < tokens:
        lengths.append(min(tokens - sum(lengths), generator.randint(64, longest)))
    return lengths


def variants(equal: bool, groups: int) -> dict:
    """name -> f(q, k, v, cu_seq_lens, longest, scale); the first is what lib/attention.py runs (equal rows: SDPA
    with cuDNN first on Hopper, the flash varlen kernel on other GPUs; ragged rows: the flash varlen kernel)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def copied(q, k, v, cu, longest, scale):
        return attention.flash_varlen(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), cu, longest,
                                      scale)

    def batch_of_rows(backend):
        def run(q, k, v, cu, longest, scale):
            rows = [t.view(cu.numel() - 1, longest, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v)]
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(*rows, is_causal=True, scale=scale, enable_gqa=groups > 1)
            return out.transpose(1, 2).reshape(q.shape)
        return run

    def project(q, k, v, cu, longest, scale):  # the attention function transformers calls, on a packed row
        query, key, value = (t.transpose(0, 1)[None] for t in (q, k, v))
        return attention.varlen_attention_forward(None, query, key, value, None, scaling=scale, cu_seq_lens_q=cu,
                                                  max_length_q=longest)[0][0]

    if not equal:
        return {"project (lib/attention.py's dispatch)": project,
                "flash varlen, heads copied": copied}
    return {"project (lib/attention.py's dispatch)": project,
            "flash varlen, heads copied": copied,
            "flash varlen, heads shared": attention.flash_varlen,
            "SDPA flash, batch of rows": batch_of_rows(SDPBackend.FLASH_ATTENTION),
            "SDPA cuDNN, batch of rows": batch_of_rows(SDPBackend.CUDNN_ATTENTION)}


def time_variant(fn, inputs, grad_out, cu, longest, scale, iters: int):
    """(forward ms, forward + backward ms, output and input gradients of one more call)."""
    import torch

    q, k, v = (t.detach().clone().requires_grad_() for t in inputs)
    for _ in range(3):
        torch.autograd.grad(fn(q, k, v, cu, longest, scale), (q, k, v), grad_out)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for backward in (False, True):
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            out = fn(q, k, v, cu, longest, scale)
            if backward:
                torch.autograd.grad(out, (q, k, v), grad_out)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    out = fn(q, k, v, cu, longest, scale)
    return times[0], times[1], [out.detach(), *torch.autograd.grad(out, (q, k, v), grad_out)]


def measure(args) -> list[dict]:
    import torch

    tokens, groups = args.examples * args.length, args.heads // args.kv_heads
    scale = args.head_dim ** -0.5
    generator = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(tokens, heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
              for heads in (args.heads, args.kv_heads, args.kv_heads)]
    grad_out = torch.randn(tokens, args.heads, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=generator)
    rows = []
    for batch, lengths in (("equal", [args.length] * args.examples),
                           ("ragged", ragged_lengths(tokens, args.length))):
        cu = torch.tensor([0, *lengths], device="cuda").cumsum(0).to(torch.int32)
        first = None
        for name, fn in variants(batch == "equal", groups).items():
            forward, both, results = time_variant(fn, inputs, grad_out, cu, max(lengths), scale, args.iters)
            first = first or results
            difference = max((a.float() - b.float()).abs().max().item() for a, b in zip(results, first))
            rows.append({"batch": batch, "examples": len(lengths), "tokens": tokens, "variant": name,
                         "forward_ms": round(forward, 3), "forward_backward_ms": round(both, 3),
                         "max_abs_difference_to_first": difference})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("tools/attention_speed.py needs a CUDA GPU: the kernels it times exist only there", file=sys.stderr)
        return 2
    if args.heads % args.kv_heads:
        print(f"--heads ({args.heads}) must be a multiple of --kv-heads ({args.kv_heads})", file=sys.stderr)
        return 2
    rows = measure(args)
    device = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "heads": args.heads, "kv_heads": args.kv_heads,
              "head_dim": args.head_dim}
    print(f"{device['card']}, torch {device['torch']}, cuDNN {device['cudnn']}; {args.heads} query and "
          f"{args.kv_heads} key/value heads of {args.head_dim}, bf16, mean of {args.iters} calls\n")
    print("| batch | variant | forward ms | forward + backward ms | max |diff| to the first |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['examples']} {row['batch']} examples, {row['tokens']} tokens | {row['variant']} "
              f"| {row['forward_ms']:.3f} | {row['forward_backward_ms']:.3f} | {row['max_abs_difference_to_first']:.3g} |")
    if args.out:
        Path(args.out).write_text(json.dumps([{**device, **row} for row in rows], indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
