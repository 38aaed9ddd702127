"""The start-up memory plan: how the memory the engine may use is split between what is already
in use (weights, CUDA context), the activation reserves (the peak of the biggest step, the decode
graphs' pool) and the caches (Mamba state slots and KV blocks), and so how many sequences can run.

Pure arithmetic; the model runner measures the inputs. A reserve is sized by what can actually
run: the runner first fits the caches with no reserve at all (`fit_cache` on the whole budget),
which bounds the sequences — hence the sample rows and the decode batch — any step can have,
measures the reserves at that bound, then fits the caches into what is left.
"""

from __future__ import annotations

from dataclasses import dataclass

_GIB = 2**30


def fit_cache(budget: int, *, slot_bytes: int, block_bytes: int, max_blocks_per_seq: int, max_num_seqs: int,
              fixed_blocks: int | None = None) -> tuple[int, int]:
    """(state slots, KV blocks) that fit `budget` bytes besides one padding slot and one padding
    block. A slot is only useful with KV to grow into, so slots are sized so that every running
    sequence can reach max_model_len (at most max_num_seqs of them); the rest goes to KV. With
    `fixed_blocks`, the blocks are fixed and the slots take what is left. Raises RuntimeError
    when not one sequence fits."""
    budget -= slot_bytes + block_bytes
    per_sequence = slot_bytes + max_blocks_per_seq * block_bytes
    if fixed_blocks is None:
        room_for_slots = budget // per_sequence
    else:
        room_for_slots = (budget - fixed_blocks * block_bytes) // slot_bytes
    num_slots = min(max_num_seqs, room_for_slots)
    if num_slots < 1:
        raise RuntimeError(
            f"not enough memory for the cache: {max(budget, 0) / 2**20:.1f} MiB left, one sequence of "
            f"{max_blocks_per_seq} KV blocks needs {per_sequence / 2**20:.1f} MiB; "
            "lower max_model_len or raise gpu_memory_utilization / cpu_cache_bytes"
        )
    num_blocks = fixed_blocks or (budget - num_slots * slot_bytes) // block_bytes
    return int(num_slots), int(num_blocks)


@dataclass(frozen=True)
class MemoryPlan:
    """The split, for the start-up log (GPU: of gpu_memory_utilization x the card; CPU: of cpu_cache_bytes)."""

    budget: int  # bytes the engine may use in all
    in_use: int  # before the caches: weights, CUDA context, other processes (0 on CPU)
    weights: int
    step_peak: int  # activations of the biggest step (max_num_batched_tokens, `sample_rows` sample rows)
    sample_rows: int
    graphs: int  # the CUDA graphs' memory pool (decode batch up to `graph_batch`, prefill up to `graph_tokens`)
    graph_batch: int
    graph_tokens: int
    num_slots: int
    slot_bytes: int
    num_snapshots: int  # prefix-cache Mamba state snapshots (slot_bytes each)
    num_blocks: int
    block_bytes: int
    max_num_seqs: int
    max_model_len: int

    def summary(self) -> str:
        kv, state = self.num_blocks * self.block_bytes, self.num_slots * self.slot_bytes
        parts = []
        if self.in_use:  # GPU: the budget also holds the weights and the reserves
            parts = [f"weights {self.weights / _GIB:.2f}", f"other in use {(self.in_use - self.weights) / _GIB:.2f}",
                     f"activations {self.step_peak / _GIB:.2f} ({self.sample_rows} sample rows)"]
            if self.graph_batch:  # not eager
                parts.append(f"CUDA graphs {self.graphs / _GIB:.2f} (decode batch <= {self.graph_batch}, "
                             f"prefill <= {self.graph_tokens} tokens)")
        parts += [f"Mamba state {state / _GIB:.2f} ({self.num_slots} slots)",
                  f"prefix-cache snapshots {self.num_snapshots * self.slot_bytes / _GIB:.2f} ({self.num_snapshots})",
                  f"KV {kv / _GIB:.2f} ({self.num_blocks} blocks)"]
        return (f"memory plan (GiB): {self.budget / _GIB:.2f} = {' + '.join(parts)}; {self.num_slots} sequences of "
                f"up to {self.max_model_len} tokens fit (max_num_seqs {self.max_num_seqs})")
