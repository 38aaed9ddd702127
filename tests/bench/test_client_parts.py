"""Unit tests of the client's pieces: SSE parsing, payloads, arrivals, option parsing, the report."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hybridserve.bench.datasets import SampleRequest
from hybridserve.bench.metrics import calculate_metrics
from hybridserve.bench.report import format_report, metric_fields, result_filename
from hybridserve.bench.request import RequestOutput, SSEParser, build_payload, error_text
from hybridserve.bench.serve import (
    BenchError,
    arrival_offsets,
    choose_model,
    format_server_side,
    parse_goodput,
    parse_percentiles,
    server_side,
)


def test_sse_parser_handles_split_frames_comments_crlf_and_utf8():
    parser = SSEParser()
    euro = '{"t": "€"}'.encode()
    assert parser.feed(b': ping\n\ndata: {"a"') == []
    assert parser.feed(b": 1}\n\ndata: [DO") == ['{"a": 1}']
    assert parser.feed(b"NE]\r\n\r\ndata: " + euro[:8]) == ["[DONE]"]
    assert parser.feed(euro[8:] + b"\n\n") == ['{"t": "€"}']


def test_completions_payload_matches_vllm():
    request = SampleRequest("w1 w2", 2, 9, "bench-0")
    payload = build_payload("openai", "m", request, ignore_eos=True, extra_body={"temperature": 0.5})
    assert payload == {
        "model": "m", "prompt": "w1 w2", "repetition_penalty": 1.0, "max_tokens": 9, "logprobs": None,
        "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.5,
    }  # fmt: skip


def test_chat_payload_sends_max_completion_tokens():
    payload = build_payload("openai-chat", "m", SampleRequest("hi", 1, 5), ignore_eos=False, extra_body={})
    assert payload["messages"] == [{"role": "user", "content": "hi"}]
    assert payload["max_completion_tokens"] == 5
    assert "max_tokens" not in payload and "ignore_eos" not in payload


def test_error_text_reads_openai_errors():
    assert error_text('{"error": {"message": "no such model", "code": 404}}') == "no such model"
    assert error_text('{"object": "error", "message": "bad"}') == "bad"
    assert error_text("plain text\n") == "plain text"


def test_arrival_offsets():
    rng = np.random.default_rng(0)
    assert arrival_offsets(5, math.inf, 1.0, rng).tolist() == [0.0] * 5
    poisson = arrival_offsets(100, 20.0, 1.0, rng)
    assert np.all(np.diff(poisson) >= 0)
    assert poisson[-1] == pytest.approx(100 / 20.0)  # rescaled: the last goes out at N / rate
    assert arrival_offsets(4, 2.0, math.inf, rng).tolist() == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # burstier arrivals (shape < 1) have more spread-out gaps than Poisson
    bursty = np.diff(arrival_offsets(2000, 20.0, 0.25, np.random.default_rng(1)))
    smooth = np.diff(arrival_offsets(2000, 20.0, 4.0, np.random.default_rng(1)))
    assert bursty.std() > 2 * smooth.std()


def test_option_parsing():
    assert parse_goodput(["ttft:500", "tpot:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    with pytest.raises(BenchError):
        parse_goodput(["itl:5"])
    with pytest.raises(BenchError):
        parse_goodput(["ttft=5"])
    assert parse_percentiles("50,90,99.9") == [50.0, 90.0, 99.9]
    with pytest.raises(BenchError):
        parse_percentiles("101")


def test_choose_model():
    models = [{"id": "a"}, {"id": "b"}]
    assert choose_model(None, models, "u") == ("a", {"id": "a"})
    assert choose_model("b", models, "u") == ("b", {"id": "b"})
    assert choose_model("c", None, "u") == ("c", None)  # server without /v1/models: trust the user
    with pytest.raises(BenchError, match="not served"):
        choose_model("c", models, "u")


def test_report_block_has_vllm_layout_and_fields():
    outputs = [
        RequestOutput(success=True, start_time=0.0, ttft=0.5, itl=[0.25], latency=0.75, output_tokens=2, prompt_len=3),
        RequestOutput(success=False, error="x"),
    ]
    metrics = calculate_metrics(outputs, 1.0, [50, 99.9])
    text = format_report(metrics, 1.0, ["ttft", "tpot", "itl"], max_concurrency=4, request_rate=2.0, goodput=False)
    lines = text.splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[-1] == "=" * 50
    assert f"{'Successful requests:':<40} {1:<10}" in lines
    assert f"{'Failed requests:':<40} {1:<10}" in lines
    assert f"{'Maximum request concurrency:':<40} {4:<10}" in lines
    assert f"{'Request rate configured (RPS):':<40} {2.0:<10.2f}" in lines
    assert f"{'Total generated tokens:':<40} {2:<10}" in lines
    assert "---------------Time to First Token----------------" in lines
    assert f"{'P99.9 TTFT (ms):':<40} {500.0:<10.2f}" in lines
    assert not any("Goodput" in line or "E2EL" in line for line in lines)
    fields = metric_fields(metrics, ["ttft", "tpot", "itl"])
    assert fields["p50_tpot_ms"] == pytest.approx(250.0) and fields["p99.9_itl_ms"] == pytest.approx(250.0)
    assert {"mean_ttft_ms", "median_ttft_ms", "std_ttft_ms"} <= fields.keys()


def test_result_filename_like_vllm():
    assert result_filename("openai", math.inf, 8, "org/model", "20260101-000000") == (
        "openai-infqps-concurrency8-model-20260101-000000.json"
    )
    assert result_filename("x", 2.0, None, "m", "d") == "x-2.0qps-m-d.json"


STREAMS = {
    "/garbage": b"data: not json\n\n",
    "/array": b"data: [1, 2]\n\n",
    "/empty": b": comment only\n\ndata: [DONE]\n\n",
    "/no-usage": b'data: {"choices": [{"text": "a"}]}\n\ndata: {"choices": [{"text": ""}]}\n\ndata: [DONE]\n\n',
}


async def test_send_request_on_odd_streams():
    import aiohttp
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from hybridserve.bench.request import send_request

    async def handler(request):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(STREAMS[request.path])
        return response

    app = web.Application()
    for path in STREAMS:
        app.router.add_post(path, handler)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:

        async def send(path):
            return await send_request(session, str(server.make_url(path)), "openai", "m", SampleRequest("p", 1, 2))

        garbage, array, empty, no_usage = [await send(path) for path in STREAMS]
    assert not garbage.success and "JSONDecodeError" in garbage.error
    assert not array.success and "not a JSON object" in array.error
    assert not empty.success and "without any message carrying choices" in empty.error
    # an empty-text chunk still counts as a token message; no usage -> count left to the tokenizer
    assert no_usage.success and no_usage.output_tokens is None and len(no_usage.itl) == 1
    assert no_usage.generated_text == "a" and no_usage.latency >= no_usage.ttft > 0


def test_server_side_reads_the_counters_change_over_the_run():
    before = {"vllm:prefix_cache_queries_total": 100.0, "vllm:prefix_cache_hits_total": 40.0,
              "vllm:time_to_first_token_seconds_sum": 1.0, "vllm:time_to_first_token_seconds_count": 2.0,
              "vllm:request_queue_time_seconds_sum": 0.5, "vllm:request_queue_time_seconds_count": 2.0,
              "vllm:iteration_tokens_total_sum": 50.0, "vllm:iteration_tokens_total_count": 10.0}
    after = {"vllm:prefix_cache_queries_total": 300.0, "vllm:prefix_cache_hits_total": 190.0,
             "vllm:time_to_first_token_seconds_sum": 1.3, "vllm:time_to_first_token_seconds_count": 6.0,
             "vllm:request_queue_time_seconds_sum": 0.54, "vllm:request_queue_time_seconds_count": 6.0,
             "vllm:iteration_tokens_total_sum": 450.0, "vllm:iteration_tokens_total_count": 30.0}
    side = server_side(before, after, duration=2.0)
    assert side == pytest.approx({"prefix_cache_hit_rate": 0.75, "server_mean_ttft_ms": 75.0,
                                  "server_mean_queue_time_ms": 10.0, "engine_steps": 20,
                                  "engine_ms_per_step": 100.0, "engine_mean_tokens_per_step": 20.0})
    text = format_server_side(side)
    assert "hit rate (server, prompt tokens): 75.0%" in text and "75.00 ms, of it queued in the engine: 10.00 ms" in text
    assert "Engine steps: 20 (one per 100.00 ms of the run, 20.0 tokens each)" in text
    # a server without these series (or without /metrics): nothing reported, nulls in the JSON
    empty = server_side(None, None, 2.0)
    assert set(empty.values()) == {None} and format_server_side(empty) == ""
    only_cache = server_side({}, {"vllm:prefix_cache_queries_total": 10.0, "vllm:prefix_cache_hits_total": 5.0}, 2.0)
    assert format_server_side(only_cache) == "Prefix cache hit rate (server, prompt tokens): 50.0%"
