"""StepPlan: one model step as plain data, the only thing the scheduler hands the model runner.

The scheduler is the only reader and writer of `Request`s; the runner sees numpy arrays and
Python scalars, never a live request. A plan says, for B sequences feeding T tokens in total:
which state slot each uses (the slot also names its block-table row and its token-buffer row),
how many tokens it already has in the caches and how many it feeds, the fed token ids (or
`FROM_DEVICE` where the token is the one the previous step sampled into the slot's token-buffer
row, so a decode never needs the host to know its last token), the block-table entries that
changed, the R rows to sample (which token's logits, which slot receives the token, the sampling
scalars), the L prompt-logprob rows (which fed prompt token's logits score which next prompt
token), the state / KV block copies to do before the forward (prefix caching: saving a finished
sequence's state into a snapshot row, restoring a snapshot into a slot on a hit, copying a hit's
partial tail block) and after it (n > 1 forks, a prompt snapshot where a chunk ends), and the
prompt snapshots to capture inside a chunk (`StateCapture`).

Letters: B sequences, T tokens, R sample rows, L prompt-logprob rows, K block-table updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hybridserve.engine.request import Request

FROM_DEVICE = -1  # input id placeholder: take the slot's token-buffer entry
# prompt_logprobs: prompt tokens scored per step at most (their [rows, vocab] logits are the cost;
# the runner's memory plan reserves for them)
PROMPT_LOGPROB_ROWS_PER_STEP = 256


def _empty(cols: int) -> np.ndarray:
    return np.zeros((0, cols), dtype=np.int64)


@dataclass
class SamplingInputs:
    """Per-row sampling inputs of one step (R rows), host side. Optional parts are empty when unused."""

    slots: np.ndarray  # [R] int64: token-buffer row that receives the sampled token
    temperature: np.ndarray  # [R] float32, 0 for greedy rows
    top_p: np.ndarray  # [R] float32
    min_p: np.ndarray  # [R] float32
    top_k: np.ndarray  # [R] int64, 0 = off
    seeds: np.ndarray  # [R] int64
    positions: np.ndarray  # [R] int64: output index of the token being sampled (the noise counter)
    forced: np.ndarray  # [R] int64: token to force (thinking budget), -1 for none
    bias: tuple[list[int], list[int], list[float]] = ((), (), ())  # rows, token ids, values (sparse)
    suppress: tuple[list[int], list[int]] = ((), ())  # rows, token ids masked (min_tokens)
    penalty_rows: list[int] = field(default_factory=list)
    penalty_prompts: list[list[int]] = field(default_factory=list)  # per penalty row: prompt ids
    penalty_outputs: list[list[int]] = field(default_factory=list)  # per penalty row: output ids
    penalty_values: np.ndarray = field(default_factory=lambda: np.zeros((3, 0), dtype=np.float32))  # presence, frequency, repetition
    num_logprobs: list[int | None] = field(default_factory=list)  # per row: None or top-k alternatives

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature == 0).all())

    @property
    def filter_needed(self) -> bool:
        return bool(((self.top_k > 0) | (self.top_p < 1.0) | (self.min_p > 0.0)).any())

    @property
    def max_logprobs(self) -> int:
        """-1 when no row asks for logprobs."""
        return max((k for k in self.num_logprobs if k is not None), default=-1)

    def rows(self, start: int, stop: int) -> SamplingInputs:
        """Rows start..stop-1 as inputs of their own (sparse parts re-indexed): the sampler runs
        a big step a bounded number of rows at a time."""
        if start == 0 and stop >= len(self):
            return self

        def sparse(rows, *columns):
            keep = [i for i, r in enumerate(rows) if start <= r < stop]
            return ([rows[i] - start for i in keep], *([c[i] for i in keep] for c in columns))

        keep = [i for i, r in enumerate(self.penalty_rows) if start <= r < stop]
        part = slice(start, stop)
        return SamplingInputs(
            slots=self.slots[part], temperature=self.temperature[part], top_p=self.top_p[part],
            min_p=self.min_p[part], top_k=self.top_k[part], seeds=self.seeds[part], positions=self.positions[part],
            forced=self.forced[part], bias=sparse(*self.bias), suppress=sparse(*self.suppress),
            penalty_rows=[self.penalty_rows[i] - start for i in keep],
            penalty_prompts=[self.penalty_prompts[i] for i in keep],
            penalty_outputs=[self.penalty_outputs[i] for i in keep],
            penalty_values=self.penalty_values[:, keep], num_logprobs=self.num_logprobs[part],
        )

    @classmethod
    def of(cls, rows: list[Request], slots: list[int]) -> SamplingInputs:
        """The sampling rules of each row's request, as of the token it samples next."""
        ps = [r.params for r in rows]
        forced = [r.forced_next_token() for r in rows]
        bias: tuple[list, list, list] = ([], [], [])
        suppress: tuple[list, list] = ([], [])
        pen_rows = []
        for i, (r, p) in enumerate(zip(rows, ps)):
            for tid, v in p.logit_bias.items():
                bias[0].append(i)
                bias[1].append(tid)
                bias[2].append(v)
            if r.suppress_stop_tokens:
                suppress[0].extend([i] * len(r.stop_token_ids))
                suppress[1].extend(r.stop_token_ids)
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
                pen_rows.append(i)
        return cls(
            slots=np.array(slots, dtype=np.int64),
            temperature=np.array([0.0 if p.greedy else p.temperature for p in ps], dtype=np.float32),
            top_p=np.array([p.top_p for p in ps], dtype=np.float32),
            min_p=np.array([p.min_p for p in ps], dtype=np.float32),
            top_k=np.array([p.top_k for p in ps], dtype=np.int64),
            seeds=np.array([r.seed for r in rows], dtype=np.int64),
            positions=np.array([r.next_output_index for r in rows], dtype=np.int64),
            forced=np.array([-1 if f is None else f for f in forced], dtype=np.int64),
            bias=bias,
            suppress=suppress,
            penalty_rows=pen_rows,
            penalty_prompts=[rows[i].token_ids[: rows[i].num_prompt_tokens] for i in pen_rows],
            penalty_outputs=[rows[i].output_token_ids for i in pen_rows],
            penalty_values=np.array(
                [[ps[i].presence_penalty for i in pen_rows], [ps[i].frequency_penalty for i in pen_rows],
                 [ps[i].repetition_penalty for i in pen_rows]], dtype=np.float32,
            ).reshape(3, -1),
            num_logprobs=[p.logprobs for p in ps],
        )


@dataclass
class StepPlan:
    """One model step (see the module docstring). Rows are in batch order."""

    slots: np.ndarray  # [B] int64: state slot of each sequence
    num_cached: np.ndarray  # [B] int64: tokens already in the caches (the first fed token's position)
    num_new_tokens: np.ndarray  # [B] int64: tokens fed this step (>= 1)
    input_ids: np.ndarray  # [T] int64: fed token ids, FROM_DEVICE for the slot's last sampled token
    sample_token_indices: np.ndarray  # [R] int64: index into the T tokens of the logits each sample reads
    sampling: SamplingInputs  # [R] rows
    table_updates: np.ndarray = field(default_factory=lambda: _empty(3))  # [K, 3] row, column, block
    # prefix caching: state rows (snapshot saves, restores on a hit) and a hit's tail block, before the forward
    slot_copies_before: np.ndarray = field(default_factory=lambda: _empty(2))  # [C, 2] src, dst state rows
    block_copies_before: np.ndarray = field(default_factory=lambda: _empty(2))  # [D, 2] src, dst KV blocks
    slot_copies: np.ndarray = field(default_factory=lambda: _empty(2))  # [C, 2] src, dst: after the forward (forks, snapshots)
    block_copies: np.ndarray = field(default_factory=lambda: _empty(2))  # [D, 2] src, dst: after the forward
    captures: np.ndarray = field(default_factory=lambda: _empty(3))  # [N, 3] slot, snapshot row, position inside its chunk
    # prompt logprobs: L fed prompt tokens whose logits score the prompt token after them
    prompt_logprob_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [L] into T
    prompt_logprob_targets: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # [L] next ids
    prompt_logprob_k: int = 0  # top alternatives per prompt row (the step's largest request)

    @property
    def num_seqs(self) -> int:
        return len(self.slots)

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def num_samples(self) -> int:
        return len(self.sample_token_indices)

    @property
    def num_logits_rows(self) -> int:
        """Rows of logits the forward returns: the R sample rows, then the L prompt-logprob rows."""
        return self.num_samples + len(self.prompt_logprob_indices)

    @property
    def is_decode(self) -> bool:
        """One new token per sequence, each continuing carried state (a one-token prompt is not a decode)."""
        return bool((self.num_new_tokens == 1).all() and (self.num_cached > 0).all())

    @property
    def samples_each_sequence_once(self) -> bool:
        """Sample row b reads sequence b's (last) token, for every b, and nothing else: the decode-graph shape."""
        return self.num_logits_rows == self.num_samples == self.num_seqs == self.num_tokens

    def block_table_width(self, block_size: int) -> int:
        """Block-table columns the step reads: enough for the longest sequence after the step."""
        return max(1, int(-(-(self.num_cached + self.num_new_tokens).max() // block_size)))


def synthetic_plan(
    new_tokens: list[list[int]],
    num_cached: list[int],
    slots: list[int],
    block_tables: list[list[int]],
    sample_token_indices: list[int] = (),
    sample_rows: list[Request] = (),
) -> StepPlan:
    """A plan over made-up sequences (warm-up, memory probes, tests): sequence b feeds
    new_tokens[b] into slot slots[b] with the KV blocks block_tables[b] (its whole table is sent
    as updates); sample row r reads token sample_token_indices[r] with sample_rows[r]'s rules."""
    lens = np.array([len(t) for t in new_tokens], dtype=np.int64)
    indices = np.array(sample_token_indices, dtype=np.int64)
    owner = np.searchsorted(np.cumsum(lens), indices, side="right")  # the sequence of each sampled token
    updates = [(s, c, b) for s, table in zip(slots, block_tables) for c, b in enumerate(table)]
    return StepPlan(
        slots=np.array(slots, dtype=np.int64),
        num_cached=np.array(num_cached, dtype=np.int64),
        num_new_tokens=lens,
        input_ids=np.array([t for toks in new_tokens for t in toks], dtype=np.int64),
        sample_token_indices=indices,
        sampling=SamplingInputs.of(list(sample_rows), np.array(slots, dtype=np.int64)[owner].tolist()),
        table_updates=np.array(updates, dtype=np.int64).reshape(-1, 3),
    )
