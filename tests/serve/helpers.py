"""Test helpers: a small byte-level tokenizer with Nemotron's special tokens and our chat template."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hybridserve.config import PRESETS_DIR

TEMPLATE_PATH = PRESETS_DIR / "chat_template.jinja"
SPECIAL = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|im_start|>": 10, "<|im_end|>": 11}
MARKERS = {"<think>": 12, "</think>": 13, "<tool_call>": 14, "</tool_call>": 15}


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level: every byte is one token (ids 16..271); markers are single tokens (ids 10..15)."""
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: ord(c))
    named = {i: name for name, i in {**SPECIAL, **MARKERS}.items()}
    vocab = {named.get(i, f"<reserved_{i}>"): i for i in range(16)}
    for i, ch in enumerate(byte_chars):
        vocab[ch] = 16 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>", pad_token="<unk>"
    )
    fast.chat_template = TEMPLATE_PATH.read_text()
    return fast
