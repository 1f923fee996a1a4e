"""The segmented forward: a forward through an expert provider, cut at each MoE router.

With M MoE layers a forward is M + 1 segments (graphs). Segment 0 starts from the tokens;
segment m (0 < m <= M) starts with MoE layer m-1's experts, fetched after segment m-1
ran. Each segment m < M stops at MoE layer m's router and hands back only its routing
(top-K ids, weights, unimportance scores) and the lookahead's prediction of the next
layers (their routers on this layer's input, computed in the same graph); segment M ends
with the logits. Between segments m and m+1 (Segments.run, top to bottom):

  route    MoE layer m's routing, as segment m computed it (sel, w, scores)
  fetch    its distinct experts from the provider, each in the precision the provider
           chose or skipped (blocking: hobbitd may read them now)
  hint     the coming layers' predicted experts, for the provider to prefetch while
           segment m+1 computes
  inputs   per precision the ids, weights and slot span of every (token, expert) use:
           a Fetched, which segment m+1 takes (Pool.point, then its graph's inputs)
  release  once segment m+1 has run, the provider may reuse those slots
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ...loader.precision import HIGH, LOW
from .experts import ExpertProvider
from .graph import Graph, Timing
from .moe import check_routing
from .pool import Pool, Span

Variant = tuple[bool, bool]  # (has_high, has_low): which precisions a segment computes in


class ExpertInputs(NamedTuple):
    """One precision's part of a MoE layer's expert uses, as a segment's graph takes it:
    ids (T', K) i32 relative to span.first; weights (T', K) f32, 0 for the uses computed
    in the other precision or skipped (their ids repeat one already read)."""

    ids: np.ndarray
    weights: np.ndarray
    span: Span


@dataclass(frozen=True)
class Fetched:
    """MoE layer `layer`'s experts, fetched between the segment that routed them and the
    next one, which computes them: x, the residual stream where the routing segment
    stopped (T', D), and per precision some use needs (none: every expert skipped) its
    inputs. The graph input names are the model's (Model._expert_head)."""

    layer: int
    x: np.ndarray
    inputs: dict[str, ExpertInputs]

    @property
    def variant(self) -> Variant:
        return HIGH in self.inputs, LOW in self.inputs

    @property
    def spans(self) -> dict[str, Span]:
        return {prec: i.span for prec, i in self.inputs.items()}

    def feed(self) -> dict:
        out = {"x": self.x}
        for prec, i in self.inputs.items():
            out[f"ids_{prec}"], out[f"w_{prec}"] = i.ids, i.weights
        return out


class Variants:
    """The graphs of one segment, built on first use per variant (segment 0: None)."""

    def __init__(self, build: Callable[[Variant | None], Graph]):
        self.build, self.graphs = build, {}

    def __call__(self, variant: Variant | None) -> Graph:
        if variant not in self.graphs:
            self.graphs[variant] = self.build(variant)
        return self.graphs[variant]

    def free(self) -> None:
        for g in self.graphs.values():
            g.free()
        self.graphs.clear()


class Segments:
    """Runs a forward's segments with one provider. compute(graph, feed) runs a graph
    (the model's backend; it adds to timing.compute_s); lookahead: MoE layers ahead to
    hint (0: none); prefetch counts how well the hints predicted."""

    def __init__(
        self,
        provider: ExpertProvider,
        pool: Pool,
        n_expert: int,
        compute: Callable[[Graph, dict], dict],
        timing: Timing,
        lookahead: int,
        prefetch: PrefetchStats,
    ):
        self.provider, self.pool, self.n_expert = provider, pool, n_expert
        self.compute, self.timing, self.lookahead = compute, timing, lookahead
        self.prefetch = prefetch

    def run(self, plan: list[Variants], feed: dict, seq: int, token: int) -> np.ndarray:
        """The logits of one chunk: plan is its M + 1 segments, feed the inputs every
        segment may read (tokens, positions, KV slots and masks); seq and token (the
        position after the chunk) place the fetches in the sequence for the cache policy."""
        provider, M = self.provider, len(plan) - 1
        T = feed["tokens"].size  # the chunk's tokens (the last block's routing: its last row only)
        held: list = []  # the handles of `ready`'s experts, until they are computed
        ready: Fetched | None = None  # MoE layer m-1's experts, for segment m
        try:
            for m, segment in enumerate(plan):
                if ready is None:  # segment 0: from the tokens
                    out = self.compute(segment(None), feed)
                else:
                    self.pool.point(ready.layer, ready.spans)
                    out = self.compute(segment(ready.variant), {**feed, **ready.feed()})
                provider.release(held)  # MoE layer m-1's experts are done with
                held = []
                if m == M:
                    return out["logits"]
                # route: MoE layer m's, computed by segment m
                sel, w, scores = out["sel"], out["w"], out["scores"]  # (T', K) each
                check_routing(m, w, scores)
                self.prefetch.observe(m, sel)
                wanted, best = _wanted(sel, scores)
                # fetch
                t0 = time.perf_counter()
                held = provider.fetch(m, wanted, best, seq=seq, token=token, n_tokens=T)
                self.timing.expert_wait_s += time.perf_counter() - t0
                # hint: after the demand (never ahead of it): the coming layers' reads
                # overlap with this layer's compute (in a prompt too: the next layer streams in)
                if self.lookahead > 0 and m + 1 < M:
                    self._hint(m, out, M)
                # inputs, for segment m+1
                pairs = provider.fetch_pairs(m, sel, scores, dict(zip(wanted, held)))
                ready = Fetched(m, out["x"], _expert_inputs(sel, w, pairs, self.n_expert))
        finally:
            provider.release(held)
            provider.flush()

    def _hint(self, il: int, out: dict, M: int) -> None:
        """Hint MoE layers il+1..il+p as MoE layer il's segment predicted them (its outputs
        ahead_sel.d, ahead_scores.d (T', K)); the daemon walks them and prefetches at the
        first predicted miss. Several tokens (a prompt): each layer's prediction is every
        expert some token is predicted to use, at its most important use."""
        last = min(M, il + 1 + self.lookahead)
        if self.provider.holds(il + 1, last):  # cached already (most of a model that fits)
            return
        ahead = [(il + d, out[f"ahead_sel.{d}"], out[f"ahead_scores.{d}"]) for d in range(1, last - il)]
        if ahead[0][1].shape[0] == 1:
            preds = [(t, sel[0].tolist(), scores[0].tolist()) for t, sel, scores in ahead]
            self.prefetch.predict(il, preds)
        else:  # most important first: hobbitd prefetches in that order, within a budget
            preds = []
            for t, sel, scores in ahead:
                experts, best = _wanted(sel, scores)
                order = np.argsort(best, kind="stable")
                preds.append((t, [experts[i] for i in order], [best[i] for i in order]))
        # the next segment computes about as long as this one did: hobbitd's prefetch budget
        self.provider.hint(il, preds, self.timing.last_graph_s)


def _wanted(sel: np.ndarray, scores: np.ndarray) -> tuple[list, list]:
    """The distinct experts of a routing sel (T', K), ascending, and each one's most
    important (lowest) score."""
    if sel.shape[0] == 1:  # one token: its experts are distinct already
        pairs = sorted(zip(sel[0].tolist(), scores[0].tolist()))
        return [e for e, _ in pairs], [s for _, s in pairs]
    wanted = np.unique(sel)
    return wanted.tolist(), [float(scores[sel == e].min()) for e in wanted]


def _expert_inputs(sel, w, pairs, block: int) -> dict[str, ExpertInputs]:
    """Per precision used, the ids, weights (from w (T', K)) and span of every use, from
    pairs[t][k], the Handle (or None: skipped) of token t's k-th expert sel[t, k]. The span
    is the aligned `block` of slots that holds them all where one does (hobbitd's home
    slots, block = E: a layer's view stays the same token after token), else just theirs.
    A use computed in the other precision or skipped has weight 0 here; its id repeats an
    index already read for that token or batch (the row's first own index, else the
    batch's), so no extra weights are read."""
    wl = w.tolist()
    out = {}
    used = {h.precision for row in pairs for h in row if h is not None}
    for prec in (HIGH, LOW):
        if prec not in used:
            continue
        ids, wts, fill = [], [], None
        for row, ws in zip(pairs, wl):
            own = [h.slot if h is not None and h.precision == prec else None for h in row]
            first = next((i for i in own if i is not None), None)
            if fill is None:
                fill = first
            ids.append([first if i is None else i for i in own])
            wts.append([x if i is not None else 0.0 for i, x in zip(own, ws)])
        # rows with no own use repeat the batch's first own index
        ids = [[fill if i is None else i for i in row] for row in ids]
        lo, hi = min(map(min, ids)), max(map(max, ids))
        if hi - lo + 1 <= block and lo // block == hi // block:
            lo, hi = lo - lo % block, lo - lo % block + block - 1
        out[prec] = ExpertInputs(
            np.array([[i - lo for i in row] for row in ids], np.int32), np.array(wts, np.float32), Span(lo, hi - lo + 1)
        )
    return out


class PrefetchStats:
    """How well the lookahead predicted each layer's experts, per distance d (layers
    ahead): top-1 hits (the actual top expert was predicted) and expert recall. Only
    predictions made count: none is made while the coming layers are all cached."""

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        """Forget what was counted (and the predictions waiting for their layer)."""
        self.pending: dict = {}  # target layer -> [(distance, predicted set, predicted top1)]
        self.top1: dict = {}  # distance -> [hits, total]
        self.recall: dict = {}  # distance -> [experts predicted and used, experts used]

    def predict(self, layer: int, preds) -> None:
        for target, experts, _ in preds:
            self.pending.setdefault(target, []).append((target - layer, set(experts), experts[0]))

    def observe(self, layer: int, sel) -> None:
        if sel.shape[0] != 1:
            return
        actual = sel[0].tolist()
        for d, predicted, top1 in self.pending.pop(layer, []):
            t = self.top1.setdefault(d, [0, 0])
            t[0] += top1 == actual[0]
            t[1] += 1
            r = self.recall.setdefault(d, [0, 0])
            r[0] += len(predicted & set(actual))
            r[1] += len(actual)

    def summary(self) -> dict:
        return {
            d: {"top1": h / n if n else 0.0, "recall": self.recall[d][0] / max(self.recall[d][1], 1), "n": n}
            for d, (h, n) in sorted(self.top1.items())
        }
