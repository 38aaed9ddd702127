"""Chat completions over real HTTP (uvicorn + the openai client) with a scripted fake engine."""

import json

import httpx
import openai
import pytest

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]

CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=days>\n3\n"
        "</parameter>\n</function>\n</tool_call>")
MSG = [{"role": "user", "content": "Weather in Paris?"}]


def prompt_len(fake_server, messages, **kw):
    body = {"messages": messages, **kw}
    return httpx.post(fake_server.url + "/tokenize", json=body).json()["count"]


def test_reasoning_and_content_split(client, fake, fake_server):
    r = client.chat.completions.create(model="tiny", messages=MSG)
    m = r.choices[0].message
    assert m.content == "Hello there! The answer is 42."
    assert m.reasoning_content == m.reasoning == "Let me think.\n"
    assert r.choices[0].finish_reason == "stop"
    assert m.tool_calls == []
    gen = fake.tokenizer.encode("Let me think.\n</think>\nHello there! The answer is 42.<|im_end|>",
                                add_special_tokens=False)
    assert r.usage.completion_tokens == len(gen)
    assert r.usage.prompt_tokens == prompt_len(fake_server, MSG) == len(fake.last_prompt_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # reasoning tokens: those generated while reasoning was open, the closing </think> included
    assert r.usage.completion_tokens_details.reasoning_tokens == len(fake.tokenizer.encode("Let me think.\n")) + 1


def test_stream_one_chunk_per_token_and_usage(client, fake):
    stream = client.chat.completions.create(model="tiny", messages=MSG, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    *content_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    first = content_chunks[0].choices[0].delta
    assert first.role == "assistant" and first.reasoning == "L"  # no empty first chunk
    reasoning = "".join(c.choices[0].delta.reasoning_content or "" for c in content_chunks)
    content = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert reasoning == "Let me think.\n" and content == "Hello there! The answer is 42."
    # one chunk per generated token (the first is visible here): </think> and the newline the
    # parser drops after it send empty deltas, <|im_end|> the finish chunk
    assert len(content_chunks) == usage_chunk.usage.completion_tokens > len(reasoning) + len(content)
    assert content_chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in content_chunks[:-1])
    ns = client.chat.completions.create(model="tiny", messages=MSG)
    assert usage_chunk.usage.prompt_tokens == ns.usage.prompt_tokens
    assert usage_chunk.usage.completion_tokens == ns.usage.completion_tokens


def test_raw_sse_framing_and_null_reasoning_fields(fake_server, fake):
    fake.reply = lambda p, s: "ok<|im_end|>"
    body = {"model": "tiny", "messages": MSG, "stream": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    with httpx.stream("POST", fake_server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(ln[len("data: "):]) for ln in lines[:-1]]
    for p in payloads:
        delta = p["choices"][0]["delta"]
        assert "reasoning" in delta and "reasoning_content" in delta  # always serialised
    assert payloads[0]["choices"][0]["delta"]["content"] == "o"


def test_thinking_off_goes_to_content(client, fake):
    fake.reply = lambda p, s: "Stray</think>Answer.<|im_end|>"
    r = client.chat.completions.create(model="tiny", messages=MSG,
                                       extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # the model thought anyway: split as nano_v3 does (a stream, which cannot take text back, drops the tag)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Stray", "Answer.")
    streamed = list(client.chat.completions.create(model="tiny", messages=MSG, stream=True, extra_body={
        "chat_template_kwargs": {"enable_thinking": False}}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == "StrayAnswer."
    assert fake.tokenizer.decode(fake.last_prompt_ids).endswith("<|im_start|>assistant\n<think></think>")
    assert fake.last_params.thinking_budget is None


def test_truncated_response_keeps_reasoning(client, fake):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_completion_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.reasoning_content == "Let m"
    assert r.choices[0].message.content is None
    assert fake.last_params.max_tokens == 5
    client.chat.completions.create(model="tiny", messages=MSG, max_tokens=7)
    assert fake.last_params.max_tokens == 7


def test_default_max_tokens_is_capped_by_context(client, fake, fake_server):
    client.chat.completions.create(model="tiny", messages=MSG)
    n = prompt_len(fake_server, MSG)
    assert fake.last_params.max_tokens == min(fake_server.ctx.settings.default_max_tokens, 2048 - n)


def test_tool_call_non_streaming(client, fake):
    fake.reply = lambda p, s: "Need weather.</think>I'll check.\n" + CALL + "<|im_end|>"
    r = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "Need weather."
    assert choice.message.content == "I'll check."
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert "<tools>" in fake.tokenizer.decode(fake.last_prompt_ids)


def test_tool_call_streaming_and_implicit_end_of_reasoning(client, fake):
    fake.reply = lambda p, s: "Need weather.\n" + CALL + "\n" + CALL.replace("Paris", "Lyon") + "<|im_end|>"
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, stream=True))
    calls: dict[int, dict] = {}
    first_deltas = {}
    for c in chunks:
        for tc in c.choices[0].delta.tool_calls or []:
            if tc.index not in calls:
                first_deltas[tc.index] = tc
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "args": ""}
            calls[tc.index]["args"] += tc.function.arguments or ""
    assert first_deltas[0].id and first_deltas[0].function.name == "get_weather"
    assert first_deltas[0].function.arguments == ""
    assert [json.loads(calls[i]["args"]) for i in (0, 1)] == [{"city": "Paris", "days": 3}, {"city": "Lyon", "days": 3}]
    reasoning = "".join(c.choices[0].delta.reasoning_content or "" for c in chunks)
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert reasoning == "Need weather.\n" and content == ""
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the same output, non-streaming
    r = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS)
    assert [tc.function.arguments for tc in r.choices[0].message.tool_calls] == [calls[0]["args"], calls[1]["args"]]


def test_tool_choice_policies(client, fake):
    two_calls = "x</think>" + CALL + "<tool_call>\n<function=get_time>\n</function>\n</tool_call><|im_end|>"
    fake.reply = lambda p, s: two_calls
    r = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, parallel_tool_calls=False)
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_weather"]
    r = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.function.name for c in r.choices[0].message.tool_calls] == ["get_time"]
    # none: no tools in the prompt, no parsing
    r = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="none")
    assert r.choices[0].message.tool_calls == [] and r.choices[0].finish_reason == "stop"
    assert "<tools>" not in fake.tokenizer.decode(fake.last_prompt_ids)


def test_required_and_named_tool_choice_send_the_tool_call_grammar(client, fake):
    fake.reply = lambda p, s: "x</think>" + CALL + "<|im_end|>"
    r = client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required")
    assert r.choices[0].finish_reason == "tool_calls"
    spec = fake.last_params.structured
    assert spec.kind == "tool_call" and "<function=get_weather>" in spec.grammar and "<function=get_time>" in spec.grammar
    client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "get_time"}})
    spec = fake.last_params.structured
    assert "<function=get_time>" in spec.grammar and "<function=get_weather>" not in spec.grammar
    client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS)  # auto: the model may answer
    assert fake.last_params.structured is None


def test_structured_output_fields_reach_the_engine_and_bad_ones_never_do(client, fake):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    client.chat.completions.create(model="tiny", messages=MSG, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert fake.last_params.structured.kind == "json"
    client.completions.create(model="tiny", prompt="Hi", extra_body={"guided_choice": ["yes", "no"]})
    assert fake.last_params.structured.kind == "choice"
    client.completions.create(model="tiny", prompt="Hi", extra_body={"structured_outputs": {"regex": "[0-9]+"}})
    assert fake.last_params.structured.kind == "regex"
    fake.last_params = None
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Hi", extra_body={"guided_regex": "(unclosed"})
    assert e.value.body["param"] == "guided_regex" and "unclosed group" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice="required",
                                       response_format={"type": "json_object"})
    assert fake.last_params is None


@pytest.mark.parametrize("extra,param", [
    ({"thinking_token_budget": 10}, None),
    ({"reasoning_budget": 10}, None),
    ({"chat_template_kwargs": {"reasoning_budget": 10}}, None),
    ({"chat_template_kwargs": {"reasoning_budget": "ten"}}, "chat_template_kwargs.reasoning_budget"),
    ({"thinking_token_budget": -1}, "thinking_token_budget"),
])
def test_thinking_budget_reaches_the_engine(client, fake, extra, param):
    if param is not None:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MSG, extra_body=extra)
        assert e.value.body["param"] == param
        return
    client.chat.completions.create(model="tiny", messages=MSG, extra_body=extra)
    p = fake.last_params
    assert p.thinking_budget == 10
    assert p.thinking_end_token_id == fake.tokenizer.convert_tokens_to_ids("</think>")
    assert p.thinking_grace_tokens > 0
    newline = fake.tokenizer.encode("\n", add_special_tokens=False)[0]
    assert newline in p.newline_token_ids
    assert all("\n" in fake.tokenizer.decode([t]) for t in p.newline_token_ids)


def test_history_round_trip_accepts_reasoning_and_string_arguments(client, fake):
    history = MSG + [
        {"role": "assistant", "content": None, "reasoning": "think A",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    client.chat.completions.create(model="tiny", messages=history, tools=TOOLS)
    prompt = fake.tokenizer.decode(fake.last_prompt_ids)
    assert "<think>\nthink A\n</think>\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n" in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


def test_n_choices_and_logprobs(client, fake):
    r = client.chat.completions.create(model="tiny", messages=MSG, n=3, logprobs=True, top_logprobs=2,
                                       max_tokens=4)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c in r.choices:
        assert len(c.logprobs.content) == 4
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)
        assert "".join(t.token for t in c.logprobs.content) == "Let "
    assert r.usage.completion_tokens == 12


def test_seeded_sampling_reaches_the_engine(client, fake):
    a = client.chat.completions.create(model="tiny", messages=MSG, seed=7, temperature=0.8)
    b = client.chat.completions.create(model="tiny", messages=MSG, seed=7, temperature=0.8)
    assert fake.last_params.seed == 7 and fake.last_params.temperature == 0.8
    assert a.choices[0].message.reasoning_content == b.choices[0].message.reasoning_content


def test_stop_strings(client, fake):
    r = client.chat.completions.create(model="tiny", messages=MSG, stop=["answer"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "Hello there! The "
    assert fake.last_params.stop == ["answer"]


def test_stream_n_choices_with_logprobs(client, fake):
    fake.reply = lambda p, s: "ab</think>cd<|im_end|>"
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, n=2, stream=True, logprobs=True,
                                                 top_logprobs=1))
    for i in (0, 1):
        mine = [ch for c in chunks for ch in c.choices if ch.index == i]
        assert "".join(ch.delta.reasoning or "" for ch in mine) == "ab"
        assert "".join(ch.delta.content or "" for ch in mine) == "cd"
        tokens = [t.token for ch in mine if ch.logprobs for t in ch.logprobs.content]
        assert tokens == ["a", "b", "</think>", "c", "d", "<|im_end|>"]  # logprobs for every token, markers too
        assert mine[-1].finish_reason == "stop" and mine[0].delta.role == "assistant"
