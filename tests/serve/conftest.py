"""Shared fixtures: a real-engine server (tiny preset, one per session) and a fake-engine server per module."""

from __future__ import annotations

import openai
import pytest

from hybridserve.config import EngineConfig
from hybridserve.serve.app import build_app
from hybridserve.serve.context import ServeSettings
from tests.serve.fake_engine import DEFAULT_REPLY, FakeEngineClient
from tests.serve.helpers import ServerThread, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def fake_server(tokenizer):
    engine = FakeEngineClient(tokenizer)
    settings = ServeSettings(["tiny", "alias"], max_num_seqs=4, max_queued_requests=64, max_seqs_per_request=64)
    app = build_app(settings, engine=engine)
    with ServerThread(app) as server:
        server.engine = engine
        server.ctx = app.state.ctx
        yield server


@pytest.fixture
def fake(fake_server):
    """The module's fake engine, reset to the default reply for each test."""
    engine = fake_server.engine
    engine.reply = lambda prompt, params: DEFAULT_REPLY
    engine.fail_after = None
    engine.step_delay = 0.0
    return engine


@pytest.fixture
def client(fake_server):
    return openai.OpenAI(base_url=fake_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="session")
def real_server():
    """The real engine (in-process) on the tiny preset behind a real uvicorn server."""

    async def engine():
        from hybridserve.engine.client import EngineClient

        return await EngineClient.create(EngineConfig(model="tiny", device="cpu", max_num_seqs=16,
                                                      max_model_len=2048), in_process=True)

    app = build_app(ServeSettings(["tiny", "alias"], max_num_seqs=16), engine_factory=engine)
    with ServerThread(app) as server:
        server.wait_healthy(180)
        server.ctx = app.state.ctx
        yield server


@pytest.fixture
def real(real_server):
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
