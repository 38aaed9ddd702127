"""Compile every Triton kernel of hybridserve/ops/triton for sm_90 (H100/H200) on a machine without a
GPU, and print registers, spills and shared memory per kernel at the model's launch configurations.

Catches compile errors before a GPU run and answers "does it spill" for free.
Usage: python bench/compile_check.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hybridserve.ops.triton import attention, conv, fp8, mamba_step, moe, norm, sampling, ssd

FLOAT_ARGS = {"eps", "scale", "scale_log2"}


def compile_one(fn, ptrs: dict, consts: dict, num_warps: int, num_stages: int = 3):
    """As the JIT specialises at launch on the model's shapes: pointers 16-byte aligned, integer
    arguments multiples of 16 (2688, 1856, 6144, 4096, ... are), a stride of 1 a constant (consts)."""
    names = fn.arg_names
    sig, cx, attrs = {}, {}, {}
    for i, n in enumerate(names):
        if n in consts:
            sig[n] = "constexpr"
            cx[(i,)] = consts[n]
        elif n in ptrs:
            sig[n] = ptrs[n]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif n in FLOAT_ARGS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, sig, constexprs=cx, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def ptxas_report(kernel) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(kernel.asm["ptx"])
        res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return f"regs {regs.group(1) if regs else '?'}, spill st/ld {spill.groups() if spill else '?'}"


BF = "*bf16"
SSD_PTRS = dict(x_ptr=BF, dt_ptr=BF, alog_ptr="*fp32", b_ptr=BF, c_ptr=BF, d_ptr="*fp32", dtb_ptr="*fp32",
                cu_ptr="*i32", lens_ptr="*i32", state_ptr="*bf16", slots_ptr="*i64", init_ptr="*i8", y_ptr=BF)
CASES = [
    ("rms_norm", norm._rms_norm_kernel, dict(x_ptr=BF, res_ptr=BF, w_ptr=BF, out_ptr=BF, res_out_ptr=BF),
     dict(HAS_RES=True, BLOCK=4096), 16, 1),
    ("gated_rms_norm", norm._gated_rms_norm_kernel, dict(y_ptr=BF, z_ptr=BF, w_ptr=BF, out_ptr=BF),
     dict(BLOCK=512), 2, 1),
    ("conv_varlen", conv._conv_varlen_kernel,
     dict(x_ptr=BF, w_ptr=BF, b_ptr=BF, out_ptr=BF, state_ptr=BF, seq_idx_ptr="*i32", cu_ptr="*i32",
          lens_ptr="*i32", slots_ptr="*i64", init_ptr="*i8"), dict(KW=4, HAS_BIAS=True, BLOCK_T=16, BLOCK_C=128), 4, 1),
    ("conv_state", conv._conv_state_kernel,
     dict(x_ptr=BF, state_ptr=BF, cu_ptr="*i32", lens_ptr="*i32", slots_ptr="*i64", init_ptr="*i8"),
     dict(KW=4, BLOCK_C=256), 2, 1),
    ("conv_update", conv._conv_update_kernel,
     dict(x_ptr=BF, w_ptr=BF, b_ptr=BF, out_ptr=BF, state_ptr=BF, slots_ptr="*i64", lens_ptr="*i32"),
     dict(KW=4, HAS_BIAS=True, BLOCK_C=512), 4, 1),
    ("mamba_decode_step fp32 state", mamba_step._mamba_step_kernel,
     dict(xbc_ptr=BF, dt_ptr=BF, w_ptr=BF, cb_ptr=BF, alog_ptr="*fp32", d_ptr="*fp32", dtb_ptr="*fp32",
          lens_ptr="*i32", conv_ptr=BF, state_ptr="*fp32", slots_ptr="*i64", y_ptr=BF),
     dict(KW=4, HAS_BIAS=True, BLOCK_P=32, BLOCK_N=128, SR=False), 4, 1),
    ("mamba_decode_step bf16 state, SR", mamba_step._mamba_step_kernel,
     dict(xbc_ptr=BF, dt_ptr=BF, w_ptr=BF, cb_ptr=BF, alog_ptr="*fp32", d_ptr="*fp32", dtb_ptr="*fp32",
          lens_ptr="*i32", conv_ptr=BF, state_ptr=BF, slots_ptr="*i64", y_ptr=BF),
     dict(KW=4, HAS_BIAS=True, BLOCK_P=32, BLOCK_N=128, SR=True), 4, 1),
    ("ssu fp32 state", ssd._ssu_kernel,
     dict(x_ptr=BF, dt_ptr=BF, alog_ptr="*fp32", b_ptr=BF, c_ptr=BF, d_ptr="*fp32", dtb_ptr="*fp32",
          lens_ptr="*i32", state_ptr="*fp32", slots_ptr="*i64", y_ptr=BF), dict(BLOCK_P=32, BLOCK_N=128, SR=False), 4, 1),
    ("ssu fp16 state, SR", ssd._ssu_kernel,
     dict(x_ptr=BF, dt_ptr=BF, alog_ptr="*fp32", b_ptr=BF, c_ptr=BF, d_ptr="*fp32", dtb_ptr="*fp32",
          lens_ptr="*i32", state_ptr="*fp16", slots_ptr="*i64", y_ptr=BF), dict(BLOCK_P=32, BLOCK_N=128, SR=True), 4, 1),
    ("ssd_varlen one pass", ssd._ssd_one_pass_kernel, SSD_PTRS,
     dict(BLOCK_T=32, BLOCK_P=32, BLOCK_N=128, DOT_PREC="tf32", SR=False), 4, 2),
    ("ssd state pass", ssd._ssd_state_pass_kernel,
     dict(SSD_PTRS, first_ptr="*i32", prev_ptr=BF, dtc_ptr="*fp32", acum_ptr="*fp32"),
     dict(CHUNK=ssd.SSD_TUNE["CHUNK"], BLOCK_T=32, BLOCK_P=32, BLOCK_N=128, DOT_PREC="tf32", SR=True),
     ssd.SSD_TUNE["num_warps"], ssd.SSD_TUNE["num_stages"]),
    ("ssd chunk scan", ssd._ssd_chunk_scan_kernel,
     dict(x_ptr=BF, b_ptr=BF, c_ptr=BF, d_ptr="*fp32", cu_ptr="*i32", chunk_seq_ptr="*i32", first_ptr="*i32",
          prev_ptr=BF, dtc_ptr="*fp32", acum_ptr="*fp32", y_ptr=BF),
     dict(CHUNK=ssd.SSD_TUNE["CHUNK"], BLOCK_M=ssd.SSD_TUNE["SCAN_BLOCK_M"], BLOCK_K=ssd.SSD_TUNE["SCAN_BLOCK_K"],
          BLOCK_P=64, BLOCK_N=128, DOT_PREC="tf32"), ssd.SSD_TUNE["scan_warps"], ssd.SSD_TUNE["scan_stages"]),
    ("moe_route", moe._route_kernel, dict(logits_ptr="*fp32", bias_ptr="*fp32", w_ptr="*fp32", ids_ptr="*i64"),
     dict(TOP_K=6, K_PAD=8, BLOCK_E=128, RENORM=True), 1, 1),
]
F8 = "*fp8e4nv"


def moe_gemm_cases():
    """Each shape of the bf16 and fp8 tables (up: K = 2688, down: K = 1856); fp8 with static activation
    scales (x quantized in the up kernel's loads, h written in e4m3) and per-token ones (both e4m3)."""
    configs = [("bf16", c, None) for c in moe.CONFIGS["bf16"]] + [("bf16", c, None) for c in moe.PREFILL_CANDIDATES[1:]]
    configs += [("fp8", c, static) for c in moe.CONFIGS["fp8"] for static in (True, False)]
    cases = []
    for dtype, cfg, static in configs:
        bm, sm = cfg["BLOCK_M"], cfg.get("SMALL_M", cfg["BLOCK_M"])
        fp8 = dtype == "fp8"
        for up in (True, False):
            a = (BF if static else F8) if up else (F8 if fp8 else BF)
            ptrs = dict(a_ptr=a if fp8 else BF, w_ptr=F8 if fp8 else BF, out_ptr=(F8 if static else BF) if up else BF,
                        sorted_ptr="*i32", tile_expert_ptr="*i32", tile_row_ptr="*i32", a_scale_ptr="*fp32",
                        w_scale_ptr="*fp32", out_scale_ptr="*fp32")
            consts = dict(TOP_K=6, UP=up, PAIR_MODE=False, DOT_PREC="tf32", stride_wk=1,
                          EVEN_K=(2688 if up else 1856) % cfg["BLOCK_K"] == 0, FP8=fp8, ACT=tl.bfloat16,
                          a_scale_stride=0 if static or not fp8 else 1, ws_stride_n=0,
                          MIXED=sm < bm, BLOCK_M=bm, SMALL_M=sm, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
            if sm == bm:
                consts["tile_row_ptr"] = None
            tag = f"{dtype}{'' if static is None else ' static' if static else ' dynamic'} <= {cfg.get('max_tokens')}"
            cases.append((f"moe_gemm {tag} {'up' if up else 'down'} {moe.describe(cfg)}", moe._moe_gemm_kernel,
                          ptrs, consts, cfg["num_warps"], cfg["num_stages"]))
    return cases


def fp8_gemm_cases():
    """Each Triton tile of fp8.GEMM_TUNE, with a static-scale bf16 input and with an e4m3 one."""
    cases = []
    for cfg in fp8.GEMM_TUNE:
        for a in (BF, F8):
            consts = dict(EVEN_K=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                          a_scale_stride=0 if a == BF else 1, w_scale_stride=1)
            cases.append((f"fp8_gemm <= {cfg['max_tokens']} a={a[1:]} M{cfg['BLOCK_M']} N{cfg['BLOCK_N']} K{cfg['BLOCK_K']}",
                          fp8._fp8_gemm_kernel, dict(a_ptr=a, a_scale_ptr="*fp32", w_ptr=F8, w_scale_ptr="*fp32", out_ptr=BF),
                          consts, cfg["num_warps"], cfg["num_stages"]))
    return cases


ATTN_PTRS = dict(q_ptr=BF, tables_ptr="*i32", cu_ptr="*i32", lens_ptr="*i32", tile_seq_ptr="*i32",
                 tile_q0_ptr="*i32", o_ptr=BF, part_ptr="*fp32", ml_ptr="*fp32", kv_scale_ptr="*fp32")
DECODE = dict(GROUP=16, GROUP_PAD=16, BLOCK_Q=1, BLOCK_D=128, BLOCK_N=64, SPLITS=64, MIN_SPLIT=256, DOT_PREC="tf32")
PREFILL = dict(GROUP=16, GROUP_PAD=16, BLOCK_Q=8, BLOCK_D=128, BLOCK_N=64, SPLITS=1, MIN_SPLIT=64, DOT_PREC="tf32")


CASES += moe_gemm_cases()
CASES += [
    ("moe_sum", moe._moe_sum_kernel, dict(y_ptr=BF, w_ptr="*fp32", out_ptr=BF), dict(TOP_K=6, BLOCK=1024), 4, 1),
    ("moe_rank", moe._rank_kernel, dict(ids_ptr="*i64", counts_ptr="*i32", rank_ptr="*i32"), dict(BLOCK=1024), 4, 1),
    ("moe_scatter", moe._scatter_kernel,
     dict(ids_ptr="*i64", counts_ptr="*i32", rank_ptr="*i32", sorted_ptr="*i32", tile_expert_ptr="*i32"),
     dict(tile_row_ptr=None, BM=128, SM=128, BLOCK_E=128, BLOCK=64), 4, 1),
    ("moe_scatter two heights", moe._scatter_kernel,
     dict(ids_ptr="*i64", counts_ptr="*i32", rank_ptr="*i32", sorted_ptr="*i32", tile_expert_ptr="*i32",
          tile_row_ptr="*i32"), dict(BM=128, SM=64, BLOCK_E=128, BLOCK=64), 4, 1),
    *[(f"store_kv {c[1:]} cache", attention._store_kv_kernel,
       dict(k_ptr=BF, v_ptr=BF, cache_ptr=c, slot_ptr="*i64", scale_ptr="*fp32"), dict(BLOCK=256), 1, 1)
      for c in (BF, F8)],
    *[(f"attn {kind} {c[1:]} cache", attention._attn_kernel, dict(ATTN_PTRS, cache_ptr=c), consts, warps, 2)
      for c in (BF, F8) for kind, consts, warps in (("decode", DECODE, 4), ("prefill", PREFILL, 8))],
    ("fp8 quantize dynamic", fp8._quantize_kernel, dict(x_ptr=BF, q_ptr=F8, scale_ptr="*fp32"),
     dict(STATIC=False, BLOCK=4096), 4, 1),
    ("fp8 quantize static", fp8._quantize_kernel, dict(x_ptr=BF, q_ptr=F8, scale_ptr="*fp32"),
     dict(STATIC=True, BLOCK=4096), 4, 1),
    ("sample", sampling._sample_kernel, dict(logits_ptr="*fp32", temp_ptr="*fp32", seed_ptr="*i64", pos_ptr="*i64",
                                             thresh_ptr="*fp32", best_ptr="*fp32", idx_ptr="*i64"),
     dict(HAS_THRESH=True, PRECISE=True, BLOCK=1024, CHUNK=8192), 4, 2),
    ("token bitmask", sampling._bitmask_kernel, dict(logits_ptr="*fp32", rows_ptr="*i64", mask_ptr="*i32"),
     dict(BLOCK=4096), 4, 3),
    ("sample threshold", sampling._threshold_kernel,
     dict(logits_ptr="*fp32", temp_ptr="*fp32", topk_ptr="*i32", topp_ptr="*fp32", minp_ptr="*fp32",
          thresh_ptr="*fp32"), dict(PRECISE=True, BLOCK=512), 8, 1),
    ("attn merge", attention._merge_kernel, dict(part_ptr="*fp32", ml_ptr="*fp32", lens_ptr="*i32", o_ptr=BF),
     dict(SPLITS=64, BLOCK_N=64, MIN_SPLIT=256, BLOCK_D=128), 1, 1),
]
CASES += fp8_gemm_cases()


def main() -> int:
    failed = 0
    for name, fn, ptrs, consts, warps, stages in CASES:
        try:
            k = compile_one(fn, ptrs, consts, warps, stages)
            print(f"{name:40s} ok   smem {k.metadata.shared:6d} B, {ptxas_report(k)}")
        except Exception as e:  # noqa: BLE001
            failed += 1
            print(f"{name:40s} FAIL {type(e).__name__}: {str(e)[:400]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
