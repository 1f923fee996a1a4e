"""`hobbit-cli calibrate`: choose HOBBIT's thresholds T1/T2 and cache-policy weights for a
model from calibration text, and store them next to its companion file.

1. Route the text through the model (in-process) and keep, per token and layer, the
   selected experts and their unimportance scores: the routing trace.
2. Thresholds: for each (T1, T2) on a grid, the mean KL divergence of the next-token
   distribution against the all-high-precision run, with every use of an expert in the
   precision its own score asks for on a miss (no cache; hits of the other precision in
   a real cache can cost more or less), and the modelled load cost of the trace through a
   simulated cache. Keep the cheapest pair whose KLD is within the bound. The grid's T1
   of -1 loads every miss in low precision (then hobbitd's cache is all low slots): on a
   model whose low copies are nearly as good, that is cheapest.
3. Policy weights: for the chosen thresholds, the cache simulation again for every
   (w_lru, w_lfu, w_lhu, w_fld) on a simplex grid; keep the lowest modelled load cost.
Modelled load cost = high-precision misses + low-precision misses x (low bytes / high bytes),
in units of one high-precision expert read.
4. Blindness: the mean entropy of the all-high next-token distributions over log V (the
   flatness, 0..1). A model near uniform (random weights: ~1) cannot move far in KL
   whatever is loaded low or skipped, so a KLD bound says nothing of its quality: such a
   calibration is marked blind, and benches label its lossy figures.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ...loader.calibration import save_calibration
from ...loader.ggml_types import type_name
from ...loader.layout import PAGE
from ...loader.served import cache_low_share
from ...loader.policy import PolicyWeights, make_policy
from ...loader.pool import Region
from ...loader.precision import EVERY_MISS_LOW, HIGH, LOW, SKIP, Thresholds, decide
from ...protocol.errors import HobbitError
from ..divergence import BLOCK, entropy_rows, kl_rows, log_softmax
from ..progress import progress_bar
from ..engine.experts import LocalExperts
from ..engine.model import Model, RunOptions
from ..engine.moe import Routers

T1_GRID = (EVERY_MISS_LOW, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)  # 1.0: every miss in high precision
T2_GRID = (0.6, 0.75, 0.9, 1.0)  # 1.0: never skip
# Flatness at or above which calibration is blind. Measured on DESIGN.md's first 128 tokens:
# a random-weight synthetic model (2 layers, d 128, 8 experts, Q8_0) 0.954, the default
# model (SmolLM2's real weights) 0.505.
BLIND_FLATNESS = 0.9


class GridMeasure(NamedTuple):
    """What grid_klds measures: the mean KLD of each thresholds pair, and the flatness of the
    reference (mean entropy of its next-token distributions / log V, 0..1)."""

    klds: list[float]
    flatness: float


def routing_trace(weights, tokens, n_ctx=512):
    """(sel, scores): per token and layer the top-k experts (rank order) and their
    unimportance scores, shapes (tokens, L, K), from an all-high in-process run."""
    a = weights.args
    model = Model(weights, RunOptions(n_ctx=n_ctx, taps=("router_in",)))
    routers = Routers(weights)
    sels, scores = [], []
    for start in range(0, len(tokens) - 1, n_ctx):
        chunk = tokens[start : start + n_ctx]
        model.reset()
        model.forward(chunk, all_logits=True)
        h = np.stack([model.taps[f"router_in.{il}"] for il in a.moe_layers])  # (L, T, D)
        sel, _, score = routers.route(h, 0, len(h))  # the graph's routing, in numpy: (L, T, K)
        sels.append(sel.transpose(1, 0, 2))
        scores.append(score.transpose(1, 0, 2))
    model.close()
    return np.concatenate(sels), np.concatenate(scores)


def simulate(
    sel,
    scores,
    n_expert,
    th: Thresholds,
    high_slots,
    low_slots,
    low_ratio,
    policy="lru",
    weights: PolicyWeights | None = None,
) -> dict:
    """Replay a routing trace through high/low regions of the given sizes; return miss
    counts and the modelled load cost (in high-precision expert reads)."""
    n_tok, L, K = sel.shape
    pol = make_policy(policy, L, weights)

    class _Fmt:  # the simulation needs slot counts only
        slot_bytes = PAGE

    regions = {}
    if high_slots:
        regions[HIGH] = Region("sim", HIGH, _Fmt, 0, high_slots)
    if low_slots:
        regions[LOW] = Region("sim", LOW, _Fmt, 0, low_slots)
    counts = {"high_miss": 0, "low_miss": 0, "hits": 0, "skipped": 0}
    for t in range(n_tok):
        for il in range(L):
            pol.begin(1, 0, t + 1, il)
            used = []
            for k in range(K):
                key = (il, int(sel[t, il, k]))
                s = float(scores[t, il, k])
                prec = decide(th, regions, key, s)  # the daemon's rule and fallback
                if prec is SKIP:
                    counts["skipped"] += 1
                    continue
                r = regions[prec]
                load = r.lookup(key) is None
                if load:
                    slot = r.take(key, pol)
                    if slot is None:  # all slots in use by this layer: read and drop
                        counts[f"{prec}_miss"] += 1
                        continue
                    slot.state = "ready"
                    counts[f"{prec}_miss"] += 1
                else:
                    slot = r.lookup(key)
                    counts["hits"] += 1
                slot.pins[1] += 1
                pol.touch(slot, 1, s <= th.t1)
                used.append(slot)
            for slot in used:
                slot.pins.clear()
    counts["cost"] = counts["high_miss"] + low_ratio * counts["low_miss"]
    return counts


def grid_klds(model, grid: list[Thresholds], tokens, n_ctx=512, progress=True) -> GridMeasure:
    """Mean KL(all high || thresholds th) over every next-token position of `tokens`, for each
    th in grid, with the model's LocalExperts (stateless: a chunk's logits under th do not
    depend on what ran before), and the reference's flatness over the same positions.
    Chunk by chunk: one chunk's reference logits and one batch of the other's are held at a
    time, not every position's (2,048 x 151,936 floats is 1.2 GB, twice, and float64
    log-probabilities of them four times that)."""
    sums, rows, entropy = [0.0] * len(grid), 0, 0.0
    starts = range(0, len(tokens) - 1, n_ctx)
    with progress_bar(len(starts) * len(grid), "thresholds", progress) as bar:
        for start in starts:
            chunk = tokens[start : start + n_ctx]
            model.experts.thresholds = Thresholds(dynamic=False)
            model.reset()
            ref = np.concatenate(list(model.logit_pieces(chunk, 0)))  # (n_ctx, V)
            for b in range(0, len(ref), BLOCK):
                entropy += float(entropy_rows(log_softmax(ref[b : b + BLOCK])).sum())
            for i, th in enumerate(grid):
                model.experts.thresholds = th
                model.reset()
                at = 0
                for piece in model.logit_pieces(chunk, 0):
                    for b in range(0, len(piece), BLOCK):
                        ours = piece[b : b + BLOCK]
                        sums[i] += float(kl_rows(log_softmax(ref[at : at + len(ours)]), log_softmax(ours)).sum())
                        at += len(ours)
                bar.update(1)
            rows += len(chunk)
    return GridMeasure([x / rows for x in sums], entropy / rows / math.log(ref.shape[-1]))


def calibrate(
    weights, companion: str, tokens, cache_fraction=0.25, low_share=0.25, kld_bound=0.01, progress=True, trace=None
) -> dict:
    """Thresholds and policy weights for one companion (steps 2-4 of the module's recipe).
    trace: routing_trace(weights, tokens) if the caller has it (it does not depend on the
    companion)."""
    from ...loader.companion import open_companion
    from ...loader.layout import gguf_experts

    high_src = gguf_experts(weights)
    low_src, _ = open_companion(weights, companion)
    ratio = low_src.total_bytes / high_src.total_bytes
    a = weights.args
    budget = cache_fraction * a.n_moe_layer * a.n_expert * high_src.format.slot_bytes

    def slots(th: Thresholds) -> tuple[int, int]:
        """(high, low) slot counts hobbitd's plan gives thresholds `th` (loader/served.py)."""
        share = cache_low_share(th, low_share)
        high = 0 if share == 1.0 else max(a.n_expert, int(budget * (1 - share)) // high_src.format.slot_bytes)
        return high, max(a.n_expert, int(budget * share) // low_src.format.slot_bytes)

    t0 = time.perf_counter()
    sel, scores = trace if trace is not None else routing_trace(weights, tokens)
    model = Model(weights, RunOptions(n_ctx=512, lookahead=0), experts=LocalExperts(weights, companion))
    grid = [Thresholds(t1, t2) for t1 in T1_GRID for t2 in T2_GRID if t2 >= t1]
    # (1, 1) loads every expert in high precision: it is the reference itself, so that some
    # pair always meets the bound (a model too sensitive for low precision gets none)
    lossy = [th for th in grid if th.t1 < 1.0]
    measured = grid_klds(model, lossy, tokens, progress=progress)
    klds = dict(zip(lossy, measured.klds))
    rows = []
    for th in grid:
        sim = simulate(sel, scores, a.n_expert, th, *slots(th), ratio)
        rows.append({"t1": th.t1, "t2": th.t2, "kld": klds.get(th, 0.0), **sim})
    ok = [r for r in rows if r["kld"] <= kld_bound]
    best = min(ok, key=lambda r: (r["cost"], r["kld"]))
    model.close()
    th = Thresholds(best["t1"], best["t2"])
    simplex = [w for w in itertools.product((0, 0.25, 0.5, 0.75, 1.0), repeat=4) if abs(sum(w) - 1) < 1e-9]
    policy_rows = []
    with progress_bar(len(simplex), "policy weights", progress) as bar:
        for w in simplex:
            pw = PolicyWeights(*w)
            sim = simulate(sel, scores, a.n_expert, th, *slots(th), ratio, "hobbit", pw)
            policy_rows.append({"weights": list(w), **sim})
            bar.update(1)
    lru = simulate(sel, scores, a.n_expert, th, *slots(th), ratio, "lru")
    bestw = min(policy_rows, key=lambda r: r["cost"])
    return {
        "t1": best["t1"],
        "t2": best["t2"],
        "weights": bestw["weights"],
        "kld": best["kld"],
        "kld_bound": kld_bound,
        "cost": bestw["cost"],
        "lru_cost": lru["cost"],
        "cache_fraction": cache_fraction,
        "low_share": low_share,
        "low_ratio": ratio,
        "tokens": len(tokens),
        "flatness": round(measured.flatness, 4),
        "blind": measured.flatness >= BLIND_FLATNESS,
        "seconds": round(time.perf_counter() - t0, 1),
        "threshold_grid": rows,
        "companion": os.path.basename(companion),
        "low_type": type_name(low_src.format.types(0)[0]),
    }


@dataclass(frozen=True)
class CalibrateOptions:
    model: str  # a MoE GGUF
    text: str  # calibration text (never the evaluation text)
    tokens: int = 2048  # tokens of the text to use
    low: str | None = None  # the companion's type; None: every candidate type, the best kept
    companion: str | None = None  # the companion file; None: found from low
    cache: float = 0.25  # cache size as a fraction of expert bytes
    low_share: float = 0.25  # share of the cache for low precision
    kld: float = 0.01  # KLD bound vs all-high-precision
    progress: bool = True


def calibrate_model(opts: CalibrateOptions) -> tuple[dict, str]:
    """Calibrate opts.model on opts.text and save the result next to its companion file:
    (the result, the path it was saved to). HobbitError for a dense model, evaluation text,
    a missing companion or too little text.

    Without --low or --companion every candidate type (loader.companion.low_type_candidates)
    is measured, its companion made first if missing: the chosen one is the candidate whose
    thresholds model the fewest bytes read within the bound (on a tie, e.g. when none
    allows any low precision, one that existed before, else the first). Each candidate's calibration is saved beside its
    companion, the chosen one marked "chosen" (what hobbitd's low type "auto" serves); the
    companions calibration made for the others are removed. The result lists the candidates."""
    from ..engine import ggml
    from ...loader.companion import companion_path, low_type_candidates
    from ...loader.layout import gguf_experts
    from ..engine.tokenizer import Tokenizer
    from ..engine.weights import open_model
    from .convert import convert

    weights = open_model(opts.model)
    if not weights.args.is_moe:
        raise HobbitError(f"{opts.model}: a dense model has nothing to calibrate")
    if os.path.basename(opts.text) == "wiki.test.raw":
        raise HobbitError(f"{opts.text}: that is evaluation text; calibrate on other text")
    high = gguf_experts(weights)
    if opts.companion or opts.low:
        companion = opts.companion or companion_path(weights.path, ggml.TYPES_BY_NAME[opts.low.upper()])
        if not os.path.exists(companion):
            raise HobbitError(f"{companion}: no companion file; run hobbit-cli convert {opts.model} first")
        candidates = {companion: None}
    else:
        types = low_type_candidates(high.format)
        if not types:
            names = "/".join(ggml.type_name(t) for t in high.format.type_set)
            raise HobbitError(f"{opts.model}: its {names} experts have no smaller type to calibrate")
        candidates = {companion_path(weights.path, t): t for t in types}
    with open(opts.text, encoding="utf-8", errors="replace") as f:
        tokens = Tokenizer(opts.model).encode(f.read())[: opts.tokens]
    if len(tokens) < 64:
        raise HobbitError(f"{opts.text}: only {len(tokens)} tokens; calibration needs at least 64")
    made = [p for p, t in candidates.items() if t is not None and not os.path.exists(p)]
    trace = routing_trace(weights, tokens)
    results = {}
    try:
        for path, t in candidates.items():
            if path in made:
                convert(weights, t, out=path, progress=opts.progress)
            results[path] = calibrate(
                weights, path, tokens, opts.cache, opts.low_share, opts.kld, progress=opts.progress, trace=trace
            )
    except BaseException:
        for path in made:  # a half-finished choice leaves no new file behind
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    # the fewest modelled reads; among equals one that was there before (no new file),
    # then the first (min keeps it): e.g. when no candidate allows any low precision
    best = min(results, key=lambda p: (results[p]["cost"], p in made))
    table = [_candidate_row(p, r) for p, r in results.items()]
    for path, r in results.items():
        r["chosen"] = path == best
        r["candidates"] = table
        if path != best and path in made:
            os.unlink(path)  # a companion nobody will serve
        else:
            saved = save_calibration(r, path)
            if path == best:
                out = saved
    return results[best], out


def _candidate_row(path: str, r: dict) -> dict:
    """One candidate's line in the result: its type, size against high precision, the KLD
    of every miss loaded in it, and what calibration chose for it."""
    every_low = next(row["kld"] for row in r["threshold_grid"] if row["t1"] < 0 and row["t2"] >= 1.0)
    return {
        "type": r["low_type"],
        "low_ratio": r["low_ratio"],
        "kld_every_miss_low": every_low,
        **{k: r[k] for k in ("t1", "t2", "kld", "cost")},
    }
