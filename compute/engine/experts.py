"""What the segmented forward needs from its experts (ExpertProvider), and LocalExperts,
the provider that computes them in place from the model's own files, without hobbitd.

ExpertClient (client/expert_client.py) is the other provider: it implements the protocol
structurally, without importing the engine.

LocalExperts is the in-process counterpart of ExpertClient: high precision
from the mmapped GGUF (or its repacked image), low precision from the mmapped companion file, chosen per expert
with the same rule the daemon applies on a miss (loader/precision.py). There is no cache,
so every expert is a "miss": this is the accuracy the precision rule costs at worst, and
what evaluation and calibration measure without a daemon.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from ...loader.companion import open_companion, open_repacked
from ...loader.layout import Handle, SlotRegion, gguf_experts
from ...loader.precision import HIGH, LOW, Thresholds


class ExpertProvider(Protocol):
    """Where the segmented forward (engine/segments.py) gets a layer's routed experts.

    regions: {precision: SlotRegion}, the stacked tensors per precision (engine/pool.py
    views them); part_bases(precision, layer): the addresses of index 0 of each of the
    format's parts (gate/up/down, then the expert biases where the model has them) for
    that layer (re-read before every layer: a provider may move its memory); part_strides
    (precision, layer): the bytes from one index to the next, per part; the format's
    types(layer) are that layer's tensor types (quantizer mixes differ by layer). fetch()
    returns, per wanted expert, its Handle; fetch_pairs() then gives the Handle of each
    (token, rank) use; release() ends the use of one fetch()'s handles, flush() ends a
    forward; hint() announces predicted experts of coming layers. remote: the experts come
    from another process (hobbitd), which needs CPU time of its own.
    """

    remote: bool
    regions: dict[str, SlotRegion]

    def part_bases(self, precision: str, layer: int) -> tuple: ...

    def part_strides(self, precision: str, layer: int) -> tuple: ...

    def fetch(self, layer: int, experts, scores, seq: int = 0, token: int = 0, n_tokens: int = 1) -> list:
        """[Handle or None] for `experts` (distinct ids) of `layer`; scores are their
        unimportance; seq/token/n_tokens place the request in the sequence."""

    def fetch_pairs(self, layer: int, sel, scores, fetched: dict) -> list:
        """pairs[t][k]: the Handle (or None) token t's k-th expert sel[t, k] is computed
        with; fetched maps each expert id to what fetch() returned for it."""

    def release(self, handles) -> None: ...

    def flush(self) -> None:
        """The forward is over: send whatever the provider batched (no answer)."""

    def hint(self, layer: int, predictions, compute_s: float | None = None) -> None:
        """predictions [(target layer, experts, scores)], nearest first; no answer.
        compute_s: about how long the client computes before its next request (seconds),
        what a prefetch can hide behind."""

    def holds(self, first: int, last: int) -> bool:
        """Every expert of layers [first, last) is where a fetch finds it without asking:
        a hint for them would do nothing, so the forward skips predicting them."""

    def resident(self):
        """(n_layer, n_expert) int32 high-precision slot indices of every expert, pinned
        until the provider is closed, when it holds them all; else None (while loading:
        ask again at a later forward). With them a forward needs no fetch at all."""

    def used(self, uses: int, seq: int, token: int, n_tokens: int) -> None:
        """A forward computed on the resident experts with `uses` expert uses (counts)."""


class LocalExperts:
    """ExpertProvider over the mmapped GGUF (high) and companion file (low)."""

    remote = False

    def __init__(
        self, weights, companion: str | None = None, thresholds: Thresholds | None = None, repacked: str | None = None
    ):
        """repacked: the model's repacked image (`hobbit-cli convert --repack`), mmapped for
        high precision instead of the GGUF (validated as hobbitd does: CompanionError)."""
        self.thresholds = thresholds or Thresholds()
        self.weights = weights  # kept: bases point into its mmap
        self.sources = {HIGH: gguf_experts(weights)}
        # where each file starts in this process, by path (a split model's experts may be
        # in several of its parts)
        self.bases = {HIGH: {p: weights.base(i) for i, p in enumerate(weights.paths)}}
        if repacked:
            self.sources[HIGH], _ = open_repacked(weights, repacked, self.sources[HIGH])
            self._image_map = np.memmap(repacked, dtype=np.uint8, mode="r")
            self.bases[HIGH] = {repacked: self._image_map.ctypes.data}
        if companion:
            src, _ = open_companion(weights, companion)
            self._low_map = np.memmap(companion, dtype=np.uint8, mode="r")
            self.sources[LOW] = src
            self.bases[LOW] = {src.path: self._low_map.ctypes.data}
        elif self.thresholds.low_only or self.thresholds.dynamic:
            # without a companion file there is nothing to load in low precision
            self.thresholds = Thresholds(self.thresholds.t1, self.thresholds.t2, dynamic=False)
        self.regions = {p: SlotRegion(s.n_expert, s.format) for p, s in self.sources.items()}

    def part_bases(self, precision: str, layer: int) -> tuple:
        src, bases = self.sources[precision], self.bases[precision]
        return tuple(bases[src.file_of(layer, p)] + b for p, b in enumerate(src.part_base[layer]))

    def part_strides(self, precision: str, layer: int) -> tuple:
        return self.sources[precision].part_stride[layer]

    def fetch(self, layer: int, experts, scores, seq: int = 0, token: int = 0, n_tokens: int = 1) -> list:
        """[Handle or None]: each expert's index in its precision's stacked tensors."""
        out = []
        for e, s in zip(experts, scores):
            p = self.thresholds.on_miss(float(s))
            out.append(None if p is None else Handle(p, int(e)))
        return out

    def fetch_pairs(self, layer: int, sel, scores, fetched: dict) -> list:
        """Per token and rank: every expert is at hand in both precisions here, so each
        (token, expert) use gets the precision its own score asks for — as decoding one
        token at a time would — rather than one precision per expert for the batch."""
        return [
            [
                None if (p := self.thresholds.on_miss(float(s))) is None else Handle(p, int(e))
                for e, s in zip(row_e, row_s)
            ]
            for row_e, row_s in zip(sel, scores)
        ]

    def release(self, handles) -> None:
        pass

    def flush(self) -> None:
        pass

    def hint(self, layer: int, predictions, compute_s: float | None = None) -> None:
        pass

    def holds(self, first: int, last: int) -> bool:
        return True  # every expert is in this process already

    def resident(self):
        return None  # in-process without a provider already runs one graph per forward

    def used(self, uses: int, seq: int, token: int, n_tokens: int) -> None:
        pass
