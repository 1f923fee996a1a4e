"""`hobbit-cli bench compute`: our engine and llama-cpp-python on the same GGUF, in one
process, all weights in memory; prefill and decode speed side by side (see METHOD). The
other kinds of `bench` are measured in their own modules (bench_*.py); their parsers are
in apps/cli_bench.py.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass

from ...protocol.errors import InputError
from .engines import N_BATCH, bench_prompt, run_once

WARMUP_STEPS = 4
NOISY = 1.3  # round_spread above this: warn that the machine was busy
ENGINES = ("hobbit", "llamacpp")

METHOD = (
    "Both engines run in this process on the same GGUF with all weights in memory (mmap), "
    "n_ctx={ctx}, n_batch={n_batch}, {threads} threads; llama.cpp with flash_attn=True, "
    "logits_all=False. Prompt: a fixed English paragraph, tokenized (BOS first), repeated "
    "and cut to {prompt_tokens} tokens. Each engine is warmed up once (the full prompt and "
    "{warmup} decode steps). Then {repeat} rounds alternate hobbit, llama.cpp, ... Prefill = "
    "perf_counter wall time of one forward over the whole prompt after a reset (ours: "
    "Model.forward(prompt); llama.cpp: Llama.eval(prompt)). Decode = wall time of {n} greedy "
    "steps each feeding the argmax of the previous logits (ours: Model.forward([tok]); "
    "llama.cpp: Llama.eval([tok]) + llama_get_logits_ith(-1)). tok/s = tokens / median "
    "seconds over the rounds; ratio = hobbit / llama.cpp. The greedy tokens (first from the "
    "prefill logits, then one per decode step) are compared across engines and rounds."
)


@dataclass
class ComputeOptions:
    model: str
    prompt_tokens: int = 128
    n_decode: int = 64
    threads: int = 0  # 0: physical cores
    repeat: int = 3
    ctx: int = 1024


def run_compute(opts: ComputeOptions) -> dict:
    """Run the comparison and return the report (a JSON-ready dict)."""
    import llama_cpp

    from ..engine import ggml
    from ..engine.model import RunOptions
    from ..engine.weights import open_model
    from ..runs import open_run
    from .engines import HobbitEngine, LlamaCppEngine

    for name in ("prompt_tokens", "n_decode", "repeat", "ctx"):
        if getattr(opts, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if opts.prompt_tokens + max(opts.n_decode, WARMUP_STEPS) > opts.ctx:
        raise InputError(
            f"{opts.prompt_tokens} prompt + {opts.n_decode} decode tokens do not "
            f"fit the context of {opts.ctx} (raise --ctx)"
        )
    weights = open_model(opts.model)  # raises ModelError for a missing or bad file
    threads = opts.threads or ggml.physical_cores()
    prompt = bench_prompt(opts.model, opts.prompt_tokens)
    if max(prompt) >= weights.args.n_vocab:
        raise InputError(f"the tokenizer gives ids beyond the model's {weights.args.n_vocab} tokens")

    engines = {
        "hobbit": HobbitEngine(
            open_run(opts.model, RunOptions(opts.ctx, N_BATCH, threads), weights=weights, tokenizer=False)
        ),
        "llamacpp": LlamaCppEngine(opts.model, opts.ctx, threads, N_BATCH),
    }
    load = os.getloadavg()[0]  # other processes running skew both engines: report it
    timings = {e: {"prefill_s": [], "decode_s": []} for e in ENGINES}
    runs = {e: [] for e in ENGINES}
    try:
        for engine in engines.values():  # warm-up: graphs, buffers, page cache
            run_once(engine, prompt, WARMUP_STEPS)
        for _ in range(opts.repeat):
            for name in ENGINES:
                prefill_s, decode_s, tokens = run_once(engines[name], prompt, opts.n_decode)
                timings[name]["prefill_s"].append(prefill_s)
                timings[name]["decode_s"].append(decode_s)
                runs[name].append(tokens)
    finally:
        for engine in engines.values():
            engine.close()

    ref = runs["hobbit"][0]
    mismatch = [next((i for i, (x, y) in enumerate(zip(ref, r)) if x != y), None) for e in ENGINES for r in runs[e]]
    mismatch = [i for i in mismatch if i is not None]
    speed = {
        e: {
            k: n / statistics.median(timings[e][k + "_s"])
            for k, n in (("prefill", opts.prompt_tokens), ("decode", opts.n_decode))
        }
        for e in ENGINES
    }
    a = weights.args
    return {
        "model": os.path.abspath(opts.model),
        "model_size_bytes": weights.total_bytes,
        "model_kind": f"MoE {a.n_expert} experts, top-{a.n_expert_used}" if a.is_moe else "dense",
        "hobbit_prefill_tok_s": speed["hobbit"]["prefill"],
        "llamacpp_prefill_tok_s": speed["llamacpp"]["prefill"],
        "prefill_ratio": speed["hobbit"]["prefill"] / speed["llamacpp"]["prefill"],
        "hobbit_decode_tok_s": speed["hobbit"]["decode"],
        "llamacpp_decode_tok_s": speed["llamacpp"]["decode"],
        "ratio": speed["hobbit"]["decode"] / speed["llamacpp"]["decode"],
        "tokens_match": not mismatch,
        "tokens_compared": len(ref),
        "first_mismatch": min(mismatch) if mismatch else None,
        "threads": threads,
        "loadavg_1m": load,
        "prompt_tokens": opts.prompt_tokens,
        "n_decode": opts.n_decode,
        "repeat": opts.repeat,
        "n_ctx": opts.ctx,
        "n_batch": N_BATCH,
        "llama_cpp_python": llama_cpp.__version__,
        "method": METHOD.format(
            ctx=opts.ctx,
            n_batch=N_BATCH,
            threads=threads,
            prompt_tokens=opts.prompt_tokens,
            warmup=WARMUP_STEPS,
            repeat=opts.repeat,
            n=opts.n_decode,
        ),
        "rounds": timings,
        # slowest / fastest round of any measurement: > NOISY means other load interfered
        "round_spread": max(max(t) / min(t) for e in timings.values() for t in e.values()),
    }


def format_compute(r: dict) -> str:
    size = r["model_size_bytes"] / 1e9
    ms = lambda xs: " ".join(f"{x * 1e3:.0f}" for x in xs)
    lines = [
        f"bench compute: {r['model']} ({size:.2f} GB, {r['model_kind']})",
        f"threads {r['threads']}, prompt {r['prompt_tokens']} tokens, decode {r['n_decode']} "
        f"tokens, {r['repeat']} rounds (medians); load average before: {r['loadavg_1m']:.2f}",
        "",
        f"{'':16}{'hobbit':>10}{'llama.cpp':>12}{'ratio':>8}",
        f"{'prefill tok/s':16}{r['hobbit_prefill_tok_s']:10.1f}{r['llamacpp_prefill_tok_s']:12.1f}"
        f"{r['prefill_ratio']:8.2f}",
        f"{'decode tok/s':16}{r['hobbit_decode_tok_s']:10.1f}{r['llamacpp_decode_tok_s']:12.1f}{r['ratio']:8.2f}",
        "",
        f"tokens_match: {str(r['tokens_match']).lower()} ({r['tokens_compared']} greedy tokens "
        f"per round compared"
        + (f"; first difference at token {r['first_mismatch']})" if r["first_mismatch"] is not None else ")"),
    ]
    for e, label in (("hobbit", "hobbit"), ("llamacpp", "llama.cpp")):
        t = r["rounds"][e]
        lines.append(f"rounds {label:9} prefill ms: {ms(t['prefill_s'])}; decode ms: {ms(t['decode_s'])}")
    if r["round_spread"] > NOISY:
        lines.append(
            f"warning: rounds differ up to {r['round_spread']:.1f}x; the machine was busy "
            "(other processes steal cores from both engines), rerun when idle"
        )
    lines += ["", "method: " + r["method"]]
    return "\n".join(lines)
