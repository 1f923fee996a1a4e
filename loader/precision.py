"""HOBBIT's token-level dynamic loading: which precision an expert is used in.

For one token and layer the router's top-k experts, ranked by normalised gate weight
g_0 >= g_1 >= ..., get unimportance scores s_i = g_0 + ... + g_{i-1} (s_0 = 0: the top
expert always counts as important). The rule, for thresholds T1 <= T2:
  - a cached copy is used as it is, high precision preferred: an important expert
    (s <= T1) found only in low precision is used in low precision rather than waiting
    for a high-precision read (the paper's choice: a hit is never turned into a miss);
  - on a miss: s <= T1 loads high precision, T1 < s <= T2 loads low precision, and
    s > T2 skips the expert (its output is left out, the other weights unchanged).
Scores are below 1, so T1 = T2 = 1 (EXACT, the default until a model is calibrated) loads
every miss in high precision: the output is the all-high model's, exactly. Scores are at
least 0, so T1 < 0 (EVERY_MISS_LOW, a value calibration may choose) loads every miss in low
precision, the top expert's too; the cache is then all low-precision slots.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

HIGH, LOW, SKIP = "high", "low", None
EXACT = 1.0  # T1 = T2 = 1: never low precision, never a skip
EVERY_MISS_LOW = -1.0  # T1 below every score: no miss loads high precision
PAPER_T1, PAPER_T2 = 0.6, 0.9  # the paper's thresholds for Mixtral: lossy, measured on nothing here


@dataclass(frozen=True)
class Thresholds:
    t1: float = EXACT
    t2: float = EXACT
    dynamic: bool = True  # False: every miss loads high precision (no low, no skip)
    low_only: bool = False  # True: every expert in low precision (the ablation's floor)

    @property
    def exact(self) -> bool:
        """Every expert is used in high precision and none is skipped."""
        return not self.low_only and (not self.dynamic or self.t1 >= EXACT)

    @property
    def loads_high(self) -> bool:
        """Some miss loads high precision (else a cache needs low-precision slots only)."""
        return not self.low_only and (not self.dynamic or self.t1 >= 0)

    def describe(self, calibrated: bool) -> str:
        """One phrase for logs, `hobbit-cli stats` and `top`: exact or which lossy mode."""
        if self.low_only:
            return "low precision only (lossy)"
        if not self.dynamic:
            return "exact: high precision only"
        if self.exact:
            return "exact: high precision only (" + ("calibrated" if calibrated else "not calibrated") + ")"
        t1 = "every miss low," if self.t1 < 0 else f"T1 {self.t1:.2f}"
        return f"lossy: {t1} T2 {self.t2:.2f}" + (" (calibrated)" if calibrated else "")

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
        if cached_low and self.dynamic and score <= self.t2 and self.t1 < EXACT:
            return LOW, False
        p = self.on_miss(score)
        return p, p is not SKIP


class Decision(NamedTuple):
    """How one expert is served: in `precision` (HIGH or LOW; SKIP, None: left out), read
    first when `load` (no copy in that precision is cached: a miss), else the cached copy."""

    precision: str | None
    load: bool


def precision_for(
    th: Thresholds, score: float, cached_high: bool, cached_low: bool, have: Collection[str], holds_all: bool = False
) -> Decision:
    """The rule for one expert of unimportance `score`, whose copies cached in high and low
    precision are `cached_high`, `cached_low`: the one decision hobbitd serves by
    (ModelCache.decide) and a client's hit path pins by (client/local_pins.py). `have`: the
    precisions the model has slots for; one it has none for (e.g. no companion) falls back
    to the other, still a load (slots it has not, it caches nothing in). holds_all: the
    high region has a slot for every expert, so every expert is high (unless low_only): its
    misses happen only while the cache warms, and a low copy or a skip then would lose
    quality for no memory."""
    if holds_all and not th.low_only:
        return Decision(HIGH, not cached_high)
    prec, load = th.choose(score, cached_high, cached_low)
    if prec is not SKIP and prec not in have:
        prec = HIGH if HIGH in have else LOW
    return Decision(prec, load)


def decide(th: Thresholds, regions: dict, key: tuple, score: float, holds_all: bool = False):
    """The precision (HIGH, LOW or SKIP) to serve expert `key` = (layer, expert) in, given
    `regions` {precision: Region} (a key held by a region, even loading, counts as cached);
    precision_for's rule."""
    cached = {p: r.lookup(key) is not None for p, r in regions.items()}
    return precision_for(th, score, cached.get(HIGH, False), cached.get(LOW, False), regions, holds_all).precision


def unimportance(weights: np.ndarray) -> np.ndarray:
    """Scores s for weights of the selected experts (rows: tokens, columns in rank order,
    largest weight first, already normalised): s[:, i] = sum of weights before i."""
    w = np.asarray(weights, dtype=np.float64)
    before = np.cumsum(w, axis=1)
    total = before[:, -1:]
    return (before - w) / np.where(total > 0, total, 1.0)
