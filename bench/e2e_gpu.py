"""End to end on the GPU: the full-size preset with dummy weights through the offline engine.

1024-token random prompts, 1024 output tokens (ignore_eos), at concurrency 1 and 64, in one process.
Prints start-up time, memory (weights / KV / Mamba state), and per concurrency: output tok/s, mean and
median TTFT and TPOT (as `vllm bench serve` defines them: TPOT = (latency - TTFT) / (output - 1)),
then one JSON line. Timestamps are taken when each engine step returns its tokens (offline: no
HTTP, no detokenization in the loop).

Usage: python bench/e2e_gpu.py [--input-len 1024] [--output-len 1024] [--concurrency 1 64]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

import torch


def run_level(llm, concurrency: int, num_prompts: int, input_len: int, output_len: int, seed: int) -> dict:
    from hybridserve.sampling_params import SamplingParams

    engine = llm.engine
    rng = random.Random(seed)
    vocab = llm.model_config.vocab_size
    prompts = [[rng.randrange(10, vocab - 10) for _ in range(input_len)] for _ in range(num_prompts)]
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=1.0, seed=seed)
    pending = list(range(num_prompts))
    sent, first, last, count = {}, {}, {}, {}
    in_flight = 0
    t_start = time.perf_counter()
    while pending or engine.has_unfinished():
        while pending and in_flight < concurrency:
            i = pending.pop(0)
            rid = f"e2e-{concurrency}-{i}"
            engine.add_request(rid, prompts[i], params)
            sent[rid] = time.perf_counter()
            count[rid] = 0
            in_flight += 1
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            n = sum(len(d.token_ids) for d in o.deltas)
            if n:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                count[o.request_id] += n
            if o.finished:
                in_flight -= 1
    duration = time.perf_counter() - t_start
    ttft = [first[r] - sent[r] for r in sent]
    tpot = [(last[r] - first[r]) / (count[r] - 1) for r in sent if count[r] > 1]
    total_out = sum(count.values())
    return dict(
        concurrency=concurrency, num_prompts=num_prompts, duration_s=round(duration, 2),
        output_tokens=total_out, output_tok_s=round(total_out / duration, 1),
        total_tok_s=round((total_out + num_prompts * input_len) / duration, 1),
        mean_ttft_ms=round(1000 * statistics.mean(ttft), 1), median_ttft_ms=round(1000 * statistics.median(ttft), 1),
        mean_tpot_ms=round(1000 * statistics.mean(tpot), 2) if tpot else None,
        median_tpot_ms=round(1000 * statistics.median(tpot), 2) if tpot else None,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nemotron-3-nano-30b-a3b")
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompts-per-level", type=int, default=0, help="default: = concurrency (one full wave)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    from hybridserve.engine.llm import LLM

    t0 = time.perf_counter()
    cuda = args.device == "cuda"
    llm = LLM(model=args.model, load_format="dummy", device=args.device, max_num_seqs=max(args.concurrency),
              max_model_len=args.input_len + args.output_len + 16)
    if cuda:
        torch.cuda.synchronize()
    startup = time.perf_counter() - t0
    runner = llm.engine.runner
    weights = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    cache = runner.cache
    mem = dict(
        weights_GiB=round(weights / 2**30, 2),
        kv_GiB=round(cache.kv.numel() * cache.kv.element_size() / 2**30, 2),
        mamba_state_GiB=round((cache.conv_state.numel() * cache.conv_state.element_size()
                               + cache.ssm_state.numel() * cache.ssm_state.element_size()) / 2**30, 2),
        ssm_state_dtype=str(cache.ssm_state.dtype).replace("torch.", ""),
        state_slots=runner.layout.num_slots, kv_blocks=runner.layout.num_blocks, block_size=runner.block_size,
        torch_max_allocated_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    )
    card = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"card: {card}  start-up {startup:.1f} s  memory {mem}", flush=True)
    results = []
    for c in args.concurrency:
        # warm-up at this level's shapes: kernel compiles and CUDA-graph captures stay out of the timing
        run_level(llm, c, c, args.input_len, min(4, args.output_len), seed=1000 + c)
        r = run_level(llm, c, args.prompts_per_level or c, args.input_len, args.output_len, seed=c)
        print(f"concurrency {c:4d}: {r['output_tok_s']:9.1f} out tok/s  TTFT mean {r['mean_ttft_ms']:8.1f} ms "
              f"median {r['median_ttft_ms']:8.1f} ms  TPOT mean {r['mean_tpot_ms']} ms median {r['median_tpot_ms']} ms "
              f"({r['duration_s']} s)", flush=True)
        results.append(r)
    line = json.dumps(dict(card=card, model=args.model, startup_s=round(startup, 1),
                           memory=mem, input_len=args.input_len, output_len=args.output_len, levels=results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
