"""How the experts asked for were served: one counter, kept per model and per owner.

Counts is the counter; ModelCache (per model, `hobbit-cli stats`) and the cache's Owner
(per client, `hobbit-cli top`) are Counts, and loader/cache.py counts both at once.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field


class Outcome(enum.Enum):
    REQUESTED = "requested"  # asked for; each then gets one of the four below
    HIT = "hits"  # served from the cache
    WAIT = "waits"  # served by a read already in flight
    MISS = "misses"  # read for the request
    SKIP = "skipped"  # left out by the precision rule


@dataclass(eq=False, kw_only=True)
class Counts:
    """hits + waits + misses + skipped = requested (a read nobody asked for yet, such as
    RESIDENT's, counts a miss only)."""

    requested: int = 0
    hits: int = 0
    waits: int = 0
    misses: int = 0
    skipped: int = 0
    by_precision: Counter = field(default_factory=Counter)  # "hits_high", "misses_low", ...
    # (a wait counts as a hit here)

    def count(self, outcome: Outcome, precision: str | None = None, n: int = 1) -> None:
        """n more experts with `outcome`, in `precision` (None: not counted by precision)."""
        match outcome:
            case Outcome.REQUESTED:
                self.requested += n
            case Outcome.HIT:
                self.hits += n
            case Outcome.WAIT:
                self.waits += n
            case Outcome.MISS:
                self.misses += n
            case Outcome.SKIP:
                self.skipped += n
        if precision is not None:
            self.by_precision[f"{'misses' if outcome is Outcome.MISS else 'hits'}_{precision}"] += n
