"""Reasoning split: hand-written outputs, and streaming at every split point equals non-streaming."""

import random

import pytest

from hybridserve.serve.reasoning import ReasoningParser, prompt_opens_reasoning


def split_reasoning(text: str, reasoning_open: bool, hindsight: bool = True) -> tuple[str | None, str | None]:
    """The whole text at once: (reasoning or None, content or None)."""
    parser = ReasoningParser(reasoning_open, hindsight=hindsight)
    a, b = parser.feed(text), parser.finish()
    return (a.reasoning + b.reasoning) or None, (a.content + b.content) or None

CASES = [
    # (output, thinking on?, expected reasoning, expected content)
    ("I think.\n</think>\nParis.", True, "I think.\n", "Paris."),
    ("<think>\nI think.</think>Paris.", True, "\nI think.", "Paris."),
    ("still thinking, cut off", True, "still thinking, cut off", None),
    ("reason</think>", True, "reason", None),
    ("</think>answer", True, None, "answer"),
    ("a</think>b</think>c", True, "a", "b</think>c"),  # only the first end tag splits
    ("plan\n<tool_call>\n<function=f>\n</function>\n</tool_call>", True, "plan\n",
     "<tool_call>\n<function=f>\n</function>\n</tool_call>"),  # implicit end of reasoning
    ("Paris.", False, None, "Paris."),
    ("\nParis.", False, None, "Paris."),
    ("<think>x</think>y", False, "x", "y"),  # thinking off, but the model thinks: split
    (" \n<think>x</think>\ny", False, "x", "y"),
    ("a<think>b", False, None, "ab"),  # a stray opening tag after content is dropped
    # an unfinished call inside reasoning is reasoning (nano_v3); a call cut off at the end is a call
    ("plan <tool_call> call f? no.</think>answer", True, "plan <tool_call> call f? no.", "answer"),
    ("plan <tool_call>\n<function=f>\n<parameter=a>\n1", True, "plan ",
     "<tool_call>\n<function=f>\n<parameter=a>\n1"),
    ("r<tool_call><function=f></function></tool_call></think>x", True, "r",
     "<tool_call><function=f></function></tool_call></think>x"),
    ("a < b and </thin", True, "a < b and </thin", None),  # partial tag at the end is kept
    ("", True, None, None),
    ("   ", False, None, None),
    ("r</think>\n\n<tool_call>", True, "r", "<tool_call>"),
]


@pytest.mark.parametrize("text,thinking,reasoning,content", CASES)
def test_split(text, thinking, reasoning, content):
    assert split_reasoning(text, thinking) == (reasoning, content)


# Thinking off and a bare `X</think>Y`: only a parser that may hold the text (non-streaming) can
# move X into reasoning; a stream has already sent X as content and drops the stray tag.
HINDSIGHT_ONLY = [("oops</think>Paris.", "oops", "Paris.", None, "oopsParis.")]


@pytest.mark.parametrize("text,reasoning,content,streamed_reasoning,streamed_content", HINDSIGHT_ONLY)
def test_stray_think_end_with_thinking_off(text, reasoning, content, streamed_reasoning, streamed_content):
    assert split_reasoning(text, False) == (reasoning, content)
    assert _stream(list(text), False, hindsight=True) == (reasoning, content)
    assert split_reasoning(text, False, hindsight=False) == (streamed_reasoning, streamed_content)
    assert _stream(list(text), False) == (streamed_reasoning, streamed_content)


def _stream(pieces, thinking, hindsight=False):
    parser = ReasoningParser(thinking, hindsight=hindsight)
    reasoning = content = ""
    for piece in pieces:
        d = parser.feed(piece)
        reasoning += d.reasoning
        content += d.content
    d = parser.finish()
    return (reasoning + d.reasoning) or None, (content + d.content) or None


@pytest.mark.parametrize("text,thinking,reasoning,content", CASES)
def test_streaming_matches_at_every_split(text, thinking, reasoning, content):
    expected = (reasoning, content)
    assert _stream(list(text), thinking) == expected  # character by character
    assert _stream(list(text), thinking, hindsight=True) == expected
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            assert _stream([text[:i], text[i:j], text[j:]], thinking) == expected, (i, j)
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert _stream(pieces, thinking) == expected


def test_no_text_is_emitted_twice_or_lost_in_reasoning():
    parser = ReasoningParser(True)
    deltas = [parser.feed(t) for t in ["Let", " me", " see", "<", "/think", ">", "Hi"]]
    assert [d.reasoning for d in deltas] == ["Let", " me", " see", "", "", "", ""]
    assert [d.content for d in deltas] == ["", "", "", "", "", "", "Hi"]


def test_prompt_decides_thinking():
    assert prompt_opens_reasoning("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think></think>")
    # history with closed reasoning does not matter: the newest marker decides
    assert prompt_opens_reasoning("<think></think>old<|im_end|>\n<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_reasoning("plain prompt")


def test_tool_call_ends_reasoning_only_when_tools_are_parsed():
    text = "plan <tool_call>x</tool_call> more</think>answer"
    parser = ReasoningParser(True, tool_call_ends_reasoning=False)
    a, b = parser.feed(text), parser.finish()
    assert (a.reasoning + b.reasoning, a.content + b.content) == ("plan <tool_call>x</tool_call> more", "answer")


def test_held_call_is_undecided_until_it_closes():
    parser = ReasoningParser(True)
    d = parser.feed("plan <tool_call>\n<function=f>")
    assert (d.reasoning, d.content, parser.undecided) == ("plan ", "", True)
    d = parser.feed("</function>")
    assert not parser.undecided and not parser.held_was_reasoning and not parser.in_reasoning
    assert d.content == "<tool_call>\n<function=f></function>"
