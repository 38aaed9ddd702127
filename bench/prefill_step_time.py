"""Wall time of one eager prefill step against its GPU time, with 0, 1 and 2 prefix-cache state
captures per sequence: whether small prefill steps are host-bound, and what a capture adds.

The full-size preset (dummy weights): B sequences feed L tokens each, continuing from C cached
tokens (a chat turn's hit). Prints per capture count the mean wall ms of 5 steps (synchronized),
then the profile of the step with two captures: GPU time and the host's launches.

Usage (GPU): python bench/prefill_step_time.py [--seqs 3] [--tokens 208] [--cached 3040]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from hybridserve.config import ModelConfig
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
    cache = HybridCache.allocate(cfg, b + 2 * b + 1, b * per_seq, bs, torch.bfloat16, torch.float32, "cuda")

    def batch(captures: int) -> ForwardBatch:
        fb = ForwardBatch.build([[5] * n] * b, [c] * b, list(range(b)),
                                [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)], bs, "cuda")
        points = [(s, b + 2 * s + j, c + (j + 1) * (n // 3) // bs * bs) for s in range(b) for j in range(captures)]
        if points:
            fb.capture = StateCapture.build(np.array(points), np.arange(b), np.full(b, c), np.full(b, n),
                                            lambda a: torch.from_numpy(a).cuda())
        return fb

    with torch.inference_mode():
        for captures in (0, 1, 2):
            model(batch(captures), cache)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                model(batch(captures), cache)
            torch.cuda.synchronize()
            print(f"{b} x {n} tokens from {c} cached, {captures} captures per sequence: "
                  f"{(time.perf_counter() - t0) / 5 * 1e3:.1f} ms wall", flush=True)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            model(batch(2), cache)
            torch.cuda.synchronize()
    events = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in events) / 1e3
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx", "cuLaunchKernel"))
    print(f"two captures per sequence, profiled: {gpu:.1f} ms of GPU time, {launches} kernel launches")


if __name__ == "__main__":
    main()
