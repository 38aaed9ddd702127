"""StateCapture: Mamba state snapshots taken inside a prefill chunk, in the step that computes it.

The prefix cache snapshots a prompt's state at chosen points (its last full block, where it leaves
a prefix other prompts share). Ending the chunk at such a point would cost the request a step
before its first token; instead the step's plan names the capture points inside the chunks, and
each Mamba layer writes the state there into a snapshot row while it computes the chunk:
  * conv: the ring of raw rows before the point, gathered from the chunk and the slot's old ring
    (before the conv op overwrites it);
  * SSM: launches of the same varlen op. The first runs every sequence, a capturing one cut in two
    at its first point: the head reads the slot's state (copied into the snapshot row) and leaves
    its final state, the capture, in that row; the tail is computed from zeros and thrown away.
    The next launch runs the tails from the captured states (copied into the slots), cut at their
    next point, and so on. A tail is the chunk's tokens after a point: a block or two after a
    prompt's last full block, the rest of the prompt after a branch point (its SSM is then computed
    twice, once thrown away; still cheaper than the step a cut would add). No kernel knows about
    captures.
A 16-bit state is rounded at a capture point, as it would be at the end of a chunk cut there.

Letters: B sequences, n captures, T tokens, K conv kernel width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Launch:
    """One SSM launch over a batch of segments, the capturing ones cut at their next point."""

    op_args: tuple[torch.Tensor, ...]  # cu_seqlens, seq_lens, state rows, has_initial_state of the cut batch
    rows: torch.Tensor  # [m] snapshot rows written by this launch's heads
    slots: torch.Tensor  # [m] their sequences' slots
    tail_rows: torch.Tensor  # the tails' rows among this launch's inputs: the next launch's inputs
    next: _Launch | None


@dataclass
class StateCapture:
    seqs: torch.Tensor  # [n] int64: batch index of each capture's sequence
    rows: torch.Tensor  # [n] int64: the snapshot state row it writes
    starts: torch.Tensor  # [n] int64: its sequence's first fed token's row among the T
    cached: torch.Tensor  # [n] int64: its sequence's tokens in the caches before the step
    positions: torch.Tensor  # [n] int64: the capture point (tokens of the sequence before it)
    launch: _Launch
    _conv_index: tuple[torch.Tensor, ...] | None = None  # `save_conv`'s gather indices (the first layer's work)

    @classmethod
    def build(cls, captures: np.ndarray, slots: np.ndarray, num_cached: np.ndarray, num_new: np.ndarray,
              to_device: Callable[[np.ndarray], torch.Tensor]) -> StateCapture | None:
        """From a plan's captures [n, 3] (slot, snapshot row, position strictly inside that slot's
        chunk) and its per-sequence slots, cached and fed token counts [B]. None without captures."""
        if not len(captures):
            return None
        batch_of = {int(s): b for b, s in enumerate(slots)}
        seqs = np.array([batch_of[int(s)] for s in captures[:, 0]], dtype=np.int64)
        rows, positions = captures[:, 1], captures[:, 2]
        split = positions - num_cached[seqs]
        assert ((split > 0) & (split < num_new[seqs])).all(), "a capture point must lie inside its chunk"
        assert len(set(zip(seqs.tolist(), positions.tolist()))) == len(seqs), "two captures of one point"
        cu = np.concatenate([[0], np.cumsum(num_new)])
        pending: dict[int, list[tuple[int, int]]] = {}  # sequence -> its (point, row)s, in order
        for b, point, row in sorted(zip(seqs.tolist(), positions.tolist(), rows.tolist())):
            pending.setdefault(b, []).append((point, row))
        # launches, round by round: segments (sequence, first position, tokens, has state) of its batch
        segments = [(b, int(num_cached[b]), int(num_new[b]), bool(num_cached[b] > 0)) for b in range(len(slots))]
        plans = []
        while segments:
            lens, after, state_rows, has_state, heads, tails, nxt = [], [], [], [], [], [], []
            offset = 0
            for b, c, n, h in segments:
                slot = int(slots[b])
                if pending.get(b):
                    point, row = pending[b].pop(0)
                    k = point - c
                    lens += [k, n - k]
                    after += [point, c + n]
                    state_rows += [row, slot]
                    has_state += [h, False]
                    heads.append((row, slot))
                    tails.append(np.arange(offset + k, offset + n))
                    nxt.append((b, point, n - k, True))
                else:
                    lens.append(n)
                    after.append(c + n)
                    state_rows.append(slot)
                    has_state.append(h)
                offset += n
            plans.append((lens, after, state_rows, has_state, heads, tails))
            segments = nxt
        # one host->device copy of everything
        arrays = [seqs, rows, cu[seqs], num_cached[seqs], positions]
        for lens, after, state_rows, has_state, heads, tails in plans:
            head = np.array(heads, dtype=np.int64).reshape(-1, 2)
            arrays += [np.concatenate([[0], np.cumsum(lens)]), after, state_rows, has_state, head[:, 0], head[:, 1],
                       np.concatenate(tails) if tails else np.zeros(0, dtype=np.int64)]
        sizes = [len(a) for a in arrays]
        parts = list(to_device(np.concatenate(arrays).astype(np.int64)).split(sizes))
        d_seqs, d_rows, d_starts, d_cached, d_pos = parts[:5]
        launch = None
        for i in range(len(plans) - 1, -1, -1):
            f_cu, f_after, f_rows, f_has, h_rows, h_slots, t_rows = parts[5 + 7 * i : 12 + 7 * i]
            launch = _Launch((f_cu.to(torch.int32), f_after.to(torch.int32), f_rows, f_has.bool()), h_rows, h_slots,
                             t_rows, launch)
        return cls(seqs=d_seqs, rows=d_rows, starts=d_starts, cached=d_cached, positions=d_pos, launch=launch)

    def save_conv(self, xbc: torch.Tensor, conv_state: torch.Tensor, state_slots: torch.Tensor,
                  has_initial_state: torch.Tensor) -> None:
        """The conv ring at each capture point into its snapshot row: ring row q % K holds the raw
        row of position q, for the K positions before the point. Call before the conv op (it
        overwrites the slots' rings). xbc: [T, C] raw rows; conv_state: [S, K, C]."""
        if self._conv_index is None:  # the same for every layer: worked out once
            k = conv_state.shape[1]
            q = self.positions[:, None] - k + torch.arange(k, device=xbc.device)[None, :]  # [n, K] positions
            fed = q >= self.cached[:, None]  # fed this step (else from the slot's old ring)
            self._conv_index = (q % k, fed[..., None], (self.starts[:, None] + q - self.cached[:, None]).clamp_min(0),
                                state_slots[self.seqs][:, None], has_initial_state[self.seqs][:, None, None],
                                self.rows[:, None])
        ring, fed, x_rows, slots, has_state, rows = self._conv_index
        old = conv_state[slots, ring] * has_state
        conv_state[rows, ring] = torch.where(fed, xbc[x_rows].to(conv_state.dtype), old)

    def ssd(self, ssd_varlen: Callable[..., torch.Tensor], x: torch.Tensor, dt_raw: torch.Tensor, A_log, B, C, D,
            dt_bias, ssm_state: torch.Tensor, chunk_size: int, state_seed: int | None) -> torch.Tensor:
        """`ssd_varlen` over the step's sequences with the SSM state at each capture point left in
        its snapshot row (see the module docstring); returns y [T, H, P]."""

        def run(launch: _Launch, x, dt_raw, B, C) -> torch.Tensor:
            if len(launch.rows):
                ssm_state[launch.rows] = ssm_state[launch.slots]  # the heads start from the slots' states
            cu, lens, rows, has_state = launch.op_args
            y = ssd_varlen(x, dt_raw, A_log, B, C, D, dt_bias, cu, lens, ssm_state, rows, has_state, chunk_size,
                           state_seed)
            if launch.next is not None:
                ssm_state[launch.slots] = ssm_state[launch.rows]  # the tails start from the captures
                r = launch.tail_rows
                y[r] = run(launch.next, x[r], dt_raw[r], B[r], C[r])
            return y

        return run(self.launch, x, dt_raw, B, C)
