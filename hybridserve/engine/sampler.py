"""Sampler: logits of the rows that sample this step -> token ids (and logprobs), on the device.

Per row, in this order: raw logprobs (log_softmax of the model's logits, what `logprobs` returns);
logit_bias; stop tokens masked while `min_tokens` is not reached; repetition, frequency and
presence penalties; then greedy (temperature 0) or seeded sampling with top_k / top_p / min_p
(`ops.reference.sampling`); finally a forced token (thinking budget) replaces the pick.

`SamplingMetadata.build` turns the rows' requests into tensors once per step; rare features
(penalties, bias, min_tokens, logprobs) cost nothing when no row uses them. The sampler returns one
device tensor so the runner makes a single device->host copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridserve.engine.outputs import TokenLogprob
from hybridserve.engine.request import Request
from hybridserve.ops import get_ops
from hybridserve.ops.reference import sampling as ref_sampling


@dataclass
class SamplingMetadata:
    """Per-row sampling inputs for one step (R rows). Optional parts are None when unused."""

    temperature: torch.Tensor  # [R] float32
    top_k: torch.Tensor  # [R] int32
    top_p: torch.Tensor  # [R] float32
    min_p: torch.Tensor  # [R] float32
    seeds: torch.Tensor  # [R] int64
    positions: torch.Tensor  # [R] int64: output index of the token being sampled
    filter_needed: bool
    all_greedy: bool  # every row is temperature 0: a plain argmax, no noise
    forced: torch.Tensor | None  # [R] int64, -1 where nothing is forced
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # rows, cols, values (sparse)
    suppress: tuple[torch.Tensor, torch.Tensor] | None  # rows, cols of stop tokens to mask
    penalties: tuple[torch.Tensor, ...] | None  # rows, prompt tokens, output tokens, presence, frequency, repetition
    num_logprobs: list[int | None]  # per row: None, or how many top alternatives to return
    max_logprobs: int  # -1 when no row asks for logprobs

    @classmethod
    def build(cls, rows: list[Request], device: torch.device) -> SamplingMetadata:
        ps = [r.params for r in rows]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        forced = [r.forced_next_token() for r in rows]
        bias_r, bias_c, bias_v = [], [], []
        sup_r, sup_c = [], []
        pen_rows = []
        for i, (r, p) in enumerate(zip(rows, ps)):
            for tid, v in p.logit_bias.items():
                bias_r.append(i)
                bias_c.append(tid)
                bias_v.append(v)
            if r.suppress_stop_tokens:
                for tid in r.stop_token_ids:
                    sup_r.append(i)
                    sup_c.append(tid)
            if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
                pen_rows.append(i)
        penalties = None
        if pen_rows:
            penalties = (
                tensor(pen_rows, torch.int64),
                [rows[i].token_ids[: rows[i].num_prompt_tokens] for i in pen_rows],
                [rows[i].output_token_ids for i in pen_rows],
                tensor([ps[i].presence_penalty for i in pen_rows], torch.float32),
                tensor([ps[i].frequency_penalty for i in pen_rows], torch.float32),
                tensor([ps[i].repetition_penalty for i in pen_rows], torch.float32),
            )
        num_logprobs = [p.logprobs for p in ps]
        # two host->device copies for the per-row scalars
        floats = tensor([[p.temperature if not p.greedy else 0.0 for p in ps], [p.top_p for p in ps],
                         [p.min_p for p in ps]], torch.float32)
        ints = tensor([[p.top_k for p in ps], [r.seed for r in rows], [r.num_output_tokens for r in rows],
                       [-1 if f is None else f for f in forced]], torch.int64)
        return cls(
            temperature=floats[0],
            top_k=ints[0].to(torch.int32),
            top_p=floats[1],
            min_p=floats[2],
            seeds=ints[1],
            positions=ints[2],
            filter_needed=any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in ps),
            all_greedy=all(p.greedy for p in ps),
            forced=ints[3] if any(f is not None for f in forced) else None,
            bias=(tensor(bias_r, torch.int64), tensor(bias_c, torch.int64), tensor(bias_v, torch.float32)) if bias_r else None,
            suppress=(tensor(sup_r, torch.int64), tensor(sup_c, torch.int64)) if sup_r else None,
            penalties=penalties,
            num_logprobs=num_logprobs,
            max_logprobs=max((k for k in num_logprobs if k is not None), default=-1),
        )


class Sampler:
    """Applies the per-row rules and picks tokens; returns a single tensor to copy to the host."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # the Triton twin of sample_tokens when the device's op set has one
        self.sample_tokens = getattr(get_ops(device), "sample_tokens", ref_sampling.sample_tokens)

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """logits: [R, V] float32 (may be modified). Returns [R] int64 token ids, or, when some row
        asks for logprobs, [R, 3 + 2K] float32: token id, its logprob, its rank, K top ids, K top
        logprobs (see `unpack`)."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.max_logprobs >= 0 else None
        if meta.bias is not None:
            rows, cols, values = meta.bias
            logits.index_put_((rows, cols), values, accumulate=True)
        if meta.suppress is not None:
            logits[meta.suppress] = float("-inf")
        if meta.penalties is not None:
            self._apply_penalties(logits, meta.penalties)
        if meta.all_greedy:
            token_ids = torch.argmax(logits, dim=-1)
        else:
            token_ids = self.sample_tokens(
                logits, meta.temperature, meta.top_k, meta.top_p, meta.min_p, meta.seeds, meta.positions,
                meta.filter_needed,
            )
        if meta.forced is not None:
            token_ids = torch.where(meta.forced >= 0, meta.forced, token_ids)
        if raw_logprobs is None:
            return token_ids
        chosen = raw_logprobs.gather(1, token_ids[:, None])  # [R, 1]
        rank = (raw_logprobs > chosen).sum(-1, keepdim=True) + 1
        top_lp, top_ids = raw_logprobs.topk(meta.max_logprobs, dim=-1)
        return torch.cat([token_ids[:, None].float(), chosen, rank.float(), top_ids.float(), top_lp], dim=1)

    @staticmethod
    def unpack(host: list, meta: SamplingMetadata) -> tuple[list[int], list[list[TokenLogprob]] | None]:
        """The host copy of `__call__`'s result -> token ids, and per row the logprob entries
        (sampled token first, then the top alternatives) or None."""
        if meta.max_logprobs < 0:
            return host, None
        k_max = meta.max_logprobs
        token_ids, logprobs = [], []
        for row, k in zip(host, meta.num_logprobs):
            token_id = int(row[0])
            token_ids.append(token_id)
            if k is None:
                logprobs.append(None)
                continue
            entries = [TokenLogprob(token_id, row[1], int(row[2]))]
            for j in range(k):
                entries.append(TokenLogprob(int(row[3 + j]), row[3 + k_max + j], j + 1))
            logprobs.append(entries)
        return token_ids, logprobs

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, penalties: tuple) -> None:
        rows, prompts, outputs, presence, frequency, repetition = penalties
        vocab, device = logits.shape[1], logits.device
        prompt_mask = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
        counts = torch.zeros(len(outputs), vocab, dtype=torch.int32, device=device)
        # every row's ids at once, as flat offsets row * vocab + id: one copy each, not two per row
        prompt_mask.view(-1)[_flat_offsets(prompts, vocab, device)] = True
        out_ids = _flat_offsets(outputs, vocab, device)
        counts.view(-1).index_add_(0, out_ids, torch.ones_like(out_ids, dtype=torch.int32))
        sub = logits[rows]
        ref_sampling.apply_penalties(sub, prompt_mask, counts, presence, frequency, repetition)
        logits[rows] = sub


def _flat_offsets(seqs: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """row * vocab + id for every id of every row, as one int64 tensor on the device."""
    return torch.tensor([i * vocab + t for i, seq in enumerate(seqs) for t in seq], dtype=torch.int64, device=device)
