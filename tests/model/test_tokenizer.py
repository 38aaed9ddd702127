"""Tokenizers of the presets and of checkpoint directories: ids of the special tokens, tags that
survive skip_special_tokens, the chat template, and the exact round trip of the synthetic one."""

from __future__ import annotations

import json
import random

import pytest

from hybridserve.tokenizer import CHAT_TEMPLATE, load_tokenizer

IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 10, "<|im_end|>": 11, "<think>": 12, "</think>": 13,
       "<tool_call>": 14, "</tool_call>": 15, "<tool_response>": 16, "</tool_response>": 17}
TAGS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The full-size preset's synthetic tokenizer, generated into a fresh cache dir."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYBRIDSERVE_CACHE", str(cache))
        tok = load_tokenizer("nemotron-3-nano-30b-a3b")
        assert list(cache.glob("tokenizers/*/tokenizer.json")), "generated into $HYBRIDSERVE_CACHE"
        again = load_tokenizer("nemotron-3-nano-30b-a3b")  # second use reads the cached files
    assert again.get_vocab() == tok.get_vocab()
    return tok


@pytest.fixture(scope="module")
def tiny():
    return load_tokenizer("tiny")


@pytest.mark.parametrize("name", ["tiny", "full"])
def test_special_tokens_at_fixed_ids(name, tiny, full):
    tok = tiny if name == "tiny" else full
    for token, i in IDS.items():
        assert tok.convert_tokens_to_ids(token) == i, token
        assert tok.encode(token, add_special_tokens=False) == [i], token
    assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == ("<|im_end|>", 11, 1, 0)
    assert {"<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)
    assert not set(TAGS) & set(tok.all_special_tokens)


@pytest.mark.parametrize("name", ["tiny", "full"])
def test_tags_survive_skip_special_tokens(name, tiny, full):
    tok = tiny if name == "tiny" else full
    words = "hello world" if name == "tiny" else "w500 w600"
    text = f"<|im_start|>assistant\n<think>{words}</think><tool_call>{words}</tool_call><|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    kept = tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in kept and "<|im_end|>" not in kept
    for tag in ["<think>", "</think>", "<tool_call>", "</tool_call>"]:
        assert kept.count(tag) == 1, (tag, kept)


def test_tiny_tokenizer_fits_the_tiny_vocab_and_round_trips_text(tiny):
    assert len(tiny) <= 512
    text = "The weather in Paris is sunny! def f(x): return {\"a\": 42}\n\tÜnïcödé ✓"
    ids = tiny.encode(text, add_special_tokens=False)
    assert max(ids) < 512 and tiny.decode(ids) == text
    assert tiny.encode("hi", add_special_tokens=True) == tiny.encode("hi", add_special_tokens=False)  # no BOS


def test_full_size_tokenizer_round_trips_random_ids_exactly(full):
    assert len(full) == 131072
    rng = random.Random(0)
    for length in [1, 7, 300, 2000]:
        ids = [rng.randrange(131072) for _ in range(length)]
        assert full.encode(full.decode(ids), add_special_tokens=False) == ids
    prompt = " ".join(f"w{rng.randrange(20, 131072)}" for _ in range(1000))
    assert len(full.encode(prompt, add_special_tokens=False)) == 1000  # exact benchmark prompt lengths


@pytest.mark.parametrize("name", ["tiny", "full"])
def test_presets_use_the_shared_chat_template(name, tiny, full):
    tok = tiny if name == "tiny" else full
    if not CHAT_TEMPLATE.is_file():
        assert tok.chat_template is None
        return
    assert tok.chat_template == CHAT_TEMPLATE.read_text()
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n<think>\n")


def test_checkpoint_directory_uses_its_own_files(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    tok = load_tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[x]"
    assert tok.get_vocab() == tiny.get_vocab() and tok.convert_tokens_to_ids("</think>") == 13


def test_unknown_names_and_directories_without_a_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a preset"):
        load_tokenizer("no-such-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nemotron_h"}))
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
