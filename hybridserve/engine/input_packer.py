"""InputPacker: a StepPlan's numpy arrays -> the device tensors of one ForwardBatch.

The one packer of every step (eager steps, decode CUDA graphs, warm-up and memory probes). It
owns the two device tables that persist between steps, both with one row per state slot:
  block_table  [S, M] int32  the KV blocks of the slot's sequence; plans send only changed entries
  token_buffer [S]    int64  the token last sampled into the slot; decode rows read their input here
so a step needs one host->device copy of the plan's flat arrays, and the host never has to know a
decode's last token. Letters: S slots (+1 padding), M blocks per sequence, T tokens, B sequences.
"""

from __future__ import annotations

import numpy as np
import torch

from hybridserve.engine.step_plan import FROM_DEVICE, StepPlan
from hybridserve.model.forward_batch import ForwardBatch
from hybridserve.model.state_capture import StateCapture


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device, without making the host wait for the device's queue (a plain
    copy would: async scheduling queues a step while the previous one runs). CUDA: staged
    through pinned memory and copied asynchronously; CPU: the array's memory itself."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


class InputPacker:
    def __init__(self, num_rows: int, max_blocks_per_seq: int, block_size: int, pad_block: int,
                 device: torch.device) -> None:
        self.block_size = block_size
        self.device = device
        self.block_table = torch.full((num_rows, max_blocks_per_seq), pad_block, dtype=torch.int32, device=device)
        self.token_buffer = torch.zeros(num_rows, dtype=torch.int64, device=device)

    def pack(self, plan: StepPlan) -> ForwardBatch:
        """Apply the plan's block-table updates and build its ForwardBatch (logits for the sample
        rows, then the prompt-logprob rows)."""
        b, t, r, k = plan.num_seqs, plan.num_tokens, plan.num_logits_rows, len(plan.table_updates)
        bs = self.block_size
        lens = plan.num_new_tokens
        cu = np.zeros(b + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        seq_index = np.repeat(np.arange(b), lens)
        positions = np.arange(t) - cu[:-1][seq_index] + plan.num_cached[seq_index]
        flat = np.concatenate([
            plan.input_ids, positions, plan.slots[seq_index], cu, plan.num_cached + lens, plan.slots,
            plan.num_cached > 0, plan.sample_token_indices, plan.prompt_logprob_indices, plan.table_updates.T.reshape(-1),
        ])
        dev = to_device(flat, self.device)  # the step's one host->device copy
        ids, pos, token_slots, cu_d, seq_lens, slots, has_state, sample_idx, updates = dev.split(
            [t, t, t, b + 1, b, b, b, r, 3 * k]
        )
        if k:
            rows, cols, blocks = updates.view(3, k)
            self.block_table[rows, cols] = blocks.to(torch.int32)
        if (plan.input_ids == FROM_DEVICE).any():
            ids = torch.where(ids == FROM_DEVICE, self.token_buffer[token_slots], ids)
        pages = self.block_table[token_slots, pos // bs].long()
        return ForwardBatch(
            input_ids=ids,
            cu_seqlens=cu_d.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            state_slots=slots,
            has_initial_state=has_state.bool(),
            block_tables=self.block_table[slots, : plan.block_table_width(bs)],
            slot_mapping=pages * bs + pos % bs,
            logits_indices=sample_idx,
            is_decode=plan.is_decode,
            capture=StateCapture.build(plan.captures, plan.slots, plan.num_cached, lens,
                                       lambda a: to_device(a, self.device)),
        )

    def store_sampled(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Sampled tokens [R] into their slots' token-buffer rows (the next step's decode inputs)."""
        self.token_buffer[slots] = token_ids
