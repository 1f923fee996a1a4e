"""How a MoE routes real text: expert popularity per layer and temporal locality.

`routing_stats(model, tokens)` runs the model in-process on the text (chunks of ctx tokens,
each from an empty cache) and routes every token of every layer as the model does:
softmax(gate_inp . x) over the E experts of the layer's FFN input x (model.taps), top-K,
weights renormalised. Per layer it reports
  - popularity: each expert's share of the routed slots (T * K), its skew as max/mean
    (1 = uniform) and normalised entropy (1 = uniform), and the share of the busiest
    quarter of the experts, and the share of tokens sent to the least and the most used
    expert (with K close to E, max/mean saturates at E/K; these do not);
  - temporal locality: for consecutive tokens, the mean share of token t's experts that
    token t-1 also used, and the chance that it reuses at least one / all of them; each
    against uniform random routing (K/E, 1 - C(E-K, K)/C(E, K), 1/C(E, K)) and against the
    same routing with the tokens shuffled (same popularity, no order);
  - gate weights: the mean top-1 weight and the shares of routed experts HOBBIT would load
    in high / low precision or skip on a miss (unimportance thresholds T1, T2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...loader.precision import unimportance
from ...protocol.errors import InputError, ModelError

SHUFFLE_SEED = 0


def _locality(sel_chunks: list, n_expert: int) -> dict:
    """Overlap of each token's experts with the previous token's, within chunks."""
    overlap, any_, all_ = [], [], []
    for sel in sel_chunks:
        if len(sel) < 2:
            continue
        m = np.zeros((len(sel), n_expert), bool)
        np.put_along_axis(m, sel, True, axis=1)
        common = (m[1:] & m[:-1]).sum(axis=1)  # (T-1,)
        k = sel.shape[1]
        overlap.append(common / k)
        any_.append(common > 0)
        all_.append(common == k)
    if not overlap:
        return {"overlap": float("nan"), "reuse_any": float("nan"), "reuse_all": float("nan")}
    return {
        "overlap": float(np.concatenate(overlap).mean()),
        "reuse_any": float(np.concatenate(any_).mean()),
        "reuse_all": float(np.concatenate(all_).mean()),
    }


def uniform_baseline(n_expert: int, k: int) -> dict:
    """Locality under uniform random routing of K of E experts per token."""
    return {
        "overlap": k / n_expert,
        "reuse_any": 1.0 - math.comb(n_expert - k, k) / math.comb(n_expert, k),
        "reuse_all": 1.0 / math.comb(n_expert, k),
    }


def layer_stats(sel_chunks: list, w_chunks: list, n_expert: int, t1: float, t2: float) -> dict:
    sel = np.concatenate(sel_chunks)
    w = np.concatenate(w_chunks)
    counts = np.bincount(sel.ravel(), minlength=n_expert)
    share = counts / counts.sum()
    nz = share[share > 0]
    rng = np.random.default_rng(SHUFFLE_SEED)
    shuffled = sel[rng.permutation(len(sel))]
    s = unimportance(w)
    quarter = max(1, n_expert // 4)
    return {
        "popularity": share.tolist(),
        "max_over_mean": float(share.max() * n_expert),
        "entropy": float(-(nz * np.log(nz)).sum() / math.log(n_expert)),
        "top_quarter_share": float(np.sort(share)[::-1][:quarter].sum()),
        "unused": int((counts == 0).sum()),
        # share of tokens routed to the least / most used expert (uniform: K/E for both)
        "rate_min": float(counts.min() / len(sel)),
        "rate_max": float(counts.max() / len(sel)),
        **_locality(sel_chunks, n_expert),
        "shuffled": _locality([shuffled], n_expert),
        "top1_weight": float(w[:, 0].mean()),
        "high": float((s <= t1).mean()),
        "low": float(((s > t1) & (s <= t2)).mean()),
        "skip": float((s > t2).mean()),
    }


def routing_stats(model, tokens, ctx: int = 512, t1: float = 0.6, t2: float = 0.9, progress: bool = False) -> dict:
    """Route `tokens` through `model` (an in-process Model whose RunOptions.taps include
    "router_in"); see the module docstring for what is returned."""
    from ..engine.moe import Routers
    from ..progress import progress_bar

    a = model.args
    if not a.is_moe:
        raise ModelError(f"{model.w.path}: a dense model has no router to study")
    if "router_in" not in model.opts.taps:
        raise InputError("routing_stats needs a Model run with taps=('router_in',)")
    if len(tokens) < 2:
        raise InputError("the text has fewer than 2 tokens")
    ctx = min(ctx, model.n_ctx)
    routers = Routers(model.w)
    M = a.n_moe_layer
    sels = [[] for _ in range(M)]
    ws = [[] for _ in range(M)]
    starts = range(0, len(tokens), ctx)
    with progress_bar(len(tokens), "routing", progress, "tok") as bar:
        for start in starts:
            chunk = list(tokens[start : start + ctx])
            model.reset()
            model.forward(chunk, all_logits=True)
            for m, il in enumerate(a.moe_layers):  # routed as the model routes
                sel, w, _ = routers.route(model.taps[f"router_in.{il}"], m, m + 1)
                sels[m].append(sel[0])  # the weights as shares of their sum
                ws[m].append(w[0] / w[0].sum(axis=-1, keepdims=True))
            bar.update(len(chunk))
    layers = [layer_stats(sels[m], ws[m], a.n_expert, t1, t2) for m in range(M)]
    keys = (
        "max_over_mean",
        "entropy",
        "top_quarter_share",
        "rate_min",
        "rate_max",
        "overlap",
        "reuse_any",
        "reuse_all",
        "top1_weight",
        "high",
        "low",
        "skip",
    )
    mean = {k: float(np.mean([ls[k] for ls in layers])) for k in keys}
    mean["shuffled"] = {
        k: float(np.mean([ls["shuffled"][k] for ls in layers])) for k in ("overlap", "reuse_any", "reuse_all")
    }
    return {
        "tokens": len(tokens),
        "ctx": ctx,
        "n_layer": M,
        "experts": a.n_expert,
        "top_k": a.n_expert_used,
        "thresholds": [t1, t2],
        "uniform": uniform_baseline(a.n_expert, a.n_expert_used),
        "mean": mean,
        "layers": layers,
    }


def verdict(r: dict) -> str:
    """One line: does the routing look like a real MoE (skewed, with temporal locality)?"""
    m, u = r["mean"], r["uniform"]
    # max/mean cannot exceed E/K (an expert serves at most every token), so with many
    # experts per token the spread of the per-expert rates is the telling figure
    skewed = m["rate_max"] - m["rate_min"] >= 0.2
    local = m["overlap"] > m["shuffled"]["overlap"] + 0.02
    return (
        f"popularity {'skewed' if skewed else 'near uniform'} (tokens per expert from "
        f"{m['rate_min']:.0%} to {m['rate_max']:.0%}, uniform {r['top_k'] / r['experts']:.0%}; "
        f"max/mean {m['max_over_mean']:.2f}, entropy {m['entropy']:.3f} of uniform); temporal locality "
        f"{'present' if local else 'absent'} (overlap with the previous token {m['overlap']:.3f} vs "
        f"{m['shuffled']['overlap']:.3f} shuffled, {u['overlap']:.3f} uniform random)"
    )


def format_stats(r: dict) -> str:
    u = r["uniform"]
    lines = [
        f"routing of {r['tokens']} tokens: E={r['experts']} K={r['top_k']}, chunks of {r['ctx']}",
        "layer  max/mean  entropy  top25%  rate min/max  overlap(shuf)    reuse>=1(shuf)   reuse all  "
        "top1 w  high/low/skip",
    ]
    rows = list(enumerate(r["layers"])) + [("mean", r["mean"])]
    for il, s in rows:
        lines.append(
            f"{il!s:>5}  {s['max_over_mean']:8.2f}  {s['entropy']:7.3f}  {s['top_quarter_share']:6.3f}  "
            f"{s['rate_min']:5.2f}/{s['rate_max']:4.2f}  "
            f"{s['overlap']:.3f} ({s['shuffled']['overlap']:.3f})  "
            f"{s['reuse_any']:.3f} ({s['shuffled']['reuse_any']:.3f})   {s['reuse_all']:9.4f}  "
            f"{s['top1_weight']:6.3f}  {s['high']:.2f}/{s['low']:.2f}/{s['skip']:.2f}"
        )
    lines.append(
        f"uniform random routing: overlap {u['overlap']:.3f}, reuse>=1 {u['reuse_any']:.3f}, "
        f"reuse all {u['reuse_all']:.2e}; top25% share 0.25, max/mean 1, entropy 1"
    )
    lines.append(verdict(r))
    return "\n".join(lines)


@dataclass(frozen=True)
class RoutingOptions:
    model: str | None  # a MoE GGUF path; "default" or None: the default MoE
    text: str  # the text file to route
    tokens: int = 8192  # route its first N tokens
    ctx: int = 512  # tokens per chunk, each from an empty cache
    t1: float = 0.6  # HOBBIT's high-precision threshold
    t2: float = 0.9  # HOBBIT's skip threshold
    threads: int = 0  # 0: physical cores
    progress: bool = True


def route_text(opts: RoutingOptions) -> dict:
    """routing_stats() of opts.model on opts.text, in-process, with the model and the text."""
    from .evaluate import read_text, tokenize_text
    from ..engine.model import RunOptions
    from ..runs import open_run

    def check(weights, tok):
        if not weights.args.is_moe:
            raise ModelError(f"{weights.path}: a dense model has no router to study")

    run_opts = RunOptions(n_ctx=opts.ctx, n_batch=min(opts.ctx, 512), n_threads=opts.threads, taps=("router_in",))
    with open_run(opts.model, run_opts, check=check) as run:
        tokens = tokenize_text(run.tok, read_text(opts.text))[: opts.tokens]
        r = routing_stats(run.model, tokens, ctx=opts.ctx, t1=opts.t1, t2=opts.t2, progress=opts.progress)
    return {"model": run.path, "text": opts.text, **r}
