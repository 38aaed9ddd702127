"""Request identity and accounting: internal ids never collide, admission counts sequences, logs are safe."""

import asyncio
import logging

import httpx
import pytest

from hybridserve.serve.app import build_app
from hybridserve.serve.context import ServeSettings
from tests.serve.fake_engine import FakeEngineClient
from tests.serve.helpers import ServerThread
from tests.serve.test_serve_errors import assert_envelope, post

MSG = [{"role": "user", "content": "hi"}]


def test_client_request_ids_may_repeat(fake_server, fake):
    """Two clients sending the same request_id, and a multi-prompt request whose derived ids would be
    another request's id, all run; each response keeps the id its client sent."""
    fake.step_delay = 0.01
    fake.reply = lambda p, s: "x" * 20 + "<|im_end|>"

    async def run():
        async with httpx.AsyncClient(base_url=fake_server.url, timeout=30) as c:
            return await asyncio.gather(
                c.post("/v1/chat/completions", json={"messages": MSG, "request_id": "X"}),
                c.post("/v1/chat/completions", json={"messages": MSG, "request_id": "X"}),
                c.post("/v1/completions", json={"prompt": ["a", "b"], "request_id": "X"}),
                c.post("/v1/completions", json={"prompt": "c", "request_id": "X-0"}),
                c.post("/v1/completions", json={"prompt": "d", "request_id": "X-1", "stream": True}))

    rs = asyncio.run(run())
    assert [r.status_code for r in rs] == [200] * 5, [r.text for r in rs]
    assert [r.json()["id"] for r in rs[:4]] == ["X", "X", "X", "X-0"]
    assert '"id":"X-1"' in rs[4].text
    assert len(rs[2].json()["choices"]) == 2
    assert fake_server.ctx.tracker.in_flight == 0 and not fake.active


def test_unknown_field_names_are_escaped_and_capped_in_logs(fake_server, fake, caplog):
    forged = "Temprature\n2099-01-01 00:00:00 CRITICAL forged line"
    body = {"messages": MSG, forged: 1, **{f"field_{i:05d}": 0 for i in range(20_000)}}
    with caplog.at_level(logging.WARNING, logger="hybridserve.serve"):
        assert post(fake_server, "/v1/chat/completions", json=body).status_code == 200
    lines = [rec.getMessage() for rec in caplog.records if "unknown request fields" in rec.getMessage()]
    assert len(lines) == 1
    assert "\n" not in lines[0] and "\\n2099-01-01" in lines[0]
    assert len(lines[0]) < 1000 and "and 19991 more" in lines[0]


def test_client_text_in_other_log_lines_is_escaped(caplog):
    from hybridserve.serve.logs import LOG_TEXT_LIMIT, clip

    logger = logging.getLogger("hybridserve.serve")
    with caplog.at_level(logging.INFO, logger="hybridserve.serve"):
        logger.info("stream %s failed (%d)", "id\r\nINFO fake", 3)
        logger.info("path %(p)s", {"p": "\x1b[2J" + "y" * 5000})
    assert caplog.records[0].getMessage() == "stream id\\r\\nINFO fake failed (3)"
    second = caplog.records[1].getMessage()
    assert second.startswith("path \\x1b[2J") and len(second) < LOG_TEXT_LIMIT + 60
    assert clip("é ok ✓") == "é ok ✓"  # printable text of any script is left as is


@pytest.fixture(scope="module")
def small_server(tokenizer):
    """4 running + 4 queued sequences; one request may ask for 4."""
    engine = FakeEngineClient(tokenizer, step_delay=0.02)
    engine.reply = lambda p, s: "w" * 60 + "<|im_end|>"
    app = build_app(ServeSettings(["tiny"], max_num_seqs=4, max_queued_requests=4), engine=engine)
    with ServerThread(app) as server:
        server.ctx = app.state.ctx
        yield server


def test_admission_counts_sequences(small_server):
    url = small_server.url

    async def run():
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            big = [asyncio.ensure_future(c.post("/v1/chat/completions", json={"messages": MSG, "n": 4}))
                   for _ in range(2)]
            while small_server.ctx.tracker.sequences < 8:
                await asyncio.sleep(0.01)
            assert small_server.ctx.tracker.in_flight == 2
            late = await c.post("/v1/chat/completions", json={"messages": MSG})  # a 9th sequence
            return await asyncio.gather(*big), late

    big, late = asyncio.run(run())
    assert [r.status_code for r in big] == [200, 200]
    assert_envelope(late, 503)
    assert late.headers["retry-after"] and "8 sequences" in late.json()["error"]["message"]
    assert small_server.ctx.tracker.sequences == 0 and small_server.ctx.tracker.in_flight == 0


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": MSG, "n": 5}, "n"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, "n"),
    ("/v1/completions", {"prompt": ["a"] * 5}, "prompt"),
])
def test_one_request_may_not_exceed_the_per_request_cap(small_server, path, body, param):
    err = assert_envelope(post(small_server, path, json=body), 400, param)
    assert "at most 4" in err["message"]
    assert small_server.ctx.tracker.sequences == 0


def test_per_request_cap_setting():
    assert ServeSettings(["m"], max_num_seqs=8).per_request_limit == 8
    assert ServeSettings(["m"], max_num_seqs=8, max_seqs_per_request=32).per_request_limit == 32
    # never above what admission can ever hold, or the request would get 503 forever
    assert ServeSettings(["m"], max_num_seqs=8, max_queued_requests=2, max_seqs_per_request=32).per_request_limit == 10
    assert ServeSettings(["m"], max_num_seqs=8, max_queued_requests=None, max_seqs_per_request=99).per_request_limit == 99


def test_engine_not_running_503_has_retry_after(tokenizer):
    engine = FakeEngineClient(tokenizer)
    app = build_app(ServeSettings(["tiny"]), engine=engine)
    with ServerThread(app) as server:
        engine.errored = True
        for r in (httpx.get(server.url + "/health"), post(server, "/v1/chat/completions", json={"messages": MSG})):
            err = assert_envelope(r, 503)
            assert err["message"] == "The engine is not running." and r.headers["retry-after"] == "5"
