"""`hobbit-cli bench offload`: hobbit against llama.cpp on the same MoE file with the same
memory, side by side in one run.

Each limited run starts from a dropped page cache, and its processes (llama.cpp's, or
hobbitd and hobbit's client) run in one memory cgroup of the same limit: the budget plus
an allowance for the processes themselves. hobbitd's cache is the budget minus the bytes
of the non-expert weights the client keeps resident (the token embedding's rows are read on
use, as llama.cpp's mmap reads them, and not counted). Runs:

  1. llama.cpp (llama-cpp-python, mmap), limited;
  2. hobbit, high precision only + LRU, no prefetch, limited;
  3. hobbit with all three techniques, limited;
  4. llama.cpp unlimited with the model in the page cache: the compute ceiling;
  5. the I/O floor: the expert bytes a token must read at best (a cache of the budget
     holds that share of the experts, routing uniform) over the direct-I/O bandwidth
     measured now with dd.

Each engine runs in a worker process (`python -m hobbit.compute.measure.offload_worker
SPEC`, measure/offload_worker.py) that prints one JSON object. Where no memory cgroup can be
made or the page cache cannot be dropped, runs 1-3 are not made and the report says why.
The report's table and plots are drawn by measure/bench_offload_report.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field


from ...loader.sizing import PROCESS_ALLOWANCE
from ...protocol.errors import HobbitError, InputError
from .bench_ablation import lossy_flags

MiB = 1 << 20
CLIENT_ALLOWANCE = 256 * MiB  # added to the limit for each client process beyond the first
FULL = dict(layers=16, d_model=2048, d_ff=5376, experts=8, top_k=2, heads=16, kv_heads=4, type="Q8_0")
QUICK = dict(layers=8, d_model=512, d_ff=1024, experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0")


@dataclass
class OffloadOptions:
    model: str | None = None  # None: the synthetic Mixtral-layout model, made once
    budget: str = "25%"  # memory for model weights (llama.cpp's page cache; hobbit's
    # cache + the other weights): bytes, "1G", or "25%" of the expert bytes
    allowance: int = PROCESS_ALLOWANCE  # on top, for the processes themselves (same for both)
    runs: list = field(default_factory=lambda: [[16, 32], [128, 128]])  # [prompt, decode] tokens
    clients: list = field(default_factory=lambda: [2, 4])  # concurrent clients (the first run each)
    threads: int = 0  # 0: each engine's default
    quick: bool = False
    sweep: list = field(default_factory=list)  # budgets ("10%", ...) for the tok/s-vs-budget plot
    quantize: str | None = None  # the synthetic model through llama.cpp's quantizer (Q4_K_M, ...)


# ---- the model ---------------------------------------------------------------------------


def synthetic_model(quick: bool, progress: bool = True, quantize: str | None = None) -> str:
    """The synthetic model (and its low-precision companion), made once under
    $XDG_CACHE_HOME/hobbit/bench; FULL's experts are 4.2 GiB, 4x a 1 GiB budget. quantize:
    made F16 and quantised by llama.cpp's quantizer to that file type (its real mix)."""
    from ...loader.companion import auto_low_type, made_companion
    from ..make.convert import convert
    from ...loader.layout import gguf_experts
    from ..make.quantize import make_quantized
    from ..make.synth import SynthOptions, make_synthetic
    from ..engine.weights import open_model

    spec = dict(QUICK if quick else FULL)
    if quantize:
        spec["type"] = quantize.upper()
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hobbit", "bench")
    os.makedirs(cache, exist_ok=True)
    name = "offload-" + "-".join(f"{k[0]}{v}" for k, v in spec.items()) + ".gguf"
    path = os.path.join(cache, name)
    if not os.path.exists(path):
        if progress:
            print(f"[offload] making the synthetic model {path} (once)", file=sys.stderr)
        if quantize:
            make_quantized(path, SynthOptions(**{**spec, "type": "F16"}), quantize, progress=progress)
        else:
            make_synthetic(path, SynthOptions(**spec), progress=progress)
    w = open_model(path)
    high = gguf_experts(w)
    if made_companion(path, high.format) is None:  # any suitable one made earlier will do
        convert(w, auto_low_type(high.format, path), progress=progress)
    return path


# ---- the parent ----------------------------------------------------------------------------


def _run_worker(spec: dict, preexec=None) -> dict:
    return _run_workers([spec], preexec)[0]


def _run_workers(specs: list, preexec=None) -> list:
    """Run the workers at the same time; their results (or {"error": why}) in order."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "hobbit.compute.measure.offload_worker", json.dumps(sp)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=preexec,
        )
        for sp in specs
    ]
    out = []
    for sp, p in zip(specs, procs):
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            why = (
                "killed (out of memory in its cgroup?)"
                if p.returncode < 0
                else (stderr.strip().splitlines() or ["no message"])[-1]
            )
            out.append({"error": f"{sp['engine']} worker exited with {p.returncode}: {why}"})
        else:
            out.append(json.loads(stdout))
    return out


def _warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def _limited(label: str, limit: int, fn) -> dict:
    """Run fn(cgroup) after dropping the page cache, inside a fresh cgroup of `limit`."""
    from .memcgroup import MemoryCgroup, drop_page_cache

    print(f"[offload] {label} ...", file=sys.stderr, flush=True)
    drop_page_cache()
    with MemoryCgroup(limit) as cg:
        try:
            r = fn(cg)
        except HobbitError as e:  # e.g. hobbitd refusing a cache too small: that run only
            return {"error": str(e)}
        r["peak_memory"] = cg.peak()
    return r


def _hobbit_run(opts, path, cache, flags, lookahead, cg, tmp) -> dict:
    from .bench_ablation import daemon

    with daemon(path, cache, flags, tmp, preexec=cg.enter) as sock:
        r = _run_worker(
            {
                "engine": "hobbit",
                "model": path,
                "socket": sock,
                "runs": opts.runs,
                "threads": opts.threads,
                "lookahead": lookahead,
            },
            cg.enter,
        )
        r["settings"] = _daemon_stats(sock)["hobbit"]  # thresholds and policy in force
        return r


def _daemon_stats(sock: str) -> dict:
    from ..client.expert_client import ExpertClient

    c = ExpertClient(sock, None)
    try:
        return next(iter(c.stats()["models"].values()))
    finally:
        c.close()


def _clients(opts, path: str, cache: int, limit: int, n: int, tmp: str) -> dict:
    """n clients at once, each its own prompt (the first run's sizes): n llama.cpp
    processes; n hobbit clients sharing one hobbitd; n hobbit clients each with its own
    hobbitd and 1/n of the cache. Total tok/s = all decoded tokens / the wall time from
    the first client's first decode step to the last client's last."""
    from ..engine.ggml import physical_cores
    from .bench_ablation import daemon

    threads = opts.threads or max(1, physical_cores() // n)  # n processes share the cores, either engine

    def specs(engine, socks):
        return [
            {
                "engine": engine,
                "model": path,
                "socket": sock,
                "runs": opts.runs[:1],
                "threads": threads,
                "lookahead": 3,
                "skip": 5 * i,
            }
            for i, sock in enumerate(socks)
        ]

    def shared(cg):
        with daemon(path, cache, lossy_flags(path), tmp, preexec=cg.enter) as sock:
            return {"clients": _run_workers(specs("hobbit", [sock] * n), cg.enter), "daemons": [_daemon_stats(sock)]}

    def separate(cg):
        with contextlib.ExitStack() as stack:
            socks = [
                stack.enter_context(daemon(path, cache // n, lossy_flags(path), tmp, preexec=cg.enter))
                for _ in range(n)
            ]
            return {
                "clients": _run_workers(specs("hobbit", socks), cg.enter),
                "daemons": [_daemon_stats(sock) for sock in socks],
            }

    out = {
        "llamacpp": _limited(
            f"{n} llama.cpp processes, limited",
            limit,
            lambda cg: {"clients": _run_workers(specs("llamacpp", [None] * n), cg.enter)},
        ),
        "hobbit_shared": _limited(f"{n} hobbit clients on one hobbitd, limited", limit, shared),
        "hobbit_separate": _limited(f"{n} hobbit clients, one hobbitd each with 1/{n} of the cache", limit, separate),
    }
    for r in out.values():
        ok = [c["runs"][0] for c in r.get("clients", []) if "runs" in c]
        r["errors"] = [c["error"] for c in r.get("clients", [r]) if "error" in c]
        # all clients' decoded tokens over the wall time from the first start to the last end
        r["total_tok_s"] = (
            sum(c["decode"] for c in ok) / (max(c["decode_end"] for c in ok) - min(c["decode_start"] for c in ok))
            if len(ok) == n
            else None
        )
        if r.get("daemons"):
            req = sum(d["requested"] for d in r["daemons"])
            r["hit_ratio"] = sum(d["hits"] + d["waits"] for d in r["daemons"]) / req if req else None
    return out


def _sweep_point(opts, path: str, budget: str, expert_bytes: int, other_bytes: int, tmp: str) -> dict:
    """llama.cpp and hobbit (all techniques) limited to one budget, the first run's sizes."""
    nbytes = budget_bytes(budget, expert_bytes)
    limit = nbytes + opts.allowance
    point = {"budget": nbytes, "share_of_experts": nbytes / expert_bytes}
    first = opts.runs[:1]
    r = _limited(
        f"sweep {budget}: llama.cpp",
        limit,
        lambda cg: _run_worker({"engine": "llamacpp", "model": path, "runs": first, "threads": opts.threads}, cg.enter),
    )
    point["llamacpp_tok_s"] = r["runs"][0]["decode_tok_s"] if "runs" in r else None
    if nbytes - other_bytes > 0:
        single = OffloadOptions(**{**opts.__dict__, "runs": first})
        try:
            r = _limited(
                f"sweep {budget}: hobbit",
                limit,
                lambda cg: _hobbit_run(single, path, nbytes - other_bytes, lossy_flags(path), 3, cg, tmp),
            )
            point["hobbit_tok_s"] = r["runs"][0]["decode_tok_s"] if "runs" in r else None
        except HobbitError as e:  # e.g. a cache too small for one layer's experts
            point["hobbit_error"] = str(e)
    return point


def run(opts: OffloadOptions, progress: bool = True) -> dict:
    from ...loader.layout import client_resident_bytes, gguf_experts
    from ...loader.sizing import size_memory
    from .memcgroup import CgroupUnavailable, MemoryCgroup, drop_page_cache
    from ..engine.weights import open_model

    if opts.model and opts.quantize:
        raise InputError("--quantize makes the synthetic model; it cannot be given with MODEL")
    path = opts.model or synthetic_model(opts.quick, progress, opts.quantize)
    w = open_model(path)
    if not w.args.is_moe:
        raise InputError(f"{path}: not a mixture-of-experts model")
    src = gguf_experts(w)
    expert_bytes = src.total_bytes
    other_bytes = client_resident_bytes(w)
    budget = budget_bytes(opts.budget, expert_bytes)
    limit = budget + opts.allowance
    cache = size_memory(limit, other_bytes, allowance=opts.allowance).cache  # budget - other_bytes
    if cache < src.n_expert * src.format.slot_bytes:
        raise InputError(
            f"--budget {opts.budget} ({budget / MiB:.0f} MiB) leaves hobbitd no room for "
            f"one layer's experts after the {other_bytes / MiB:.0f} MiB of other weights"
        )
    report = {
        "model": path,
        "file_bytes": w.total_bytes,
        "expert_bytes": expert_bytes,
        "budget": budget,
        "allowance": opts.allowance,
        "cgroup_limit": limit,
        "hobbit_cache": cache,
        "runs": opts.runs,
        "results": {},
        "clients": {},
        "sweep": [],
        "not_measured": {},
    }
    res = report["results"]

    # 4. the compute ceiling: llama.cpp, no limit, the model in the page cache
    print("[offload] llama.cpp, no limit, model in memory ...", file=sys.stderr, flush=True)
    _warm(path)
    res["llamacpp_unlimited"] = _run_worker(
        {"engine": "llamacpp", "model": path, "runs": opts.runs, "threads": opts.threads}
    )
    # 1-3. the same limit for each
    try:
        drop_page_cache()
        MemoryCgroup(limit).close()
    except CgroupUnavailable as e:
        for k in ("llamacpp_limited", "hobbit_high_lru", "hobbit"):
            report["not_measured"][k] = str(e)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            res["llamacpp_limited"] = _limited(
                "llama.cpp in the memory limit",
                limit,
                lambda cg: _run_worker(
                    {"engine": "llamacpp", "model": path, "runs": opts.runs, "threads": opts.threads}, cg.enter
                ),
            )
            res["hobbit_high_lru"] = _limited(
                "hobbit, high precision only + LRU, in the limit",
                limit,
                lambda cg: _hobbit_run(
                    opts, path, cache, ["--policy", "lru", "--no-dynamic", "--no-prefetch"], 0, cg, tmp
                ),
            )
            res["hobbit"] = _limited(
                "hobbit, all techniques, in the limit",
                limit,
                lambda cg: _hobbit_run(opts, path, cache, lossy_flags(path), 3, cg, tmp),
            )
            for b in opts.sweep:  # the first run's sizes at each budget, for the plot
                report["sweep"].append(_sweep_point(opts, path, b, expert_bytes, other_bytes, tmp))
            for n in opts.clients:
                report["clients"][str(n)] = _clients(opts, path, cache, limit + (n - 1) * CLIENT_ALLOWANCE, n, tmp)
    report["io_floor"] = _io_floor(src, w.args.n_expert_used, cache, path)
    _summarise(report)
    return report


def _io_floor(src, top_k: int, cache: int, path: str) -> dict:
    """Tokens per second if every token read only the experts a cache of `cache` bytes
    cannot hold (uniform routing: that share of each token's top-k experts) at the best
    direct-I/O rate measured now: `bench io`'s two readers, hobbit's I/O engine (parallel
    reads) and dd (one stream), whichever is faster, median of two passes each."""
    from . import bench_io

    print("[offload] the I/O floor: direct-I/O bandwidth ...", file=sys.stderr, flush=True)
    io = bench_io.run(path, repeat=2)
    bw = max(io["engine_MBps"], io["dd_MBps"]) * 1e6
    expert_bytes = src.total_bytes
    per_token = top_k * expert_bytes / src.n_expert * max(0.0, 1 - cache / expert_bytes)
    return {
        "direct_io_Bps": bw,
        "engine_Bps": [r["engine_bytes"] / r["engine_s"] for r in io["rounds"]],
        "dd_Bps": [r["dd_bytes"] / r["dd_s"] for r in io["rounds"]],
        "bytes_per_token": per_token,
        "tok_s": bw / per_token if per_token else None,
    }


def _summarise(report: dict) -> None:
    """Ratios per run: hobbit / llama.cpp limited, share of the I/O floor, tokens equal."""
    res = report["results"]
    ref = res.get("llamacpp_unlimited", {}).get("runs")
    base = res.get("llamacpp_limited", {}).get("runs")
    floor = report["io_floor"]["tok_s"]
    for key, r in res.items():
        for i, run in enumerate(r.get("runs", [])):
            if ref:
                same = sum(a == b for a, b in zip(run["tokens"], ref[i]["tokens"]))
                run["tokens_equal_to_unlimited"] = same / len(run["tokens"])
            if base and key.startswith("hobbit"):
                run["x_llamacpp_limited"] = run["decode_tok_s"] / base[i]["decode_tok_s"]
            if floor and key.startswith("hobbit"):
                run["share_of_io_floor"] = run["decode_tok_s"] / floor


def budget_bytes(text: str, expert_bytes: int) -> int:
    """Bytes from "1G", "1073741824" or "25%" (of the model's expert bytes)."""
    from ...hobbitd.config import parse_size

    text = str(text).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            raise InputError(f"--budget {text}: not a percentage") from None
        if share <= 0:
            raise InputError(f"--budget {text}: must be positive")
        return int(share * expert_bytes)
    try:
        return parse_size(text)
    except InputError as e:
        raise InputError(f"--budget {text}: {e}") from None
