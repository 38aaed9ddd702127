"""Shared fixtures: a small word-level tokenizer saved to disk and the fake streaming server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_server import FakeServer  # noqa: E402

NUM_WORDS = 300


def build_word_tokenizer(directory: Path) -> Path:
    """A WordLevel tokenizer over `w0`..`w299` plus 4 specials, saved as a HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "<s>", "</s>", "[PAD]"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(NUM_WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>", pad_token="[PAD]"
    )
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_word_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def fake_server(tokenizer_dir):
    """Factory: `with fake_server(**FakeOptions) as server:` -> server.base_url, server.record."""

    def start(**options) -> FakeServer:
        return FakeServer(tokenizer_dir, **options)

    return start
