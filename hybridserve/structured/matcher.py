"""SequenceMatcher: where one sequence stands in its grammar.

The engine feeds it every token appended to the sequence (sampled or forced) and asks it for the
next token mask. Preemption keeps a sequence's tokens, so the matcher needs nothing then;
`rollback` undoes tokens for a scheduler that discards ones it already fed (speculative or
overlapped steps). Each choice of an n > 1 request has its own matcher.
"""

from __future__ import annotations

import logging

import llguidance

logger = logging.getLogger(__name__)


class SequenceMatcher:
    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int):
        self.llmatcher = matcher
        self.vocab_size = vocab_size

    def accept(self, token_id: int) -> bool:
        """Advance by one token; True when the sequence must end here: the grammar is complete (no
        token may follow) or the token broke it (`failed`, logged)."""
        if not self.llmatcher.consume_token(token_id):
            logger.error("token %d does not fit the request's grammar: %s", token_id,
                         self.llmatcher.get_error().split("\n")[0])
            return True
        return self.llmatcher.is_stopped()

    @property
    def failed(self) -> bool:
        return self.llmatcher.is_error()

    @property
    def is_complete(self) -> bool:
        """The output so far is a whole answer (the end-of-sequence token is allowed)."""
        return self.llmatcher.is_accepting()

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` accepted tokens."""
        if num_tokens and not self.llmatcher.rollback(num_tokens):
            raise RuntimeError(f"grammar cannot roll back {num_tokens} tokens: {self.llmatcher.get_error()}")
