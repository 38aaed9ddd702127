"""The OpenAI / vLLM response contract in details clients rely on (fake engine unless named real):
logprobs 0, per-token text offsets in streams, stop_reason, continuous usage, one choice per chunk."""

import httpx

from tests.serve.fake_engine import DEFAULT_REPLY

MSG = [{"role": "user", "content": "hi"}]


def _stream(url: str, route: str, body: dict) -> list[dict]:
    import json

    with httpx.stream("POST", url + route, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_logprobs_zero_gives_the_sampled_token(client, fake):
    r = client.completions.create(model="tiny", prompt="Q:", max_tokens=3, logprobs=0)
    lp = r.choices[0].logprobs
    assert lp.top_logprobs == [{t: v} for t, v in zip(lp.tokens, lp.token_logprobs)]
    assert all(v is not None for v in lp.top_logprobs)


def test_streamed_text_offset_counts_tokens_even_when_text_is_held_back(fake_server, fake):
    """A stop string that may be forming holds text back, so deltas lag the tokens; offsets must not."""
    fake.reply = lambda prompt, params: "az bz cz dz ez"
    body = {"prompt": "Q:", "max_tokens": 12, "logprobs": 1, "stop": ["zzz"], "echo": True}
    whole = httpx.post(fake_server.url + "/v1/completions", json=body).json()["choices"][0]
    chunks = _stream(fake_server.url, "/v1/completions", body)
    offsets = [o for c in chunks for o in (c["choices"][0]["logprobs"] or {}).get("text_offset", [])]
    assert any(c["choices"][0]["text"] == "" for c in chunks[1:])  # some step was really held back
    assert offsets == whole["logprobs"]["text_offset"] == list(range(2, 14))
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["text"]


def test_continuous_usage_only_with_include_usage(fake_server, fake):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 4}
    alone = _stream(fake_server.url, "/v1/chat/completions",
                    {**body, "stream_options": {"continuous_usage_stats": True}})
    assert alone and not any("usage" in c for c in alone)
    both = _stream(fake_server.url, "/v1/chat/completions",
                   {**body, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert all(c.get("usage") for c in both) and both[-1]["choices"] == []
    prompt = {"prompt": "Q:", "max_tokens": 3, "stream_options": {"continuous_usage_stats": True}}
    assert not any("usage" in c for c in _stream(fake_server.url, "/v1/completions", prompt))


def test_streaming_n_sends_one_choice_per_chunk(fake_server, fake):
    chat = _stream(fake_server.url, "/v1/chat/completions", {"messages": MSG, "n": 3, "max_tokens": 5})
    assert chat and all(len(c["choices"]) == 1 for c in chat)
    assert sorted({c["choices"][0]["index"] for c in chat}) == [0, 1, 2]
    done = [c["choices"][0]["index"] for c in chat if c["choices"][0]["finish_reason"]]
    assert sorted(done) == [0, 1, 2]
    comp = _stream(fake_server.url, "/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 4})
    assert all(len(c["choices"]) == 1 for c in comp)
    texts: dict[int, str] = {}
    for c in comp:
        texts[c["choices"][0]["index"]] = texts.get(c["choices"][0]["index"], "") + c["choices"][0]["text"]
    assert texts == {i: DEFAULT_REPLY[:4] for i in range(4)}


def test_stop_reason_is_null_on_eos_and_the_id_of_a_requested_stop_token(real_server):
    """Real engine: the model's own end (eos / <|im_end|>) reports stop_reason null, as vLLM does;
    a stop_token_ids entry reports its id; a stop string reports the string."""
    url = real_server.url + "/v1/completions"
    im_end = real_server.ctx.tokenizer.convert_tokens_to_ids("<|im_end|>")
    eos = httpx.post(url, json={"prompt": "Once", "max_tokens": 5, "logit_bias": {str(im_end): 100}}).json()
    assert eos["choices"][0]["finish_reason"] == "stop" and eos["choices"][0]["stop_reason"] is None
    chunks = _stream(real_server.url, "/v1/chat/completions",
                     {"messages": MSG, "max_tokens": 5, "logit_bias": {str(im_end): 100}})
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["stop_reason"] is None
    own = httpx.post(url, json={"prompt": "Once", "max_tokens": 5, "stop_token_ids": [40],
                                "logit_bias": {"40": 100}}).json()
    assert own["choices"][0]["finish_reason"] == "stop" and own["choices"][0]["stop_reason"] == 40


def _sample(text: str, name: str) -> float:
    import re

    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert m, f"{name} not exported"
    return float(m.group(1))


def test_vllm_metrics_and_models_without_paths(real_server):
    """Real engine: vLLM 0.33's request, cache, process and HTTP metrics are exported and observed;
    /v1/models reports the served name as root, not the server's checkpoint path."""
    httpx.post(real_server.url + "/v1/completions",
               json={"prompt": "Once", "max_tokens": 6, "ignore_eos": True, "n": 2}).raise_for_status()
    text = httpx.get(real_server.url + "/metrics").text
    for name in ("vllm:request_time_per_output_token_seconds_count", "vllm:request_prefill_time_seconds_count",
                 "vllm:request_decode_time_seconds_count", "vllm:request_inference_time_seconds_count",
                 "vllm:request_max_num_generation_tokens_count", "vllm:request_params_n_count",
                 "vllm:request_params_max_tokens_count", "vllm:request_queue_time_seconds_count"):
        assert _sample(text, name) >= 1, name
    assert _sample(text, "vllm:request_max_num_generation_tokens_sum") >= 6
    assert _sample(text, "vllm:iteration_tokens_total_count") >= 6  # prefill + 5 decode steps at least
    assert _sample(text, "vllm:iteration_tokens_total_sum") >= _sample(text, "vllm:generation_tokens_total")
    assert 'vllm:num_requests_waiting_by_reason{engine="0",model_name="tiny",reason="capacity"}' in text
    assert 'vllm:cache_config_info{block_size="16"' in text and 'enable_prefix_caching="True"' in text
    assert _sample(text, "process_resident_memory_bytes") > 0
    assert 'http_requests_total{handler="/v1/completions",method="POST",status="2xx"}' in text
    assert 'handler="/metrics"' not in text  # vLLM's exclusions
    models = httpx.get(real_server.url + "/v1/models").json()["data"]
    assert [m["root"] for m in models] == ["tiny", "tiny"]
