"""The openai client against a real uvicorn server running the real engine on the tiny preset (CPU).

The tiny preset has random weights, so the tests check what must hold for any model: exact usage,
streaming == non-streaming under greedy decoding, n, logprobs, stop strings, seeds, the
context-length error, and that a storm of cut streams leaves no KV block or state slot in use.
"""

import asyncio
import time

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "Tell me a story."}]


def test_chat_usage_and_stream_equals_non_stream(real, real_server):
    kw = dict(model="tiny", messages=MSG, temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    r = real.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 12
    count = httpx.post(real_server.url + "/tokenize", json={"messages": MSG}).json()["count"]
    assert r.usage.prompt_tokens == count and r.usage.total_tokens == count + 12
    chunks = list(real.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    streamed = chunks[-1].usage.model_dump()
    assert streamed.pop("prompt_tokens_details")["cached_tokens"] == (count - 1) // 16 * 16  # the same prompt again
    assert streamed == {k: v for k, v in r.usage.model_dump().items() if k != "prompt_tokens_details"}
    body = [c for c in chunks if c.choices]
    assert len(body) <= 12  # at most one chunk per token
    assert body[0].choices[0].delta.role == "assistant"
    assert any(c.choices[0].delta.reasoning_content or c.choices[0].delta.content for c in body[:1])
    reasoning = "".join(c.choices[0].delta.reasoning_content or "" for c in body)
    content = "".join(c.choices[0].delta.content or "" for c in body)
    assert (reasoning or None, content or None) == (r.choices[0].message.reasoning_content,
                                                     r.choices[0].message.content)


def test_completions_prompt_forms(real):
    r = real.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0,
                                extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    ids = real.completions.create(model="tiny", prompt=[20, 30, 40, 50], max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert ids.usage.prompt_tokens == 4
    many = real.completions.create(model="tiny", prompt=["Once upon a time", [20, 30, 40, 50]], max_tokens=8,
                                   temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in many.choices] == [r.choices[0].text, ids.choices[0].text]
    streamed = "".join(c.choices[0].text for c in real.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if c.choices)
    assert streamed == r.choices[0].text


def test_n_logprobs_and_seeds(real):
    r = real.chat.completions.create(model="tiny", messages=MSG, n=3, max_tokens=6, temperature=1.0, seed=123,
                                     logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    assert len(r.choices) == 3 and r.usage.completion_tokens == 18
    for c in r.choices:
        assert len(c.logprobs.content) == 6
        for t in c.logprobs.content:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3
            assert t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob
    again = real.chat.completions.create(model="tiny", messages=MSG, n=3, max_tokens=6, temperature=1.0, seed=123,
                                         extra_body={"ignore_eos": True})
    texts = [(c.message.reasoning_content, c.message.content) for c in r.choices]
    assert texts == [(c.message.reasoning_content, c.message.content) for c in again.choices]


def test_stop_string_cuts_the_output(real):
    kw = dict(model="tiny", prompt="Once upon a time", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = real.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full
    cut = real.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def test_context_length_error(real):
    with pytest.raises(openai.BadRequestError) as e:
        real.chat.completions.create(model="tiny", messages=MSG, max_tokens=5000)
    assert "maximum context length is 2048 tokens" in e.value.body["message"]


def test_disconnect_storm_frees_kv_blocks_and_state_slots(real_server, real):
    url = real_server.url + "/v1/completions"
    body = {"prompt": "Once upon a time", "max_tokens": 500, "stream": True, "ignore_eos": True}

    async def cut(i: int):
        async with httpx.AsyncClient(timeout=60) as c:
            async with c.stream("POST", url, json=body) as r:
                n = 0
                async for line in r.aiter_lines():
                    n += bool(line)
                    if n >= 2 + i % 4:
                        return

    async def storm():
        await asyncio.gather(*(cut(i) for i in range(12)))

    asyncio.run(storm())
    engine = real_server.ctx.engine
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.num_running == 0 and s.num_waiting == 0 and s.num_free_slots == s.num_slots \
                and s.num_free_blocks == s.num_blocks:
            break
        time.sleep(0.05)
    s = engine.stats()
    assert (s.num_running, s.num_waiting) == (0, 0)
    assert s.num_free_slots == s.num_slots and s.num_free_blocks == s.num_blocks
    metrics = httpx.get(real_server.url + "/metrics").text
    assert f'hybridserve:num_free_state_slots{{engine="0",model_name="tiny"}} {float(s.num_slots)}' in metrics
    assert 'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"} 0.0' in metrics
    t0 = time.monotonic()
    r = real.completions.create(model="tiny", prompt="Hi", max_tokens=4, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4 and time.monotonic() - t0 < 5
    queued = next(ln for ln in httpx.get(real_server.url + "/metrics").text.splitlines()
                  if ln.startswith("vllm:request_queue_time_seconds_count"))
    assert float(queued.split()[-1]) >= 1  # the engine reports each request's queue time


def test_thinking_budget_ends_reasoning(real):
    from hybridserve.serve.chat import THINKING_GRACE_TOKENS

    kw = dict(model="tiny", messages=MSG, temperature=0, max_tokens=48, extra_body={"ignore_eos": True})
    free = real.chat.completions.create(**kw)
    capped = real.chat.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "thinking_token_budget": 4}})
    budget_end = 4 + THINKING_GRACE_TOKENS + 1  # the forced </think> counts as a reasoning token
    assert capped.usage.completion_tokens_details.reasoning_tokens <= budget_end
    assert capped.choices[0].message.content  # the rest of the output became the answer
    if free.usage.completion_tokens_details.reasoning_tokens > budget_end:
        assert capped.choices[0].message.reasoning_content != free.choices[0].message.reasoning_content


def test_prefix_cache_hits_in_usage_and_metrics(real, real_server):
    """A prompt extending an earlier one reports the reused tokens in usage (vLLM's
    prompt_tokens_details.cached_tokens), in completions and chat, streamed or not, and the
    vllm:prefix_cache_* counters count them."""
    import random

    def counter(name: str) -> float:
        text = httpx.get(real_server.url + "/metrics").text
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + "{")))

    hits0 = counter("vllm:prefix_cache_hits_total")
    prompt = [random.Random(16).randrange(10, 400) for _ in range(40)]
    kw = dict(model="tiny", max_tokens=3, temperature=0)
    first = real.completions.create(prompt=prompt, **kw)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    longer = real.completions.create(prompt=prompt + [7] * 20, **kw)
    assert longer.usage.prompt_tokens_details.cached_tokens == 32  # the first prompt's last full block
    assert counter("vllm:prefix_cache_hits_total") - hits0 == 32
    assert counter("vllm:prefix_cache_queries_total") >= 40 + 60
    system = [{"role": "system", "content": "You are a careful assistant. " * 12}, *MSG]
    count = httpx.post(real_server.url + "/tokenize", json={"messages": system}).json()["count"]
    assert real.chat.completions.create(messages=system, **kw).usage.prompt_tokens_details.cached_tokens in (0, (count - 1) // 16 * 16)
    again = list(real.chat.completions.create(messages=system, stream=True, stream_options={"include_usage": True}, **kw))
    assert again[-1].usage.prompt_tokens_details.cached_tokens == (count - 1) // 16 * 16 > 0  # the same prompt again
