"""Writes the `tiny` preset's tokenizer (tokenizer.json + tokenizer_config.json) next to its config.

A byte-level BPE of 512 ids (the tiny config's vocab_size) trained on the small English corpus
below, with the real model's special and tag tokens at their ids (ids 3-9 are reserved
placeholders). Run once by hand; the output is committed: `python -m hybridserve.presets.make_tiny_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from hybridserve.tokenizer import SPECIAL_TOKENS, TAG_TOKENS, wrap

VOCAB_SIZE = 512
OUT_DIR = Path(__file__).parent / "tiny"

CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn to speak a little.
Once upon a time there was a little cat who lived in a house by the river. Every morning the cat
walked to the water, looked at the fish, and went back home to sleep in the sun.
The weather today is sunny and warm, with a light wind from the west. Tomorrow it will rain.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
Please write a short poem about the sea. The sea is deep and blue, the waves are white and new.
You are a helpful assistant. Answer the question of the user in a clear and friendly way.
The user asked for the weather in Paris, so the assistant called a function to get the weather.
Let me think about this step by step. First we read the question, then we find the answer.
I need to call the tool with the city name. The result of the tool is the current temperature.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 42 100 1000 3.14 -1 2025.
Code: def add(a, b): return a + b. print("hello world"). for i in range(10): x = x * 2.
JSON: {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}.
The function has a parameter named city of type string, and it is required.
Good morning! How are you? I am fine, thank you. Have a nice day, and see you soon.
Machine learning models read tokens, predict the next token, and repeat until they stop.
The server streams tokens to many users at once, and each request has its own state.
"""


def build() -> Tokenizer:
    fixed = {**SPECIAL_TOKENS, **TAG_TOKENS}
    first_ids = [fixed.get(i, f"<|reserved_{i}|>") for i in range(max(fixed) + 1)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=first_ids,  # the trainer gives them ids 0.. in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines() * 4, trainer=trainer)
    # Re-register the tags as added tokens that are not special (same ids: already in the vocab).
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS.values()])
    return tok


def main() -> None:
    tok = build()
    for i, t in {**SPECIAL_TOKENS, **TAG_TOKENS}.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    assert tok.get_vocab_size() <= VOCAB_SIZE, tok.get_vocab_size()
    wrap(tok).save_pretrained(str(OUT_DIR))
    (OUT_DIR / "chat_template.jinja").unlink(missing_ok=True)  # the template is shared, not copied
    print(f"wrote {OUT_DIR} ({tok.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()
