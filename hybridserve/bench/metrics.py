"""Benchmark metrics from per-request timings, defined exactly as `vllm bench serve` defines them.

All inputs are seconds; every latency statistic comes out in milliseconds. Only successful
requests enter the latency statistics and throughputs; failed ones are counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hybridserve.bench.request import RequestOutput

GOODPUT_METRICS = ("ttft", "tpot", "e2el")


@dataclass
class Stats:
    """mean / median / std / percentiles of one latency metric, in milliseconds."""

    mean: float
    median: float
    std: float
    percentiles: dict[float, float]


def summarize(values_s: Sequence[float], percentiles: Sequence[float]) -> Stats:
    """numpy statistics (linear-interpolated percentiles); an empty list reads as all zeros."""
    values = np.asarray(values_s if len(values_s) else [0.0], dtype=np.float64) * 1000.0
    return Stats(
        mean=float(np.mean(values)),
        median=float(np.median(values)),
        std=float(np.std(values)),
        percentiles={p: float(np.percentile(values, p)) for p in percentiles},
    )


def token_times(output: RequestOutput) -> np.ndarray:
    """Arrival time of every streamed message: start + ttft, then + each gap in turn."""
    gaps = np.concatenate([[output.start_time + output.ttft], np.asarray(output.itl, dtype=np.float64)])
    return np.cumsum(gaps)


def peak_output_throughput(outputs: Sequence[RequestOutput]) -> float:
    """Most messages (= tokens, one per message) that arrived in one 1-second bucket.

    Buckets start at the earliest request start; the last bucket may be partial.
    """
    if not outputs:
        return 0.0
    origin = min(o.start_time for o in outputs)
    end = max(o.start_time + o.latency for o in outputs)
    num_buckets = int(math.ceil(end - origin)) + 1
    counts = np.zeros(num_buckets)
    for output in outputs:
        buckets = (token_times(output) - origin).astype(np.int64)
        buckets = buckets[(buckets >= 0) & (buckets < num_buckets)]
        np.add.at(counts, buckets, 1)
    return float(counts.max())


def peak_concurrency(outputs: Sequence[RequestOutput]) -> int:
    """Most requests in flight at once over half-open intervals [start, start + latency).

    Exact sweep: at equal times a departure is counted before an arrival, so back-to-back
    requests through one slot never count twice and the result never exceeds the cap.
    """
    events = sorted(
        [(o.start_time, 1) for o in outputs] + [(o.start_time + o.latency, -1) for o in outputs]
    )
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def count_good_requests(
    ttfts: Sequence[float], tpots: Sequence[float], e2els: Sequence[float], slos_ms: dict[str, float]
) -> int:
    """Requests meeting every given SLO (DistServe goodput); values in seconds, SLOs in ms."""
    per_metric = {"ttft": ttfts, "tpot": tpots, "e2el": e2els}
    chosen = [(per_metric[name], limit / 1000.0) for name, limit in slos_ms.items()]
    return sum(
        all(values[i] <= limit for values, limit in chosen) for i in range(len(ttfts))
    )


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    total_input: int
    total_output: int
    request_throughput: float
    request_goodput: float
    output_throughput: float
    total_token_throughput: float
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    output_lens: list[int]  # one per request, 0 for failed ones
    stats: dict[str, Stats] = field(default_factory=dict)  # ttft, tpot, itl, e2el, queue ones


def calculate_metrics(
    outputs: Sequence[RequestOutput],
    duration_s: float,
    percentiles: Sequence[float] = (99,),
    goodput_slos_ms: dict[str, float] | None = None,
    count_tokens: Callable[[str], int] | None = None,
    max_concurrency: int | None = None,
    request_rate: float = math.inf,
) -> BenchmarkMetrics:
    """All of `vllm bench serve`'s generation metrics for one run.

    TPOT per request is (latency - ttft) / (output_tokens - 1), only for requests with more than
    one output token; for goodput a single-token request counts as TPOT 0. Output tokens come
    from the server's usage message, else from re-tokenizing the text (`count_tokens`), else 1.
    """
    ok = [o for o in outputs if o.success]
    output_lens, tpots, tpots_for_goodput, itls = [], [], [], []
    for o in outputs:
        if not o.success:
            output_lens.append(0)
            continue
        n = o.output_tokens or (count_tokens(o.generated_text) if count_tokens else 1)
        output_lens.append(n)
        tpot = (o.latency - o.ttft) / (n - 1) if n > 1 else 0.0
        if n > 1:
            tpots.append(tpot)
        tpots_for_goodput.append(tpot)
        itls.extend(o.itl)
    ttfts = [o.ttft for o in ok]
    e2els = [o.latency for o in ok]
    total_input = sum(o.prompt_len for o in ok)
    total_output = sum(output_lens)
    good = count_good_requests(ttfts, tpots_for_goodput, e2els, goodput_slos_ms) if goodput_slos_ms else 0

    stats = {
        "ttft": summarize(ttfts, percentiles),
        "tpot": summarize(tpots, percentiles),
        "itl": summarize(itls, percentiles),
        "e2el": summarize(e2els, percentiles),
    }
    if max_concurrency is not None:
        stats["client_queue_time"] = summarize([o.client_queue_time for o in ok], percentiles)
        if not math.isinf(request_rate):
            stats["e2el_including_client_queue"] = summarize(
                [o.latency + o.client_queue_time for o in ok], percentiles
            )
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(outputs) - len(ok),
        total_input=total_input,
        total_output=total_output,
        request_throughput=len(ok) / duration_s,
        request_goodput=good / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        max_output_tokens_per_s=peak_output_throughput(ok),
        max_concurrent_requests=peak_concurrency(ok),
        output_lens=output_lens,
        stats=stats,
    )
