"""Sampler: logits of the rows that sample this step -> token ids (and logprobs), on the device.

Per row, in this order: raw logprobs (log_softmax of the model's logits, what `logprobs` returns);
logit_bias; stop tokens masked while `min_tokens` is not reached; repetition, frequency and
presence penalties; then greedy (temperature 0) or seeded sampling with top_k / top_p / min_p
(`ops.reference.sampling`); finally a forced token (thinking budget) replaces the pick. Rows whose
sequence has a grammar (structured outputs) get their token bitmask applied after the penalties.

`SamplingMetadata.build` puts a step plan's `SamplingInputs` (host arrays, built by the scheduler)
on the device once per step; rare features (penalties, bias, min_tokens, logprobs) cost nothing
when no row uses them. The sampler's `SamplerOutput` stays on the device (the runner writes the
tokens into the token buffer) and reaches the host in a single copy per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hybridserve.engine.input_packer import to_device
from hybridserve.engine.outputs import TokenLogprob
from hybridserve.engine.step_plan import SamplingInputs
from hybridserve.ops import get_ops
from hybridserve.ops.reference import sampling as ref_sampling
from hybridserve.structured.bitmask import StepBitmasks


@dataclass
class SamplingMetadata:
    """Per-row sampling inputs for one step (R rows) on the device. Optional parts are None when unused."""

    slots: torch.Tensor  # [R] int64: token-buffer row of each sampled token
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
    grammar: tuple[torch.Tensor, torch.Tensor] | None = None  # rows [G], token bitmasks [G, ceil(V/32)]

    @classmethod
    def build(cls, inputs: SamplingInputs, device: torch.device, bitmasks: StepBitmasks | None = None,
              max_logprobs: int | None = None) -> SamplingMetadata:
        """The host inputs on the device: two copies for the per-row scalars, more only for rare
        features. bitmasks: the grammar rows' token masks of these rows (structured outputs).
        max_logprobs: the top-k width to return (default: the rows' own maximum; the chunks of one
        step pass the step's, so that their outputs concatenate)."""

        def tensor(values, dtype):
            return to_device(np.array(values, dtype=dtype), device)

        floats = to_device(np.stack([inputs.temperature, inputs.top_p, inputs.min_p]), device)
        ints = to_device(np.stack([inputs.slots, inputs.top_k, inputs.seeds, inputs.positions, inputs.forced]), device)
        penalties = None
        if inputs.penalty_rows:
            values = to_device(inputs.penalty_values, device)
            penalties = (tensor(inputs.penalty_rows, np.int64), inputs.penalty_prompts, inputs.penalty_outputs,
                         values[0], values[1], values[2])
        bias_rows, bias_cols, bias_values = inputs.bias
        sup_rows, sup_cols = inputs.suppress
        return cls(
            slots=ints[0],
            temperature=floats[0],
            top_k=ints[1].to(torch.int32),
            top_p=floats[1],
            min_p=floats[2],
            seeds=ints[2],
            positions=ints[3],
            filter_needed=inputs.filter_needed,
            all_greedy=inputs.all_greedy,
            forced=ints[4] if (inputs.forced >= 0).any() else None,
            bias=(tensor(bias_rows, np.int64), tensor(bias_cols, np.int64), tensor(bias_values, np.float32))
            if bias_rows else None,
            suppress=(tensor(sup_rows, np.int64), tensor(sup_cols, np.int64)) if sup_rows else None,
            penalties=penalties,
            num_logprobs=inputs.num_logprobs,
            max_logprobs=inputs.max_logprobs if max_logprobs is None else max_logprobs,
            grammar=None if bitmasks is None else bitmasks.to(device),
        )


@dataclass
class SamplerOutput:
    """One step's samples on the device. `start_host_copy` queues the step's one device->host copy
    (right after sampling, so that it does not wait behind a step launched later); `to_host`
    waits for it. Logprob rows (sampled and prompt alike): [token id, its logprob, its rank,
    K top ids, K top logprobs]."""

    token_ids: torch.Tensor  # [R] int64
    logprobs: torch.Tensor | None  # [R, 2 + 2K] float32: sampled logprob, its rank, K top ids, K top logprobs
    num_logprobs: list[int | None]
    prompt: torch.Tensor | None = None  # [L, 3 + 2K'] float32: the step's prompt-logprob rows
    prompt_entries: list[list[TokenLogprob]] | None = None  # set by to_host: per prompt row, K' + 1 entries
    _host: torch.Tensor | None = None
    _copied: torch.cuda.Event | None = None

    @classmethod
    def concat(cls, parts: list[SamplerOutput]) -> SamplerOutput:
        """The outputs of consecutive row chunks as one (all chunks of the same logprobs width)."""
        if len(parts) == 1:
            return parts[0]
        logprobs = None if parts[0].logprobs is None else torch.cat([p.logprobs for p in parts])
        return cls(torch.cat([p.token_ids for p in parts]), logprobs, [k for p in parts for k in p.num_logprobs])

    def start_host_copy(self) -> None:
        """Everything in one flat float32 copy (token ids < 2**24 are exact)."""
        flat = [self.token_ids.float()] + [t.flatten() for t in (self.logprobs, self.prompt) if t is not None]
        packed = torch.cat(flat) if len(flat) > 1 else flat[0]
        self._host = packed.to("cpu", non_blocking=True)  # pinned memory on CUDA
        if packed.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()

    def to_host(self) -> tuple[list[int], list[list[TokenLogprob] | None] | None]:
        """Token ids, and per row the logprob entries (sampled token first, then the top
        alternatives) or None; the second item is None when no row asked for logprobs. Also sets
        `prompt_entries`."""
        if self._host is None:
            self.start_host_copy()
        if self._copied is not None:
            self._copied.synchronize()
        host = self._host
        r = len(self.token_ids)
        token_ids = [int(t) for t in host[:r].tolist()]
        offset = r
        logprobs = None
        if self.logprobs is not None:
            width = self.logprobs.shape[1]
            rows = host[offset : offset + r * width].view(r, width).tolist()
            offset += r * width
            logprobs = [None if k is None else _entries([t, *row], k) for t, row, k in zip(token_ids, rows, self.num_logprobs)]
        if self.prompt is not None:
            n, width = self.prompt.shape
            rows = host[offset : offset + n * width].view(n, width).tolist()
            self.prompt_entries = [_entries(row, (width - 3) // 2) for row in rows]
        return token_ids, logprobs


def _entries(row: list[float], k: int) -> list[TokenLogprob]:
    """A logprob row [token id, logprob, rank, K ids, K logprobs] -> the token's entry and its first k alternatives."""
    k_max = (len(row) - 3) // 2
    return [TokenLogprob(int(row[0]), row[1], int(row[2]))] + [
        TokenLogprob(int(row[3 + j]), row[3 + k_max + j], j + 1) for j in range(k)
    ]


def logprob_rows(raw_logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> torch.Tensor:
    """[n, 2 + 2k]: each row's logprob of token_ids, its rank (1 = most likely), the top-k ids and logprobs."""
    chosen = raw_logprobs.gather(1, token_ids[:, None])  # [n, 1]
    rank = (raw_logprobs > chosen).sum(-1, keepdim=True) + 1
    top_lp, top_ids = raw_logprobs.topk(k, dim=-1)
    return torch.cat([chosen, rank.float(), top_ids.float(), top_lp], dim=1)


def prompt_logprob_rows(logits: torch.Tensor, targets: torch.Tensor, k: int, chunk_rows: int) -> torch.Tensor:
    """[L, 3 + 2k] prompt-logprob rows (target id first) from logits [L, V], `chunk_rows` rows at a
    time so that the log-softmax scratch stays bounded."""
    parts = []
    for start in range(0, len(targets), chunk_rows):
        t = targets[start : start + chunk_rows]
        lp = torch.log_softmax(logits[start : start + chunk_rows], dim=-1)
        parts.append(torch.cat([t[:, None].float(), logprob_rows(lp, t, k)], dim=1))
    return torch.cat(parts)


class Sampler:
    """Applies the per-row rules and picks tokens; returns a single tensor to copy to the host."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        # the Triton twins of sample_tokens and apply_token_bitmask when the device's op set has them
        ops = get_ops(device)
        self.sample_tokens = getattr(ops, "sample_tokens", ref_sampling.sample_tokens)
        self.apply_token_bitmask = getattr(ops, "apply_token_bitmask", ref_sampling.apply_token_bitmask)

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        """logits: [R, V] float32 (may be modified)."""
        raw_logprobs = torch.log_softmax(logits, dim=-1) if meta.max_logprobs >= 0 else None
        if meta.bias is not None:
            rows, cols, values = meta.bias
            logits.index_put_((rows, cols), values, accumulate=True)
        if meta.suppress is not None:
            logits[meta.suppress] = float("-inf")
        if meta.penalties is not None:
            self._apply_penalties(logits, meta.penalties)
        if meta.grammar is not None:
            self.apply_token_bitmask(logits, *meta.grammar)
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
            return SamplerOutput(token_ids, None, meta.num_logprobs)
        return SamplerOutput(token_ids, logprob_rows(raw_logprobs, token_ids, meta.max_logprobs), meta.num_logprobs)

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
    return to_device(np.array([i * vocab + t for i, seq in enumerate(seqs) for t in seq], dtype=np.int64), device)
