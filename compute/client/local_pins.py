"""The hit path: a client pins cached experts itself, without a message.

hobbitd's control block (loader/control.py) holds, per precision, a directory of the slots
holding each expert ready, and one row of pin counts per client. When the directory holds
every expert of a layer's request in the precision loader.precision's rule picks (the one
hobbitd would serve), the client adds 1 to their counts in its own row, reads the
directory again, and keeps the pins if nothing changed meanwhile; otherwise it asks
hobbitd. The pins belong to one session (a HELLO, `generation`): a new session's row is
another, so pins of an old one are never taken off it.
"""

from __future__ import annotations

from ...loader import control
from ...loader.layout import Handle
from ...loader.precision import HIGH, LOW, SKIP, Thresholds, precision_for


class Pinned(list):
    """One fetch()'s handles [Handle or None (skipped)], pinned by ourselves: `ids` their
    entries in our row, `generation` the session they were pinned in (LocalPins.unpin)."""

    def __init__(self, handles, ids: list, generation: int):
        super().__init__(handles)
        self.ids, self.generation = ids, generation


def hit_handles(th: Thresholds, holds_all: bool, entries: dict, experts, scores) -> list | None:
    """[Handle or None (skipped)] for `experts` of one layer with unimportance `scores`, when
    `entries` {precision: the directory's entries of that layer (slot index, -1: not
    held)} hold each one in the precision the rule picks (precision_for, as hobbitd's
    ModelCache.decide); None when one of them must be loaded (hobbitd is asked)."""
    high, low = entries.get(HIGH), entries.get(LOW)
    out = []
    for e, score in zip(experts, scores):
        h = high[e] if high is not None else -1
        lo = low[e] if low is not None else -1
        prec, load = precision_for(th, float(score), h >= 0, lo >= 0, entries, holds_all)
        if load:
            return None
        out.append(None if prec is SKIP else Handle(prec, h if prec == HIGH else lo))
    return out


class LocalPins:
    """Our row of the control block and the directories of our model's precisions; empty
    (finds nothing, so every fetch asks hobbitd) until attach() maps a control block."""

    def __init__(self):
        self.control: control.ControlBlock | None = None
        self._dirs: dict = {}  # precision -> int32 [n_layer, n_expert] slot directory
        self._first: dict = {}  # precision -> our row's index of its slot 0
        self._row = None  # our pin counts (int32 view), or None: nothing to pin in

    def attach(self, ctl: dict | None, info: dict) -> None:
        """Map the control block `ctl` of a WELCOME (with our row) and the directories of
        model `info`'s regions; what was mapped before goes. Nothing without a control
        block, a row, or membarrier."""
        self.close()
        if not ctl or ctl.get("row") is None or not control.register_client():
            return
        self.control = control.ControlBlock.attach(ctl["shm"], ctl["size"], ctl["rows_offset"], ctl["n_slots"])
        self._row = self.control.rows[ctl["row"]]
        for p, r in info["regions"].items():
            self._dirs[p] = self.control.directory(r["directory"], info["n_layer"], info["n_expert"])
            self._first[p] = r["first_slot"]

    def close(self) -> None:
        self._row, self._dirs, self._first = None, {}, {}
        if self.control is not None:
            self.control.close()
            self.control = None

    def _entries(self, layer: int) -> dict:
        """{precision: the directory's E entries of `layer`, as a list} (a snapshot)."""
        return {p: d[layer].tolist() for p, d in self._dirs.items()}

    def find(self, layer: int, experts, scores, th: Thresholds, holds_all: bool) -> list | None:
        """hit_handles() on the directory as it is now; None without a row."""
        if self._row is None:
            return None
        return hit_handles(th, holds_all, self._entries(layer), experts, scores)

    def pin(self, layer: int, experts, scores, th: Thresholds, holds_all: bool, generation: int) -> Pinned | None:
        """find()'s handles pinned in our row, or None (nothing pinned). The pin holds only
        if the directory still says the same after it (loader/control.py)."""
        got = self.find(layer, experts, scores, th, holds_all)
        row = self._row
        if got is None or row is None:  # (find() finds nothing without a row)
            return None
        ids = [self._first[h.precision] + h.slot for h in got if h is not None]
        row[ids] += 1
        # every entry we pinned unchanged (a slot freed and refilled with the same expert
        # has the same key, so the same bytes)
        now = self._entries(layer)
        if any(h is not None and now[h.precision][e] != h.slot for e, h in zip(experts, got)):
            row[ids] -= 1  # evicted meanwhile: hobbitd decides
            return None
        return Pinned(got, ids, generation)

    def unpin(self, pinned: Pinned, generation: int) -> None:
        """Take `pinned` off our row, if it is still the row it was pinned in (`generation`:
        the current session's)."""
        if pinned.generation == generation and self._row is not None and pinned.ids:
            self._row[pinned.ids] -= 1

    def holds(self, first: int, last: int, low_only: bool) -> bool:
        """The directory holds every expert of layers [first, last) in high precision (low
        for a low-only model): find() finds any prediction of them, whatever its scores."""
        d = self._dirs.get(LOW if low_only else HIGH)
        return d is not None and bool((d[first:last] >= 0).all())
