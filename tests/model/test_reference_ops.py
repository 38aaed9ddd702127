"""The reference ops against simpler oracles: chunked SSD = token-by-token recurrence, paged
attention = dense causal attention, fused MoE = a per-token loop, varlen conv = torch's conv1d."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridserve.ops import reference as ops
from hybridserve.ops.reference.ssd import ssd_recurrent

GEN = torch.Generator().manual_seed(0)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=GEN) * scale


def _ssd_inputs(length, h=4, p=3, g=2, n=5):
    x, dt_raw = randn(length, h, p), randn(length, h)
    B, C = randn(length, g, n), randn(length, g, n)
    A_log = torch.log(torch.rand(h, generator=GEN) * 4 + 0.1)  # A = -exp(A_log)
    D, dt_bias = randn(h), randn(h, scale=0.5) - 1
    return x, dt_raw, A_log, B, C, D, dt_bias


def test_chunked_ssd_equals_recurrence_over_ragged_batch_with_carried_state():
    lengths, chunk = [1, 7, 8, 9, 30], 8
    slots, has_init = [4, 0, 2, 5, 1], [False, True, False, True, True]
    x, dt_raw, A_log, B, C, D, dt_bias = _ssd_inputs(sum(lengths))
    state0 = randn(6, 4, 3, 5)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([n + 4 * init for n, init in zip(lengths, has_init)], dtype=torch.int32)
    state = state0.clone()
    y = ops.ssd_varlen(x, dt_raw, A_log, B, C, D, dt_bias, cu, seq_lens, state, torch.tensor(slots),
                       torch.tensor(has_init), chunk)
    for b, (slot, init) in enumerate(zip(slots, has_init)):
        s, e = cu[b].item(), cu[b + 1].item()
        start = state0[slot] if init else torch.zeros_like(state0[slot])
        y_ref, final = ssd_recurrent(x[s:e], dt_raw[s:e], A_log, B[s:e], C[s:e], D, dt_bias, start)
        torch.testing.assert_close(y[s:e], y_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[slot], final, atol=1e-5, rtol=1e-5)
    untouched = [i for i in range(6) if i not in slots]
    torch.testing.assert_close(state[untouched], state0[untouched], atol=0, rtol=0)


def test_ssd_recurrence_is_the_spec_formula():
    """ssd_recurrent itself against the spec's per-head loop (dt softplus, no clamp, D skip on x)."""
    x, dt_raw, A_log, B, C, D, dt_bias = _ssd_inputs(6)
    A = -torch.exp(A_log)
    state = randn(4, 3, 5)
    y, final = ssd_recurrent(x, dt_raw, A_log, B, C, D, dt_bias, state)
    s = state.clone()
    for t in range(6):
        for h in range(4):
            g = h // 2
            dt = F.softplus(dt_raw[t, h] + dt_bias[h])
            s[h] = s[h] * torch.exp(dt * A[h]) + dt * torch.outer(x[t, h], B[t, g])
            torch.testing.assert_close(y[t, h], s[h] @ C[t, g] + D[h] * x[t, h], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, s, atol=1e-5, rtol=1e-5)


def _dense_causal(q, k, v, scale):
    """q [L, H, D] for the last L of k/v [S, Hkv, D] positions."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    ql, s = q.shape[0], k.shape[0]
    mask = torch.ones(ql, s, dtype=torch.bool).tril(diagonal=s - ql)
    o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale)
    return o.transpose(0, 1)


def test_paged_attention_equals_dense_causal_attention():
    bs, h, hkv, d = 4, 4, 2, 8
    cached, new = [0, 5, 3, 9], [6, 1, 7, 2]  # tokens already in the cache / fed this step
    tables = [[7, 2], [0, 11], [5, 9, 3], [1, 10, 4]]  # shuffled pages
    kv = torch.zeros(2, 12, bs, hkv, d)
    keys = [randn(c + n, hkv, d) for c, n in zip(cached, new)]
    vals = [randn(c + n, hkv, d) for c, n in zip(cached, new)]
    for b, c in enumerate(cached):  # earlier steps' tokens
        if c:
            slots = torch.tensor([tables[b][p // bs] * bs + p % bs for p in range(c)])
            ops.store_kv(keys[b][:c], vals[b][:c], kv, slots)
    slot_mapping = torch.tensor([tables[b][p // bs] * bs + p % bs for b, c in enumerate(cached) for p in range(c, c + new[b])])
    k_new = torch.cat([keys[b][c:] for b, c in enumerate(cached)])
    v_new = torch.cat([vals[b][c:] for b, c in enumerate(cached)])
    pad = torch.tensor([-1])  # a padding token's negative slot is skipped
    ops.store_kv(torch.cat([k_new, randn(1, hkv, d)]), torch.cat([v_new, randn(1, hkv, d)]), kv, torch.cat([slot_mapping, pad]))
    q = randn(sum(new), h, d)
    cu = torch.tensor([0, *torch.tensor(new).cumsum(0).tolist()], dtype=torch.int32)
    block_tables = torch.tensor([t + [-1] * (3 - len(t)) for t in tables], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in zip(cached, new)], dtype=torch.int32)
    out = ops.paged_attention(q, kv, block_tables, cu, seq_lens, d**-0.5)
    for b in range(4):
        s, e = cu[b].item(), cu[b + 1].item()
        torch.testing.assert_close(out[s:e], _dense_causal(q[s:e], keys[b], vals[b], d**-0.5), atol=1e-5, rtol=1e-5)


def test_fused_moe_equals_per_token_loop():
    t, hidden, inter, e, k = 11, 8, 6, 5, 2
    x, up, down = randn(t, hidden), randn(e, inter, hidden), randn(e, hidden, inter)
    logits, bias = randn(t, e), randn(e)
    weights, ids = ops.moe_route(logits, bias, k, 2.5, True)
    out = ops.fused_moe(x, up, down, weights, ids)
    for i in range(t):
        scores = torch.sigmoid(logits[i])
        chosen = sorted(range(e), key=lambda j: -(scores[j] + bias[j]).item())[:k]
        w = scores[chosen] / scores[chosen].sum() * 2.5
        expected = sum(w[j] * (down[c] @ torch.relu(up[c] @ x[i]).square()) for j, c in enumerate(chosen))
        assert sorted(ids[i].tolist()) == sorted(chosen)
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=1e-5)


def _zero_padded_conv(x, weight, bias):
    """silu(causal conv) of one whole sequence [L, C] from zeros, by torch's conv1d."""
    k, n = weight.shape[1], x.shape[0]
    return F.silu(F.conv1d(x.t()[None], weight[:, None, :], bias, padding=k - 1, groups=x.shape[1])[0, :, :n].t())


def test_varlen_conv_equals_torch_conv1d_and_keeps_a_ring_of_raw_rows():
    c, k = 6, 4
    lengths, starts, slots, has_init = [5, 1, 2, 9], [0, 7, 2, 0], [3, 0, 2, 1], [False, True, True, False]
    x, weight, bias = randn(sum(lengths), c), randn(c, k), randn(c)
    state0 = randn(4, k, c)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    seq_lens = torch.tensor([s + n for s, n in zip(starts, lengths)], dtype=torch.int32)
    state = state0.clone()
    out = ops.causal_conv1d(x, weight, bias, cu, seq_lens, state, torch.tensor(slots), torch.tensor(has_init))
    for b, (slot, init, start) in enumerate(zip(slots, has_init, starts)):
        s, e = cu[b].item(), cu[b + 1].item()
        ring = state0[slot] if init else torch.zeros(k, c)
        prefix = torch.stack([ring[q % k] for q in range(start - k + 1, start)])
        seq = torch.cat([prefix, x[s:e]])  # [K-1+L, C]: carried rows (or zeros) then the sequence
        ref = F.silu(F.conv1d(seq.t()[None], weight[:, None, :], bias, groups=c)[0].t())
        torch.testing.assert_close(out[s:e], ref, atol=1e-5, rtol=1e-5)
        end = start + e - s
        for q in range(end - k, end):  # ring row of each of the last K positions
            expected = x[s + q - start] if q >= start else ring[q % k]  # older rows stay (zeros if fresh)
            torch.testing.assert_close(state[slot, q % k], expected, atol=0, rtol=0)
    torch.testing.assert_close(out[:5], _zero_padded_conv(x[:5], weight, bias), atol=1e-5, rtol=1e-5)


def test_conv_chunks_then_decode_steps_equal_one_shot_conv():
    """The ring carries exactly what the next chunk or decode token needs, whatever the chunk sizes."""
    c, k = 5, 4
    x, weight, bias = randn(20, c), randn(c, k), randn(c)
    state, slot = randn(3, k, c), torch.tensor([1])  # garbage in the slot: a fresh sequence ignores it
    outs, done = [], 0
    for i, n in enumerate([2, 1, 5, 3]):
        cu = torch.tensor([0, n], dtype=torch.int32)
        lens = torch.tensor([done + n], dtype=torch.int32)
        outs.append(ops.causal_conv1d(x[done : done + n], weight, bias, cu, lens, state, slot, torch.tensor([i > 0])))
        done += n
    for t in range(done, 20):
        lens = torch.tensor([t + 1], dtype=torch.int32)
        outs.append(ops.causal_conv1d_update(x[t : t + 1], weight, bias, lens, state, slot))
    torch.testing.assert_close(torch.cat(outs), _zero_padded_conv(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_conv_update_equals_one_token_varlen_conv():
    c, k = 6, 4
    x, weight, bias, state0 = randn(3, c), randn(c, k), randn(c), randn(5, k, c)
    slots, seq_lens = torch.tensor([4, 0, 2]), torch.tensor([9, 1, 6], dtype=torch.int32)
    a, b = state0.clone(), state0.clone()
    out_update = ops.causal_conv1d_update(x, weight, bias, seq_lens, a, slots)
    out_varlen = ops.causal_conv1d(x, weight, bias, torch.arange(4, dtype=torch.int32), seq_lens, b, slots,
                                   torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(out_update, out_varlen, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_state_update_equals_one_token_chunked_ssd():
    x, dt_raw, A_log, B, C, D, dt_bias = _ssd_inputs(3)
    state0, slots = randn(4, 4, 3, 5), torch.tensor([3, 1, 0])
    seq_lens = torch.tensor([9, 1, 6], dtype=torch.int32)
    a, b = state0.clone(), state0.clone()
    y1 = ops.selective_state_update(x, dt_raw, A_log, B, C, D, dt_bias, seq_lens, a, slots)
    y2 = ops.ssd_varlen(x, dt_raw, A_log, B, C, D, dt_bias, torch.arange(4, dtype=torch.int32), seq_lens, b, slots,
                        torch.ones(3, dtype=torch.bool), 8)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
