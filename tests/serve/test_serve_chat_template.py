"""The presets' chat template against hand-written expected strings (model-spec.md §4.2)."""

import pytest

from tests.serve.helpers import make_tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": " Current weather ",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

INSTRUCTIONS = (
    "\n\nTo call a function, reply with only this format and nothing after it:\n\n<tool_call>\n"
    "<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nA value for the second parameter,\nwhich may span\nseveral lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Nest the <function=...></function> block inside <tool_call></tool_call> tags\n"
    "- Always give the required parameters\n"
    "- Any reasoning about the call goes BEFORE the call, never after it\n"
    "- If no function fits, answer normally from your own knowledge without mentioning functions\n"
    "</IMPORTANT>"
)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def render(tok, messages, **kw):
    kw.setdefault("add_generation_prompt", True)
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_system_turn_is_always_emitted(tok):
    assert render(tok, [{"role": "user", "content": "hi"}]) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_thinking_off_generation_prompt(tok):
    out = render(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                 enable_thinking=False)
    assert out == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                   "<|im_start|>assistant\n<think></think>")


def test_no_generation_prompt(tok):
    assert render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=False).endswith(
        "<|im_start|>user\nhi<|im_end|>\n")


def test_worked_example_with_tools(tok):
    out = render(tok, [{"role": "system", "content": "You are terse."},
                       {"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL])
    assert out == (
        "<|im_start|>system\nYou are terse.\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>\n"
        "<function>\n<name>get_weather</name>\n<description>Current weather</description>\n<parameters>\n"
        "<parameter>\n<name>city</name>\n<type>string</type>\n</parameter>\n<required>[\"city\"]</required>\n"
        "</parameters>\n</function>\n</tools>" + INSTRUCTIONS + "<|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_tools_without_system_text_have_no_leading_blank_line(tok):
    out = render(tok, [{"role": "user", "content": "x"}], tools=[WEATHER_TOOL])
    assert out.startswith("<|im_start|>system\n# Tools\n\n")


def test_null_schema_fields_render(tok):
    tools = [
        {"type": "function", "function": {"name": "a", "description": None, "parameters": None}},
        {"type": "function", "function": {"name": "b", "parameters": {"type": "object", "properties": {
            "p": {"type": None, "description": None, "enum": None, "default": None, "items": {"type": "string"}},
        }, "required": None}}},
        {"type": "function", "function": {"name": "c", "parameters": {"properties": None}}},
    ]
    out = render(tok, [{"role": "user", "content": "x"}], tools=tools)
    assert "<function>\n<name>a</name>\n<parameters>\n</parameters>\n</function>" in out
    assert ("<function>\n<name>b</name>\n<parameters>\n<parameter>\n<name>p</name>\n"
            "<items>{\"type\": \"string\"}</items>\n</parameter>\n</parameters>\n</function>") in out
    assert "<function>\n<name>c</name>\n<parameters>\n</parameters>\n</function>" in out
    assert "None" not in out


def test_extra_schema_keys_and_enum(tok):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "additionalProperties": False,
        "properties": {"u": {"type": "string", "description": "unit ", "enum": ["c", "f"], "minLength": 1}}}}}]
    out = render(tok, [{"role": "user", "content": "x"}], tools=tools)
    assert ("<parameter>\n<name>u</name>\n<type>string</type>\n<description>unit</description>\n"
            "<enum>[\"c\", \"f\"]</enum>\n<minLength>1</minLength>\n</parameter>\n"
            "<additionalProperties>False</additionalProperties>\n</parameters>") in out


def test_tool_responses_merge_into_one_user_turn(tok):
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
            {"type": "function", "function": {"name": "g", "arguments": {}}}]},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    out = render(tok, msgs)
    assert out.endswith(
        "<|im_start|>assistant\n<think></think>\n<tool_call>\n<function=f>\n<parameter=x>\n1\n</parameter>\n"
        "</function>\n</tool_call>\n<tool_call>\n<function=g>\n</function>\n</tool_call>\n<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response>\n"
        "<|im_end|>\n<|im_start|>assistant\n<think>\n")


def test_tool_call_argument_values(tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {
            "s": "two\nlines", "n": 2.5, "b": True, "o": {"k": [1, "é"]}, "l": ["a", "b"]}}}]}]
    out = render(tok, msgs, add_generation_prompt=False)
    assert out.endswith(
        "<|im_start|>assistant\n<think></think>Checking.\n<tool_call>\n<function=f>\n"
        "<parameter=s>\ntwo\nlines\n</parameter>\n<parameter=n>\n2.5\n</parameter>\n"
        "<parameter=b>\nTrue\n</parameter>\n<parameter=o>\n{\"k\": [1, \"é\"]}\n</parameter>\n"
        "<parameter=l>\n[\"a\", \"b\"]\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n")


def test_reasoning_history_is_truncated_before_the_last_user_turn(tok):
    msgs = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "reasoning_content": "r2"},
    ]
    out = render(tok, msgs, add_generation_prompt=False)
    assert out == ("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
                   "<|im_start|>assistant\n<think></think>\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
                   "<|im_start|>assistant\n<think>\nr2\n</think>\na2<|im_end|>\n")
    kept = render(tok, msgs, add_generation_prompt=False, truncate_history_thinking=False)
    assert "<|im_start|>assistant\n<think>\nr1\n</think>\na1<|im_end|>\n" in kept


def test_tool_loop_after_last_user_keeps_reasoning(tok):
    msgs = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "reasoning_content": "need tool",
         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"a": "b"}}}]},
        {"role": "tool", "content": "res"},
    ]
    out = render(tok, msgs)
    assert ("<|im_start|>assistant\n<think>\nneed tool\n</think>\n<tool_call>\n<function=f>\n"
            "<parameter=a>\nb\n</parameter>\n</function>\n</tool_call>\n<|im_end|>\n") in out


def test_empty_assistant_and_extra_system(tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""},
            {"role": "system", "content": "late"}, {"role": "user", "content": "q2"}]
    out = render(tok, msgs, add_generation_prompt=False)
    assert "<|im_start|>assistant\n<think></think><|im_end|>\n<|im_start|>system\nlate<|im_end|>\n" in out
