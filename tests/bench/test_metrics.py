"""Every metric on hand-built timelines with answers worked out by hand.

Times are multiples of 1/8 s so every sum is exact in binary floating point.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybridserve.bench.metrics import (
    calculate_metrics,
    count_good_requests,
    peak_concurrency,
    peak_output_throughput,
    summarize,
)
from hybridserve.bench.request import RequestOutput


def ok(start, ttft, itl, n_tokens, prompt_len=10, text=""):
    return RequestOutput(
        success=True, start_time=start, ttft=ttft, itl=list(itl), latency=ttft + sum(itl),
        output_tokens=n_tokens, prompt_len=prompt_len, generated_text=text,
    )  # fmt: skip


def timeline():
    """A: [0, 1.125) 4 tokens at .5 .75 1 1.125; B: [.25, 1.125) 2 tokens at .5 1.125;
    C: [1.125, 1.25) 1 token at 1.25, starting exactly when A and B end; D failed."""
    return [
        ok(0.0, 0.5, [0.25, 0.25, 0.125], 4, prompt_len=10),
        ok(0.25, 0.25, [0.625], 2, prompt_len=20),
        ok(1.125, 0.125, [], 1, prompt_len=30),
        RequestOutput(success=False, error="HTTP 500: boom", prompt_len=40),
    ]


def test_summarize_uses_numpy_linear_percentiles():
    stats = summarize([1.0, 2.0, 3.0, 4.0], [25, 50, 99])
    assert stats.mean == pytest.approx(2500.0)
    assert stats.median == pytest.approx(2500.0)
    assert stats.std == pytest.approx(1000.0 * math.sqrt(1.25))  # population std
    assert stats.percentiles[25] == pytest.approx(1750.0)  # 1 + 0.25 * 3 s
    assert stats.percentiles[50] == pytest.approx(2500.0)
    assert stats.percentiles[99] == pytest.approx(3970.0)  # 1 + 0.99 * 3 s


def test_summarize_empty_is_zero():
    stats = summarize([], [99])
    assert (stats.mean, stats.median, stats.std, stats.percentiles[99]) == (0.0, 0.0, 0.0, 0.0)


def test_counts_and_throughputs():
    m = calculate_metrics(timeline(), duration_s=2.0, percentiles=[50, 99])
    assert (m.completed, m.failed) == (3, 1)
    assert m.output_lens == [4, 2, 1, 0]
    assert m.total_output == 7
    assert m.total_input == 60  # the failed request's prompt does not count
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(33.5)


def test_ttft_tpot_itl_e2el():
    m = calculate_metrics(timeline(), duration_s=2.0, percentiles=[50, 99])
    assert m.stats["ttft"].mean == pytest.approx(1000 * (0.5 + 0.25 + 0.125) / 3)
    assert m.stats["ttft"].median == pytest.approx(250.0)
    # TPOT excludes the first token and single-token requests: A (1.125-.5)/3, B (.875-.25)/1
    tpot_a, tpot_b = 0.625 / 3, 0.625
    assert m.stats["tpot"].mean == pytest.approx(1000 * (tpot_a + tpot_b) / 2)
    assert m.stats["tpot"].percentiles[99] == pytest.approx(1000 * (tpot_a + 0.99 * (tpot_b - tpot_a)))
    # ITL: every gap of every request in one flat list
    assert m.stats["itl"].mean == pytest.approx(1000 * (0.25 + 0.25 + 0.125 + 0.625) / 4)
    assert m.stats["itl"].median == pytest.approx(250.0)
    assert m.stats["e2el"].mean == pytest.approx(1000 * (1.125 + 0.875 + 0.125) / 3)


def test_peak_output_throughput_uses_one_second_buckets_from_first_start():
    # bucket [0,1): A .5 .75, B .5 -> 3 ; bucket [1,2): A 1.0 1.125, B 1.125, C 1.25 -> 4
    assert peak_output_throughput(timeline()[:3]) == 4.0
    # move C one second later: bucket 1 keeps 3, bucket 2 gets 1
    late = timeline()[:2] + [ok(2.125, 0.125, [], 1)]
    assert peak_output_throughput(late) == 3.0


def test_peak_concurrency_is_an_exact_sweep_with_departures_first():
    # A and B both end at 1.125, exactly when C starts: the peak is 2, never 3
    assert peak_concurrency(timeline()[:3]) == 2
    # 4 requests back to back through one slot never count as more than 1
    serial = [ok(i * 0.5, 0.25, [0.25], 2) for i in range(4)]
    assert peak_concurrency(serial) == 1
    # three fully overlapping requests
    assert peak_concurrency([ok(0.0, 0.5, [0.5], 2) for _ in range(3)]) == 3


def test_peak_metrics_in_calculate_metrics_ignore_failures():
    m = calculate_metrics(timeline(), duration_s=2.0)
    assert m.max_output_tokens_per_s == 4.0
    assert m.max_concurrent_requests == 2


def test_goodput_needs_every_slo_and_counts_single_token_tpot_as_zero():
    outputs = timeline()
    # TTFT <= 300 ms: B (250) and C (125) pass, A (500) fails
    assert calculate_metrics(outputs, 2.0, goodput_slos_ms={"ttft": 300}).request_goodput == pytest.approx(1.0)
    # + TPOT <= 300 ms: B's 625 ms fails; C has one token -> TPOT 0 -> passes
    both = calculate_metrics(outputs, 2.0, goodput_slos_ms={"ttft": 300, "tpot": 300})
    assert both.request_goodput == pytest.approx(0.5)
    # E2EL <= 1000 ms: B (875) and C (125)
    assert count_good_requests([0.5, 0.25, 0.125], [0.2, 0.625, 0.0], [1.125, 0.875, 0.125], {"e2el": 1000}) == 2
    # an SLO is met at equality
    assert count_good_requests([0.25], [0.0], [0.25], {"ttft": 250}) == 1
    assert calculate_metrics(outputs, 2.0).request_goodput == 0.0


def test_output_tokens_fall_back_to_retokenizing_the_text():
    no_usage = ok(0.0, 0.125, [0.125, 0.125], None, text="a b c")
    m = calculate_metrics([no_usage], 1.0, count_tokens=lambda text: len(text.split()))
    assert m.output_lens == [3]
    assert m.stats["tpot"].mean == pytest.approx(125.0)
    assert calculate_metrics([no_usage], 1.0).output_lens == [1]  # no tokenizer: 1, as vLLM


def test_client_queue_stats_only_with_a_concurrency_cap():
    outputs = timeline()[:3]
    for output, queue in zip(outputs, [0.0, 0.125, 0.5]):
        output.client_queue_time = queue
    assert "client_queue_time" not in calculate_metrics(outputs, 1.0).stats
    capped = calculate_metrics(outputs, 1.0, max_concurrency=2)
    assert capped.stats["client_queue_time"].mean == pytest.approx(1000 * 0.625 / 3)
    assert "e2el_including_client_queue" not in capped.stats  # only with a finite rate
    rated = calculate_metrics(outputs, 1.0, max_concurrency=2, request_rate=4.0)
    assert rated.stats["e2el_including_client_queue"].median == pytest.approx(1000 * 1.0)


def test_all_failed_gives_zeros_not_errors():
    m = calculate_metrics([RequestOutput(error="x"), RequestOutput(error="y")], 1.0)
    assert (m.completed, m.failed, m.total_output, m.max_concurrent_requests) == (0, 2, 0, 0)
    assert m.stats["ttft"].mean == 0.0
    assert np.isfinite(m.output_throughput)
