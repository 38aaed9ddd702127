"""Wall time of one eager prefill step against its GPU time, with 0, 1 and 2 prefix-cache state
captures per sequence, and of the same step (no captures) replayed as a prefill CUDA graph: whether
small prefill steps are host-bound, what a capture adds, what a graph saves.

The full-size preset (dummy weights): B sequences feed L tokens each, continuing from C cached
tokens (a chat turn's hit). Prints per capture count the mean wall ms of 5 steps (synchronized),
the same for the graph, then the profile of the step with two captures: GPU time and the host's
launches; then one JSON line.

Usage (GPU): python bench/prefill_step_time.py [--seqs 3] [--tokens 208] [--cached 3040]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from hybridserve.config import ModelConfig
from hybridserve.engine.cuda_graphs import StepGraphs
from hybridserve.model.cache import HybridCache
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.loader import load_model
from hybridserve.model.state_capture import StateCapture


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=208)
    ap.add_argument("--cached", type=int, default=3040)
    args = ap.parse_args()
    b, n, c, bs = args.seqs, args.tokens, args.cached, 16
    cfg = ModelConfig.from_hf("nemotron-3-nano-30b-a3b")
    model = load_model(cfg, "dummy", device="cuda")
    per_seq = -(-(c + n) // bs)
    # rows: b slots, 2b snapshot rows, a padding slot; blocks: b tables and a padding block
    cache = HybridCache.allocate(cfg, 3 * b + 1, b * per_seq + 1, bs, torch.bfloat16, torch.float32, "cuda")

    def batch(captures: int) -> ForwardBatch:
        fb = ForwardBatch.build([[5] * n] * b, [c] * b, list(range(b)),
                                [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)], bs, "cuda")
        points = [(s, b + 2 * s + j, c + (j + 1) * (n // 3) // bs * bs) for s in range(b) for j in range(captures)]
        if points:
            fb.capture = StateCapture.build(np.array(points), np.arange(b), np.full(b, c), np.full(b, n),
                                            lambda a: torch.from_numpy(a).cuda())
        return fb

    def wall_ms(step) -> float:
        step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 5 * 1e3

    result = {}
    with torch.inference_mode():
        for captures in (0, 1, 2):
            result[f"eager_{captures}_captures_ms"] = ms = wall_ms(lambda k=captures: model(batch(k), cache))
            print(f"{b} x {n} tokens from {c} cached, {captures} captures per sequence: {ms:.1f} ms wall", flush=True)
        graphs = StepGraphs(model, cache, max_decode_batch=1, max_prefill_tokens=b * n, prefill_while_decoding=b * n,
                            max_blocks_per_seq=per_seq, pad_slot=3 * b, pad_block=b * per_seq)
        plain = batch(0)
        result["graph_ms"] = ms = wall_ms(lambda: graphs.prefill[0].replay(plain, b * n))
        print(f"{b} x {n} tokens from {c} cached, as a prefill CUDA graph: {ms:.1f} ms wall", flush=True)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model(batch(2), cache)
            torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
    print(f"two captures per sequence, profiled: {gpu:.1f} ms of GPU time, {launches} kernel launches")
    print(json.dumps(dict(seqs=b, tokens=n, cached=c, profiled_gpu_ms=round(gpu, 1), launches=launches,
                          **{k: round(v, 2) for k, v in result.items()})))


if __name__ == "__main__":
    main()
