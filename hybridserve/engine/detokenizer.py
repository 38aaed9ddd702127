"""IncrementalDetokenizer: token ids -> text, one step at a time, never splitting a UTF-8 character.

Decoding each new token on its own breaks multi-byte characters and word-boundary spaces, so each
step decodes a short window (`prefix_offset`..end) and emits only what that window adds beyond its
already-emitted part (`prefix_offset`..`read_offset`). Text that still ends in U+FFFD (an incomplete
byte sequence) waits for the next token, or for `flush` at the end. The last prompt tokens seed the window so the first output
token gets its leading space right. Used by the output processor, one per choice.
"""

from __future__ import annotations

_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; returns the text they complete (possibly empty)."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        new = full[len(prefix) :]
        self.text += new
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return new

    def flush(self) -> str:
        """At the end of the sequence: whatever is still waiting, incomplete characters included."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        new = full[len(prefix) :]
        self.text += new
        self.prefix_offset = self.read_offset = len(self.ids)
        return new

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
