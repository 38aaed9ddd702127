"""/v1/completions, /v1/models, /tokenize, /detokenize, /version, /health and /metrics (fake engine)."""

import httpx

TEXT = "Let me think.\n</think>\nHello there! The answer is 42."


def test_completion_text_prompt(client, fake):
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5)
    assert r.choices[0].text == TEXT[:5] and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(fake.tokenizer.encode("Once upon", add_special_tokens=False))
    assert r.usage.completion_tokens == 5
    assert fake.last_prompt_ids == fake.tokenizer.encode("Once upon", add_special_tokens=False)


def test_completion_token_and_list_prompts(client, fake):
    r = client.completions.create(model="tiny", prompt=[20, 21, 22], max_tokens=3)
    assert fake.last_prompt_ids == [20, 21, 22] and r.usage.prompt_tokens == 3
    r = client.completions.create(model="tiny", prompt=["a", "bb", "ccc"], max_tokens=2, n=2)
    assert [c.index for c in r.choices] == list(range(6))
    assert r.usage.prompt_tokens == 1 + 2 + 3 and r.usage.completion_tokens == 12
    r = client.completions.create(model="tiny", prompt=[[30, 31], [32, 33, 34, 35]], max_tokens=1)
    assert r.usage.prompt_tokens == 6 and len(r.choices) == 2


def test_completion_echo_logprobs_stop(client, fake):
    r = client.completions.create(model="tiny", prompt="Q:", max_tokens=4, echo=True, logprobs=2)
    assert r.choices[0].text == "Q:" + TEXT[:4]
    lp = r.choices[0].logprobs
    assert lp.tokens == list(TEXT[:4]) and len(lp.token_logprobs) == 4
    assert lp.text_offset == [2, 3, 4, 5] and all(len(t) >= 2 for t in lp.top_logprobs)
    chunks = list(client.completions.create(model="tiny", prompt="Q:", max_tokens=4, echo=True, logprobs=2,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Q:" + TEXT[:4]
    assert [o for c in chunks for o in c.choices[0].logprobs.text_offset] == [2, 3, 4, 5]  # as without streaming
    r = client.completions.create(model="tiny", prompt="Q:", max_tokens=50, stop="think")
    assert r.choices[0].text == "Let me " and r.choices[0].finish_reason == "stop"


def test_completion_streaming(client, fake):
    chunks = list(client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    for c in chunks[:-1]:
        for ch in c.choices:
            texts[ch.index] += ch.text
    assert texts == {0: TEXT[:6], 1: TEXT[:6]}
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    # one chunk per token per prompt
    assert sum(len(c.choices) for c in chunks[:-1]) == 12


def test_models_and_version(client, fake_server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "alias"]
    assert models[0].model_extra["max_model_len"] == 2048
    assert httpx.get(fake_server.url + "/version").json()["version"]


def test_tokenize_detokenize(fake_server, fake):
    r = httpx.post(fake_server.url + "/tokenize", json={"prompt": "héllo", "return_token_strs": True}).json()
    assert r["tokens"] == fake.tokenizer.encode("héllo") and r["count"] == len(r["tokens"])
    assert len(r["token_strs"]) == r["count"] and r["max_model_len"] == 2048
    back = httpx.post(fake_server.url + "/detokenize", json={"tokens": r["tokens"]}).json()
    assert back["prompt"] == "héllo"
    chat = httpx.post(fake_server.url + "/tokenize",
                      json={"messages": [{"role": "user", "content": "hi"}]}).json()
    text = httpx.post(fake_server.url + "/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_metrics_names(client, fake_server, fake):
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}])
    text = httpx.get(fake_server.url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count", "vllm:request_queue_time_seconds_count",
                 "hybridserve:state_slot_usage_perc", "hybridserve:num_free_state_slots"):
        assert name in text, name
    line = next(ln for ln in text.splitlines()
                if ln.startswith("vllm:request_success_total") and 'finished_reason="stop"' in ln)
    assert float(line.split()[-1]) >= 1
    ttft = next(ln for ln in text.splitlines() if ln.startswith("vllm:time_to_first_token_seconds_count"))
    assert float(ttft.split()[-1]) >= 1


def test_health(fake_server, fake):
    r = httpx.get(fake_server.url + "/health")
    assert r.status_code == 200 and r.content == b""
    fake.errored = True
    try:
        r = httpx.get(fake_server.url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == 503
        r = httpx.post(fake_server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503
    finally:
        fake.errored = False
