"""Property-based fuzzing of the four body-taking endpoints against the real engine (tiny preset).

Field names come from the server's own `/openapi.json`; values from JSON's whole range, weighted
towards the edges that broke servers before (2^31, 2^32+1, 2^63, 2^64, NaN, Infinity, deep nesting,
wrong types). Every answer must be below 500 — a stream's in-band error frames included — and the
server must be healthy and hold no request, block or slot afterwards. Bounded by `max_examples`
(HYBRIDSERVE_FUZZ_EXAMPLES raises it), and by generation lengths drawn small, to stay well under a
minute in CI.
"""

import json
import math
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.test_serve_limits import _engine_is_clean

EXAMPLES = int(os.environ.get("HYBRIDSERVE_FUZZ_EXAMPLES", "40"))
BASES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    "/v1/completions": {"prompt": "hi", "max_tokens": 3},
    "/tokenize": {"prompt": "hi"},
    "/detokenize": {"tokens": [1, 2, 3]},
}
EDGE_INTS = st.sampled_from([0, 1, -1, 2**31 - 1, 2**31, 2**32 + 1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1,
                             2**64, 2**70, -(2**63) - 1, 10**400])
SCALARS = (st.none() | st.booleans() | st.integers(-3, 600) | EDGE_INTS | st.floats() | st.text(max_size=12)
           | st.sampled_from(["", "\n", "<|im_end|>", "</think>", "\ud800", "user", "assistant", "tool"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8) | st.sampled_from(["role", "content", "type", "name"]),
                                      inner, max_size=4), max_leaves=10)
# what sets the work a request asks for: small, or out of range (so a fuzz run stays short)
LENGTHS = st.integers(-2, 6) | EDGE_INTS | st.text(max_size=3) | st.floats(-1, 8)
LENGTH_FIELDS = {"max_tokens", "max_completion_tokens", "min_tokens", "n", "best_of", "thinking_token_budget",
                 "reasoning_budget", "logprobs", "top_logprobs"}


@pytest.fixture(scope="module")
def fields(real_server) -> dict[str, list[str]]:
    """Each endpoint's body field names, read from the served /openapi.json."""
    schema = httpx.get(real_server.url + "/openapi.json").json()
    out = {}
    for path in BASES:
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        out[path] = sorted(schema["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"])
    return out


def test_openapi_describes_every_request_body(real_server, fields):
    assert {"messages", "max_tokens", "top_k", "seed", "logit_bias", "stream"} <= set(fields["/v1/chat/completions"])
    assert {"prompt", "n", "echo", "logprobs"} <= set(fields["/v1/completions"])
    assert {"prompt", "messages"} <= set(fields["/tokenize"]) and fields["/detokenize"] == ["model", "tokens"]
    page = httpx.get(real_server.url + "/docs")
    assert page.status_code == 200 and "/openapi.json" in page.text


def _server_errors(response: httpx.Response) -> list[int]:
    """5xx statuses in the response: its own, or an SSE error frame's."""
    codes = [response.status_code] if response.status_code >= 500 else []
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        for line in response.text.splitlines():
            if line.startswith("data: {"):
                code = json.loads(line[6:]).get("error", {}).get("code", 0)
                codes += [code] if code >= 500 else []
    return codes


@pytest.mark.parametrize("path", list(BASES))
def test_fuzzed_bodies_never_get_a_server_error(real_server, fields, path):
    seen: list[tuple[int, str]] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(data=st.data())
    def check(data):
        names = st.sampled_from(fields[path]) | st.text(min_size=1, max_size=10)
        changes = data.draw(st.dictionaries(names, JSON, max_size=5), label="fields")
        body = {**BASES[path], **changes}
        for name in LENGTH_FIELDS & set(changes):  # keep generation short; out-of-range stays possible
            body[name] = data.draw(LENGTHS, label=name)
        if data.draw(st.booleans(), label="stream") and path.startswith("/v1/"):
            body["stream"] = True
        raw = json.dumps(body, allow_nan=True, ensure_ascii=data.draw(st.booleans(), label="ascii"))
        content = raw.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8: fuzz that too
        r = httpx.post(real_server.url + path, content=content, timeout=60, headers={"content-type": "application/json"})
        seen.append((r.status_code, raw[:300]))
        assert not _server_errors(r), (raw[:2000], r.text[:2000])
        if r.status_code >= 400 and not r.headers.get("content-type", "").startswith("text/event-stream"):
            error = r.json()["error"]
            assert error["code"] == r.status_code and isinstance(error["message"], str)

    check()
    assert len(seen) >= min(EXAMPLES, 10)
    assert httpx.get(real_server.url + "/health").status_code == 200
    _engine_is_clean(real_server)


def test_nan_and_infinity_in_numbers_are_400(real_server):
    """Python's JSON reader accepts NaN and Infinity; none may reach the sampler."""
    for field in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        for value in (math.nan, math.inf, -math.inf):
            raw = json.dumps({"prompt": "hi", "max_tokens": 2, field: value})
            r = httpx.post(real_server.url + "/v1/completions", content=raw,
                           headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, value, r.text)
    raw = json.dumps({"prompt": "hi", "max_tokens": 2, "logit_bias": {"5": math.nan}})
    r = httpx.post(real_server.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("logit_bias"), r.text
