"""Eviction policies: which unpinned slot of a region to reuse.

Every policy implements EvictionPolicy. LRU is the baseline (mixtral-offloading's);
HobbitPolicy is HOBBIT's sequence-level multidimensional policy. Neither is thread-safe:
the cache calls them from its event loop only. `sid` is a pin owner's id (a client).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class EvictionPolicy(Protocol):
    name: str  # "lru" or "hobbit", as in the config

    @property
    def weights(self) -> PolicyWeights | None:
        """HobbitPolicy's weights; None for LRU."""

    def begin(self, sid: int, seq: int, token: int, layer: int) -> None:
        """Client `sid` is at token `token` of its sequence `seq`, at `layer`."""

    def touch(self, slot, sid: int = 0, high: bool = True) -> None:
        """`sid` used `slot` now (hit or fresh load); `high`: its score asked for high precision."""

    def reset(self, slot) -> None:
        """`slot` was just given a new expert."""

    def victim(self, candidates):
        """The slot to evict among `candidates` (evictable slots of one region)."""

    def forget(self, sid: int) -> None:
        """Client `sid` is gone: drop what the policy keeps for it."""


class LRUPolicy:
    name = "lru"
    weights = None

    def __init__(self):
        self.clock = 0

    def begin(self, sid: int, seq: int, token: int, layer: int) -> None:
        pass

    def forget(self, sid: int) -> None:
        pass  # LRU keeps nothing per client

    def touch(self, slot, sid: int = 0, high: bool = True) -> None:
        """A slot was used (hit or freshly loaded) now."""
        self.clock += 1
        slot.last_use = self.clock
        slot.uses += 1

    def reset(self, slot) -> None:
        """The slot now holds a new expert (its last_use is set when it is first used)."""

    def victim(self, candidates):
        return min(candidates, key=lambda s: s.last_use)


@dataclass(frozen=True)
class PolicyWeights:
    """w_lru + w_lfu + w_lhu + w_fld = 1 (calibrated by `hobbit-cli calibrate`)."""

    lru: float = 0.25
    lfu: float = 0.25
    lhu: float = 0.25
    fld: float = 0.25


class HobbitPolicy:
    """Keep-priority of an expert e of layer l_e for a client at token T, layer l_now:

        p = w_lru·R/T + w_lfu·F/T + w_lhu·H/T + w_fld·(1 − d/L)

    R: the token index of its last use; F: its uses in this sequence; H: its uses at high
    precision (the score asked for high); d = (l_e − l_now − 1) mod L: how many layers
    until it can be needed again, so the next layer's experts score highest and the layer
    just computed lowest (it is needed again only after a whole pass). The evicted slot is
    the one with the lowest priority (ties: the least recently used).

    Counters are per client sequence: a client's REQUEST carries (seq, token); a new seq
    starts its counters afresh. Several clients sharing one cache each keep their own
    counters on the same slots, and a slot's priority is the highest any client gives it:
    an expert one client still needs is not evicted for another's sake. A client's terms
    count only on slots it used in its current sequence.

    The counters live in numpy arrays per (client, region), indexed by slot, so choosing a
    victim costs a few vector operations instead of a Python loop over the slots (it runs
    on every miss, on the daemon's event loop).
    """

    name = "hobbit"

    def __init__(self, n_layer: int, weights: PolicyWeights = PolicyWeights()):
        self.L = n_layer
        self.weights = weights
        self.clients: dict[int, list] = {}  # sid -> [seq, token T, layer l_now]
        self.counts: dict = {}  # (sid, region) -> float array [n_slots, 3]: R, F, H
        self.layers: dict = {}  # region -> int array [n_slots]: layer held
        self.last_use: dict = {}  # region -> int array [n_slots]: clock of last use
        self.clock = 0

    def begin(self, sid: int, seq: int, token: int, layer: int) -> None:
        """A client is at (seq, token, layer); a new seq resets its counters."""
        c = self.clients.get(sid)
        if c is not None and c[0] == seq:
            c[1], c[2] = token, layer
            return
        self.clients[sid] = [seq, token, layer]
        for (owner, _), a in self.counts.items():
            if owner == sid:
                a[:] = 0

    def forget(self, sid: int) -> None:
        self.clients.pop(sid, None)
        for key in [k for k in self.counts if k[0] == sid]:
            del self.counts[key]

    def _region_arrays(self, region):
        if region not in self.layers:
            self.layers[region] = np.zeros(len(region.slots), np.int64)
            self.last_use[region] = np.zeros(len(region.slots), np.int64)
        return self.layers[region], self.last_use[region]

    def reset(self, slot) -> None:
        """The slot now holds a new expert: every client's counters on it start at zero."""
        layers, _ = self._region_arrays(slot.region)
        layers[slot.index] = slot.key[0] if slot.key else 0
        for (_, region), a in self.counts.items():
            if region is slot.region:
                a[slot.index] = 0

    def touch(self, slot, sid: int = 0, high: bool = True) -> None:
        self.clock += 1
        slot.last_use = self.clock
        slot.uses += 1
        _, last_use = self._region_arrays(slot.region)
        last_use[slot.index] = self.clock
        c = self.clients.get(sid)
        if c is None:
            return
        a = self.counts.get((sid, slot.region))
        if a is None:
            a = self.counts[sid, slot.region] = np.zeros((len(slot.region.slots), 3))
        a[slot.index, 0] = c[1]
        a[slot.index, 1] += 1
        a[slot.index, 2] += bool(high)

    def priorities(self, region) -> np.ndarray:
        """The keep-priority of every slot of `region` (0 where no client used it)."""
        layers, _ = self._region_arrays(region)
        best = np.zeros(len(region.slots))
        w = self.weights
        for sid, (_, token, l_now) in self.clients.items():
            a = self.counts.get((sid, region))
            if a is None:
                continue
            T = max(token, 1)
            d = (layers - l_now - 1) % self.L
            p = (
                w.lru * a[:, 0] / T
                + w.lfu * np.minimum(a[:, 1] / T, 1.0)
                + w.lhu * np.minimum(a[:, 2] / T, 1.0)
                + w.fld * (1 - d / self.L)
            )
            np.maximum(best, np.where(a[:, 1] > 0, p, 0.0), out=best)
        return best

    def priority(self, slot) -> float:
        return float(self.priorities(slot.region)[slot.index])

    def victim(self, candidates):
        """The candidate (slots of one region) with the lowest priority, then the oldest use."""
        region = candidates[0].region
        idx = np.fromiter((s.index for s in candidates), np.int64, len(candidates))
        _, last_use = self._region_arrays(region)
        order = np.lexsort((last_use[idx], self.priorities(region)[idx]))
        return candidates[int(order[0])]


def make_policy(name: str, n_layer: int, weights: PolicyWeights | None = None) -> EvictionPolicy:
    if name == "lru":
        return LRUPolicy()
    if name == "hobbit":
        return HobbitPolicy(n_layer, weights or PolicyWeights())
    raise ValueError(f"unknown cache policy {name!r} (lru, hobbit)")
