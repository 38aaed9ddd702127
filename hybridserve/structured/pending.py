"""PendingGrammars: requests whose grammar is still compiling, held outside the scheduler.

A structured request waits here (holding no cache slot, KV block or place in the queue) until its
grammar is compiled, then each of its sequences gets its own matcher and the engine queues it. The
requests behind it are not held up: the engine keeps stepping while the compiler works.
"""

from __future__ import annotations

import concurrent.futures
from concurrent.futures import Future
from typing import Any

from hybridserve.structured.compiler import CompiledGrammar, GrammarCompiler


class PendingGrammars:
    def __init__(self, compiler: GrammarCompiler):
        self.compiler = compiler
        self._waiting: dict[str, tuple[Future[CompiledGrammar], list[Any]]] = {}  # request_id -> (grammar, sequences)

    def add(self, sequences: list[Any]) -> None:
        """Hold the sequences of one request (engine `Request`s) until their grammar is ready."""
        first = sequences[0]
        self._waiting[first.request_id] = (self.compiler.submit(first.params.structured), sequences)

    def take_ready(self) -> tuple[list[list[Any]], list[tuple[str, str]]]:
        """(sequences of each request whose grammar is ready, matchers set), (request_id, error) of
        each whose grammar failed to compile."""
        ready, failed = [], []
        for request_id, (future, sequences) in list(self._waiting.items()):
            if not future.done():
                continue
            del self._waiting[request_id]
            error = future.exception()
            if error is not None:
                failed.append((request_id, str(error)))
                continue
            grammar = future.result()
            for seq in sequences:
                seq.grammar = grammar.matcher()
            ready.append(sequences)
        return ready, failed

    def abort(self, request_id: str, indices: list[int] | None = None) -> list[Any] | None:
        """Drop the given choices (all by default) of a waiting request; the dropped sequences, or
        None if the request is not waiting here."""
        entry = self._waiting.get(request_id)
        if entry is None:
            return None
        future, sequences = entry
        dropped = [s for s in sequences if indices is None or s.index in indices]
        kept = [s for s in sequences if s not in dropped]
        if kept:
            self._waiting[request_id] = (future, kept)
        else:
            del self._waiting[request_id]
        return dropped

    def wait(self, timeout: float) -> None:
        """Block until some grammar is ready or `timeout` seconds pass (the engine has nothing else to do)."""
        concurrent.futures.wait([f for f, _ in self._waiting.values()], timeout=timeout,
                                return_when=concurrent.futures.FIRST_COMPLETED)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    @property
    def num_sequences(self) -> int:
        return sum(len(seqs) for _, seqs in self._waiting.values())

    def __bool__(self) -> bool:
        return bool(self._waiting)
