"""Token sampling math: penalties, top-k / top-p / min-p filtering, and seeded sampling.

Randomness is counter based: the noise for row r is a pure function of (seeds[r], positions[r],
vocab index), so a request with a seed gets the same tokens whatever batch it shares a step with,
and after a preemption. Sampling uses the exponential race: argmax(p_i / E_i), E_i ~ Exp(1), which
draws i with probability p_i; in log space argmax(log p_i - log E_i) (Gumbel-max).

The hash is 32-bit integer arithmetic (held in int64 tensors, products split so nothing overflows),
which a Triton kernel reproduces bit for bit with uint32 math.

Letters: R rows (one per sampled sequence), V vocabulary.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    presence_penalty: torch.Tensor,
    frequency_penalty: torch.Tensor,
    repetition_penalty: torch.Tensor,
) -> None:
    """OpenAI presence/frequency and CTRL-style repetition penalties, in place.

    logits: [R, V] float32, updated in place; prompt_mask: [R, V] bool (token occurs in the prompt);
    output_counts: [R, V] int32 (occurrences among generated tokens); presence_penalty,
    frequency_penalty, repetition_penalty: [R] float32.
    Repetition (tokens of prompt or output): positive logits divided by the penalty, negative ones
    multiplied. Then logits -= frequency * count + presence * (count > 0) (generated tokens only).
    """
    seen = prompt_mask | (output_counts > 0)
    rep = repetition_penalty[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalized, logits))
    counts = output_counts.to(logits.dtype)
    logits -= frequency_penalty[:, None] * counts + presence_penalty[:, None] * (counts > 0).to(logits.dtype)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    positions: torch.Tensor,
    filter_needed: bool = True,
) -> torch.Tensor:
    """Pick one token per row.

    logits: [R, V] float32 (already biased and penalized; not modified); temperature: [R] float32,
    0 means greedy (argmax of the logits); top_k: [R] int32, 0 = off; top_p: [R] float32 in (0, 1];
    min_p: [R] float32 in [0, 1]; seeds: [R] int64; positions: [R] int64 (the index of the token
    being generated, the counter of the noise); filter_needed: False when no row uses top_k, top_p
    < 1 or min_p > 0 (skips the sort). Returns [R] int64 token ids.
    Filters apply to the temperature-scaled distribution in the order top_k, top_p, min_p; the most
    likely token always survives.
    """
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    if filter_needed:
        scaled = filter_logits(scaled, top_k, top_p, min_p)
    noise = uniform_noise(seeds, positions, logits.shape[1])
    sampled = torch.argmax(scaled - torch.log(-torch.log(noise)), dim=-1)
    return torch.where(greedy, torch.argmax(logits, dim=-1), sampled)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Set filtered-out entries to -inf; returns a new [R, V] float32 tensor.

    logits: [R, V] float32 (temperature already applied); top_k: [R] int32 (0 = keep all);
    top_p: [R] float32 (keep the smallest set of most likely tokens whose mass reaches top_p);
    min_p: [R] float32 (drop tokens with probability < min_p * the largest probability).
    """
    vocab = logits.shape[1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).to(torch.int64)
    drop = rank >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the more likely tokens
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False  # the most likely token always survives
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))


def uniform_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Counter-based uniforms in (0, 1): [R, V] float32, a pure function of (seed, position, column).

    seeds: [R] int64 (any value; the low and high 32 bits are both used); positions: [R] int64.
    """
    lo = seeds & _MASK32
    hi = (seeds >> 32) & _MASK32
    key = mix32(lo ^ mix32(hi ^ 0x68E31DA4))
    key = mix32(key ^ mix32((positions & _MASK32) ^ 0x1B873593))  # [R]
    cols = mix32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64) ^ 0x27D4EB2F)  # [V]
    bits = mix32(key[:, None] ^ cols[None, :])
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finalizer (xor-shift-multiply) on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 without int64 overflow: multiply by the 16-bit halves of c."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & _MASK32


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, bitmasks: torch.Tensor) -> None:
    """Constrained decoding: set to -inf, in place, the logits of tokens a row's grammar forbids.

    logits: [R, V] float32; rows: [G] int64, distinct rows that have a grammar; bitmasks:
    [G, W] int32 with 32 * W >= V, bit t % 32 of word t // 32 set where token t is allowed.
    """
    g, words = bitmasks.shape
    vocab = logits.shape[1]
    assert words * 32 >= vocab, "the bitmask must cover the vocabulary"
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    allowed = ((bitmasks[:, :, None] >> shifts) & 1).view(g, words * 32)[:, :vocab].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
