# ruff: noqa: B023  (every timed lambda runs inside the loop iteration that defines it)
"""Kernel benchmark at Nemotron-3-Nano-30B-A3B's shapes: time, GB/s, TFLOP/s and the fraction of the
card's ceilings measured in the same run (device-to-device copy bandwidth, bf16 matmul rate).

Usage (on a CUDA machine): python bench/ops.py [--quick] [--sweep] [--only SECTIONS] [--json-out PATH] [--md-out PATH]
       python bench/ops.py --moe-sweep [--write-table PATH] [--moe-dtypes fp8] [--compile-workers 8]
           (fused_moe launch shapes per token bucket, bf16 + fp8; candidates compiled in parallel first)
Prints a table, then one JSON line. Times are medians of `triton.testing.do_bench_cudagraph`
(kernel time as a decode step's CUDA graph sees it; `do_bench` where capture fails). Inputs rotate
over several copies so that repeated runs do not measure the 50 MB L2 instead of HBM.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton
import triton.testing as tt

from hybridserve.ops import reference as R
from hybridserve.ops import triton as K  # noqa: N812
from hybridserve.ops.triton import attention as KA
from hybridserve.ops.triton import fp8 as KF
from hybridserve.ops.triton import mamba_step as KMS
from hybridserve.ops.triton import moe as KM
from hybridserve.ops.triton import ssd as KS

# real model shapes (docs/model-spec.md §1.3)
HIDDEN, V = 2688, 131072
MH, MP, MN, MG, CONV_C, KW = 64, 64, 128, 8, 6144, 4
QH, KVH, HD = 32, 2, 128
E, TOPK, INTER = 128, 6, 1856
BF = torch.bfloat16
F8 = torch.float8_e4m3fn
DEV = "cuda"
L2_BYTES = 50 * 2**20
SWEEP = False  # --sweep: also time alternative launch shapes (tuning runs)


class tuned:
    """Temporarily override a kernel module's launch-shape dict (DECODE_TUNE, SSD_TUNE)."""

    def __init__(self, table: dict, **kw):
        self.table, self.kw, self.old = table, kw, dict(table)

    def __enter__(self):
        self.table.update(self.kw)

    def __exit__(self, *exc):
        self.table.clear()
        self.table.update(self.old)


def label(d: dict) -> str:
    return " ".join(f"{k[:8]}={v}" for k, v in d.items())


def timed(fn, rep_ms: int = 100) -> float:
    """Median milliseconds of fn()."""
    fn()
    torch.cuda.synchronize()
    try:
        return float(tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    except Exception:  # noqa: BLE001  (not capturable)
        return float(tt.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def copies(bytes_one: float) -> int:
    """How many input sets to rotate over so that one sweep is >= 4x the L2."""
    return max(1, min(16, math.ceil(4 * L2_BYTES / max(bytes_one, 1))))


def rotating(make, bytes_one):
    """Build n input sets (enough to defeat the L2); returns (the sets, n)."""
    n = copies(bytes_one)
    sets = [make() for _ in range(n)]
    return sets, n


class Table:
    def __init__(self, copy_gbs: float, mm_tflops: float):
        self.copy_gbs, self.mm_tflops = copy_gbs, mm_tflops
        self.rows = []

    def add(self, name, shape, ms, nbytes, flops, target=None):
        gbs = nbytes / ms / 1e6 if nbytes else 0.0
        tfl = flops / ms / 1e9 if flops else 0.0
        row = dict(kernel=name, shape=shape, ms=round(ms, 5), GBps=round(gbs, 1), TFLOPs=round(tfl, 2),
                   frac_bw=round(gbs / self.copy_gbs, 3), frac_mm=round(tfl / self.mm_tflops, 3), target=target)
        self.rows.append(row)
        print(f"{name:26s} {shape:34s} {ms * 1000:10.1f} us {gbs:8.0f} GB/s {tfl:7.1f} TF/s "
              f"{100 * row['frac_bw']:5.1f}% bw {100 * row['frac_mm']:5.1f}% mm  {target or ''}", flush=True)


def ceilings():
    n = 1 << 30  # 1 GiB
    src = torch.randn(n // 4, device=DEV)
    dst = torch.empty_like(src)
    ms = tt.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    copy_gbs = 2 * n / ms / 1e6
    a = torch.randn(8192, 8192, device=DEV, dtype=BF)
    b = torch.randn(8192, 8192, device=DEV, dtype=BF)
    ms = tt.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    mm = 2 * 8192**3 / ms / 1e9
    return copy_gbs, mm


def ssm_params():
    A_log = torch.randn(MH, device=DEV) * 0.5
    D = torch.randn(MH, device=DEV)
    dtb = torch.randn(MH, device=DEV) * 0.5 - 1
    return A_log, D, dtb


# (state dtype, stochastic rounding seed): the engine's float32 default and the 16-bit options
STATE_FORMATS = [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, 7), (torch.float16, 7)]


def state_label(sdt, seed) -> str:
    return f"state={str(sdt)[6:]}{' SR' if seed is not None else ''}"


def bench_norms(tb, quick):
    for t in (256, 4096):
        nbytes = 4 * t * HIDDEN * 2

        def make():
            return (torch.randn(t, HIDDEN, device=DEV, dtype=BF), torch.randn(t, HIDDEN, device=DEV, dtype=BF))

        sets, n = rotating(make, nbytes)
        w = torch.ones(HIDDEN, device=DEV, dtype=BF)
        ms = timed(lambda: [K.rms_norm(x, w, 1e-5, r) for x, r in sets]) / n
        tb.add("rms_norm+residual", f"T={t} hidden={HIDDEN}", ms, nbytes, 0)
    for t in (256, 4096):
        d = MH * MP
        nbytes = 3 * t * d * 2

        def make():
            return (torch.randn(t, d, device=DEV, dtype=BF), torch.randn(t, d, device=DEV, dtype=BF))

        sets, n = rotating(make, nbytes)
        w = torch.ones(d, device=DEV, dtype=BF)
        ms = timed(lambda: [K.gated_rms_norm(y, z, w, d // MG, 1e-5) for y, z in sets]) / n
        tb.add("gated_rms_norm", f"T={t} d={d} groups={MG}", ms, nbytes, 0)


def bench_conv(tb, quick):
    w = torch.randn(CONV_C, KW, device=DEV, dtype=BF)
    bias = torch.randn(CONV_C, device=DEV, dtype=BF)
    for b in (1, 64, 256) if not quick else (256,):
        nbytes = b * CONV_C * 2 * (KW + 2)  # K-1 ring rows and x read, one ring row and the output written

        def make():
            return (torch.randn(b, CONV_C, device=DEV, dtype=BF), torch.randn(b, KW, CONV_C, device=DEV, dtype=BF),
                    torch.arange(b, device=DEV), torch.randint(1, 5000, (b,), dtype=torch.int32, device=DEV))

        sets, n = rotating(make, nbytes)
        ms = timed(lambda: [K.causal_conv1d_update(x, w, bias, ln, s, sl) for x, s, sl, ln in sets]) / n
        tb.add("conv_update (alone)", f"B={b} C={CONV_C}", ms, nbytes, 0)
    for lens in ([4096], [1024] * 4):
        t = sum(lens)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
        nb = len(lens)
        x = torch.randn(t, CONV_C, device=DEV, dtype=BF)
        st = torch.randn(nb, KW, CONV_C, device=DEV, dtype=BF)
        sl = torch.arange(nb, device=DEV)
        init = torch.ones(nb, dtype=torch.bool, device=DEV)
        lens_t = torch.tensor(lens, dtype=torch.int32, device=DEV) + 100  # continuing sequences
        ms = timed(lambda: K.causal_conv1d(x, w, bias, cu, lens_t, st, sl, init))
        tb.add("causal_conv1d (prefill)", f"T={t} seqs={nb} C={CONV_C}", ms, 2 * t * CONV_C * 2, 0)


def bench_ssm(tb, quick):
    """Decode: the state update alone and the fused step per state format and batch (the state is
    read and written once per step, so time grows with B x state bytes: the step-time-vs-batch
    curve of issue 13.5). Prefill: the chunked SSD, and the one-pass kernel beside it (A/B)."""
    A_log, D, dtb = ssm_params()
    conv_w = torch.randn(CONV_C, KW, device=DEV, dtype=BF)
    conv_b = torch.randn(CONV_C, device=DEV, dtype=BF)
    for sdt, seed in STATE_FORMATS:
        for b in (1, 64, 256, 1024) if not quick else (256,):
            state_bytes = b * MH * MP * MN * sdt.itemsize
            nbytes = 2 * state_bytes + b * (MH * MP + 2 * MG * MN + MH) * 2 + b * MH * MP * 2
            conv_bytes = b * CONV_C * 2 * KW  # K-1 ring rows read, one written

            def make():
                xbc = torch.randn(b, MH * MP + 2 * MG * MN, device=DEV, dtype=BF)  # x | B | C, as split
                return (xbc, xbc[:, : MH * MP].view(b, MH, MP), xbc[:, MH * MP : MH * MP + MG * MN].view(b, MG, MN),
                        xbc[:, MH * MP + MG * MN :].view(b, MG, MN), torch.randn(b, MH, device=DEV, dtype=BF),
                        (torch.randn(b, MH, MP, MN, device=DEV) * 0.1).to(sdt), torch.arange(b, device=DEV),
                        torch.randn(b, KW, CONV_C, device=DEV, dtype=BF),
                        torch.randint(1, 5000, (b,), dtype=torch.int32, device=DEV))

            sets, n = rotating(make, nbytes + conv_bytes)
            tag = state_label(sdt, seed)
            ms_ssu = timed(lambda: [K.selective_state_update(x, dt, A_log, Bm, Cm, D, dtb, ln, s, sl, seed)
                                    for _, x, Bm, Cm, dt, s, sl, _, ln in sets]) / n
            tb.add("selective_state_update", f"B={b} {tag}", ms_ssu, nbytes, b * MH * MP * MN * 5,
                   ">=85% bw" if b >= 64 else None)
            variants = [{}] if not SWEEP else [{}, dict(state_elems=8192, num_warps=8),
                                               dict(state_elems=8192, num_warps=4), dict(state_elems=2048)]
            for v in variants:
                with tuned(KMS.STEP_TUNE, **v):
                    ms = timed(lambda: [K.mamba_decode_step(xbc, dt, conv_w, conv_b, A_log, D, dtb, ln, cs, s, sl, seed)
                                        for xbc, _, _, _, dt, s, sl, cs, ln in sets]) / n
                # the conv update's own cost inside the fused kernel: the time it adds to the state update
                extra_us = 1000 * (ms - ms_ssu)
                tb.add("mamba_decode_step (conv+SSU)", f"B={b} {tag} conv adds {extra_us:.1f} us {label(v)}",
                       ms, nbytes + conv_bytes, b * MH * MP * MN * 5,
                       ">=85% bw" if b >= 64 and not v else None)
    impls = [("chunked", K.ssd_varlen), ("one pass", KS.ssd_varlen_one_pass)]
    for lens in ([4096], [1024] * 4, [256] * 16, [8192]):
        t, nb = sum(lens), len(lens)
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)
        seq_lens = cu[1:] - cu[:-1]
        x = torch.randn(t, MH, MP, device=DEV, dtype=BF)
        dt = torch.randn(t, MH, device=DEV, dtype=BF)
        Bm = torch.randn(t, MG, MN, device=DEV, dtype=BF)
        Cm = torch.randn(t, MG, MN, device=DEV, dtype=BF)
        sl = torch.arange(nb, device=DEV)
        init = torch.ones(nb, dtype=torch.bool, device=DEV)
        for sdt, seed in (STATE_FORMATS[0], STATE_FORMATS[2]):
            st = (torch.randn(nb, MH, MP, MN, device=DEV) * 0.1).to(sdt)
            for name, fn in impls:
                variants = [{}] if not SWEEP or nb > 1 or name != "chunked" else [
                    {}, dict(CHUNK=64), dict(CHUNK=256), dict(SCAN_BLOCK_M=128, scan_warps=8),
                    dict(SCAN_BLOCK_K=32), dict(scan_stages=3), dict(BLOCK_T=16)]
                for v in variants:
                    with tuned(KS.SSD_TUNE, **v):
                        ms = timed(lambda: fn(x, dt, A_log, Bm, Cm, D, dtb, cu, seq_lens, st, sl, init, 128, seed))
                    # the model's arithmetic (chunk 128, as the reference), whatever the kernel's blocking
                    q = 128
                    flops = t * MH * (2 * q * MN + 2 * q * MP + 4 * MP * MN)
                    nbytes = t * (2 * MH * MP + 2 * MG * MN + MH) * 2 + 2 * nb * MH * MP * MN * sdt.itemsize
                    tb.add(f"ssd_varlen {name}", f"T={t} seqs={nb} {state_label(sdt, seed)} {label(v)}", ms, nbytes,
                           flops)


def moe_inputs(t):
    x = torch.randn(t, HIDDEN, device=DEV, dtype=BF)
    logits = torch.randn(t, E, device=DEV)
    w, ids = K.moe_route(logits, torch.zeros(E, device=DEV), TOPK, 2.5)
    return x, w, ids


def fp8_experts(w_up, w_down):
    """Per-expert e4m3 copies of the bf16 experts (the ModelOpt format: one scale per expert)."""
    def q(w):
        s = w.float().abs().amax(dim=(1, 2)) / KF.FP8_MAX
        return (w.float() / s[:, None, None]).clamp(-KF.FP8_MAX, KF.FP8_MAX).to(F8), s
    (uq, us), (dq, ds) = q(w_up), q(w_down)
    return uq, dq, us, ds


def moe_call(x, w, ids, experts, fp8, cfg=None):
    """fused_moe with bf16 experts, or fp8 ones with static activation scales (ModelOpt's)."""
    if not fp8:
        up, down = experts[:2]
        return (lambda: KM._fused_moe(x, up, down, w, ids, cfg)) if cfg else (lambda: K.fused_moe(x, up, down, w, ids))
    up, down, us, ds = experts[2:]
    a_up = (x.float().abs().amax() / KF.FP8_MAX).reshape(())
    a_down = torch.tensor(0.05, device=DEV)
    if cfg:
        return lambda: KM._fused_moe(x, up, down, w, ids, cfg, us, ds, a_up, a_down)
    return lambda: K.fused_moe(x, up, down, w, ids, us, ds, a_up, a_down)


def rel_err(y, gold):
    return ((y.float() - gold).norm() / gold.norm()).item()


def moe_gold(x, w, ids, experts, fp8):
    """The routed experts in float32 (reference op) from the weights the kernel reads: bf16 ones, or
    the fp8 ones dequantized with their per-expert scales; activations unquantized."""
    up, down = experts[:2]
    if fp8:
        up = experts[2].float() * experts[4][:, None, None]
        down = experts[3].float() * experts[5][:, None, None]
    return R.fused_moe(x.float(), up.float(), down.float(), w, ids)


def bench_moe(tb, quick, experts):
    for t in (256, 4096):
        logits = torch.randn(t, E, device=DEV)
        bias = torch.zeros(E, device=DEV)
        ms = timed(lambda: K.moe_route(logits, bias, TOPK, 2.5))
        tb.add("moe_route", f"T={t} E={E} k={TOPK}", ms, t * E * 4, 0)
    # decode under spread routing (random router logits: T=64 touches ~120 of 128 experts): every
    # touched expert's weights streamed once per step, issue 14.2's target
    for fp8 in (False, True):
        dt = "fp8" if fp8 else "bf16"
        expert_bytes = 2 * INTER * HIDDEN * (1 if fp8 else 2)
        for t in (1, 8, 64, 128, 256, 512, 1024) if not quick else (1, 64, 1024):
            x, w, ids = moe_inputs(t)
            touched = ids.unique().numel()
            nbytes = touched * expert_bytes + 2 * t * HIDDEN * 2
            flops = 2 * t * TOPK * 2 * HIDDEN * INTER
            ms = timed(moe_call(x, w, ids, experts, fp8))
            tb.add(f"fused_moe {dt} (decode)", f"T={t} experts touched={touched}", ms, nbytes, flops,
                   ">=90% bw" if t >= 64 else ">=70% bw")
        for t in (4096, 8192) if not quick else (4096,):
            x, w, ids = moe_inputs(t)
            flops = 2 * t * TOPK * 2 * HIDDEN * INTER
            nbytes = E * expert_bytes + 2 * t * HIDDEN * 2
            cfg = KM._config(t, fp8)
            ms = timed(moe_call(x, w, ids, experts, fp8, cfg))
            tb.add(f"fused_moe {dt} (prefill)", f"T={t} {KM.describe(cfg)}", ms, nbytes, flops,
                   ">=50% mm" if t == 4096 and not fp8 else None)
    cfg = KM._config(t)
    ms_align = timed(lambda: KM.align_by_expert(ids, E, cfg["BLOCK_M"], cfg.get("SMALL_M")))
    tb.add("moe align (sort by expert)", f"T={t}", ms_align, 0, 0)


# the model's FP8 projections (ModelOpt's FP8 release), plus attention's (bf16 there) for comparison
FP8_SHAPES = dict(in_proj=(HIDDEN, 10304), out_proj=(4096, HIDDEN), shared_up=(HIDDEN, 3712), shared_down=(3712, HIDDEN),
                  q_proj=(HIDDEN, QH * HD), kv_proj=(HIDDEN, KVH * HD), o_proj=(QH * HD, HIDDEN))


def bench_fp8(tb, quick):
    """Per model shape and token count: bf16 F.linear, then fp8_linear through torch._scaled_mm
    (static and per-token activation scales) and through the Triton FP8 GEMM with its tile of
    fp8.GEMM_TUNE (static scales). The fastest fp8 backend per row is what GEMM_TUNE's `backend`
    should say for that token bucket."""
    for name, (k, n) in FP8_SHAPES.items():
        w = torch.randn(n, k, device=DEV, dtype=BF) * k**-0.5
        ws_t = (w.float().abs().amax() / KF.FP8_MAX).reshape(())  # per tensor, as ModelOpt's
        wq_t = (w.float() / ws_t).clamp(-KF.FP8_MAX, KF.FP8_MAX).to(F8)
        for t in (1, 16, 64, 256, 1024, 4096) if not quick else (1, 256):
            x = torch.randn(t, k, device=DEV, dtype=BF)
            a_s = (x.float().abs().amax() / KF.FP8_MAX).reshape(())
            ref = torch.nn.functional.linear(x, w).float()
            flops = 2 * t * k * n
            ms_bf = timed(lambda: torch.nn.functional.linear(x, w))
            tb.add(f"linear bf16 {name}", f"T={t} {k}->{n}", ms_bf, n * k * 2 + t * (k + n) * 2, flops)
            cfg = KF.gemm_config(t)
            for backend, scale, tag in (("scaled_mm", a_s, "static"), ("scaled_mm", None, "per-token"),
                                        ("triton", a_s, "static")):
                fn = lambda: KF._fp8_linear(x, wq_t, ws_t, scale, cfg, backend)
                err = rel_err(fn(), ref)
                ms = timed(fn)
                tb.add(f"fp8_linear {backend} {name}", f"T={t} {tag} x{ms_bf / ms:.2f} vs bf16 err {err:.3f}", ms,
                       n * k + t * (k + 2 * n), flops)


def _moe_sweep_plan(dtypes) -> list[tuple[bool, int | None, tuple[int, ...], list[dict]]]:
    """(fp8, bucket, token counts, candidates) of every step of the fused_moe sweep, in order."""
    decode = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=st)
              for bm, bn, bk in ((16, 32, 256), (16, 64, 128), (16, 64, 256), (16, 128, 128), (32, 64, 128),
                                 (32, 128, 128), (64, 128, 64), (64, 128, 128), (64, 64, 128))
              for st in (3, 4)]
    plan = []
    for fp8 in [dt == "fp8" for dt in dtypes]:
        for bucket in (2, 16, 64, 128, 256, 512, 1024, None):
            ts = (4096, 8192) if bucket is None else (bucket,)
            cands = KM.PREFILL_CANDIDATES if bucket is None else decode
            if fp8:  # fp8 dots: same bytes per pipeline stage, so twice the K elements; decode also tries
                # weight-only fp8 (W8A16: e4m3 weights widened in registers, bf16 dots)
                # (3 stages only: 4 lost at every bucket the 2026-12-07 H100 sweep reached (T <= 128), and
                # half the candidates halve the sweep's time)
                if bucket is not None:
                    cands = [c for c in cands if c["num_stages"] == 3]
                cands = [dict(c, BLOCK_K=2 * c["BLOCK_K"]) for c in cands] + \
                    ([dict(c, W8A16=True) for c in cands] if bucket is not None else [])
            plan.append((fp8, bucket, ts, cands))
    return plan


def _compile_moe_candidates(jobs: list[tuple[bool, int, dict]]) -> int:
    """Worker process: run each (fp8, tokens, config) once on zero weights of the real shapes, so its
    Triton kernels land in the on-disk cache the sweep then reads. Returns how many failed to build."""
    w_up = torch.zeros(E, INTER, HIDDEN, device=DEV, dtype=BF)
    w_down = torch.zeros(E, HIDDEN, INTER, device=DEV, dtype=BF)
    ones = torch.ones(E, device=DEV)
    experts = (w_up, w_down, w_up.to(F8), w_down.to(F8), ones, ones)
    failed = 0
    for fp8, t, cfg in jobs:
        x, w, ids = moe_inputs(t)
        try:
            moe_call(x, w, ids, experts, fp8, cfg)()
        except Exception:  # noqa: BLE001  (the sweep itself reports it)
            failed += 1
    torch.cuda.synchronize()
    return failed


def precompile_moe_sweep(plan, workers: int) -> None:
    """Compile every candidate of the sweep in `workers` processes at once (compiling ~150 Triton
    configurations one after another takes minutes; the timing loop then finds them cached)."""
    import concurrent.futures
    import multiprocessing

    jobs = [(fp8, t, cfg) for fp8, _, ts, cands in plan for t in ts for cfg in cands]
    t0 = time.time()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        failed = sum(pool.map(_compile_moe_candidates, [jobs[i::workers] for i in range(workers)]))
    print(f"  compiled {len(jobs)} sweep candidates in {workers} processes in {time.time() - t0:.0f} s "
          f"({failed} failed to build)", flush=True)


def bench_moe_sweep(tb, experts, write_table: str | None, dtypes=("bf16", "fp8"), compile_workers: int = 0):
    """fused_moe launch shapes per token bucket and weight dtype: each decode candidate at each
    bucket's upper end (spread routing), KM.PREFILL_CANDIDATES at 4096 / 8192 tokens; every output
    compared with the float32 gold of the same (dequantized) weights, within the shipped config's own
    error (fp8 dots quantize the activations too, weight-only fp8 does not); the best per (bucket,
    dtype) makes the table (moe_configs.json). compile_workers > 1: compile the candidates in that
    many processes first."""
    plan = _moe_sweep_plan(dtypes)
    if compile_workers > 1:
        try:
            precompile_moe_sweep(plan, compile_workers)
        except Exception as e:  # noqa: BLE001  (the sweep then compiles each candidate as it times it)
            print(f"  parallel compile failed ({type(e).__name__}: {str(e)[:200]}); compiling one by one", flush=True)
    shipped = json.loads(KM.CONFIG_FILE.read_text())
    table = {"about": shipped["about"], "measured": shipped["measured"], **{dt: shipped[dt] for dt in ("bf16", "fp8")}}
    rows = {"bf16": [], "fp8": []}
    for fp8, bucket, ts, cands in plan:
        dt = "fp8" if fp8 else "bf16"
        expert_bytes = 2 * INTER * HIDDEN * (1 if fp8 else 2)
        total = [0.0] * len(cands)
        for t in ts:
            x, w, ids = moe_inputs(t)
            touched = ids.unique().numel()
            nbytes = touched * expert_bytes + 2 * t * HIDDEN * 2
            flops = 2 * t * TOPK * 2 * HIDDEN * INTER
            gold = moe_gold(x, w, ids, experts, fp8)
            shipped_err = rel_err(moe_call(x, w, ids, experts, fp8, KM._config(t, fp8))(), gold)
            tol = max(2e-2, 1.5 * shipped_err)
            for i, cfg in enumerate(cands):
                tag = f"T={t} {KM.describe(cfg)}" + (" (table)" if dict(cfg, max_tokens=bucket) == KM._config(t, fp8) else "")
                try:
                    fn = moe_call(x, w, ids, experts, fp8, cfg)
                    err = rel_err(fn(), gold)
                    ms = timed(fn)
                except Exception as e:  # noqa: BLE001
                    print(f"  candidate {tag} failed: {type(e).__name__}: {str(e)[:200]}")
                    total[i] = math.inf
                    continue
                if err > tol:
                    print(f"  candidate {tag} is off the float32 gold: rel err {err:.2e} > {tol:.2e}")
                    total[i] = math.inf
                    continue
                total[i] += ms
                tb.add(f"fused_moe {dt} sweep", tag, ms, nbytes, flops)
        best = min(range(len(cands)), key=total.__getitem__)
        rows[dt].append(dict(max_tokens=bucket, **cands[best]))
        print(f"  best {dt} for T <= {bucket}: {KM.describe(cands[best])}", flush=True)
        # written after every bucket (the shipped rows past it), so a sweep cut short still leaves a table
        later = [r for r in shipped[dt] if bucket is not None and (r["max_tokens"] is None or r["max_tokens"] > bucket)]
        table[dt] = rows[dt] + later
        table["measured"][dt] = f"{torch.cuda.get_device_name()}, bench/ops.py --moe-sweep, {time.strftime('%Y-%m-%d')}" + \
            (f" (T <= {bucket}; shipped rows above)" if later else "")
        if write_table:
            with open(write_table, "w") as f:
                f.write(json.dumps(table, indent=1) + "\n")
    if write_table:
        print(f"wrote {write_table}: copy it to {KM.CONFIG_FILE} to ship it")


def bench_attention(tb, quick):
    variants = [{}] if not SWEEP else [{}, dict(num_stages=3), dict(BLOCK_N=128), dict(num_stages=3, target_programs=528),
                                   dict(BLOCK_N=128, num_stages=3, num_warps=8, target_programs=528)]
    for v in variants:
        with tuned(KA.DECODE_TUNE, **v):
            bench_attention_decode(tb, quick, label(v))
    bench_attention_prefill(tb, quick)


def bench_attention_decode(tb, quick, tag):
    """bf16 and fp8 KV pages; long contexts at small batches run split-K (flash-decoding)."""
    bs = 16
    shapes = ((1, 1024), (1, 8192), (1, 32768), (4, 16384), (64, 1024), (256, 1024)) if not quick else ((64, 1024),)
    for kv_dtype in (BF, F8):
        item = 1 if kv_dtype == F8 else 2
        kv_scale = torch.tensor([0.02, 0.02], device=DEV) if kv_dtype == F8 else None
        for b, ctx in shapes:
            nblk = b * (ctx // bs + 1)
            kv_bytes = b * ctx * 2 * KVH * HD * item
            nbytes = kv_bytes + 2 * b * QH * HD * 2

            def make():
                kv = torch.randn(2, nblk, bs, KVH, HD, device=DEV, dtype=BF).to(kv_dtype)
                tables = torch.randperm(nblk, device=DEV, dtype=torch.int32)[: b * (ctx // bs + 1)].view(b, -1)
                return kv, tables

            sets, n = rotating(make, kv_bytes)
            q = torch.randn(b, QH, HD, device=DEV, dtype=BF)
            cu = torch.arange(b + 1, device=DEV, dtype=torch.int32)
            lens = torch.full((b,), ctx, device=DEV, dtype=torch.int32)
            ms = timed(lambda: [K.paged_attention(q, kv, tb_, cu, lens, HD**-0.5, kv_scale) for kv, tb_ in sets]) / n
            flops = 4 * b * QH * HD * ctx
            tb.add(f"paged_attention {'fp8' if item == 1 else 'bf16'} KV (decode)", f"B={b} ctx={ctx} {tag}", ms,
                   nbytes, flops, ">=70% bw" if (b >= 64 or ctx >= 8192) and not tag else None)


def bench_attention_prefill(tb, quick):
    bs = 16
    for new, cached in (([1024] * 4, [0] * 4), ([2048], [2048]), ([4096], [0])):
        b = len(new)
        tot = [n_ + c for n_, c in zip(new, cached)]
        per = max(tot) // bs + 1
        kv = torch.randn(2, b * per, bs, KVH, HD, device=DEV, dtype=BF)
        tables = torch.arange(b * per, device=DEV, dtype=torch.int32).view(b, per)
        t = sum(new)
        q = torch.randn(t, QH, HD, device=DEV, dtype=BF)
        cu = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32, device=DEV)
        lens = torch.tensor(tot, dtype=torch.int32, device=DEV)
        flops = sum(4 * QH * HD * n_ * (c + (n_ + 1) / 2) for n_, c in zip(new, cached))
        for kv_, kv_scale in ((kv, None), (kv.to(F8), torch.tensor([0.02, 0.02], device=DEV))):
            ms = timed(lambda: K.paged_attention(q, kv_, tables, cu, lens, HD**-0.5, kv_scale))
            tb.add(f"paged_attention {'bf16' if kv_scale is None else 'fp8'} KV (prefill)",
                   f"new={new[0]}x{b} cached={cached[0]}", ms,
                   sum(tot) * 2 * KVH * HD * kv_.element_size() + 2 * t * QH * HD * 2, flops)
    t = 256
    k = torch.randn(t, KVH, HD, device=DEV, dtype=BF)
    v = torch.randn(t, KVH, HD, device=DEV, dtype=BF)
    kv = torch.zeros(2, 1024, bs, KVH, HD, device=DEV, dtype=BF)
    sm = torch.randperm(1024 * bs, device=DEV)[:t]
    ms = timed(lambda: K.store_kv(k, v, kv, sm))
    tb.add("store_kv", f"T={t}", ms, 4 * t * KVH * HD * 2, 0)
    kv8, scale = kv.to(F8), torch.tensor([0.02, 0.02], device=DEV)
    ms = timed(lambda: K.store_kv(k, v, kv8, sm, scale))
    tb.add("store_kv fp8", f"T={t}", ms, 3 * t * KVH * HD * 2, 0)


def bench_sampling(tb, quick):
    from hybridserve.ops.reference import sampling as S

    for rows in (1, 64, 256, 1024):
        logits = torch.randn(rows, V, device=DEV)
        temp = torch.full((rows,), 0.8, device=DEV)
        seeds = torch.arange(rows, device=DEV)
        pos = torch.full((rows,), 100, device=DEV)
        for filt, top_k, top_p in ((False, 0, 1.0), (True, 50, 0.9), (True, 0, 0.95)):
            tk = torch.full((rows,), top_k, dtype=torch.int32, device=DEV)
            tp = torch.full((rows,), top_p, device=DEV)
            mp = torch.zeros(rows, device=DEV)
            args = (logits, temp, tk, tp, mp, seeds, pos, filt)
            ms = tt.do_bench(lambda: K.sample_tokens(*args), warmup=10, rep=50, return_mode="median")
            ms_ref = tt.do_bench(lambda: S.sample_tokens(*args), warmup=10, rep=50, return_mode="median")
            tb.add("sample_tokens", f"R={rows} top_k={top_k} top_p={top_p} (ref {ms_ref * 1000:.0f} us)", ms,
                   rows * V * 4, 0)


def reference_spot_check(experts):
    """Decode-sized MoE (bf16 and fp8) and one fp8 projection against the reference, so a
    fast-but-wrong kernel cannot pass unnoticed."""
    x, w, ids = moe_inputs(8)
    for fp8 in (False, True):
        up, down, *scales = experts[2:] if fp8 else experts[:2]
        a_up, a_down = (x.float().abs().amax() / KF.FP8_MAX).reshape(()), torch.tensor(0.05, device=DEV)
        extra = (*scales, a_up, a_down) if fp8 else ()
        a = K.fused_moe(x, up, down, w, ids, *extra).float()
        b = R.fused_moe(x, up, down, w, ids, *extra).float()
        err = rel_err(a, b)
        print(f"spot check fused_moe vs reference ({'fp8' if fp8 else 'bf16'}, T=8): rel err {err:.2e}")
        assert err < 2e-2
    wq, ws = KF.quantize_fp8(experts[0][0])
    for t in (8, 300):
        xx = torch.randn(t, HIDDEN, device=DEV, dtype=BF)
        a, b = K.fp8_linear(xx, wq, ws).float(), R.fp8_linear(xx, wq, ws).float()
        err = rel_err(a, b)
        print(f"spot check fp8_linear vs reference (T={t}): rel err {err:.2e}")
        assert err < 2e-2


def markdown(result: dict) -> str:
    lines = [f"Card: {result['card']}; measured ceilings: copy {result['copy_GBps']:.0f} GB/s, "
             f"bf16 matmul {result['bf16_mm_TFLOPs']:.0f} TFLOP/s.", "",
             "| kernel | shape | time (us) | GB/s | TFLOP/s | % copy BW | % matmul | target |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['kernel']} | {r['shape']} | {r['ms'] * 1000:.1f} | {r['GBps']:.0f} | {r['TFLOPs']:.1f} | "
                     f"{100 * r['frac_bw']:.0f}% | {100 * r['frac_mm']:.0f}% | {r['target'] or ''} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time alternative launch shapes")
    ap.add_argument("--moe-sweep", action="store_true", help="only the fused_moe launch-shape sweep (bf16 + fp8)")
    ap.add_argument("--write-table", default=None, help="--moe-sweep: write the best shapes as moe_configs.json here")
    ap.add_argument("--moe-dtypes", default="bf16,fp8", help="--moe-sweep: weight dtypes to sweep (others keep the shipped rows)")
    ap.add_argument("--compile-workers", type=int, default=8, help="--moe-sweep: processes compiling the candidates first")
    ap.add_argument("--only", default=None, help="comma-separated sections: ssm,conv,attention,moe,fp8,norms,sampling")
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--md-out", default=None, help="also write the table as markdown (docs/performance.md)")
    args = ap.parse_args()
    global SWEEP
    SWEEP = args.sweep
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    t0 = time.time()
    copy_gbs, mm = ceilings()
    print(f"card: {name}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"ceilings: device copy {copy_gbs:.0f} GB/s (read+write), bf16 matmul 8192^3 {mm:.0f} TFLOP/s")
    tb = Table(copy_gbs, mm)
    w_up = (torch.randn(E, INTER, HIDDEN, device=DEV) * HIDDEN**-0.5).to(BF)
    w_down = (torch.randn(E, HIDDEN, INTER, device=DEV) * INTER**-0.5).to(BF)
    experts = (w_up, w_down, *fp8_experts(w_up, w_down))
    reference_spot_check(experts)
    print(f"{'kernel':26s} {'shape':34s} {'time':>13s} {'':>13s}")
    all_sections = dict(
        ssm=lambda: bench_ssm(tb, args.quick), conv=lambda: bench_conv(tb, args.quick),
        attention=lambda: bench_attention(tb, args.quick), moe=lambda: bench_moe(tb, args.quick, experts),
        fp8=lambda: bench_fp8(tb, args.quick),
        norms=lambda: bench_norms(tb, args.quick), sampling=lambda: bench_sampling(tb, args.quick))
    names = args.only.split(",") if args.only else list(all_sections)
    sections = [lambda: bench_moe_sweep(tb, experts, args.write_table, args.moe_dtypes.split(","),
                                   args.compile_workers)] if args.moe_sweep else [all_sections[k] for k in names]
    for section in sections:
        try:
            section()
        except Exception as e:  # noqa: BLE001  (one failing section must not hide the others)
            print(f"SECTION FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
    result = dict(card=name, copy_GBps=round(copy_gbs, 1), bf16_mm_TFLOPs=round(mm, 1), rows=tb.rows,
                  seconds=round(time.time() - t0, 1))
    line = json.dumps(result)
    if args.md_out:
        with open(args.md_out, "w") as f:
            f.write(markdown(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
