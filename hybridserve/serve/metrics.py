"""Prometheus metrics under vLLM's `vllm:` names (routers and dashboards scrape exactly these).

One registry per app. Engine-wide values (queue sizes, cache usage, token totals, preemptions)
are read from `EngineClient.stats()` at scrape time; per-request histograms and the finish-reason
counter are recorded by the API side as outputs stream by. `hybridserve:` gauges add what vLLM
has no name for: Mamba state-slot usage and the API's own admission counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 262144)


class _EngineCollector:
    """Reads the engine's last known stats when Prometheus scrapes."""

    def __init__(self, model_name: str, stats: Callable[[], Any | None], api_state: Callable[[], dict[str, float]]):
        self._labels = {"model_name": model_name, "engine": "0"}
        self._stats = stats
        self._api_state = api_state

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
        yield self._counter("hybridserve:admission_rejections", "Requests rejected with 503 (queue full).",
                            api["rejected"])
        s = self._stats()
        if s is None:
            return
        yield self._gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
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


class Metrics:
    def __init__(self, model_name: str, stats: Callable[[], Any | None], api_state: Callable[[], dict[str, float]]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(model_name, stats, api_state))
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
        self.prompt_tokens = hist("vllm:request_prompt_tokens", "Prompt tokens per request.", TOKEN_BUCKETS)
        self.generation_tokens = hist("vllm:request_generation_tokens", "Generated tokens per request.",
                                      TOKEN_BUCKETS)
        self.params_n = hist("vllm:request_params_n", "The n parameter per request.", (1, 2, 5, 10, 20))
        self.params_max_tokens = hist("vllm:request_params_max_tokens", "max_tokens per request.", TOKEN_BUCKETS)
        success = Counter("vllm:request_success", "Finished requests by finish reason.",
                          labels + ["finished_reason"], registry=self.registry)
        self.success = {r: success.labels(*values, r) for r in ("stop", "length", "abort", "error")}

    def observe_request(self, *, prompt_tokens: int, n: int, max_tokens: int) -> None:
        self.prompt_tokens.observe(prompt_tokens)
        self.params_n.observe(n)
        self.params_max_tokens.observe(max_tokens)

    def observe_finished(self, *, e2e_seconds: float, generation_tokens: int, finish_reasons: list[str]) -> None:
        self.e2e.observe(e2e_seconds)
        self.generation_tokens.observe(generation_tokens)
        for reason in finish_reasons:
            self.success.get(reason, self.success["error"]).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
