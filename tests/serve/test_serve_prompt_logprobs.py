"""Completions `echo` + `logprobs` (lm-eval's scoring request) and vLLM's `prompt_logprobs`, on the real
engine: one entry per prompt token, the first without a logprob, then the generated tokens'."""

from __future__ import annotations

import json

import httpx
import pytest

PROMPT_IDS = [5, 17, 42, 9, 88, 3, 61]


@pytest.fixture
def url(real_server):
    return f"{real_server.url}/v1/completions"


def test_echo_logprobs_lead_with_the_prompt(url):
    body = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1,
            "prompt_logprobs": 2}
    r = httpx.post(url, json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n = len(PROMPT_IDS)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == n + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(x <= 0 for x in lp["token_logprobs"][1:])
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    # vLLM's field: per prompt token {id: {logprob, rank, decoded_token}}, holding the prompt token itself
    field = choice["prompt_logprobs"]
    assert len(field) == n and field[0] is None
    for pos in range(1, n):
        entry = field[pos][str(PROMPT_IDS[pos])]
        assert entry["logprob"] == pytest.approx(lp["token_logprobs"][pos], abs=1e-5)
        assert entry["rank"] >= 1 and len(field[pos]) <= 3
        assert (entry["rank"] == 1) == (entry["logprob"] >= max(v["logprob"] for v in field[pos].values()) - 1e-6)


def test_streamed_echo_logprobs_equal_the_collected_ones(url):
    body = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 0}
    whole = httpx.post(url, json=body, timeout=120).json()["choices"][0]["logprobs"]
    tokens, logprobs = [], []
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    if c["logprobs"]:
                        tokens += c["logprobs"]["tokens"]
                        logprobs += c["logprobs"]["token_logprobs"]
    assert tokens == whole["tokens"]
    assert logprobs[0] is None and logprobs[1:] == pytest.approx(whole["token_logprobs"][1:], abs=1e-5)


def test_no_echo_no_prompt_entries(url):
    body = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 2, "temperature": 0, "logprobs": 1}
    choice = httpx.post(url, json=body, timeout=120).json()["choices"][0]
    assert len(choice["logprobs"]["tokens"]) == 2 and "prompt_logprobs" not in choice
