"""Structured outputs through the real server on the tiny model (random weights: noise without a
grammar): the openai SDK's `parse` with a pydantic model, JSON schemas on completions, guaranteed
tool calls, and streaming equal to non-streaming under a grammar."""

from __future__ import annotations

import json
from enum import StrEnum

import jsonschema
import pydantic
import pytest

from tests.structured.test_tool_grammar import SCHEMAS as TOOL_SCHEMAS
from tests.structured.test_tool_grammar import TOOLS

MSG = [{"role": "user", "content": "Describe a city."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


class Size(StrEnum):
    small = "small"
    large = "large"


class District(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=12)
    population: int = pydantic.Field(ge=0, le=10_000)


class City(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    name: str = pydantic.Field(max_length=20)
    size: Size
    districts: list[District] = pydantic.Field(min_length=1, max_length=3)
    capital: bool


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_parse_with_a_pydantic_model(real, seed):
    r = real.chat.completions.parse(model="tiny", messages=MSG, response_format=City, temperature=1.0, seed=seed,
                                    max_tokens=300, extra_body=NO_THINKING)
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, City)
    assert City.model_validate_json(choice.message.content) == choice.message.parsed


def test_parse_after_reasoning_closed_by_the_budget(real):
    r = real.chat.completions.parse(model="tiny", messages=MSG, response_format=City, temperature=1.0, seed=4,
                                    max_tokens=300, extra_body={"thinking_token_budget": 8})
    message = r.choices[0].message
    assert message.reasoning_content and isinstance(message.parsed, City)


def test_completions_guided_json_and_choice(real):
    schema = City.model_json_schema()
    r = real.completions.create(model="tiny", prompt="Once upon a time", max_tokens=300, temperature=1.0, seed=3, n=3,
                                extra_body={"guided_json": schema})
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), schema)
    r = real.completions.create(model="tiny", prompt="Yes or no?", max_tokens=10, temperature=0,
                                extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}})
    assert r.choices[0].text in ("yes", "no", "maybe") and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "book"}}])
def test_guaranteed_tool_calls(real, tool_choice):
    for seed in range(3):
        r = real.chat.completions.create(model="tiny", messages=MSG, tools=TOOLS, tool_choice=tool_choice,
                                         temperature=1.0, seed=seed, max_tokens=400, extra_body=NO_THINKING)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls and not choice.message.content
        for call in choice.message.tool_calls:
            if isinstance(tool_choice, dict):
                assert call.function.name == "book"
            jsonschema.validate(json.loads(call.function.arguments), TOOL_SCHEMAS[call.function.name])


def test_streaming_equals_non_streaming_under_a_grammar(real):
    kw = dict(model="tiny", messages=MSG, temperature=0, max_tokens=300, extra_body=NO_THINKING,
              response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema()}})
    whole = real.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in real.chat.completions.create(**kw, stream=True)
                       if c.choices)
    assert streamed == whole and City.model_validate_json(whole)
