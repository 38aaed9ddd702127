"""Where one model step's GPU time goes: the full-size preset (dummy weights), one packed prefill
step and one decode step, under torch.profiler. Prints the top kernels of each.

    python bench/profile_step.py [--prefill-seqs 8] [--prompt-len 1024] [--decode-batch 64]
                                 [--state-dtype float32|bfloat16|float16] [--no-stochastic-rounding]
                                 [--quantization fp8] [--rows 15]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from hybridserve.config import ModelConfig
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.loader import load_model


def packed_batch(lengths: list[int], cached: int, block_size: int) -> ForwardBatch:
    tables, nxt = [], 0
    for n in lengths:
        nb = -(-(n + cached) // block_size)
        tables.append(list(range(nxt, nxt + nb)))
        nxt += nb
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 131072, (n,), generator=gen).tolist() for n in lengths]
    return ForwardBatch.build(ids, [cached] * len(lengths), list(range(len(lengths))), tables, block_size, "cuda")


def profile_step(model, batch, cache, label: str, rows: int) -> None:
    for _ in range(2):
        model(batch, cache)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(batch, cache)
        torch.cuda.synchronize()
    total = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    print(f"\n=== {label}: {total:.1f} ms of GPU time ===")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill-seqs", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--state-dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--no-stochastic-rounding", action="store_true", help="a 16-bit state rounded to nearest")
    ap.add_argument("--quantization", choices=("fp8",), default=None, help="quantize the projections at load")
    ap.add_argument("--rows", type=int, default=15, help="kernels listed per step")
    args = ap.parse_args()
    cfg = ModelConfig.from_hf("nemotron-3-nano-30b-a3b")
    model = load_model(cfg, load_format="dummy", device="cuda", quantization=args.quantization)
    bs = 16
    n = max(args.prefill_seqs, args.decode_batch)
    cache = HybridCache.allocate(cfg, n, n * (-(-(args.prompt_len + 1) // bs)), bs, torch.bfloat16,
                                 getattr(torch, args.state_dtype), "cuda",
                                 rounding_seed=None if args.no_stochastic_rounding else 0)
    with torch.inference_mode():
        profile_step(model, packed_batch([args.prompt_len] * args.prefill_seqs, 0, bs), cache,
                     f"prefill {args.prefill_seqs} x {args.prompt_len} tokens", args.rows)
        profile_step(model, packed_batch([1] * args.decode_batch, args.prompt_len, bs), cache,
                     f"decode batch {args.decode_batch} (eager, SSM state {args.state_dtype})", args.rows)


if __name__ == "__main__":
    main()
