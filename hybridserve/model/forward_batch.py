"""ForwardBatch: everything one model step needs besides the weights and the caches.

A step runs a packed batch of B sequences with T tokens in total. Each sequence contributes a
contiguous run of new tokens (a whole prompt, a prefill chunk, or one decode token) and may carry
state from earlier steps: its Mamba conv/SSM state lives in slot `state_slots[b]` of the state
cache, its earlier keys/values in the KV pages listed by `block_tables[b]`.

Letters: T tokens in the step, B sequences, M max pages per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.model.state_capture import StateCapture


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    cu_seqlens: torch.Tensor  # [B+1] int32: new tokens of sequence b are rows cu[b]:cu[b+1]
    seq_lens: torch.Tensor  # [B] int32: tokens of sequence b after this step (cached + new)
    state_slots: torch.Tensor  # [B] int64: Mamba state slot of each sequence
    has_initial_state: torch.Tensor  # [B] bool: continue from the slot's state (else from zeros)
    block_tables: torch.Tensor  # [B, M] int32: KV page ids of each sequence (-1 / unused past the end)
    slot_mapping: torch.Tensor  # [T] int64: flat KV slot (page * block_size + offset) of each new token
    logits_indices: torch.Tensor | None = None  # [R] int64 rows of the T tokens to compute logits for; None: all
    is_decode: bool = False  # host flag: every sequence has exactly one new token and carried state
    capture: StateCapture | None = None  # prefix caching: Mamba states to snapshot inside the chunks

    @classmethod
    def build(
        cls,
        new_tokens: list[list[int]],
        num_cached: list[int],
        state_slots: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        logits: str = "last",
    ) -> ForwardBatch:
        """Pack sequences into a batch (host-side helper used by the model runner and tests).

        new_tokens[b]: the tokens sequence b feeds this step; num_cached[b]: tokens it already has in
        the caches; block_tables[b]: its KV pages, enough for num_cached[b] + len(new_tokens[b]).
        logits: "last" (one row per sequence) or "all".
        """
        lens = [len(t) for t in new_tokens]
        assert all(n > 0 for n in lens), "every sequence needs at least one new token"
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        slot_mapping = []
        for toks, start, table in zip(new_tokens, num_cached, block_tables):
            for pos in range(start, start + len(toks)):
                slot_mapping.append(table[pos // block_size] * block_size + pos % block_size)
        width = max(1, max(len(t) for t in block_tables))
        tables = [t + [-1] * (width - len(t)) for t in block_tables]
        ids = [t for toks in new_tokens for t in toks]
        logits_indices = None if logits == "all" else [c - 1 for c in cu[1:]]

        def tensor(x, dtype):
            return torch.tensor(x, dtype=dtype, device=device)

        return cls(
            input_ids=tensor(ids, torch.int64),
            cu_seqlens=tensor(cu, torch.int32),
            seq_lens=tensor([c + n for c, n in zip(num_cached, lens)], torch.int32),
            state_slots=tensor(state_slots, torch.int64),
            has_initial_state=tensor([c > 0 for c in num_cached], torch.bool),
            block_tables=tensor(tables, torch.int32),
            slot_mapping=tensor(slot_mapping, torch.int64),
            logits_indices=None if logits_indices is None else tensor(logits_indices, torch.int64),
            # a one-token prompt is a first step (zero state), not a decode: the decode ops read the slot
            is_decode=all(n == 1 for n in lens) and all(c > 0 for c in num_cached),
        )
