"""Experts computed in place from the model's own files, without hobbitd.

The in-process counterpart of ExpertClient, for the segmented forward: high precision
from the mmapped GGUF, low precision from the mmapped companion file, chosen per expert
with the same rule the daemon applies on a miss (loader/precision.py). There is no cache,
so every expert is a "miss": this is the accuracy the precision rule costs at worst, and
what evaluation and calibration measure without a daemon.
"""
from __future__ import annotations

import numpy as np

from ...loader.companion import open_companion
from ...loader.layout import gguf_experts
from ...loader.precision import HIGH, LOW, Thresholds


class LocalExperts:
    def __init__(self, weights, companion: str | None = None, thresholds: Thresholds | None = None):
        self.thresholds = thresholds or Thresholds()
        self.sources = {HIGH: gguf_experts(weights)}
        self.bases = {HIGH: weights.reader.data.ctypes.data}
        if companion:
            src, _ = open_companion(weights, companion)
            self._low_map = np.memmap(companion, dtype=np.uint8, mode="r")
            self.sources[LOW] = src
            self.bases[LOW] = self._low_map.ctypes.data
        elif self.thresholds.low_only or self.thresholds.dynamic:
            # without a companion file there is nothing to load in low precision
            self.thresholds = Thresholds(self.thresholds.t1, self.thresholds.t2, dynamic=False)
        self.regions = {p: {"n_slots": s.n_expert, "format": s.format} for p, s in self.sources.items()}

    def part_bases(self, precision: str, layer: int) -> tuple:
        return tuple(self.bases[precision] + b for b in self.sources[precision].part_base[layer])

    def part_strides(self, precision: str) -> tuple:
        return self.sources[precision].part_stride

    def fetch(self, layer: int, experts, scores, seq: int = 0, token: int = 0, n_tokens: int = 1) -> list:
        """[(precision, expert) or None]: the expert's index in its precision's tensors."""
        out = []
        for e, s in zip(experts, scores):
            p = self.thresholds.on_miss(float(s))
            out.append(None if p is None else (p, int(e)))
        return out

    def fetch_pairs(self, layer: int, sel, scores) -> list:
        """Per token and rank: every expert is at hand in both precisions here, so each
        (token, expert) use gets the precision its own score asks for — as decoding one
        token at a time would — rather than one precision per expert for the batch."""
        return [[None if (p := self.thresholds.on_miss(float(s))) is None else (p, int(e))
                 for e, s in zip(row_e, row_s)] for row_e, row_s in zip(sel, scores)]

    def release(self, handles) -> None:
        pass

    def hint(self, layer: int, predictions) -> None:
        pass
