"""`hobbit-cli plan MODEL`: what hobbit will do with a model in a given memory, forecast
from the file's headers and a few seconds of probes on this machine, without root.

Memory: hobbitd's `--cache-size auto` rule (hobbitd/config.cache_sizing, loader/sizing.py)
splits the memory into the processes' allowance, the client's resident weights and
hobbitd's cache; hobbitd's own planner (loader/served.plan_cache) cuts the cache into slots.

Probes:
  - reads: a few dozen random experts of the model through hobbitd's I/O engine (direct
    I/O, its reader threads), in batches of as many as a decode step misses per layer (the
    daemon reads one layer's misses at once, then the client computes), and in larger
    batches as a prompt's layers ask; bytes over the median batch's seconds (a few batches
    slowed by a busy neighbour do not set the rate), per batch size;
  - compute: the engine in this process on the model's own weights (engine/model.Model)
    with ProbeExperts, which computes each routed expert with one of the first S experts
    of its layer (same shapes and types, so the same work): the file's pages read are
    S experts a layer, not the model. Decode steps at the prompt's end with the client's
    threads through hobbitd (one core fewer) and with every core (llama.cpp's); prompt
    chunks of enough tokens that each expert gets as many rows as in a 512-token batch,
    at the prompt's start and at its end (compute_probe).

    The decode steps run with the lookahead on (hobbitd's exact mode prefetches too): how
    many of a layer's experts the lookahead predicted one layer ahead (its recall) is
    measured there, on the probe's own routing.

Forecast, of hobbitd as it runs by default (prefetch on; exact until calibrated), routing
assumed uniform (the hit rate is the share of a layer's experts the cache holds; the models
measured in BENCHMARKS.md route near uniformly):
  decode step = compute + the misses' bytes / the read rate at that batch, less what the
  prefetch hides. At best: while segment m+1 computes (a step's compute over its L+1
  segments), hobbitd reads layer m+1's predicted experts, up to what flash delivers in that
  time; so each of the L-1 layers after the first hides recall x min(its reads, a
  segment's compute). Measured, hobbitd hides 0.3 to 0.9 of that, about half (BENCHMARKS.md),
  so the forecast is the middle of the range from hiding none to hiding all, and says the
  range. A cache that holds every expert reads none while
  decoding (hobbitd preloads such a model). A prompt: each batch of n_batch tokens reads every
  distinct expert it uses that the cache does not hold (LRU over a sweep of every layer
  keeps none, unless the cache holds them all: then each is read once), plus the compute.
  Lossy (a calibrated model): the misses of hobbitd's high and low slots, loaded high,
  low or skipped in the shares calibration's replay found at its thresholds.
  llama.cpp (mmap; the page cache gets the memory less its process, LLAMA_OWN, and its
  KV cache): the file fits: the all-core compute; else the page cache holds a uniform
  share of the file, and a token reads the rest of what it touches (the non-expert
  weights, its experts' parts), a missed part at least the disk's readahead, which the
  kernel reads around an mmap page fault (read_ahead_kb: 128 KiB by default, 8 MiB on
  the disk BENCHMARKS.md measured on).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from ...loader.layout import ExpertSource, client_resident_bytes, gguf_experts
from ...loader.precision import HIGH
from ...loader.sizing import Sizing
from ...protocol.errors import InputError
from ..engine.attention import KV_PAD
from ..engine.model import RunOptions
from ..engine.weights import ModelArgs, Weights, open_model
from .plan_probes import PROBE_EXPERTS, compute_probe, read_rate

MiB = 1 << 20
# llama.cpp's process besides the file's pages and its KV cache (measured: 80-85 MB RssAnon
# of llama-cpp-python decoding the two files of BENCHMARKS.md's plan table)
LLAMA_OWN = 128 * MiB


@dataclass(frozen=True)
class PlanOptions:
    model: str
    memory: int | None = None  # bytes; None: what is available now
    prompt: int = 512  # prompt tokens for the time to first token
    ctx: int = 2048  # context (KV cache) in tokens


@dataclass(frozen=True)
class Probes:
    """What this machine measured (seconds, bytes per second)."""

    decode_batch: int  # experts read at once in the decode read probe (random ones)
    decode_read_Bps: float
    prompt_batch: int  # in the prompt read probe (neighbours in one layer)
    prompt_read_Bps: float
    experts_read: int
    probe_slots: int  # S: experts a layer the compute probe computes with
    prompt_tokens: int  # T: the compute probe's prompt chunk
    client_threads: int  # a client's threads through hobbitd for a decode step
    decode_s: float  # a decode step's compute at the prompt's end, with them
    prefetch_recall: float  # of a layer's experts the lookahead predicted a layer ahead (decode)
    all_threads: int  # every core (llama.cpp's threads)
    decode_all_s: float  # the same step with every core
    prompt_s: float  # compute of the whole prompt
    seconds: float  # the probes' wall time


@dataclass(frozen=True)
class Forecast:
    cache_slots: int  # high-precision slots (exact mode)
    hit_share: float  # of a layer's experts the cache holds
    bytes_per_token: float  # read in a decode step
    decode_read_s: float  # a decode step's reads, at the probed rate
    decode_hidden_s: float  # of them, the most the prefetch can read while the client computes
    decode_compute_s: float  # a decode step's compute, at the prompt's length
    decode_tok_s: float  # the prefetch hiding half of decode_hidden_s
    decode_tok_s_range: tuple[float, float]  # hiding none of it, all of it
    lossy_tok_s: float | None  # None: not calibrated (hobbitd runs exact)
    lossy_note: str
    prompt_read_bytes: float
    prompt_read_s: float
    prompt_compute_s: float
    ttft_s: float
    llama_fits: bool  # the whole file fits the page cache in this memory
    llama_tok_s: float
    llama_note: str


@dataclass(frozen=True)
class Plan:
    model: str
    file_bytes: int
    expert_bytes: int
    n_layer: int  # MoE layers
    n_expert: int
    top_k: int
    sizing: Sizing
    kv_bytes: int  # the client's KV cache at ctx tokens
    ctx: int
    prompt: int
    routing: str
    probes: Probes
    forecast: Forecast


def make_plan(opts: PlanOptions, progress=None) -> Plan:
    """The plan for opts.model; HobbitError for a file that is not a MoE GGUF, a memory
    that leaves hobbitd no cache, or a cache too small for one layer's experts."""
    from ...hobbitd.config import cache_sizing

    if opts.prompt < 1 or opts.ctx < 1:
        raise InputError("--prompt and --ctx must be positive")
    if opts.prompt >= opts.ctx:
        raise InputError(f"a prompt of {opts.prompt} tokens leaves no room in a context of {opts.ctx} (raise --ctx)")
    w = open_model(opts.model)
    if not w.args.is_moe:
        raise InputError(f"{opts.model}: a dense model has no experts to offload (it runs in memory as a whole)")
    src = gguf_experts(w)
    sizing = cache_sizing(opts.memory, [opts.model])
    sizing.check("--memory" if opts.memory is not None else "the memory available now")
    slots = _exact_slots(opts.model, sizing.cache)
    a = w.args
    say = progress or (lambda text: None)
    t0 = time.perf_counter()
    hit = min(1.0, slots / (src.n_layer * src.n_expert))
    misses = a.n_expert_used * (1 - hit)  # a layer's misses in a decode step
    decode_batch = max(1, round(misses))
    prompt_batch = min(PROBE_EXPERTS // 2, round(used_experts(a.n_expert_used, src.n_expert, RunOptions().n_batch)))
    say("probing direct-I/O reads ...")
    decode_bps, n1 = read_rate(src, decode_batch, adjacent=False)
    prompt_bps, n2 = read_rate(src, prompt_batch, adjacent=True)
    say("probing compute ...")
    comp = compute_probe(w, src, opts.prompt, hit >= 1)
    probes = Probes(decode_batch, decode_bps, prompt_batch, prompt_bps, n1 + n2, *comp, time.perf_counter() - t0)
    return Plan(
        opts.model,
        w.total_bytes,
        src.total_bytes,
        src.n_layer,
        src.n_expert,
        a.n_expert_used,
        sizing,
        kv_cache_bytes(a, opts.ctx, RunOptions().n_batch),
        opts.ctx,
        opts.prompt,
        "uniform (assumed): the hit rate is the share of each layer's experts the cache holds",
        probes,
        forecast(w, src, sizing, slots, probes, opts.prompt),
    )


def used_experts(K: int, E: int, T: int) -> float:
    """Distinct experts a layer uses for T tokens, K each of E, routing uniform."""
    return E * (1 - (1 - K / E) ** T)


def _exact_slots(path: str, cache: int) -> int:
    """High-precision slots hobbitd's planner gives the model in exact mode (`--policy lru
    --no-dynamic`: no low-precision region), capped at the model's experts."""
    from ...hobbitd.config import DaemonConfig
    from ...loader.served import ModelOptions, model_name, open_served, plan_cache

    name = model_name(path)
    mo = open_served(path, name, ModelOptions(dynamic=False, policy="lru"))
    plan, _ = plan_cache({name: mo}, cache, DaemonConfig().low_share)
    return sum(r.n_slots for r in plan if r.precision == HIGH)


def forecast(w: Weights, src: ExpertSource, sizing: Sizing, slots: int, p: Probes, n_prompt: int) -> Forecast:
    """The figures the module docstring derives from the probes."""
    a = w.args
    K, E = a.n_expert_used, src.n_expert
    hit = min(1.0, slots / (src.n_layer * E))
    layer_bytes = [src.expert_bytes(il) for il in range(src.n_layer)]
    per_token = K * (1 - hit) * sum(layer_bytes)  # a cache holding them all was read at start
    read_s = per_token / p.decode_read_Bps
    step_s = p.decode_s  # decoding after the prompt
    best_s = prefetched_s(read_s, step_s, src.n_layer, p.prefetch_recall)
    decode_tok_s = 1 / (step_s + read_s - best_s / 2)
    decode_range = (1 / (step_s + read_s), 1 / (step_s + read_s - best_s))
    lossy_bytes, lossy_note = _lossy_reads(w.path, sizing.cache, src, K)
    lossy = None
    if lossy_bytes is not None:
        lossy_read_s = lossy_bytes / p.decode_read_Bps
        lossy = 1 / (step_s + lossy_read_s - prefetched_s(lossy_read_s, step_s, src.n_layer, p.prefetch_recall) / 2)
    n_batch = RunOptions().n_batch
    if hit >= 1:  # each expert read once, at its first use
        prompt_uses = used_experts(K, E, n_prompt)
    else:  # every batch reads every expert it uses: LRU over a sweep of the layers keeps none
        prompt_uses = sum(used_experts(K, E, min(n_batch, n_prompt - s)) for s in range(0, n_prompt, n_batch))
    prompt_reads = prompt_uses * sum(layer_bytes)
    prompt_read_s = prompt_reads / p.prompt_read_Bps
    prompt_compute_s = p.prompt_s
    # llama.cpp: the file in the page cache of what the memory leaves its one process
    room = sizing.memory - LLAMA_OWN - kv_cache_bytes(a, n_prompt + 1, n_batch)
    fits = room >= w.total_bytes
    if fits:
        llama = 1 / p.decode_all_s
        note = "the file fits the page cache: compute only, every core (probed)"
    else:  # a page fault reads the device's readahead around it: a missed part costs that much at least
        share = max(0, room) / w.total_bytes  # of the file in the page cache, uniformly
        ra = readahead_bytes(w.path)
        parts = sum(max(n, ra) for il in range(src.n_layer) for n in src.format.part_nbytes(il))
        missing = (1 - share) * (K * parts + client_resident_bytes(w))
        llama = 1 / (p.decode_all_s + missing / p.decode_read_Bps)
        note = (
            f"mmap; the page cache holds {share:.0%} of the file; a token reads {missing / 1e6:.0f} MB: the missed "
            f"share of the other weights and of its experts' parts, each at least the {ra >> 10} KiB the kernel "
            "reads around a page fault (the disk's readahead)"
        )
    return Forecast(
        slots,
        hit,
        per_token,
        read_s,
        best_s,
        step_s,
        decode_tok_s,
        decode_range,
        lossy,
        lossy_note,
        prompt_reads,
        prompt_read_s,
        prompt_compute_s,
        prompt_read_s + prompt_compute_s,
        fits,
        llama,
        note,
    )


def prefetched_s(read_s: float, compute_s: float, n_layer: int, recall: float) -> float:
    """Of a decode step's read_s, the seconds the prefetch hides behind its compute_s (the
    module docstring): each of the L-1 layers after the first hides the predicted share of
    its reads, or of what flash reads in one segment's compute (hobbitd's prefetch budget,
    which the wrong predictions spend too), whichever is less."""
    if n_layer < 2:
        return 0.0
    return (n_layer - 1) * recall * min(read_s / n_layer, compute_s / (n_layer + 1))


def _lossy_reads(path: str, cache: int, src: ExpertSource, K: int) -> tuple[float | None, str]:
    """(bytes a decode step reads in the calibrated lossy mode, how), or (None, why not)
    where hobbitd runs exact. hobbitd's planner gives the cache's high and low slots; a
    miss loads high, low or nothing in the shares the calibration's replay of its text
    found at the chosen thresholds (its threshold_grid row); hits as the slots' share of
    the experts, routing uniform."""
    from ...hobbitd.config import DaemonConfig
    from ...loader.calibration import load_calibration
    from ...loader.served import ModelOptions, model_name, open_served, plan_cache

    name = model_name(path)
    mo = open_served(path, name, ModelOptions())
    if mo.low is None:
        return None, "no low-precision companion (hobbit-cli convert MODEL): hobbitd runs exact"
    calib = load_calibration(mo.low.path) if mo.calibrated else None
    if calib is None:
        return None, "not calibrated (hobbit-cli calibrate MODEL): hobbitd runs exact"
    if mo.thresholds.exact:
        return None, "calibrated: no lossy mode kept within the accuracy bound, hobbitd runs exact"
    row = [r for r in calib.get("threshold_grid", []) if (r["t1"], r["t2"]) == (calib["t1"], calib["t2"])]
    misses = row and row[0]["high_miss"] + row[0]["low_miss"] + row[0]["skipped"]
    if not misses:
        return None, "the calibration recorded no misses at its thresholds: no split to forecast with"
    plan, _ = plan_cache({name: mo}, cache, DaemonConfig().low_share)
    held = sum(r.n_slots for r in plan)
    miss = K * (1 - min(1.0, held / (src.n_layer * src.n_expert)))  # a layer's misses a step
    high, low = row[0]["high_miss"] / misses, row[0]["low_miss"] / misses
    per_token = miss * sum(high * src.expert_bytes(il) + low * mo.low.expert_bytes(il) for il in range(src.n_layer))
    return per_token, (
        f"T1 {calib['t1']:.2f} T2 {calib['t2']:.2f}: {per_token / 1e6:.0f} MB read a token; misses "
        f"{high:.0%} high, {low:.0%} low, {row[0]['skipped'] / misses:.0%} skipped, as calibration replayed them"
    )


def readahead_bytes(path: str) -> int:
    """The readahead of the block device holding `path` (the window the kernel reads
    around an mmap page fault); 128 KiB, the kernel's default, where it cannot be read."""
    st = os.stat(path)
    dev = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    for q in (f"{dev}/queue/read_ahead_kb", f"{dev}/../queue/read_ahead_kb"):  # a disk, a partition
        try:
            with open(q) as f:
                return int(f.read()) << 10
        except (OSError, ValueError):
            continue
    return 128 << 10


def kv_cache_bytes(a: ModelArgs, n_ctx: int, n_batch: int) -> int:
    """The engine's KV cache (engine/attention.KVCache): per layer n_ctx F16 slots of K and
    V (MLA: one latent), sliding-window layers a ring of the window plus a batch."""
    ring = min(n_ctx, -(-(a.n_swa + n_batch) // KV_PAD) * KV_PAD) if a.n_swa else 0
    per_cell = a.n_embd_kv * 2 * (1 if a.kv_lora_rank else 2)
    return sum((ring if a.is_swa(il) else n_ctx) * per_cell for il in range(a.n_layer))


def plan_json(plan: Plan) -> dict:
    """The plan as JSON-ready data (--json)."""
    from dataclasses import asdict

    d = asdict(plan)
    d["sizing"]["shm_bound"] = plan.sizing.shm_bound
    return d
