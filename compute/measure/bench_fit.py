"""`hobbit-cli bench fit MODEL`: decode and prefill speed when every expert fits in the cache
(a laptop's case), side by side in one run: llama.cpp, hobbit in-process, hobbit through
hobbitd computing each forward in one graph on the resident experts, and through hobbitd
asking for each layer's experts (the path a smaller cache takes); and, where `hobbit-cli
convert --repack` made the model's repacked image, through a second hobbitd serving it
(one graph on slots in ggml's repacked layout, as llama.cpp computes by default).

llama.cpp runs with its CPU repacking (its default). One hobbitd (--repack off: the GGUF's
layout) is started with a cache that holds every expert and is warmed first. Rounds
interleave the engines; medians are reported, with each hobbit engine's time per decoded
token split into compute, waiting for hobbitd, the rest of the client, and hobbitd's own
CPU. Greedy tokens are compared across engines.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time

import psutil

from ...protocol.errors import InputError

ENGINES = ("llamacpp", "in_process", "resident", "per_layer")
REPACKED = "repacked"  # the engine through hobbitd serving the repacked image, where made
LABELS = {
    "llamacpp": "llama.cpp",
    "in_process": "hobbit in-process",
    "resident": "hobbitd, one graph",
    "per_layer": "hobbitd, per layer",
    REPACKED: "hobbitd, repacked",
}


def _daemon_pid(sock: str) -> int | None:
    for p in psutil.process_iter(["cmdline"]):
        if sock in " ".join(p.info["cmdline"] or []):
            return p.pid
    return None


def run(
    model: str, prompt_tokens: int = 8, n_decode: int = 64, repeat: int = 3, threads: int = 0, ctx: int = 512
) -> dict:
    from ...loader.companion import repacked_path
    from ...loader.layout import gguf_experts
    from ..client.expert_client import ExpertClient
    from ..engine import ggml
    from ..engine.model import Model, RunOptions
    from ..engine.weights import open_model
    from ..runs import Run
    from .bench_ablation import daemon
    from .engines import LlamaCppEngine, bench_prompt, run_once

    for name, v in (("prompt-tokens", prompt_tokens), ("n-decode", n_decode), ("repeat", repeat)):
        if v < 1:
            raise InputError(f"--{name} must be at least 1")
    weights = open_model(model)
    a = weights.args
    if not a.is_moe:
        raise InputError(f"{model}: not a MoE model; there are no experts to cache")
    src = gguf_experts(weights)
    cache = src.n_layer * src.n_expert * src.format.slot_bytes
    n = threads or ggml.physical_cores()
    prompt = bench_prompt(model, prompt_tokens)
    names = ENGINES + ((REPACKED,) if os.path.exists(repacked_path(model)) else ())
    rounds = {e: {"prefill_s": [], "decode_s": [], "compute_s": [], "wait_s": [], "daemon_cpu_s": []} for e in names}
    tokens = {e: [] for e in names}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="hobbit-bench-fit-"))
        socks = {"resident": stack.enter_context(daemon(model, cache, ["--repack", "off"], tmp))}
        socks["per_layer"] = socks["resident"]
        if REPACKED in names:
            socks[REPACKED] = stack.enter_context(daemon(model, cache, [], tmp))
        procs = {e: psutil.Process(pid) for e, sock in socks.items() if (pid := _daemon_pid(sock))}

        def through(name: str):
            opts = RunOptions(ctx, 512, threads, resident=name != "per_layer")
            client = ExpertClient(socks[name], model)
            run = Run(model, weights, None, Model(weights, opts, experts=client))
            if name == REPACKED and not client.regions["high"].format.any_repacked:
                raise InputError(f"{repacked_path(model)}: hobbitd did not serve it (stale? see {tmp}/hobbitd.log)")
            return run

        engines = {
            "llamacpp": LlamaCppEngine(model, ctx, n),
            "in_process": Run(model, weights, None, Model(weights, RunOptions(ctx, 512, n))),
            **{name: through(name) for name in names[2:]},
        }
        try:
            for name, e in engines.items():  # warm-up: graphs, the cache (all read)
                one_graph = name in ("resident", REPACKED)
                for _ in range(50 if one_graph else 1):
                    run_once(_engine(e), prompt, 4)
                    if not one_graph or e.model.experts.resident() is not None:
                        break
                    time.sleep(0.1)
                if one_graph and e.model.experts.resident() is None:
                    raise InputError(f"{model}: hobbitd did not make every expert resident")
            for _ in range(repeat):
                for name in names:
                    e = engines[name]
                    m = getattr(e, "model", None)
                    t0 = (m.timing.compute_s, m.timing.expert_wait_s) if m else (0, 0)
                    proc = procs.get(name)
                    cpu0 = sum(proc.cpu_times()[:2]) if proc else 0.0
                    prefill_s, decode_s, toks = run_once(_engine(e), prompt, n_decode)
                    r = rounds[name]
                    r["prefill_s"].append(prefill_s)
                    r["decode_s"].append(decode_s)
                    if m:
                        r["compute_s"].append(m.timing.compute_s - t0[0])
                        r["wait_s"].append(m.timing.expert_wait_s - t0[1])
                    if proc:
                        r["daemon_cpu_s"].append(sum(proc.cpu_times()[:2]) - cpu0)
                    tokens[name].append(toks)
        finally:
            for e in engines.values():
                e.close()
    med = {e: {k: statistics.median(v) if v else None for k, v in r.items()} for e, r in rounds.items()}
    base = med["llamacpp"]
    out = {}
    steps = n_decode + 1  # run_once: the prefill's token, then n_decode steps
    for e in names:
        m = med[e]
        row = {
            "decode_tok_s": n_decode / m["decode_s"],
            "prefill_tok_s": prompt_tokens / m["prefill_s"],
            "decode_ratio": base["decode_s"] / m["decode_s"],
            "prefill_ratio": base["prefill_s"] / m["prefill_s"],
            "tokens_match": all(t == tokens["llamacpp"][0] for t in tokens[e]),
        }
        r = rounds[e]
        if r["compute_s"]:  # per round, then the median of each part
            other = [p + d - c - w for p, d, c, w in zip(r["prefill_s"], r["decode_s"], r["compute_s"], r["wait_s"])]
            row["ms_per_token"] = {
                "compute": 1e3 * m["compute_s"] / steps,
                "wait": 1e3 * m["wait_s"] / steps,
                "client_other": 1e3 * statistics.median(other) / steps,
                "daemon_cpu": (1e3 * m["daemon_cpu_s"] / steps if m["daemon_cpu_s"] is not None else None),
            }
        out[e] = row
    # per layer, what asking hobbitd costs over computing in one graph
    per_layer_ms = (med["per_layer"]["decode_s"] - med["resident"]["decode_s"]) / n_decode * 1e3 / a.n_layer
    # the hit path alone: the per-layer forward's time outside compute (pinning, routing
    # inputs, ggml calls per segment) over the one graph's, per MoE layer; compute differs
    # by its thread count besides (one core fewer while hobbitd may be reading)
    split = {e: out[e]["ms_per_token"] for e in ("resident", "per_layer")}
    outside = {e: s["wait"] + s["client_other"] for e, s in split.items()}
    hit_path_ms = (outside["per_layer"] - outside["resident"]) / a.n_moe_layer
    return {
        "model": os.path.abspath(model),
        "n_layer": a.n_layer,
        "n_expert": a.n_expert,
        "n_moe_layer": a.n_moe_layer,
        "hit_path_ms_per_layer": hit_path_ms,
        "top_k": a.n_expert_used,
        "cache_bytes": cache,
        "threads": n,
        "prompt_tokens": prompt_tokens,
        "n_decode": n_decode,
        "repeat": repeat,
        "loadavg_1m": os.getloadavg()[0],
        "engines": out,
        "rounds": rounds,
        "per_layer_request_ms": per_layer_ms,
    }


def _engine(e):
    from .engines import HobbitEngine, LlamaCppEngine

    return e if isinstance(e, LlamaCppEngine) else HobbitEngine(e)


def print_table(r: dict) -> None:
    print(
        f"bench fit: {r['model']} ({r['n_layer']} layers, {r['n_expert']} experts, top-{r['top_k']}), "
        f"every expert cached ({r['cache_bytes'] / 2**20:.0f} MiB), {r['threads']} threads, "
        f"prompt {r['prompt_tokens']}, {r['n_decode']} decode steps, {r['repeat']} rounds (medians)"
    )
    print(
        f"  {'engine':<20} {'decode tok/s':>12} {'x llama.cpp':>11} {'prefill tok/s':>13} "
        f"{'x':>6}  same tokens  ms/token: compute / wait / client other / hobbitd CPU"
    )
    for e, row in r["engines"].items():
        split = row.get("ms_per_token")
        s = ""
        if split:
            d = split["daemon_cpu"]
            s = f"{split['compute']:.2f} / {split['wait']:.2f} / {split['client_other']:.2f} / " + (
                "-" if d is None else f"{d:.2f}"
            )
        print(
            f"  {LABELS[e]:<20} {row['decode_tok_s']:12.1f} {row['decode_ratio']:10.2f}x "
            f"{row['prefill_tok_s']:13.1f} {row['prefill_ratio']:5.2f}x  {str(row['tokens_match']).lower():<11}  {s}"
        )
    print(
        f"  per layer over the one graph: {r['per_layer_request_ms']:.3f} ms per layer per token "
        f"in all; outside compute (the hit path) {r['hit_path_ms_per_layer']:.3f} ms per MoE layer"
    )
