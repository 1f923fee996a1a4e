"""Eviction policies: which unpinned slot to reuse. The HOBBIT multidimensional policy
comes with the HOBBIT techniques; LRU is the baseline (mixtral-offloading's)."""
from __future__ import annotations


class LRUPolicy:
    name = "lru"

    def __init__(self):
        self.clock = 0

    def touch(self, slot) -> None:
        """A slot was used (hit or freshly loaded) now."""
        self.clock += 1
        slot.last_use = self.clock
        slot.uses += 1

    def victim(self, candidates):
        return min(candidates, key=lambda s: s.last_use)
