"""The printed result block and the result JSON, with `vllm bench serve`'s labels and field names."""

from __future__ import annotations

import math
from collections.abc import Sequence

from hybridserve.bench.metrics import BenchmarkMetrics, Stats
from hybridserve.bench.request import RequestOutput

METRIC_TITLES = {
    "ttft": ("TTFT", "Time to First Token"),
    "tpot": ("TPOT", "Time per Output Token (excl. 1st token)"),
    "itl": ("ITL", "Inter-token Latency"),
    "e2el": ("E2EL", "End-to-end Latency"),
    "client_queue_time": ("Client Queue Time", "Client-side Queueing"),
    "e2el_including_client_queue": ("E2EL incl. Client Queue", "Queue-inclusive End-to-end Latency"),
}
DETAIL_FIELDS = ("input_lens", "output_lens", "start_times", "ttfts", "itls", "generated_texts", "errors")


def percentile_word(p: float) -> str:
    """99.0 -> '99', 99.9 -> '99.9' (as in the `p99_ttft_ms` field names)."""
    return str(int(p)) if int(p) == p else str(p)


def _line(label: str, value, fmt: str = "") -> str:
    return f"{label:<40} {value:<10{fmt}}"


def reported_metrics(selected: list[str], metrics: BenchmarkMetrics) -> list[str]:
    """The chosen percentile metrics, plus the client-queue ones vLLM always adds when it has them."""
    extra = [m for m in ("client_queue_time", "e2el_including_client_queue") if m in metrics.stats]
    return [m for m in selected if m in METRIC_TITLES and m in metrics.stats and m not in extra] + extra


def format_report(
    metrics: BenchmarkMetrics,
    duration_s: float,
    selected_metrics: list[str],
    max_concurrency: int | None,
    request_rate: float,
    goodput: bool,
) -> str:
    """The `============ Serving Benchmark Result ============` block."""
    lines = [
        " Serving Benchmark Result ".center(50, "="),
        _line("Successful requests:", metrics.completed),
        _line("Failed requests:", metrics.failed),
    ]
    if max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", max_concurrency))
    if not math.isinf(request_rate):
        lines.append(_line("Request rate configured (RPS):", request_rate, ".2f"))
    lines += [
        _line("Benchmark duration (s):", duration_s, ".2f"),
        _line("Total input tokens:", metrics.total_input),
        _line("Total generated tokens:", metrics.total_output),
        _line("Request throughput (req/s):", metrics.request_throughput, ".2f"),
    ]
    if goodput:
        lines.append(_line("Request goodput (req/s):", metrics.request_goodput, ".2f"))
    lines += [
        _line("Output token throughput (tok/s):", metrics.output_throughput, ".2f"),
        _line("Peak output token throughput (tok/s):", metrics.max_output_tokens_per_s, ".2f"),
        _line("Peak concurrent requests:", float(metrics.max_concurrent_requests), ".2f"),
        _line("Total token throughput (tok/s):", metrics.total_token_throughput, ".2f"),
    ]
    for name in reported_metrics(selected_metrics, metrics):
        short, title = METRIC_TITLES[name]
        stats: Stats = metrics.stats[name]
        lines.append(title.center(50, "-"))
        lines.append(_line(f"Mean {short} (ms):", stats.mean, ".2f"))
        lines.append(_line(f"Median {short} (ms):", stats.median, ".2f"))
        for p, value in stats.percentiles.items():
            lines.append(_line(f"P{percentile_word(p)} {short} (ms):", value, ".2f"))
    lines.append("=" * 50)
    return "\n".join(lines)


def metric_fields(metrics: BenchmarkMetrics, selected_metrics: list[str]) -> dict:
    """`mean_<m>_ms`, `median_<m>_ms`, `std_<m>_ms`, `p<P>_<m>_ms` for each reported metric."""
    fields = {}
    for name in reported_metrics(selected_metrics, metrics):
        stats = metrics.stats[name]
        fields[f"mean_{name}_ms"] = stats.mean
        fields[f"median_{name}_ms"] = stats.median
        fields[f"std_{name}_ms"] = stats.std
        for p, value in stats.percentiles.items():
            fields[f"p{percentile_word(p)}_{name}_ms"] = value
    return fields


def result_fields(
    outputs: Sequence[RequestOutput],
    metrics: BenchmarkMetrics,
    duration_s: float,
    selected_metrics: list[str],
    goodput: bool,
) -> dict:
    """The measured part of the result JSON, in vLLM's field order (per-request arrays included)."""
    return {
        "duration": duration_s,
        "completed": metrics.completed,
        "failed": metrics.failed,
        "total_input_tokens": metrics.total_input,
        "total_output_tokens": metrics.total_output,
        "request_throughput": metrics.request_throughput,
        "request_goodput": metrics.request_goodput if goodput else None,
        "output_throughput": metrics.output_throughput,
        "total_token_throughput": metrics.total_token_throughput,
        "input_lens": [o.prompt_len for o in outputs],
        "output_lens": metrics.output_lens,
        "ttfts": [o.ttft for o in outputs],
        "itls": [o.itl for o in outputs],
        "latencies": [o.latency for o in outputs],
        "start_times": [o.start_time for o in outputs],
        "queue_times": [o.client_queue_time for o in outputs],
        "generated_texts": [o.generated_text for o in outputs],
        "errors": [o.error for o in outputs],
        "max_output_tokens_per_s": metrics.max_output_tokens_per_s,
        "max_concurrent_requests": metrics.max_concurrent_requests,
        "rtfx": 0.0,
        **metric_fields(metrics, selected_metrics),
    }


def result_filename(label: str, request_rate: float, max_concurrency: int | None, model_id: str, date: str) -> str:
    """vLLM's default: `{label}-{rate}qps[-concurrency{N}]-{model basename}-{date}.json`."""
    concurrency = f"-concurrency{max_concurrency}" if max_concurrency is not None else ""
    return f"{label}-{request_rate}qps{concurrency}-{model_id.split('/')[-1]}-{date}.json"
