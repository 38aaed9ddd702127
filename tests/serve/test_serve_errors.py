"""Every error in the OpenAI envelope with the right status; never 422, never a stack trace.

Against the real engine on the tiny preset, except where a fake engine is the better tool (forcing
an engine failure)."""

import logging

import httpx
import openai
import pytest

from hybridserve.serve.app import build_app
from hybridserve.serve.context import ServeSettings
from tests.serve.fake_engine import FakeEngineClient
from tests.serve.helpers import ServerThread

MSG = [{"role": "user", "content": "hi"}]


def assert_envelope(r: httpx.Response, status: int, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err


def post(server, path, **kw):
    return httpx.post(server.url + path, timeout=30, **kw)


@pytest.mark.parametrize("body,param", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 1000}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q"]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"logit_bias": {"99999": 1.0}}, "logit_bias"),
    ({"guided_json": {"type": "nonsense"}}, "guided_json"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"structured_outputs": {"grammar": "start: undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"jsn": {}}}, "structured_outputs.jsn"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "array", "uniqueItems": True},
                                                                 "strict": True}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
])
def test_invalid_parameters_are_400_naming_the_parameter(real_server, body, param):
    full = {"model": "tiny", "messages": MSG, **body}
    assert_envelope(post(real_server, "/v1/chat/completions", json=full), 400, param)


def test_malformed_historical_tool_arguments_name_the_message(real_server):
    messages = MSG + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]
    err = assert_envelope(post(real_server, "/v1/chat/completions", json={"messages": messages}), 400,
                          "messages[1].tool_calls[0].function.arguments")
    assert "not valid JSON" in err["message"]


def test_context_length_message_has_the_numbers(real_server):
    n = post(real_server, "/tokenize", json={"messages": MSG}).json()["count"]
    err = assert_envelope(post(real_server, "/v1/chat/completions",
                               json={"messages": MSG, "max_tokens": 5000}), 400)
    assert err["message"].startswith(
        f"This model's maximum context length is 2048 tokens. However, you requested 5000 output tokens and "
        f"your prompt contains at least {n} input tokens")
    err = assert_envelope(post(real_server, "/v1/completions",
                               json={"prompt": "x" * 3000, "max_tokens": 1}), 400)
    assert "maximum context length is 2048" in err["message"]


def test_unknown_model_is_404(real_server):
    err = assert_envelope(post(real_server, "/v1/chat/completions", json={"model": "gpt-9", "messages": MSG}),
                          404, "model")
    assert err["message"] == "The model `gpt-9` does not exist."
    ok = post(real_server, "/v1/chat/completions", json={"model": "alias", "messages": MSG, "max_tokens": 2})
    assert ok.status_code == 200


def test_body_problems(real_server):
    url = "/v1/chat/completions"
    assert_envelope(post(real_server, url, content=b'{"messages": []}', headers={"content-type": "text/plain"}), 415)
    assert_envelope(post(real_server, url, content=b'{"messages": [}', headers={"content-type": "application/json"}),
                    400)
    assert_envelope(post(real_server, url, json=[1, 2]), 400)
    assert_envelope(post(real_server, url, content=b"\xff\xfe", headers={"content-type": "application/json"}), 400)
    assert_envelope(post(real_server, url, json={"messages": "hi"}), 400, "messages")
    lone_surrogate = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    assert_envelope(post(real_server, url, content=lone_surrogate, headers={"content-type": "application/json"}), 400)
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_envelope(post(real_server, url, content=deep, headers={"content-type": "application/json"}), 400)
    assert_envelope(httpx.get(real_server.url + "/nope"), 404)
    assert_envelope(httpx.get(real_server.url + url), 405)


def test_completions_validation(real_server):
    assert_envelope(post(real_server, "/v1/completions", json={"prompt": [1, 2, 99999]}), 400, "prompt")
    assert_envelope(post(real_server, "/v1/completions", json={"prompt": ""}), 400, "prompt")
    assert_envelope(post(real_server, "/v1/completions", json={"prompt": ["a"] * 100}), 400, "prompt")
    assert_envelope(post(real_server, "/v1/completions", json={"prompt": "a", "suffix": "b"}), 400, "suffix")
    assert_envelope(post(real_server, "/v1/completions", json={}), 400, "prompt")


def test_unknown_fields_are_logged_not_rejected(real_server, caplog):
    with caplog.at_level(logging.WARNING, logger="hybridserve.serve"):
        r = post(real_server, "/v1/chat/completions", json={"messages": MSG, "temprature": 0.5, "max_tokens": 2})
    assert r.status_code == 200
    assert any("temprature" in rec.getMessage() for rec in caplog.records)


def test_engine_failure_mid_request(fake_server, fake):
    fake.fail_after = 3
    err = assert_envelope(post(fake_server, "/v1/chat/completions", json={"messages": MSG}), 500)
    assert "Traceback" not in err["message"]
    with httpx.stream("POST", fake_server.url + "/v1/chat/completions",
                      json={"messages": MSG, "stream": True}) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    assert '"error"' in lines[-2] and '"code":500' in lines[-2]
    assert sum('"delta"' in ln for ln in lines) == 3


def test_completions_stream_fails_in_band_like_chat(fake_server, fake):
    """Both endpoints share one SSE writer: the error frame, then `[DONE]` exactly once."""
    fake.fail_after = 3
    body = {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", fake_server.url + "/v1/completions", json=body) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    assert '"error"' in lines[-2] and '"code":500' in lines[-2] and "Traceback" not in lines[-2]
    assert sum('"text_completion"' in ln for ln in lines) == 3  # no usage chunk after a failure


@pytest.fixture(scope="module")
def keyed_server(tokenizer):
    app = build_app(ServeSettings(["tiny"], api_key="sekret"), engine=FakeEngineClient(tokenizer))
    with ServerThread(app) as server:
        yield server


@pytest.mark.parametrize("method,path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                         ("POST", "/v1/completions"), ("POST", "/tokenize"),
                                         ("POST", "/detokenize"), ("GET", "/version")])
def test_api_key_guards_every_endpoint(keyed_server, method, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        r = httpx.request(method, keyed_server.url + path, headers=headers, json={})
        err = assert_envelope(r, 401)
        assert err["type"] == "AuthenticationError"


def test_api_key_accepted_and_open_paths(keyed_server):
    assert httpx.get(keyed_server.url + "/health").status_code == 200
    assert httpx.get(keyed_server.url + "/metrics").status_code == 200
    assert "/v1/chat/completions" in httpx.get(keyed_server.url + "/openapi.json").json()["paths"]
    assert httpx.get(keyed_server.url + "/docs").status_code == 200
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="sekret", max_retries=0)
    assert client.models.list().data[0].id == "tiny"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="nope", max_retries=0).models.list()
