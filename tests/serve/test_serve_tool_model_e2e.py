"""End to end: a tiny model trained in the test emits reasoning + a tool call; the client gets both parsed."""

import json

import openai
import pytest

from hybridserve.config import EngineConfig
from hybridserve.serve.app import build_app
from hybridserve.serve.context import ServeSettings
from tests.serve.helpers import ServerThread
from tests.serve.tiny_tool_model import MESSAGES, REASONING, TOOLS, train_tool_model


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    checkpoint = train_tool_model(tmp_path_factory.mktemp("tool-model"))

    async def engine():
        from hybridserve.engine.client import EngineClient

        return await EngineClient.create(EngineConfig(model=str(checkpoint), device="cpu", max_num_seqs=4),
                                         in_process=True)

    app = build_app(ServeSettings(["tool-tiny"]), engine_factory=engine)
    with ServerThread(app) as server:
        server.wait_healthy(120)
        yield server


@pytest.fixture
def tool_client(tool_server):
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="x", max_retries=0, timeout=60)


def test_reasoning_and_tool_call_non_streaming(tool_client):
    r = tool_client.chat.completions.create(model="tool-tiny", messages=MESSAGES, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == choice.message.reasoning == REASONING
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


def test_reasoning_and_tool_call_streaming(tool_client):
    chunks = list(tool_client.chat.completions.create(model="tool-tiny", messages=MESSAGES, tools=TOOLS,
                                                      temperature=0, stream=True,
                                                      stream_options={"include_usage": True}))
    reasoning = "".join(c.choices[0].delta.reasoning_content or "" for c in chunks if c.choices)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert reasoning == REASONING and content == ""
    assert deltas[0].id and deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
    assert len(deltas) > 2  # the arguments arrive in pieces
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage.completion_tokens == chunks[-1].usage.total_tokens - chunks[-1].usage.prompt_tokens > 0
