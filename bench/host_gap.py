"""Host time the GPU waits for, per engine step, with and without overlapped (async) scheduling.

The full-size preset with dummy weights through the offline engine: `concurrency` requests of
`input-len` random tokens decode `output-len` tokens each (ignore_eos), once with
`--no-async-scheduling` and once with it on. For every step two CUDA events bound the device's
idle gap: one recorded after the previous step's last device work (its forward, or its sampling
and token copy), one after this step's inputs are packed (so the gap also counts the step's
small input copy and block-table scatter, a few microseconds). Their distance is how long the
device sat idle waiting for the host: ~0 when the host keeps ahead (async), the whole host
turnaround (token copy wait, output processing, scheduling, packing) when it does not (sync).
Prints a table and one JSON line.

    python bench/host_gap.py [--concurrency 1 64 256] [--input-len 256] [--output-len 128] [--top-p 1.0]
        [--quantization fp8 --mamba-ssm-cache-dtype bfloat16] [--modes async]

`--device cpu --model tiny` runs the same path on CPU as a smoke test (wall-clock timestamps
instead of events; there the "device" is the host, so nothing overlaps).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time

import torch


class _Clock:
    """CUDA events on the GPU, perf_counter timestamps on CPU; `elapsed_ms` reads them afterwards."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)


def instrument(runner, clock: _Clock) -> list[tuple[str, object]]:
    """Wrap the runner's pack / forward / sample to record ("start" | "end", mark) in launch order."""
    marks: list[tuple[str, object]] = []
    pack, forward, sample = runner.packer.pack, runner.forward, runner.sample

    def packed(plan):
        batch = pack(plan)
        marks.append(("start", clock.mark()))
        return batch

    def forwarded(plan):
        logits = forward(plan)
        marks.append(("end", clock.mark()))
        return logits

    def sampled(plan, logits, *args, **kwargs):  # bitmasks and whatever else sample takes
        out = sample(plan, logits, *args, **kwargs)
        marks.append(("end", clock.mark()))
        return out

    runner.packer.pack, runner.forward, runner.sample = packed, forwarded, sampled
    return marks


def run_level(llm, marks, clock: _Clock, concurrency: int, input_len: int, output_len: int, top_p: float,
              seed: int) -> dict:
    from hybridserve.sampling_params import SamplingParams

    engine = llm.engine
    rng = random.Random(seed)
    vocab = llm.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=1.0, top_p=top_p, seed=seed)
    for i in range(concurrency):
        engine.add_request(f"gap-{seed}-{i}", [rng.randrange(10, vocab - 10) for _ in range(input_len)], params)
    marks.clear()
    steps, tokens = 0, 0
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            tokens += sum(len(d.token_ids) for d in out.deltas)
        steps += 1
    if clock.cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    gaps = [clock.elapsed_ms(marks[i - 1][1], m) for i, (kind, m) in enumerate(marks) if kind == "start" and i]
    gaps.sort()
    return dict(
        concurrency=concurrency, steps=steps, output_tokens=tokens, output_tok_s=round(tokens / wall, 1),
        mean_step_ms=round(1000 * wall / steps, 3),
        mean_gap_ms=round(statistics.mean(gaps), 3), median_gap_ms=round(gaps[len(gaps) // 2], 3),
        p99_gap_ms=round(gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 3),
        idle_fraction=round(sum(gaps) / (1000 * wall), 3),
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nemotron-3-nano-30b-a3b")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--top-p", type=float, default=1.0, help="< 1 exercises the filtered sampling path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quantization", default=None, help="fp8: 1,024 sequences fit beside FP8 weights")
    ap.add_argument("--mamba-ssm-cache-dtype", default="auto")
    ap.add_argument("--modes", nargs="+", choices=["sync", "async"], default=["sync", "async"])
    args = ap.parse_args()

    from hybridserve.engine.llm import LLM

    cuda = args.device == "cuda"
    clock = _Clock(cuda)
    card = torch.cuda.get_device_name() if cuda else "cpu"
    results = []
    print(f"card: {card}  model {args.model}  input {args.input_len}  output {args.output_len}  top_p {args.top_p}")
    print(f"{'async':>5} {'conc':>5} {'steps':>6} {'tok/s':>9} {'step ms':>8} {'gap mean':>9} {'p50':>7} "
          f"{'p99':>7} {'idle':>5}")
    model = None  # the weights are built once and shared by both engines
    for async_scheduling in [mode == "async" for mode in args.modes]:
        llm = LLM(model=args.model, load_format="dummy", device=args.device, max_num_seqs=max(args.concurrency),
                  max_model_len=args.input_len + args.output_len + 16, async_scheduling=async_scheduling,
                  quantization=args.quantization, mamba_ssm_cache_dtype=args.mamba_ssm_cache_dtype,
                  model_instance=model)
        model = llm.engine.runner.model
        marks = instrument(llm.engine.runner, clock)
        for c in args.concurrency:
            # warm-up at this level's shapes: compiles and graph captures stay out of the timing
            run_level(llm, marks, clock, c, args.input_len, min(4, args.output_len), args.top_p, seed=1000 + c)
            r = dict(async_scheduling=async_scheduling,
                     **run_level(llm, marks, clock, c, args.input_len, args.output_len, args.top_p, seed=c))
            print(f"{'on' if async_scheduling else 'off':>5} {c:>5} {r['steps']:>6} {r['output_tok_s']:>9} "
                  f"{r['mean_step_ms']:>8} {r['mean_gap_ms']:>9} {r['median_gap_ms']:>7} {r['p99_gap_ms']:>7} "
                  f"{r['idle_fraction']:>5}", flush=True)
            results.append(r)
        del llm, marks
        gc.collect()  # the caches and graph pools of this engine go before the next one sizes its own
        if cuda:
            torch.cuda.empty_cache()
    print(json.dumps(dict(bench="host_gap", card=card, model=args.model, input_len=args.input_len,
                          output_len=args.output_len, top_p=args.top_p, levels=results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
