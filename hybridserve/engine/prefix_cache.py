"""Prefix-cache bookkeeping: content keys of token prefixes and the pool of Mamba state snapshots.

A prefix of a sequence's tokens is named by a chained content hash: block j's key is
`content_key(key of block j-1, its token ids)`, starting from `ROOT`. The same function names a
partial block (fewer than `block_size` tokens after a full block), so a key says exactly which
tokens it covers. The keys only have to agree within one engine process (Python's `hash` of
int tuples is deterministic there).

A `Snapshot` is the Mamba state (conv + SSM) after the first `depth` tokens of some sequence,
kept in one snapshot row of the state tensors. KV alone is useless for this model (a Mamba state
cannot be rebuilt from KV), so a prefix-cache hit always resumes from a snapshot; its KV blocks
are found by key in the block pool. Snapshots do not pin blocks: one whose blocks were evicted is
simply not found by `CacheManager.match` (its chain breaks) and ages out of the LRU here.
Pure Python; the cache manager is the only caller.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

ROOT = 0  # the parent key of a sequence's first block


def content_key(parent: int, tokens: list[int] | tuple[int, ...]) -> int:
    """The key of the tokens after the prefix named `parent` (a full block, or a partial one)."""
    return hash((parent, tuple(tokens)))


@dataclass
class Snapshot:
    key: int  # content key of the covered tokens: a full block's key, or a partial block's
    anchor: int  # key of the last full block it covers
    tail: tuple[int, ...]  # the tokens after that block (empty when the depth is block-aligned)
    depth: int  # tokens covered
    row: int  # snapshot row, 0 <= row < the pool size
    final: bool = False  # a sequence's final state (its whole text), not a point inside a prompt


class SnapshotPool:
    """Snapshot rows, LRU-evicted. A row written or read by the step being planned is never evicted
    in the same step (two copies into one row, or a read of an overwritten row, would race)."""

    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        self.free_rows: deque[int] = deque(range(num_rows))
        self.entries: OrderedDict[int, Snapshot] = OrderedDict()  # key -> snapshot, least recent first
        self.by_anchor: dict[int, dict[int, Snapshot]] = {}  # anchor -> key -> snapshot
        self.pinned_rows: set[int] = set()  # written by the step being planned

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: int) -> bool:
        return key in self.entries

    def anchored_at(self, anchor: int) -> list[Snapshot]:
        """The snapshots whose last full block is `anchor`, deepest first."""
        return sorted(self.by_anchor.get(anchor, {}).values(), key=lambda s: -s.depth)

    def touch(self, snap: Snapshot, *, pin: bool = False) -> None:
        """Mark it most recently used; `pin`: also keep it through the step being planned."""
        self.entries.move_to_end(snap.key)
        if pin:
            self.pinned_rows.add(snap.row)

    def victim(self, keep: Callable[[Snapshot], bool] | None = None) -> Snapshot | None:
        """What `add` would evict: the least recently used snapshot that is not pinned and not one
        to `keep`; None when a row is free, or when no snapshot may go."""
        if self.free_rows:
            return None
        return next((s for s in self.entries.values()
                     if s.row not in self.pinned_rows and not (keep and keep(s))), None)

    def has_room(self, keep: Callable[[Snapshot], bool] | None = None) -> bool:
        return bool(self.free_rows) or self.victim(keep) is not None

    def add(self, key: int, anchor: int, tail: tuple[int, ...], depth: int, *, final: bool = False,
            keep: Callable[[Snapshot], bool] | None = None) -> Snapshot:
        """A new snapshot in a free row or the least recently used one not to `keep` (the caller
        checked `has_room` with the same `keep`)."""
        if not self.free_rows:
            self.drop(self.victim(keep))
        snap = Snapshot(key, anchor, tail, depth, self.free_rows.popleft(), final)
        self.entries[key] = snap
        self.by_anchor.setdefault(anchor, {})[key] = snap
        self.pinned_rows.add(snap.row)
        return snap

    def drop(self, snap: Snapshot) -> None:
        del self.entries[snap.key]
        siblings = self.by_anchor[snap.anchor]
        del siblings[snap.key]
        if not siblings:
            del self.by_anchor[snap.anchor]
        self.free_rows.append(snap.row)

    def end_step(self) -> None:
        self.pinned_rows.clear()

    def check_invariants(self, block_size: int) -> None:
        rows = [s.row for s in self.entries.values()]
        assert sorted(rows + list(self.free_rows)) == list(range(self.num_rows)), "snapshot rows leaked or doubled"
        assert sum(len(v) for v in self.by_anchor.values()) == len(self.entries), "anchor index out of step"
        for key, s in self.entries.items():
            assert s.key == key and self.by_anchor[s.anchor][key] is s
            assert len(s.tail) < block_size and s.depth >= block_size and (s.depth - len(s.tail)) % block_size == 0
            assert (key == s.anchor) == (not s.tail)
