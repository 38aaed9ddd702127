"""Disconnects, back-pressure, drain on SIGTERM and readiness, against real HTTP servers."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from hybridserve.bench.sweep import free_port
from hybridserve.serve.app import build_app
from hybridserve.serve.context import ServeSettings
from tests.serve.fake_engine import FakeEngineClient
from tests.serve.helpers import ServerThread

MSG = [{"role": "user", "content": "hi"}]
ROOT = Path(__file__).resolve().parents[2]


async def _read_some_then_drop(url: str, body: dict, lines_to_read: int) -> None:
    async with httpx.AsyncClient(timeout=30) as c:
        async with c.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            n = 0
            async for line in r.aiter_lines():
                if line:
                    n += 1
                if n >= lines_to_read:
                    break  # leaving the block closes the connection mid-stream


def test_disconnect_storm_frees_everything(fake_server, fake):
    fake.step_delay = 0.01
    fake.reply = lambda p, s: "y" * 500
    url = fake_server.url + "/v1/chat/completions"

    async def storm():
        await asyncio.gather(*(_read_some_then_drop(url, {"messages": MSG, "stream": True}, 3 + i % 5)
                               for i in range(24)))

    before = len(fake.aborted)
    asyncio.run(storm())
    deadline = time.monotonic() + 5
    while (fake.active or fake_server.ctx.tracker.in_flight) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.active == {} and fake_server.ctx.tracker.in_flight == 0
    assert len(fake.aborted) - before == 24
    assert not fake_server.ctx.tracker.engine_request_ids
    metrics = httpx.get(fake_server.url + "/metrics").text
    assert 'hybridserve:api_requests_in_flight{engine="0",model_name="tiny"} 0.0' in metrics
    assert 'vllm:num_requests_running{engine="0",model_name="tiny"} 0.0' in metrics
    fake.step_delay = 0.0
    fake.reply = lambda p, s: "ok<|im_end|>"
    t0 = time.monotonic()
    r = httpx.post(url, json={"messages": MSG}, timeout=10)
    assert r.status_code == 200 and time.monotonic() - t0 < 2


def test_non_streaming_disconnect_aborts(fake_server, fake):
    fake.step_delay = 0.02
    fake.reply = lambda p, s: "z" * 2000
    before = len(fake.aborted)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(fake_server.url + "/v1/chat/completions", json={"messages": MSG}, timeout=0.3)
    deadline = time.monotonic() + 5
    while len(fake.aborted) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(fake.aborted) == before + 1 and fake.active == {}


@pytest.fixture(scope="module")
def tight_server(tokenizer):
    engine = FakeEngineClient(tokenizer, step_delay=0.02)
    engine.reply = lambda p, s: "w" * 100 + "<|im_end|>"
    app = build_app(ServeSettings(["tiny"], max_num_seqs=1, max_queued_requests=1), engine=engine)
    with ServerThread(app) as server:
        server.ctx = app.state.ctx
        yield server


def test_burst_beyond_queue_gets_503(tight_server):
    url = tight_server.url + "/v1/chat/completions"

    async def burst():
        async with httpx.AsyncClient(timeout=30) as c:
            slow = [asyncio.ensure_future(c.post(url, json={"messages": MSG})) for _ in range(2)]
            while tight_server.ctx.tracker.in_flight < 2:  # both admitted and generating
                await asyncio.sleep(0.01)
            rejected = await asyncio.gather(*(c.post(url, json={"messages": MSG, "stream": True})
                                              for _ in range(8)))
            return await asyncio.gather(*slow), rejected

    done, rejected = asyncio.run(burst())
    assert [r.status_code for r in done] == [200, 200]
    assert [r.status_code for r in rejected] == [503] * 8
    assert all(r.headers.get("retry-after") for r in rejected)
    assert rejected[0].json()["error"]["code"] == 503
    assert tight_server.ctx.tracker.in_flight == 0
    assert httpx.post(url, json={"messages": MSG}, timeout=30).status_code == 200
    assert 'vllm:admission_rejections_total{model_name="tiny",reason="max_num_queued_reqs"} 8.0' in httpx.get(
        tight_server.url + "/metrics").text


def test_health_is_503_until_the_engine_is_ready(tokenizer):
    gate = threading.Event()

    async def slow_engine():
        while not gate.is_set():
            await asyncio.sleep(0.02)
        return FakeEngineClient(tokenizer)

    app = build_app(ServeSettings(["tiny"]), engine_factory=slow_engine)
    with ServerThread(app) as server:
        assert httpx.get(server.url + "/health").status_code == 503
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["message"] == "The engine is starting."
        gate.set()
        deadline = time.monotonic() + 5
        while httpx.get(server.url + "/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG}).status_code == 200


def _start(shutdown_timeout: float, step_delay: float = 0.01, **popen: object) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.serve.fake_serve_main", str(port), str(shutdown_timeout),
                             str(step_delay)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, **popen)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def _stream_in_thread(url: str, out: list) -> threading.Thread:
    """Start a streaming request; return once its first chunk has arrived."""
    def run():
        with httpx.stream("POST", url + "/v1/chat/completions", json={"messages": MSG, "stream": True},
                          timeout=60) as r:
            for ln in r.iter_lines():
                if ln.startswith("data: {"):
                    out.append(json.loads(ln[6:]))

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while not out and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return t


@pytest.mark.parametrize("shutdown_timeout,expected_reason", [(30.0, "stop"), (0.5, "abort")])
def test_sigterm_drains_then_exits_zero(shutdown_timeout, expected_reason):
    proc, url = _start(shutdown_timeout)
    try:
        chunks: list = []
        t = _stream_in_thread(url, chunks)  # running: 200 tokens at 10 ms
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        if expected_reason == "stop":
            assert httpx.get(url + "/health").status_code == 503
            r = httpx.post(url + "/v1/chat/completions", json={"messages": MSG})
            assert r.status_code == 503 and r.headers.get("retry-after")
        t.join(30)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert chunks and chunks[-1]["choices"][0]["finish_reason"] == expected_reason
    text = "".join(c["choices"][0]["delta"]["reasoning"] or "" for c in chunks)
    assert (text == "x" * 200) == (expected_reason == "stop")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_second_signal_ends_every_request_with_an_error_and_exits_128_plus_signal(sig):
    proc, url = _start(30.0, step_delay=0.05, stderr=subprocess.PIPE, text=True)  # replies take 10 s
    try:
        chunks: list = []
        stream = _stream_in_thread(url, chunks)
        plain: list = []
        waiting = threading.Thread(target=lambda: plain.append(
            httpx.post(url + "/v1/completions", json={"prompt": "hi"}, timeout=60)))
        waiting.start()
        time.sleep(0.5)  # the non-streaming request is generating
        t0 = time.monotonic()
        proc.send_signal(sig)
        time.sleep(0.2)
        proc.send_signal(sig)
        stream.join(30)
        waiting.join(30)
        assert proc.wait(30) == 128 + sig
        assert time.monotonic() - t0 < 8  # not the drain's 30 s, nor the replies' 10 s
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    (r,) = plain
    assert r.status_code == 503 and r.headers["content-type"] == "application/json"
    assert "shutting down" in r.json()["error"]["message"] and r.json()["error"]["code"] == 503
    assert chunks[0]["choices"] and chunks[-1] == {"error": {
        "message": "The server is shutting down now; this request was stopped before it finished.",
        "type": "ServiceUnavailableError", "param": None, "code": 503}}
    assert "did not end in time" not in log and "Traceback" not in log, log


def test_engine_start_failure_is_reported():
    failures = []

    async def broken_engine():
        raise RuntimeError("no GPU today")

    app = build_app(ServeSettings(["tiny"]), engine_factory=broken_engine, on_engine_failure=failures.append)
    with ServerThread(app) as server:
        deadline = time.monotonic() + 5
        while not failures and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [str(e) for e in failures] == ["no GPU today"]
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["message"] == "The engine failed to start."
        assert httpx.get(server.url + "/health").status_code == 503
