"""The cache pool: slots in one shared-memory segment, which expert each holds, and pins.

The segment is cut into regions, one per (model, precision); every slot of a region has
that precision's SlotFormat. A slot is `loading` while the I/O engine fills it and `ready`
after. A slot handed to a client is pinned by that client until released; a pinned or
loading slot is never chosen for eviction, so it is never overwritten while in use.
Eviction is asked of a pluggable policy (loader/policy.py). With a control block
(loader/control.py) a region also publishes its ready slots there, so that clients pin hits
themselves, and evicts only slots no client pinned that way. Not thread-safe: the daemon
touches it from its event loop only.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .layout import PAGE, SlotFormat, align

if TYPE_CHECKING:
    from .control import SharedSlots


class SlotState(enum.StrEnum):
    FREE = "free"
    LOADING = "loading"  # the I/O engine is filling it
    READY = "ready"  # holds its expert: may be served (and published)
    RETIRED = "retired"  # given up by shrink(), its memory given back


@dataclass(eq=False)
class Slot:
    region: Region
    index: int
    key: tuple | None = None  # (layer, expert) held, None when empty
    state: SlotState = SlotState.FREE
    pins: Counter = field(default_factory=Counter)  # owner -> count
    last_use: int = 0  # policy bookkeeping (token clock)
    uses: int = 0
    used_at: float = 0.0  # time.monotonic() of its last use, 0: never
    protected: bool = False  # predicted by a hint: not evicted until used
    prefetched: bool = False  # loaded by a prefetch and not used yet

    @property
    def evictable(self) -> bool:
        return self.state != SlotState.LOADING and not self.pins and not self.protected

    @property
    def offset(self) -> int:
        return self.region.offset + self.index * self.region.format.slot_bytes


class Region:
    """One model's slots of one precision: slots[:n_slots] in use, any beyond given up by
    shrink(). `segment`: the Segment they live in (None: bookkeeping only, no memory)."""

    def __init__(
        self, model: str, precision: str, fmt: SlotFormat, offset: int, n_slots: int, segment=None, n_expert: int = 0
    ):
        self.model, self.precision, self.format = model, precision, fmt
        self.n_expert = n_expert  # > 0: an expert's home slot is layer*E + expert
        self.offset, self.n_slots, self.segment = offset, n_slots, segment
        self.slots = [Slot(self, i) for i in range(n_slots)]
        self.by_key: dict[tuple, Slot] = {}
        self.free = self.slots[::-1]  # empty slots; take() pops from the end
        self.shared: SharedSlots | None = None  # when clients pin hits
        self.retiring: list[Slot] = []  # given up by shrink(), memory not given back yet

    def lookup(self, key: tuple) -> Slot | None:
        return self.by_key.get(key)

    def take(self, key: tuple, policy, demand: bool = True) -> Slot | None:
        """A slot to load `key` into: an empty one, else the policy's victim among the
        evictable ones; for a demand load, when nothing else is, one a hint protects (a
        prediction must never make a request wait). None when every slot is pinned or
        loading."""
        slot = self._empty(key)
        if slot is None:
            live = self.slots[: self.n_slots]
            slot = self._victim([s for s in live if s.evictable], policy)
            if slot is None and demand:
                slot = self._victim(
                    [s for s in live if s.protected and not s.pins and s.state != SlotState.LOADING], policy
                )
            if slot is None:
                return None
            assert slot.key is not None  # no slot is free, so every live one holds an expert
            if self.by_key.get(slot.key) is slot:  # not one hidden when its file changed
                del self.by_key[slot.key]
        slot.key, slot.state, slot.uses, slot.protected = key, SlotState.LOADING, 0, False
        slot.prefetched = False
        policy.reset(slot)
        self.by_key[key] = slot
        return slot

    def _empty(self, key: tuple) -> Slot | None:
        """An empty slot, the key's home (layer * n_expert + expert, modulo the slots) when
        that one is: a cache that holds the whole model then keeps each layer's experts side
        by side in expert order, as the file does, and a one-graph forward computes a layer
        on a view of just its slots (ggml's mul_mat_id does bookkeeping per slot viewed)."""
        if not self.free:
            return None
        if self.n_expert and self.n_slots:
            home = self.slots[(key[0] * self.n_expert + key[1]) % self.n_slots]
            if home.state == SlotState.FREE:
                self.free.remove(home)
                return home
        return self.free.pop()

    def _victim(self, candidates: list, policy) -> Slot | None:
        if candidates and self.shared is not None:
            return self.shared.evict(candidates, policy)  # skips what clients pin
        return policy.victim(candidates) if candidates else None

    def ready(self, slot: Slot) -> None:
        """Its read completed: it may be served (and, published, pinned by clients)."""
        slot.state = SlotState.READY
        if self.shared is not None and slot.index < self.n_slots:  # a retired one: never
            self.shared.publish(slot)

    def drop(self, slot: Slot) -> None:
        """Forget what a slot holds (its load failed, or a prefetch was cancelled)."""
        if self.shared is not None:
            self.shared.unpublish(slot)
        if slot.key is not None and self.by_key.get(slot.key) is slot:
            del self.by_key[slot.key]
        if (slot.key is not None or slot.state != SlotState.FREE) and slot.index < self.n_slots:
            self.free.append(slot)
        slot.key, slot.state, slot.protected = None, SlotState.FREE, False

    def shrink(self, n: int) -> None:
        """Keep slots [0, n) (a model opened on demand takes the memory of the others): the
        rest are forgotten at once, so nobody finds them any more, and their memory is given
        back (sweep) as soon as nothing pins or loads them."""
        if n >= self.n_slots:
            return
        tail = self.slots[n : self.n_slots]
        self.n_slots = n
        self.free = [s for s in self.free if s.index < n]
        for slot in tail:
            if slot.key is not None and self.by_key.get(slot.key) is slot:
                del self.by_key[slot.key]
            slot.protected = False
        if self.shared is not None:
            self.shared.retire(tail)
        self.retiring += tail
        self.sweep()

    def sweep(self) -> int:
        """Give back the memory of retired slots that nothing holds any more (pinned by
        hobbitd for a session or in a client's row, or being read into); their count."""
        held = self.shared.pinned() if self.shared is not None else None
        keep = []
        for slot in self.retiring:
            if slot.pins or slot.state == SlotState.LOADING or (held is not None and held[slot.index]):
                keep.append(slot)
                continue
            slot.key, slot.state = None, SlotState.RETIRED
            if self.segment is not None:
                self.segment.discard(slot.offset, self.format.slot_bytes)
        done, self.retiring = len(self.retiring) - len(keep), keep
        return done

    def counts(self) -> dict:
        live = self.slots[: self.n_slots]
        shared = self.shared.pinned() if self.shared is not None else np.zeros(len(self.slots), bool)
        return {
            "slots": self.n_slots,
            "ready": sum(s.state == SlotState.READY for s in live),
            "loading": sum(s.state == SlotState.LOADING for s in live),
            "pinned": sum(bool(s.pins) or bool(shared[s.index]) for s in live),
            "retiring": len(self.retiring),
            "slot_bytes": self.format.slot_bytes,
        }


class RegionPlan(NamedTuple):
    """Where one region goes in its segment: n_slots slots of `format` from byte `offset`."""

    model: str
    precision: str
    format: SlotFormat
    offset: int
    n_slots: int

    @property
    def nbytes(self) -> int:
        return self.n_slots * self.format.slot_bytes


def plan_regions(specs, total_bytes: int) -> list[RegionPlan]:
    """Split total_bytes among specs [(model, precision, SlotFormat, share)] (shares sum
    to 1 per model count) into regions, page-aligned."""
    out, at = [], 0
    for model, precision, fmt, share in specs:
        n = max(1, int(total_bytes * share) // fmt.slot_bytes)
        out.append(RegionPlan(model, precision, fmt, at, n))
        at = align(at + n * fmt.slot_bytes, PAGE)
    return out
