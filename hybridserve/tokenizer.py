"""Tokenizers: a checkpoint's own files, or the one that belongs to a preset.

`load_tokenizer(name_or_path)` is called by the engine and the API process. A checkpoint directory
brings its own tokenizer files and chat template. Presets have no real tokenizer, so:
  * `tiny` ships a small byte-level BPE (made by `presets/make_tiny_tokenizer.py`);
  * a preset without tokenizer files (the full-size one) gets a synthetic word-level tokenizer of
    its whole vocabulary ("w{id}" words split on whitespace), generated once into the cache dir, so
    decode -> encode round-trips exactly and benchmark prompts have exact token lengths.
Both kinds keep the special tokens at the ids of the real model and take the chat template from
`presets/chat_template.jinja`. Think/tool tags are added tokens that are *not* special, so
`decode(skip_special_tokens=True)` keeps the markers the reasoning and tool parsers need.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hybridserve.config import PRESETS_DIR, ModelConfig

# id -> token of the real model (model-spec.md §4.1). Special: stripped by skip_special_tokens.
SPECIAL_TOKENS = {0: "<unk>", 1: "<s>", 2: "</s>", 10: "<|im_start|>", 11: "<|im_end|>"}
# Tags the parsers read: single tokens, kept by skip_special_tokens.
TAG_TOKENS = {
    12: "<think>",
    13: "</think>",
    14: "<tool_call>",
    15: "</tool_call>",
    16: "<tool_response>",
    17: "</tool_response>",
}
NAMED_TOKENS = dict(
    bos_token="<s>",
    eos_token="<|im_end|>",
    unk_token="<unk>",
    pad_token="<unk>",
    extra_special_tokens=["</s>", "<|im_start|>"],  # so all_special_ids lists every special token
)
CHAT_TEMPLATE = PRESETS_DIR / "chat_template.jinja"
_SYNTHETIC_VERSION = 2  # bump when the synthetic layout changes: the cache is keyed on it


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The tokenizer of a checkpoint directory, a tokenizer directory, or a preset name."""
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer.json; pass a tokenizer directory or a preset name as the tokenizer"
            )
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    preset_dir = PRESETS_DIR / str(name_or_path)
    if not (preset_dir / "config.json").is_file():
        presets = ", ".join(sorted(p.parent.name for p in PRESETS_DIR.glob("*/config.json")))
        raise FileNotFoundError(f"{name_or_path!s}: not a directory and not a preset (presets: {presets})")
    if (preset_dir / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(str(preset_dir))
    else:
        vocab_size = ModelConfig.from_hf(preset_dir).vocab_size
        tok = _synthetic_tokenizer(preset_dir.name, vocab_size)
    tok.chat_template = CHAT_TEMPLATE.read_text() if CHAT_TEMPLATE.is_file() else None
    return tok


def cache_dir() -> Path:
    """Where generated files live: $HYBRIDSERVE_CACHE, else ~/.cache/hybridserve."""
    return Path(os.environ.get("HYBRIDSERVE_CACHE") or Path.home() / ".cache" / "hybridserve")


def build_synthetic_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer of `vocab_size` ids: the special and tag tokens at their ids, "w{id}"
    for every other id, whitespace-separated. decode(ids) then encode gives back ids exactly."""
    fixed = {**SPECIAL_TOKENS, **TAG_TOKENS}
    vocab = {fixed.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS.values()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS.values()])
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """A `tokenizers.Tokenizer` as a transformers tokenizer with the model's named tokens."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, model_max_length=1 << 30, **NAMED_TOKENS
    )


def _synthetic_tokenizer(name: str, vocab_size: int) -> PreTrainedTokenizerFast:
    """Load the preset's synthetic tokenizer from the cache, generating it on first use."""
    target = cache_dir() / "tokenizers" / f"{name}-synthetic-v{_SYNTHETIC_VERSION}-{vocab_size}"
    if not (target / "tokenizer.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        build_synthetic_tokenizer(vocab_size).save_pretrained(str(tmp))
        try:
            tmp.rename(target)  # atomic: concurrent first users never see a half-written directory
        except OSError:
            if not (target / "tokenizer.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process won the race
    return PreTrainedTokenizerFast.from_pretrained(str(target))

