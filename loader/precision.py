"""HOBBIT's token-level dynamic loading: which precision an expert is used in.

For one token and layer the router's top-k experts, ranked by normalised gate weight
g_0 >= g_1 >= ..., get unimportance scores s_i = g_0 + ... + g_{i-1} (s_0 = 0: the top
expert always counts as important). The rule, for thresholds T1 <= T2:
  - a cached copy is used as it is, high precision preferred: an important expert
    (s <= T1) found only in low precision is used in low precision rather than waiting
    for a high-precision read (the paper's choice: a hit is never turned into a miss);
  - on a miss: s <= T1 loads high precision, T1 < s <= T2 loads low precision, and
    s > T2 skips the expert (its output is left out, the other weights unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HIGH, LOW, SKIP = "high", "low", None


@dataclass(frozen=True)
class Thresholds:
    t1: float = 0.6
    t2: float = 0.9
    dynamic: bool = True     # False: every miss loads high precision (no low, no skip)
    low_only: bool = False   # True: every expert in low precision (the ablation's floor)

    def on_miss(self, score: float):
        """The precision to load for a missing expert with unimportance `score`."""
        if self.low_only:
            return LOW
        if not self.dynamic or score <= self.t1:
            return HIGH
        return LOW if score <= self.t2 else SKIP

    def choose(self, score: float, cached_high: bool, cached_low: bool):
        """(precision to use, whether it must be loaded)."""
        if self.low_only:
            return LOW, not cached_low
        if cached_high:
            return HIGH, False
        if cached_low and self.dynamic and score <= self.t2:
            return LOW, False
        p = self.on_miss(score)
        return p, p is not SKIP


def decide(th: Thresholds, regions: dict, key: tuple, score: float):
    """The precision (HIGH, LOW or SKIP) to serve expert `key` = (layer, expert) in, given
    `regions` {precision: Region} (a key held by a region, even loading, counts as cached).
    A precision the model has no region for (e.g. no companion) falls back to the other."""
    cached = {p: r.lookup(key) is not None for p, r in regions.items()}
    prec, _ = th.choose(score, cached.get(HIGH, False), cached.get(LOW, False))
    if prec is not SKIP and prec not in regions:
        prec = HIGH if HIGH in regions else LOW
    return prec


def unimportance(weights: np.ndarray) -> np.ndarray:
    """Scores s for weights of the selected experts (rows: tokens, columns in rank order,
    largest weight first, already normalised): s[:, i] = sum of weights before i."""
    w = np.asarray(weights, dtype=np.float64)
    total = w.sum(axis=1, keepdims=True)
    w = w / np.where(total > 0, total, 1.0)
    return np.concatenate([np.zeros((w.shape[0], 1)), np.cumsum(w, axis=1)[:, :-1]], axis=1)
