"""Shared fixtures: one fake-engine server per module, and an openai client for it."""

from __future__ import annotations

import openai
import pytest

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
    settings = ServeSettings(["tiny", "alias"], max_num_seqs=4, max_queued_requests=64)
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
