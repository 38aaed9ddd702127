"""Candidate: a Triton GEMV for the dense projections at decode batch 1..4, against cuBLAS.

At batch 1 cuBLAS streams the 20-55 MB projection weights at ~68 % of the copy rate (its split-K
reduce included; docs/performance.md, "Batch-1 decode"). This sweeps a plain weight-streaming
kernel (each program reduces BLOCK_N weight rows over all of K, every x row in registers; no split-K
and no tensor cores) over launch shapes, per projection shape of Nemotron-3-Nano, checks it against
torch, and prints the best shape per (projection, M) next to cuBLAS's time and the copy-rate floor.
Not wired into the model: a shape that wins goes into ops/ with its GPU test.

Usage (GPU): python bench/gemv_sweep.py [--m 1 4] [--dtypes bf16 fp8] [--json-out F]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl

from hybridserve.ops.triton.fp8 import fp8_linear, quantize_fp8

# (name, N out, K in) of the full-size model's dense projections
SHAPES = [("in_proj", 10304, 2688), ("out_proj", 2688, 4096), ("shared_up", 3712, 2688),
          ("shared_down", 2688, 3712), ("qkv_proj", 4608, 2688), ("o_proj", 2688, 4096)]


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K, sx, sw, sy, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SCALED: tl.constexpr):
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ms = tl.arange(0, BLOCK_M)
    mmask = ms < M
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        w = tl.load(w_ptr + ns[:, None].to(tl.int64) * sw + ks[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)  # [BN, BK]
        x = tl.load(x_ptr + ms[:, None] * sx + ks[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)  # [BM, BK]
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    if SCALED:  # fp8 weights: one scale per output channel
        acc *= tl.load(scale_ptr + ns, mask=nmask, other=0.0)[None, :]
    tl.store(y_ptr + ms[:, None] * sy + ns[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, warps: int, stages: int,
         scale: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T; w bf16, or e4m3 with a float32 scale per output channel (weight-only fp8:
    the activations stay bf16)."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, w if scale is None else scale, y, m, n, k, x.stride(0), w.stride(0),
                                             y.stride(0), BLOCK_M=triton.next_power_of_2(m), BLOCK_N=block_n,
                                             BLOCK_K=block_k, SCALED=scale is not None, num_warps=warps, num_stages=stages)
    return y


def gemv_args(pair, cfg):
    """gemv's arguments after x for one (weight, scale) pair and launch config."""
    w, scale = pair
    return (w, *cfg, scale)


def timed(fn, reps: int = 200) -> float:
    """µs per call of fn, `reps` calls back to back between two CUDA events (after a warm-up): a
    20 µs kernel timed alone would mostly measure its launch; queued, the device runs them end to end."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dtypes", nargs="+", choices=["bf16", "fp8"], default=["bf16", "fp8"],
                    help="fp8: e4m3 weights, per-channel scales, against hybridserve's fp8_linear (per-token "
                         "activation quantization + torch._scaled_mm) and against cuBLAS on the bf16 weights")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    copy_rate = _copy_rate()
    rows = []
    configs = list(itertools.product((8, 16, 32), (256, 512), (4,), (2, 4)))
    print(f"copy rate {copy_rate / 1e12:.2f} TB/s")
    print(f"{'projection':>12} {'dtype':>5} {'M':>2} {'floor µs':>9} {'cuBLAS bf16':>11} {'fp8_linear':>10} "
          f"{'best µs':>8}  best launch (BN, BK, warps, stages)  rel err")
    for (name, n, k), dtype, m in itertools.product(SHAPES, args.dtypes, args.m):
        fp8 = dtype == "fp8"
        # enough weight copies that back-to-back calls stream from memory, not from the 50 MB L2
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
              for _ in range(-(-200_000_000 // ((1 if fp8 else 2) * n * k)))]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        cublas = timed(lambda x=x, turn=itertools.cycle(ws): x @ next(turn).t())
        scales, fp8_mm = [None] * len(ws), None
        if fp8:
            quantized = [quantize_fp8(w) for w in ws]
            ws, scales = [q for q, _ in quantized], [s for _, s in quantized]
            fp8_mm = timed(lambda x=x, turn=itertools.cycle(quantized): fp8_linear(x, *next(turn)))
        w, scale = ws[0], scales[0]
        ref = x.float() @ (w.float() * scale[:, None] if fp8 else w.float()).t()
        pairs = list(zip(ws, scales))
        best = None
        for cfg in configs:
            if triton.next_power_of_2(m) * cfg[0] * cfg[1] > 16384:  # the [M, BN, BK] product in registers
                continue
            y = gemv(x, w, *cfg, scale=scale)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if err > 1e-2:
                continue
            t = timed(lambda x=x, turn=itertools.cycle(pairs), cfg=cfg: gemv(x, *gemv_args(next(turn), cfg)))
            if best is None or t < best[0]:
                best = (t, cfg, err)
        floor = n * k * (1 if fp8 else 2) / copy_rate * 1e6
        row = dict(projection=name, dtype=dtype, m=m, n=n, k=k, floor_us=round(floor, 1), cublas_bf16_us=round(cublas, 1),
                   fp8_linear_us=round(fp8_mm, 1) if fp8_mm else None,
                   best_us=round(best[0], 1) if best else None, best_launch=best[1] if best else None,
                   rel_err=best[2] if best else None)
        rows.append(row)
        print(f"{name:>12} {dtype:>5} {m:>2} {floor:>9.1f} {cublas:>11.1f} {row['fp8_linear_us']!s:>10} "
              f"{row['best_us']!s:>8}  {row['best_launch']}  {row['rel_err'] if best else ''}")
    print(json.dumps(dict(copy_rate_tb_s=round(copy_rate / 1e12, 3), rows=rows)))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=1)


def _copy_rate() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    a = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    us = timed(lambda: b.copy_(a), reps=20)
    return 2 * a.nbytes / (us * 1e-6)


if __name__ == "__main__":
    main()
