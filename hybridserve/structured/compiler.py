"""GrammarCompiler: StructuredSpec -> CompiledGrammar on a worker thread of the engine process.

Compiling never runs on the engine loop: `submit` returns a future and the engine keeps stepping
the other requests while a new grammar builds (ms for typical schemas). llguidance needs the
tokenizer's token bytes (an `LLTokenizer`, built on the worker at the first structured request:
about 4 s at 131k tokens, then reused). Results are cached by grammar text, so a repeated schema
costs nothing; a compiled grammar is a fresh matcher that every sequence copies (the copies share
the grammar and its lexer).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import llguidance
import llguidance.hf

from hybridserve.structured.grammars import clean_error
from hybridserve.structured.matcher import SequenceMatcher
from hybridserve.structured.spec import StructuredSpec

logger = logging.getLogger(__name__)

CACHE_SIZE = 512  # compiled grammars kept (least recently used go first)


class CompiledGrammar:
    def __init__(self, template: llguidance.LLMatcher, vocab_size: int):
        self._template = template
        self.vocab_size = vocab_size

    def matcher(self) -> SequenceMatcher:
        """A matcher at the start of the grammar, for one sequence."""
        return SequenceMatcher(self._template.deep_copy(), self.vocab_size)


class GrammarCompiler:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], cache_size: int = CACHE_SIZE):
        """tokenizer: a transformers fast tokenizer, or its name or path (loaded on the worker).
        vocab_size: the model's (logits width). stop_token_ids: end the output where the grammar allows."""
        self._tokenizer_source = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[str, Future[CompiledGrammar]] = OrderedDict()
        self._cache_size = cache_size
        self._worker: ThreadPoolExecutor | None = None

    def submit(self, spec: StructuredSpec) -> Future[CompiledGrammar]:
        """The compiled grammar of `spec`, now (cached) or later (a future). Call from one thread."""
        future = self._cache.get(spec.grammar)
        if future is not None:
            self._cache.move_to_end(spec.grammar)
            return future
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="grammar-compiler")
        future = self._worker.submit(self._compile, spec)
        self._cache[spec.grammar] = future
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return future

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: StructuredSpec) -> CompiledGrammar:
        if self._lltokenizer is None:
            self._lltokenizer = self._build_lltokenizer()
        matcher = llguidance.LLMatcher(self._lltokenizer, spec.grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the {spec.kind} constraint cannot be compiled: {clean_error(matcher.get_error())}")
        return CompiledGrammar(matcher, self._vocab_size)

    def _build_lltokenizer(self) -> llguidance.LLTokenizer:
        tok = self._tokenizer_source
        if isinstance(tok, str):
            from hybridserve.tokenizer import load_tokenizer

            tok = load_tokenizer(tok)
        logger.info("building the grammar tokenizer (%d tokens)", self._vocab_size)
        try:
            return llguidance.hf.from_tokenizer(tok, n_vocab=self._vocab_size, eos_token=self._stop_token_ids)
        except ValueError as e:  # neither byte-level nor metaspace, e.g. the full-size preset's word-level one
            raise ValueError(f"this tokenizer cannot be used for structured outputs ({e})") from None
