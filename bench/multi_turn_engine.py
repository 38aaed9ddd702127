"""The multi-turn replay of `bench serve --dataset-name multi_turn`, in process through the engine (no
HTTP, no tokenizer): where a hit's time to first token goes, step by step.

C conversations share a system prompt; each turn sends the history plus a user message and
generates a fixed number of tokens (ignore_eos). `--history` says what the next turn resends of an
answer: `answer` (its tokens exactly: hits at the answer's final state), `diverged` (its first token
re-tokenized differently, as happens when a text is cut into words again: hits at the prompt's last
full block) or `dropped` (nothing, as a template that drops reasoning). Prints per turn the median
TTFT and engine steps to the first token, the steps taken while a turn waited for its first token
(tokens, prefill sequences, state captures, whether a CUDA graph ran it, wall ms), then one JSON line.

Usage: python bench/multi_turn_engine.py [--model nemotron-3-nano-30b-a3b] [--conversations 8]
           [--turns 8] [--system-len 2048] [--user-len 64] [--output-len 128] [--history diverged]
           [--no-enable-prefix-caching]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="nemotron-3-nano-30b-a3b")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--system-len", type=int, default=2048)
    ap.add_argument("--user-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--history", choices=("answer", "diverged", "dropped"), default="diverged")
    ap.add_argument("--no-enable-prefix-caching", action="store_true")
    ap.add_argument("--warmup-turns", type=int, default=2, help="a replay of this many turns first (another seed)")
    args = ap.parse_args()

    from hybridserve.engine.llm import LLM
    from hybridserve.sampling_params import SamplingParams

    llm = LLM(args.model, load_format="dummy", max_model_len=args.system_len + args.turns * (
        args.user_len + args.output_len + 8) + 64, max_num_seqs=args.conversations,
        enable_prefix_caching=not args.no_enable_prefix_caching)
    engine = llm.engine
    vocab = llm.model_config.vocab_size
    steps: list[dict] = []
    forward = engine.runner.forward

    graphs = engine.runner.graphs

    def traced(plan):
        prefill = [int(n) for n in plan.num_new_tokens if n > 1]
        graphed = graphs is not None and (graphs.decode.fits(plan) or any(f.fits(plan) for f in graphs.prefill))
        steps.append(dict(t=time.perf_counter(), tokens=int(plan.num_tokens), prefill_seqs=len(prefill),
                          prefill_tokens=sum(prefill), captures=len(plan.captures), graph=graphed))
        return forward(plan)

    engine.runner.forward = traced
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=1.0, seed=0)

    def replay(turns: int, seed: int) -> list[dict]:
        rng = random.Random(seed)

        def tokens(n):
            return [rng.randrange(10, vocab - 10) for _ in range(n)]

        system = tokens(args.system_len)
        history = {c: list(system) for c in range(args.conversations)}
        turn = dict.fromkeys(history, 0)
        sent, first, out, records = {}, {}, {}, []

        def send(c):
            history[c] += tokens(args.user_len)
            rid = f"s{seed}c{c}t{turn[c]}"
            engine.add_request(rid, list(history[c]), params)
            sent[rid] = (time.perf_counter(), len(steps), c, turn[c])
            out[rid] = []

        for c in history:
            send(c)
        while engine.has_unfinished():
            for o in engine.step():
                now = time.perf_counter()
                for d in o.deltas:
                    if d.token_ids and o.request_id not in first:
                        first[o.request_id] = (now, len(steps))
                    out[o.request_id] += d.token_ids
                if o.finished:
                    t0, s0, c, t = sent[o.request_id]
                    t1, s1 = first[o.request_id]
                    records.append(dict(conversation=c, turn=t, ttft_ms=1e3 * (t1 - t0), steps=s1 - s0,
                                        cached=o.num_cached_tokens, waited=steps[s0:s1]))
                    answer = out[o.request_id]
                    if args.history == "answer":
                        history[c] += answer
                    elif args.history == "diverged":
                        history[c] += [(answer[0] + 1) % vocab] + answer[1:]
                    turn[c] += 1
                    if turn[c] < turns:
                        send(c)
        return records

    replay(args.warmup_turns, seed=1)
    steps.clear()
    records = replay(args.turns, seed=0)
    print(f"{'turn':>4} {'median TTFT ms':>15} {'steps':>6} {'cached':>7}")
    summary = []
    for t in range(args.turns):
        rs = [r for r in records if r["turn"] == t]
        row = dict(turn=t, median_ttft_ms=round(statistics.median(r["ttft_ms"] for r in rs), 1),
                   median_steps=statistics.median(r["steps"] for r in rs),
                   mean_cached=round(statistics.mean(r["cached"] for r in rs)))
        summary.append(row)
        print(f"{t:>4} {row['median_ttft_ms']:>15} {row['median_steps']:>6} {row['mean_cached']:>7}")
    late = [r for r in records if r["turn"] == args.turns - 1][:2]
    for r in late:
        print(f"conversation {r['conversation']} turn {r['turn']}: {r['ttft_ms']:.1f} ms, steps while waiting:")
        for a, b in zip(r["waited"], r["waited"][1:] + [None]):
            ms = f"{1e3 * (b['t'] - a['t']):.1f} ms" if b else ""
            print(f"   tokens {a['tokens']:>5} prefill {a['prefill_seqs']} seqs / {a['prefill_tokens']} tokens, "
                  f"captures {a['captures']}{'  graph' if a['graph'] else ''}  {ms}")
    all_ttft = [r["ttft_ms"] for r in records]
    print(json.dumps(dict(history=args.history, prefix_caching=not args.no_enable_prefix_caching,
                          median_ttft_ms=round(statistics.median(all_ttft), 1),
                          later_turns_median_ttft_ms=round(statistics.median(
                              r["ttft_ms"] for r in records if r["turn"] > 0), 1), turns=summary)))


if __name__ == "__main__":
    main()
