"""Every client number is bounded at the edge: a 400 naming the field, nothing reaches a tensor or a
message unchecked, and a rejected request leaves nothing behind. Against the real engine (tiny preset,
vocabulary 512, max_model_len 2048) unless a fake engine is the better tool."""

import asyncio

import httpx
import pytest

from hybridserve.sampling_params import SamplingParams, SamplingParamsError
from tests.serve.test_serve_errors import assert_envelope, post

MSG = [{"role": "user", "content": "hi"}]
BIG = [2**63, 2**64 - 1, 2**64, 2**70, 2**32 + 1]


def _engine_is_clean(server) -> None:
    engine = server.ctx.engine
    assert engine._queues == {}
    assert engine.output_processor.requests == {}
    assert not server.ctx.tracker.engine_request_ids and server.ctx.tracker.in_flight == 0


@pytest.mark.parametrize("value", BIG)
@pytest.mark.parametrize("field", ["top_k", "thinking_token_budget", "reasoning_budget", "min_tokens", "n",
                                   "top_logprobs", "max_tokens", "max_completion_tokens"])
def test_huge_chat_integers_are_400_naming_the_field(real_server, field, value):
    body = {"messages": MSG, "max_tokens": 4, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    err = assert_envelope(post(real_server, "/v1/chat/completions", json=body), 400)
    assert err["param"] == field, err
    assert len(err["message"]) < 400  # a huge value is not echoed in full
    _engine_is_clean(real_server)


@pytest.mark.parametrize("body,param", [
    ({"seed": 2**64}, "seed"),
    ({"seed": -(2**63) - 1}, "seed"),
    ({"top_k": 513}, "top_k"),  # beyond the vocabulary
    ({"stop_token_ids": [2**64]}, "stop_token_ids"),
    ({"stop_token_ids": [512]}, "stop_token_ids"),
    ({"logit_bias": {str(2**64): 1.0}}, "logit_bias"),
    ({"logit_bias": {"1" * 5000: 1.0}}, "logit_bias"),
    ({"logit_bias": {"²": 1.0}}, "logit_bias"),  # str.isdigit() but not a number int() reads
    ({"chat_template_kwargs": {"reasoning_budget": 2**64}}, "chat_template_kwargs.reasoning_budget"),
    ({"chat_template_kwargs": {"reasoning_budget": "5"}}, "chat_template_kwargs.reasoning_budget"),
    ({"thinking_token_budget": 2049}, "thinking_token_budget"),  # beyond max_model_len
    ({"reasoning_budget": 2049}, "reasoning_budget"),
])
def test_out_of_range_values_are_400(real_server, body, param):
    assert_envelope(post(real_server, "/v1/chat/completions", json={"messages": MSG, "max_tokens": 4, **body}),
                    400, param)
    _engine_is_clean(real_server)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": [1, 2**64]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 2**63]]}, "prompt[1]"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2**64}, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**64 - 1}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2**64}, "best_of"),
    ("/detokenize", {"tokens": [1, 2**64]}, "tokens"),
    ("/detokenize", {"tokens": [-1]}, "tokens"),
])
def test_other_endpoints_bound_their_integers(real_server, path, body, param):
    assert_envelope(post(real_server, path, json=body), 400, param)
    _engine_is_clean(real_server)


def test_full_range_seeds_are_accepted_and_masked(real_server):
    for seed in (2**64 - 1, 2**63, -(2**63)):
        r = post(real_server, "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "seed": seed,
                                                        "temperature": 1.0, "ignore_eos": True})
        assert r.status_code == 200, r.text
    _engine_is_clean(real_server)


def test_top_k_at_the_vocabulary_size_is_allowed(real_server):
    r = post(real_server, "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "top_k": 512})
    assert r.status_code == 200, r.text


def test_rejected_requests_leave_nothing_behind_and_ids_stay_usable(real_server):
    """The issue's leak: a 500 on an oversized top_k kept the request id "already in use" forever."""
    for _ in range(3):
        body = {"messages": MSG, "max_tokens": 2, "top_k": 2**64, "request_id": "same-id"}
        assert_envelope(post(real_server, "/v1/chat/completions", json=body), 400, "top_k")
    ok = post(real_server, "/v1/chat/completions", json={"messages": MSG, "max_tokens": 2, "request_id": "same-id"})
    assert ok.status_code == 200 and ok.json()["id"] == "same-id"
    _engine_is_clean(real_server)


def test_engine_client_releases_a_request_whose_message_cannot_be_sent(real_server):
    """Below the edge checks: if the engine message cannot even be encoded, nothing stays registered."""
    engine = real_server.ctx.engine
    params = SamplingParams(max_tokens=2)
    params.thinking_budget = 2**64  # as if a check had been missed: msgpack cannot carry it

    async def run():
        gen = engine.generate([20, 30], params, "unsendable")
        with pytest.raises(OverflowError):
            await gen.__anext__()

    asyncio.run_coroutine_threadsafe(run(), real_server.loop).result(30)
    _engine_is_clean(real_server)
    r = post(real_server, "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200


@pytest.mark.parametrize("kwargs,param", [
    (dict(top_k=2**63), "top_k"), (dict(seed=2**64), "seed"), (dict(max_tokens=2**63), "max_tokens"),
    (dict(min_tokens=2**63, max_tokens=None), "min_tokens"), (dict(thinking_budget=2**63), "thinking_token_budget"),
    (dict(n=True), "n"), (dict(stop_token_ids=[2**63]), "stop_token_ids"),
])
def test_sampling_params_bound_every_integer(kwargs, param):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_sampling_params_vocabulary_checks():
    SamplingParams(top_k=512).validate_vocab(512)
    for kwargs, param in ((dict(top_k=513), "top_k"), (dict(logit_bias={512: 1.0}), "logit_bias"),
                          (dict(stop_token_ids=[-1]), "stop_token_ids")):
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(**kwargs).validate_vocab(512)
        assert e.value.param == param
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(logit_bias={10**30: 1.0}).validate_vocab(512)
    assert "digits" in str(e.value) or len(str(e.value)) < 200


def test_numbers_of_any_json_shape_never_500(real_server):
    """Floats that JSON allows Python to read (NaN, Infinity, 1e400) and integers where floats go."""
    for raw in (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
                b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
                b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": NaN}}',
                b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1e400}',
                b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 100000000000000000000000}',
                b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5}'):
        r = httpx.post(real_server.url + "/v1/chat/completions", content=raw,
                       headers={"content-type": "application/json"}, timeout=30)
        assert_envelope(r, 400)


def test_a_prompt_that_alone_fills_the_context_is_blamed_on_the_prompt(real_server):
    for body, param in (({"prompt": [20] * 2048, "max_tokens": 5}, "prompt"),
                        ({"prompt": [[20] * 5, [20] * 2100], "max_tokens": 5}, "prompt[1]")):
        err = assert_envelope(post(real_server, "/v1/completions", json=body), 400, param)
        assert "leaves no room for output" in err["message"] and "you requested" not in err["message"]
    err = assert_envelope(post(real_server, "/v1/completions", json={"prompt": [20] * 2000, "max_tokens": 100}),
                          400, "max_tokens")
    assert "you requested 100 output tokens" in err["message"]
    err = assert_envelope(post(real_server, "/v1/chat/completions",
                               json={"messages": MSG, "max_completion_tokens": 5000}), 400, "max_completion_tokens")


def test_stream_options_need_stream(real_server):
    for path, base in (("/v1/chat/completions", {"messages": MSG}), ("/v1/completions", {"prompt": "hi"})):
        err = assert_envelope(post(real_server, path, json={**base, "max_tokens": 2, "stream": False,
                                                            "stream_options": {"include_usage": True}}),
                              400, "stream_options")
        assert "stream" in err["message"]
        ok = post(real_server, path, json={**base, "max_tokens": 2, "stream_options": None})
        assert ok.status_code == 200
