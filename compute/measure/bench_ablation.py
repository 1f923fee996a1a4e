"""`hobbit-cli bench ablation`: HOBBIT's techniques switched on one by one, same code,
same prompts, one run. Each configuration gets a fresh hobbitd (same cache size) and the
same client; decoding is greedy in (a) and forced to (a)'s tokens in the others, so every
configuration does the same work and KLD compares the same positions.

  (a) high precision only + LRU (mixtral-offloading's method)
  (b) + token-level dynamic loading (low precision / skip on misses)
  (c) + layer-level adaptive prefetch
  (d) + multidimensional cache policy (= hobbit)
  (e) low precision only (+ LRU)

hobbitd serves an uncalibrated model exactly (no low precision, no skips), so (b)-(d) ask
for the paper's thresholds then (a calibrated model keeps its own). A model without a
companion file gets one first (`convert`, with a progress bar), so every configuration runs.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

from ...protocol.errors import DaemonError, HobbitError
from ..divergence import mean_kld

CONFIGS = [
    ("a", "high only + LRU", ["--policy", "lru", "--no-dynamic"], 0),
    ("b", "+ dynamic loading", ["--policy", "lru"], 0),
    ("c", "+ prefetch", ["--policy", "lru"], 3),
    ("d", "+ multidim. cache (hobbit)", ["--policy", "hobbit"], 3),
    ("e", "low only + LRU", ["--policy", "lru", "--low-only"], 0),
]
PROMPT_TEXT = (
    "In the early morning the harbour was quiet. Fishing boats rocked against the pier "
    "while gulls circled above the market, where traders were setting out baskets of "
    "bread, cheese and fruit for the day. "
)


@contextlib.contextmanager
def daemon(model: str, cache_size: int, flags: list, workdir: str, preexec=None):
    """A hobbitd serving `model` on a fresh socket in workdir (its log: hobbitd.log there);
    `preexec` runs in the child before it starts (e.g. entering a memory cgroup)."""
    from ..client.daemon import DaemonProcess

    sock = os.path.join(workdir, f"bench-{os.getpid()}-{time.monotonic_ns()}.sock")
    d = DaemonProcess(
        [model],
        sock,
        log_path=os.path.join(workdir, "hobbitd.log"),
        cache_size=cache_size,
        flags=flags,
        preexec=preexec,
        append_log=True,
    )
    try:
        try:
            d.wait_ready(60)
        except DaemonError:
            raise HobbitError(f"hobbitd {' '.join(flags) or '(defaults)'} did not start: {d.log_tail(1)}") from None
        yield sock
    finally:
        d.stop(timeout=30)


def _stats(client) -> dict:
    return next(iter(client.stats()["models"].values()))


def run_config(weights, tok_prompts, n_decode, sock, lookahead, forced=None, n_ctx=1024):
    """One configuration, one round: prefill each prompt, decode n_decode tokens (greedy,
    or `forced` tokens). Returns (measurements, tokens, logits)."""
    from ..engine.model import RunOptions
    from ..runs import ThroughDaemon, open_run

    run = open_run(
        weights.path,
        RunOptions(n_ctx=n_ctx, lookahead=lookahead),
        ThroughDaemon(sock, autostart=False, quiet=True),
        weights=weights,
        tokenizer=False,
    )
    model, client = run.model, run.experts
    prefill_s, decode_s, n_tok, logits_all, tokens_all = [], 0.0, 0, [], []
    compute_s = wait_s = 0.0
    s0 = _stats(client)
    for i, prompt in enumerate(tok_prompts):
        model.reset()
        t0 = time.perf_counter()
        logits = model.forward(prompt)
        prefill_s.append(time.perf_counter() - t0)
        toks, lg = [], [logits]
        c0, w0 = model.timing.compute_s, model.timing.expert_wait_s
        t0 = time.perf_counter()
        for j in range(n_decode):
            t = int(np.argmax(logits)) if forced is None else forced[i][j]
            toks.append(t)
            logits = model.forward([t])
            lg.append(logits)
        decode_s += time.perf_counter() - t0
        compute_s += model.timing.compute_s - c0
        wait_s += model.timing.expert_wait_s - w0
        n_tok += n_decode
        tokens_all.append(toks)
        logits_all.append(np.stack(lg))
    s1 = _stats(client)
    delta = {k: s1.get(k, 0) - s0.get(k, 0) for k in s1 if isinstance(s1[k], (int, float))}
    result = {
        "decode_tok_s": n_tok / decode_s,
        "prefill_s": statistics.mean(prefill_s),
        # per decoded token: graph compute, waiting for hobbitd, the rest (routing,
        # hints, Python)
        "split_ms": {
            "compute": 1e3 * compute_s / n_tok,
            "expert_wait": 1e3 * wait_s / n_tok,
            "other": 1e3 * (decode_s - compute_s - wait_s) / n_tok,
        },
        "prefetch": model.prefetch.summary(),
        "daemon": delta,
        "bytes_per_token": delta.get("bytes_read", 0) / max(n_tok, 1),
    }
    run.close()
    return result, tokens_all, logits_all


def prepare(weights, cache: int, progress: bool = True) -> list:
    """The preconditions of a MoE's ablation, checked before any configuration runs: a low-precision
    companion (converted now when missing; ModelError for experts that have no smaller
    type) and a cache hobbitd accepts for the mixed configurations. Returns the threshold
    flags for (b)-(d): none for a calibrated model, else the paper's."""
    from ...loader.companion import auto_low_type, companion_path, made_companion
    from ...loader.layout import gguf_experts
    from ...loader.served import ModelOptions, open_served_all, plan_cache
    from ...loader.precision import PAPER_T1, PAPER_T2
    from ..make.convert import convert

    path = weights.path
    fmt = gguf_experts(weights).format
    if made_companion(path, fmt) is None:
        low = auto_low_type(fmt, path)
        if progress:
            print(
                f"[ablation] {path} has no low-precision companion: converting it ({companion_path(path, low)})",
                file=sys.stderr,
                flush=True,
            )
        convert(weights, low, progress=progress)
    # the daemon's own cache plan, so a too-small cache fails now, not at (b)
    plan_cache(open_served_all([path], ModelOptions(t1=PAPER_T1, t2=PAPER_T2)), cache, 0.25)
    return lossy_flags(path)


def lossy_flags(path: str) -> list:
    """hobbitd flags for a benchmark's dynamic-loading runs: none when the companion
    hobbitd will serve (the best suitable type made) is calibrated (hobbitd uses its
    thresholds), else the paper's T1/T2 (an uncalibrated model is served exactly unless
    asked otherwise)."""
    from ...loader.precision import PAPER_T1, PAPER_T2

    if served_calibration(path):
        return []
    return ["--t1", f"{PAPER_T1:g}", "--t2", f"{PAPER_T2:g}"]


def served_calibration(path: str) -> dict | None:
    """The calibration of the companion hobbitd will serve for the GGUF at `path`, or None."""
    from ...loader.calibration import load_calibration
    from ...loader.companion import made_companion
    from ...loader.layout import gguf_experts
    from ...loader.gguf_file import open_gguf

    return load_calibration(made_companion(path, gguf_experts(open_gguf(path)).format))


# A lossy row's label when the calibration behind it was blind (compute/make/calibrate.py:
# the model's predictions were near uniform, so its KLD bound judged nothing)
BLIND_LABEL = "(random weights: quality unjudged)"


def run(
    model_path: str, cache_fraction=0.25, prompt_tokens=(16, 128), n_decode=32, configs=None, rounds=3, progress=True
) -> dict:
    from ...loader.layout import gguf_experts
    from ..engine.tokenizer import Tokenizer
    from ..engine.weights import open_model

    weights = open_model(model_path)
    if not weights.args.is_moe:
        raise HobbitError(f"{model_path}: the ablation needs a MoE model")
    src = gguf_experts(weights)
    expert_bytes = src.n_layer * src.n_expert * src.format.slot_bytes
    cache = int(cache_fraction * expert_bytes)
    lossy = prepare(weights, cache, progress)
    words = Tokenizer(model_path).encode(PROMPT_TEXT * 20)
    prompts = [words[:n] for n in prompt_tokens]
    chosen = [
        (key, label, flags + lossy if key in "bcd" else flags, la)
        for key, label, flags, la in CONFIGS
        if not configs or key in configs
    ]
    per_round = {key: [] for key, *_ in chosen}
    ref_tokens, ref_logits = None, None
    with tempfile.TemporaryDirectory() as tmp:
        # rounds interleave the configurations, so a slow spell of this shared machine
        # hits all of them alike; a ratio is taken within a round
        for rnd in range(rounds):
            for key, label, flags, lookahead in chosen:
                if progress:
                    print(f"[ablation] round {rnd + 1}/{rounds} ({key}) {label} ...", file=sys.stderr, flush=True)
                with daemon(model_path, cache, flags, tmp) as sock:
                    r, toks, logits = run_config(weights, prompts, n_decode, sock, lookahead, ref_tokens)
                if ref_tokens is None:
                    ref_tokens, ref_logits = toks, logits
                r["kld_vs_a"] = float(np.mean([mean_kld(a, b) for a, b in zip(ref_logits, logits)]))
                per_round[key].append(r)
    results = {
        key: {**_summarise(rs, per_round.get("a"), label), "flags": flags}
        for (key, label, flags, _), rs in zip(chosen, per_round.values())
    }
    return {
        "model": model_path,
        "cache_fraction": cache_fraction,
        "cache_bytes": cache,
        "expert_bytes": expert_bytes,
        "prompt_tokens": list(prompt_tokens),
        "n_decode": n_decode,
        "rounds": rounds,
        "thresholds": " ".join(lossy) or "calibrated",
        "blind": bool((served_calibration(model_path) or {}).get("blind", False)),
        "configs": results,
        "method": (
            "each round runs every configuration in turn, each with a fresh hobbitd "
            "(same --cache-size), one client process, the same prompts; prefill "
            "latency = mean wall time of the prompt forward; decode tok/s = generated "
            "tokens / wall time of decoding, median over rounds (min-max shown); x(a) = "
            "median over rounds of the ratio to (a) in the same round; the split = "
            "graph compute / waiting for hobbitd / the rest, ms per decoded token, "
            "medians; (a) decodes greedily and the others are fed (a)'s tokens; KLD = "
            "mean KL(a || x) of next-token distributions over all decode positions; "
            "hits, misses, skips and bytes read come from hobbitd's STATS before and "
            "after each run, summed over rounds"
        ),
    }


def perplexities(r: dict, text: str, chunks: int, progress=True) -> dict:
    """Perplexity of `text` (its first `chunks` chunks of 512 tokens, llama-perplexity's
    method) for each configuration of the ablation result `r`, through a fresh hobbitd with
    that configuration's flags and r's cache: {key: {ppl, ppl_stderr, chunks, vs_a}}; vs_a is the
    relative change against (a)'s (exact) perplexity, when (a) ran. Scored one token per
    forward, as decoding meets the experts: in a batch an expert is loaded for its most
    important token, so a batched score would hide what low precision and skips do."""
    from ..runs import ThroughDaemon
    from .evaluate import EvalOptions, eval_ppl

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, c in r["configs"].items():
            if progress:
                print(f"[ablation] perplexity ({key}) {c['label']} ...", file=sys.stderr, flush=True)
            with daemon(r["model"], r["cache_bytes"], c["flags"], tmp) as sock:
                opts = EvalOptions(r["model"], text, chunks=chunks, batch=1, progress=progress)
                p = eval_ppl(replace(opts, daemon=ThroughDaemon(socket=sock, autostart=False, quiet=True)))
            out[key] = {"ppl": p["ppl"], "ppl_stderr": p["ppl_stderr"], "chunks": p["chunks"]}
    if "a" in out:
        for v in out.values():
            v["vs_a"] = v["ppl"] / out["a"]["ppl"] - 1
    return out


def _summarise(rs: list, base: list | None, label: str) -> dict:
    """One configuration's rounds → medians, spread, ratios to (a) within each round,
    daemon counters summed over rounds."""
    tok_s = [r["decode_tok_s"] for r in rs]
    ratios = [r["decode_tok_s"] / b["decode_tok_s"] for r, b in zip(rs, base)] if base else []
    daemon = {}
    for r in rs:
        for k, v in r["daemon"].items():
            daemon[k] = daemon.get(k, 0) + v
    return {
        "label": label,
        "decode_tok_s": statistics.median(tok_s),
        "decode_tok_s_rounds": tok_s,
        "speedup_vs_a": statistics.median(ratios) if ratios else None,
        "speedup_vs_a_rounds": ratios,
        "prefill_s": statistics.median(r["prefill_s"] for r in rs),
        "split_ms": {k: statistics.median(r["split_ms"][k] for r in rs) for k in rs[0]["split_ms"]},
        "bytes_per_token": statistics.mean(r["bytes_per_token"] for r in rs),
        "prefetch": rs[-1]["prefetch"],
        "daemon": daemon,
        "kld_vs_a": statistics.mean(r["kld_vs_a"] for r in rs),
    }


def print_table(r: dict) -> None:
    print(
        f"bench ablation: {r['model']}, cache {r['cache_fraction']:.0%} of expert bytes "
        f"({r['cache_bytes'] / 2**20:.0f} MiB), prompts {r['prompt_tokens']} tokens, "
        f"{r['n_decode']} decoded, {r['rounds']} rounds; (b)-(d) thresholds {r['thresholds']}"
    )
    if r.get("blind"):
        print(
            "the calibration was blind (near-uniform predictions: random weights): (a) is exact, the "
            "lossy rows' speed is real but their quality unjudged"
        )
    print(
        f"{'config':30s} {'dec tok/s':>9s} {'(min-max)':>11s} {'x(a)':>5s} {'prefill s':>9s} "
        f"{'hit hi':>6s} {'hit lo':>6s} {'skip':>5s} {'MB/tok':>6s} {'pf top1@1':>9s} "
        f"{'ms/tok: compute':>15s} {'wait':>5s} {'other':>5s} {'KLD':>7s}"
    )
    for key, c in r["configs"].items():
        d = c["daemon"]
        req = max(d.get("requested", 0), 1)
        pf = c["prefetch"].get(1, {}).get("top1")
        sp = c["split_ms"]
        spread = f"{min(c['decode_tok_s_rounds']):.1f}-{max(c['decode_tok_s_rounds']):.1f}"
        print(
            f"({key}) {c['label']:26s} {c['decode_tok_s']:9.2f} {spread:>11s} "
            f"{c['speedup_vs_a'] or 0:5.2f} {c['prefill_s']:9.3f} "
            f"{d.get('hits_high', 0) / req:6.1%} {d.get('hits_low', 0) / req:6.1%} "
            f"{d.get('skipped', 0) / req:5.1%} {c['bytes_per_token'] / 1e6:6.2f} "
            f"{'' if pf is None else f'{pf:9.1%}':>9s} {sp['compute']:15.1f} "
            f"{sp['expert_wait']:5.1f} {sp['other']:5.1f} {c['kld_vs_a']:7.4f}"
            + (f" {BLIND_LABEL}" if r.get("blind") and key != "a" else "")
        )
    if r.get("perplexity"):
        p = r["perplexity"]
        some = next(iter(p.values()))
        print(f"perplexity through each configuration's hobbitd, {some['chunks']} chunks of 512 tokens:")
        for key, v in p.items():
            vs = f"   {v['vs_a']:+.2%} vs (a)" if "vs_a" in v else ""
            print(f"({key}) {r['configs'][key]['label']:26s} {v['ppl']:9.4f} +/- {v['ppl_stderr']:.4f}{vs}")
    print(f"method: {r['method']}")
