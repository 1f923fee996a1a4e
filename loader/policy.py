"""Eviction policies: which unpinned slot of a region to reuse.

A policy sees `touch(slot, sid, high)` when a client uses a slot and `victim(candidates)`
when a region needs room. LRU is the baseline (mixtral-offloading's). HobbitPolicy is
HOBBIT's sequence-level multidimensional policy. Neither is thread-safe: the daemon calls
them from its event loop only.
"""
from __future__ import annotations

from dataclasses import dataclass


class LRUPolicy:
    name = "lru"

    def __init__(self, n_layer: int = 0):
        self.clock = 0

    def begin(self, sid: int, seq: int, token: int, layer: int) -> None:
        pass

    def touch(self, slot, sid: int = 0, high: bool = True) -> None:
        """A slot was used (hit or freshly loaded) now."""
        self.clock += 1
        slot.last_use = self.clock
        slot.uses += 1

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
    the one with the lowest priority.

    Counters are per client sequence: a client's REQUEST carries (seq, token); a new seq
    starts its counters afresh. Several clients sharing one cache each keep their own
    counters on the same slots, and a slot's priority is the highest any client gives it:
    an expert one client still needs is not evicted for another's sake.
    """
    name = "hobbit"

    def __init__(self, n_layer: int, weights: PolicyWeights = PolicyWeights()):
        self.L = n_layer
        self.w = weights
        self.clients: dict[int, list] = {}    # sid -> [seq, token T, layer l_now, generation]
        self.clock = 0

    def begin(self, sid: int, seq: int, token: int, layer: int) -> None:
        """A client is at (seq, token, layer); a new seq resets its counters."""
        c = self.clients.get(sid)
        if c is None or c[0] != seq:
            gen = (c[3] + 1) if c else 0
            self.clients[sid] = [seq, token, layer, gen]
        else:
            c[1], c[2] = token, layer

    def forget(self, sid: int) -> None:
        self.clients.pop(sid, None)

    def touch(self, slot, sid: int = 0, high: bool = True) -> None:
        self.clock += 1
        slot.last_use = self.clock
        slot.uses += 1
        c = self.clients.get(sid)
        if c is None:
            return
        counters = slot.counters.get(sid)
        if counters is None or counters[0] != c[3]:          # stale generation: new sequence
            counters = slot.counters[sid] = [c[3], 0, 0, 0]   # gen, R, F, H
        counters[1] = c[1]
        counters[2] += 1
        counters[3] += bool(high)

    def priority(self, slot) -> float:
        best = 0.0
        layer = slot.key[0] if slot.key else 0
        for sid, (gen, R, F, H) in slot.counters.items():
            c = self.clients.get(sid)
            if c is None or c[3] != gen:
                continue
            T = max(c[1], 1)
            d = (layer - c[2] - 1) % self.L
            w = self.w
            p = w.lru * R / T + w.lfu * min(F / T, 1.0) + w.lhu * min(H / T, 1.0) + w.fld * (1 - d / self.L)
            best = max(best, p)
        return best

    def victim(self, candidates):
        # ties (e.g. no counters yet) fall back to least recently used
        return min(candidates, key=lambda s: (self.priority(s), s.last_use))


def make_policy(name: str, n_layer: int, weights: PolicyWeights | None = None):
    if name == "lru":
        return LRUPolicy(n_layer)
    if name == "hobbit":
        return HobbitPolicy(n_layer, weights or PolicyWeights())
    raise ValueError(f"unknown cache policy {name!r} (lru, hobbit)")
