"""Big and hostile inputs: body-size limit before reading, prompt-length limit before tokenizing, request
chat templates refused (or, when trusted, bounded), and tokenization kept off the event loop."""

import asyncio
import socket
import threading
import time

import httpx
import pytest

from hybridserve.serve.app import build_app
from hybridserve.serve.context import ServeSettings
from hybridserve.serve.template_sandbox import TemplateLimitError, render_request_template
from tests.serve.fake_engine import FakeEngineClient
from tests.serve.helpers import ServerThread, make_tokenizer
from tests.serve.test_serve_errors import assert_envelope, post

MSG = [{"role": "user", "content": "hi"}]
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"


@pytest.fixture(scope="module")
def limited(tokenizer):
    engine = FakeEngineClient(tokenizer)
    app = build_app(ServeSettings(["tiny"], max_request_body_bytes=100_000, max_prompt_chars=5_000), engine=engine)
    with ServerThread(app) as server:
        server.engine = engine
        yield server


@pytest.fixture(scope="module")
def trusting(tokenizer):
    engine = FakeEngineClient(tokenizer)
    app = build_app(ServeSettings(["tiny"], trust_request_chat_template=True, max_prompt_chars=5_000), engine=engine)
    with ServerThread(app) as server:
        server.engine = engine
        yield server


def _raw_post(port: int, declared: int, send: int) -> tuple[bytes, int]:
    """POST with Content-Length `declared`, send `send` body bytes, return (response, bytes sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % declared)
        sent = 0
        try:
            while sent < send:
                s.sendall(b"x" * 65536)
                sent += 65536
        except OSError:  # the server answered and closed: the rest was never read
            pass
        response = b""
        while b'"code"' not in response:
            chunk = s.recv(65536)
            if not chunk:
                break
            response += chunk
        return response, sent


def test_body_over_the_limit_is_413_before_it_is_read(limited):
    head, _ = _raw_post(limited.port, 300_000_000, 0)  # declared too large: nothing needs to be sent
    assert head.startswith(b"HTTP/1.1 413") and b'"code":413' in head


def test_streamed_body_over_the_limit_is_413(limited):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(50):
            yield b"y" * 10_000
        yield b'"}]}'

    r = httpx.post(limited.url + "/v1/chat/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})  # chunked: no Content-Length
    err = assert_envelope(r, 413)
    assert "100000 bytes" in err["message"]
    assert post(limited, "/v1/chat/completions", json={"messages": MSG}).status_code == 200


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "a" * 5_001}, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "a" * 5_001]}, "prompt[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 5_001}]}, "messages"),
    ("/tokenize", {"prompt": "a" * 5_001}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a" * 5_001}]}, "messages"),
])
def test_prompt_text_over_the_limit_is_refused_before_tokenizing(limited, monkeypatch, path, body, param):
    tokenized = []
    real_encode = limited.engine.tokenizer.encode
    monkeypatch.setattr(limited.engine.tokenizer, "encode", lambda text, **kw: tokenized.append(len(text))
                        or real_encode(text, **kw))
    err = assert_envelope(post(limited, path, json=body), 400, param)
    assert "at most 5000 are accepted" in err["message"]
    assert all(n <= 5_000 for n in tokenized)


def test_default_prompt_limit_follows_the_context():
    ctx = build_app(ServeSettings(["tiny"]), engine=FakeEngineClient(make_tokenizer(), max_model_len=1000)).state.ctx
    assert ctx.max_prompt_chars == 16_000


@pytest.mark.parametrize("body,param", [
    ({"chat_template": TEMPLATE}, "chat_template"),
    ({"chat_template_kwargs": {"chat_template": TEMPLATE}}, "chat_template_kwargs.chat_template"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/tokenize"])
def test_request_chat_templates_are_refused_by_default(fake_server, fake, path, body, param):
    err = assert_envelope(post(fake_server, path, json={"messages": MSG, **body}), 400, param)
    assert "--trust-request-chat-template" in err["message"]


def test_render_arguments_are_not_taken_from_template_kwargs(fake_server, fake):
    """apply_chat_template's own arguments would change what it returns (tokens, a dict), not what the template sees."""
    base = post(fake_server, "/tokenize", json={"messages": MSG}).json()
    for kwargs in ({"tokenize": True}, {"return_dict": True}, {"messages": []}, {"add_generation_prompt": False},
                   {"truncation": True, "max_length": 2}):
        r = post(fake_server, "/tokenize", json={"messages": MSG, "chat_template_kwargs": kwargs})
        assert r.status_code == 200 and r.json()["tokens"] == base["tokens"], kwargs


def test_trusted_request_template_is_used(trusting):
    r = post(trusting, "/tokenize", json={"messages": MSG, "chat_template": TEMPLATE, "return_token_strs": True})
    assert r.status_code == 200, r.text
    text = trusting.engine.tokenizer.decode(r.json()["tokens"])
    assert text == "<user>hi<|im_start|>assistant\n"
    r = post(trusting, "/v1/chat/completions", json={"messages": MSG, "chat_template_kwargs": {
        "chat_template": "{{ bos_token }}{{ messages[0].content }}|{{ flavour }}", "flavour": "mint"}})
    assert r.status_code == 200, r.text
    assert trusting.engine.tokenizer.decode(trusting.engine.last_prompt_ids) == "<s>hi|mint"


@pytest.mark.parametrize("template,words", [
    ("{{ 'x' * 5001 }}", "at most 5000"),  # output cap
    ("{{ 'x' * 4000000000 }}", "MiB of memory"),  # memory cap (the child's address space)
    ("{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}{% endfor %}", "within 5 s"),  # time cap
    ("{{ ''.__class__.__mro__ }}", "unsafe"),  # Jinja's sandbox
    ("{{ raise_exception('no thanks') }}", "no thanks"),
    ("{% for %}", "TemplateSyntaxError"),
])
def test_trusted_request_templates_are_bounded(trusting, template, words):
    t0 = time.monotonic()
    err = assert_envelope(post(trusting, "/tokenize", json={"messages": MSG, "chat_template": template}), 400,
                          "chat_template")
    assert words in err["message"], err
    assert time.monotonic() - t0 < 30
    assert httpx.get(trusting.url + "/health").status_code == 200


def test_a_template_that_grows_a_string_in_a_loop_hits_the_memory_cap():
    """Not one big allocation refused up front: doubling a string until the child's address space runs out."""
    doubling = ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
                "{{ ns.s|length }}")
    with pytest.raises(TemplateLimitError, match="more than 64 MiB of memory"):
        render_request_template(doubling, MSG, None, True, False, {}, 5_000, memory_bytes=64 << 20, timeout_s=60)
    assert render_request_template("{{ messages[0].content }}", MSG, None, True, False, {}, 5_000,
                                   memory_bytes=64 << 20) == "hi"


class _GatedTokenizer:
    """Wraps a tokenizer: `encode` of the marked prompt waits until the test opens the gate."""

    def __init__(self, tok, marker: str):
        self._tok, self.marker = tok, marker
        self.gate, self.entered = threading.Event(), threading.Event()
        self.threads: list[str] = []

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __len__(self):
        return len(self._tok)

    def encode(self, text, **kw):
        if self.marker in text:
            self.threads.append(threading.current_thread().name)
            self.entered.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return self._tok.encode(text, **kw)


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "SLOW prompt", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "SLOW"}),
])
def test_tokenization_does_not_block_the_event_loop(tokenizer, path, body):
    """While one prompt is being tokenized (held there by the test), /health and other requests are served."""
    gated = _GatedTokenizer(tokenizer, "SLOW")
    app = build_app(ServeSettings(["tiny"]), engine=FakeEngineClient(gated))
    with ServerThread(app) as server:

        async def run():
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
                slow = asyncio.ensure_future(c.post(path, json=body))
                while not gated.entered.is_set():
                    await asyncio.sleep(0.01)
                health = await c.get("/health")
                other = await c.post("/v1/completions", json={"prompt": "quick", "max_tokens": 2})
                done_while_held = not slow.done()
                gated.gate.set()
                return health, other, done_while_held, await slow

        health, other, held, slow = asyncio.run(run())
    assert health.status_code == 200 and other.status_code == 200 and held
    assert slow.status_code == 200, slow.text
    assert gated.threads and all(name.startswith("hybridserve-preprocess") for name in gated.threads)
