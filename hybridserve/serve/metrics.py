"""Prometheus metrics under vLLM's `vllm:` names (routers and dashboards scrape exactly these).

One registry per app. Engine-wide values (queue sizes, cache usage, token totals, preemptions, the
cache configuration) are read from the engine client at scrape time; per-request histograms and the
finish-reason counter are recorded by the API side as outputs stream by (times on the API clock:
prefill = time to first token less the engine's queue time, decode = first to last token).
`hybridserve:` gauges add what vLLM has no name for (Mamba state slots, requests in flight).
Process metrics (`process_*`, `python_*`) and HTTP metrics (`http_*`, from
prometheus-fastapi-instrumentator, as vLLM exports them) share the registry.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from hybridserve.engine.stats import ITERATION_TOKEN_BUCKETS

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 262144)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
HTTP_EXCLUDED = ("/metrics", "/health", "/ping", "/load", "/version")  # as vLLM's instrumentator


class _EngineCollector:
    """Reads the engine's last known stats when Prometheus scrapes."""

    def __init__(self, model_name: str, stats: Callable[[], Any | None], api_state: Callable[[], dict[str, Any]],
                 cache_info: Callable[[], dict[str, str] | None]):
        self._labels = {"model_name": model_name, "engine": "0"}
        self._stats = stats
        self._api_state = api_state
        self._cache_info = cache_info

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=list(self._labels))
        g.add_metric(list(self._labels.values()), float(value))
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=list(self._labels))
        c.add_metric(list(self._labels.values()), float(value))
        return c

    def collect(self) -> Iterator[Any]:
        api = self._api_state()
        yield self._gauge("hybridserve:api_requests_in_flight", "HTTP generation requests admitted and not done.",
                          api["in_flight"])
        rejections = CounterMetricFamily("vllm:admission_rejections", "Requests rejected with 503 at admission.",
                                         labels=["model_name", "reason"])
        for reason, count in sorted(api["rejections"].items()):
            rejections.add_metric([self._labels["model_name"], reason], float(count))
        yield rejections
        s = self._stats()
        if s is None:
            return
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        by_reason = GaugeMetricFamily("vllm:num_requests_waiting_by_reason",
                                      "Waiting requests by reason (every wait here is for capacity: a state "
                                      "slot, KV blocks or the step's token budget).", labels=[*self._labels, "reason"])
        for reason, value in (("capacity", s.num_waiting), ("deferred", 0)):
            by_reason.add_metric([*self._labels.values(), reason], float(value))
        yield by_reason
        info = self._cache_info()
        if info is not None:
            g = GaugeMetricFamily("vllm:cache_config_info", "Information of the cache configuration.",
                                  labels=["engine", *info])
            g.add_metric(["0", *info.values()], 1.0)
            yield g
        usage = max(s.kv_cache_usage, s.state_slot_usage)
        yield self._gauge("vllm:kv_cache_usage_perc",
                          "Fraction of the binding cache in use (KV blocks or Mamba state slots, the fuller).", usage)
        yield self._gauge("hybridserve:kv_block_usage_perc", "Fraction of KV-cache blocks in use.", s.kv_cache_usage)
        yield self._gauge("hybridserve:state_slot_usage_perc", "Fraction of Mamba state slots in use.",
                          s.state_slot_usage)
        yield self._gauge("hybridserve:num_free_state_slots", "Free Mamba state slots.", s.num_free_slots)
        yield self._gauge("hybridserve:num_free_kv_blocks", "Free KV-cache blocks.", s.num_free_blocks)
        yield self._counter("vllm:prompt_tokens", "Prefill tokens processed.", s.prompt_tokens_total)
        yield self._counter("vllm:generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield self._counter("vllm:num_preemptions", "Preemptions (a request recomputed later).",
                            s.num_preemptions_total)
        yield self._counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            getattr(s, "prefix_cache_queries_total", 0))
        yield self._counter("vllm:prefix_cache_hits", "Prompt tokens resumed from the prefix cache.",
                            getattr(s, "prefix_cache_hits_total", 0))
        yield self._gauge("hybridserve:num_prefix_cache_snapshots", "Mamba state snapshots the prefix cache holds.",
                          getattr(s, "num_snapshots", 0))
        counts = getattr(s, "iteration_tokens_counts", None)
        if counts:
            h = HistogramMetricFamily("vllm:iteration_tokens_total", "Tokens per engine step (prompt + generated).",
                                      labels=list(self._labels))
            bounds = [str(float(b)) for b in ITERATION_TOKEN_BUCKETS] + ["+Inf"]
            h.add_metric(list(self._labels.values()), list(zip(bounds, itertools.accumulate(counts))),
                         float(s.iteration_tokens_sum))
            yield h


class Metrics:
    def __init__(self, model_name: str, stats: Callable[[], Any | None], api_state: Callable[[], dict[str, Any]],
                 cache_info: Callable[[], dict[str, str] | None] = lambda: None):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model_name, stats, api_state, cache_info))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        labels, values = ["model_name", "engine"], (model_name, "0")

        # Children with their labels made once: every name is exported (at zero) before any traffic,
        # and the per-token observe() skips the label lookup.
        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(*values)

        self.ttft = hist("vllm:time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds", "Time between consecutive outputs.", LATENCY_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds", "Arrival to last token.", LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds", "Time waiting before the first engine step.",
                               LATENCY_BUCKETS)
        self.prefill_time = hist("vllm:request_prefill_time_seconds",
                                 "Time to first token less the queue time.", LATENCY_BUCKETS)
        self.decode_time = hist("vllm:request_decode_time_seconds", "First to last token.", LATENCY_BUCKETS)
        self.inference_time = hist("vllm:request_inference_time_seconds", "Prefill plus decode time.",
                                   LATENCY_BUCKETS)
        self.tpot = hist("vllm:request_time_per_output_token_seconds",
                         "Decode time per output token after the first, per request.", TPOT_BUCKETS)
        self.prompt_tokens = hist("vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.generation_tokens = hist("vllm:request_generation_tokens", "Generated tokens per request.",
                                      TOKEN_BUCKETS)
        self.max_generation_tokens = hist("vllm:request_max_num_generation_tokens",
                                          "Generated tokens of the longest sequence of a request.", TOKEN_BUCKETS)
        self.params_n = hist("vllm:request_params_n", "The n parameter per request.", (1, 2, 5, 10, 20))
        self.params_max_tokens = hist("vllm:request_params_max_tokens", "max_tokens per request.", TOKEN_BUCKETS)
        success = Counter("vllm:request_success", "Finished requests by finish reason.",
                          labels + ["finished_reason"], registry=self.registry)
        self.success = {r: success.labels(*values, r) for r in ("stop", "length", "abort", "error")}

    def instrument(self, app: Any) -> None:
        """HTTP request metrics of `app` (vLLM's prometheus-fastapi-instrumentator set) in this registry."""
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator(excluded_handlers=list(HTTP_EXCLUDED), registry=self.registry).instrument(app)

    def observe_request(self, *, prompt_tokens: int, n: int, max_tokens: int) -> None:
        self.prompt_tokens.observe(prompt_tokens)
        self.params_n.observe(n)
        self.params_max_tokens.observe(max_tokens)

    def observe_finished(self, *, e2e_seconds: float, token_counts: list[int], finish_reasons: list[str],
                         first_token_seconds: float | None = None, queue_seconds: float | None = None) -> None:
        """One finished request: `token_counts` per sequence; times in seconds from its arrival."""
        self.e2e.observe(e2e_seconds)
        self.generation_tokens.observe(sum(token_counts))
        self.max_generation_tokens.observe(max(token_counts, default=0))
        if first_token_seconds is not None:
            prefill = max(0.0, first_token_seconds - (queue_seconds or 0.0))
            decode = max(0.0, e2e_seconds - first_token_seconds)
            self.prefill_time.observe(prefill)
            self.decode_time.observe(decode)
            self.inference_time.observe(prefill + decode)
            if max(token_counts, default=0) > 1:
                self.tpot.observe(decode / (max(token_counts) - 1))
        for reason in finish_reasons:
            self.success.get(reason, self.success["error"]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def cache_config_info(engine: Any) -> dict[str, str] | None:
    """The labels of `vllm:cache_config_info` (None until the engine and its cache exist)."""
    config = getattr(engine, "config", None)
    if config is None:
        return None
    stats = engine.stats()
    ssm = config.mamba_ssm_cache_dtype
    return {"block_size": str(config.block_size), "cache_dtype": config.kv_cache_dtype,
            "gpu_memory_utilization": str(config.gpu_memory_utilization), "num_gpu_blocks": str(stats.num_blocks),
            "num_state_slots": str(stats.num_slots), "enable_prefix_caching": str(bool(getattr(config, "enable_prefix_caching", False))),
            "mamba_ssm_cache_dtype": engine.model_config.mamba_ssm_cache_dtype if ssm == "auto" else ssm}
