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

Forecast (routing assumed uniform: the hit rate is the share of a layer's experts the
cache holds; the models measured in BENCHMARKS.md route near uniformly):
  decode step = compute + the misses' bytes / the read rate at that batch (measured:
  little overlap in exact mode); a prompt: each batch of n_batch tokens reads every
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
import random
import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np

from ...loader.io_engine import DEMAND, IOEngine
from ...loader.layout import ExpertSource, Handle, client_resident_bytes, gguf_experts
from ...loader.precision import HIGH, Thresholds
from ...loader.sizing import Sizing
from ...protocol.errors import HobbitError, InputError
from ..engine.attention import KV_PAD
from ..engine.experts import LocalExperts
from ..engine.model import WIDE, Model, RunOptions
from ..engine.weights import ModelArgs, Weights, open_model

MiB = 1 << 20
PROBE_READ_BYTES = 512 * MiB  # read per batch size probed (at most PROBE_EXPERTS experts)
PROBE_EXPERTS = 96
PROBE_TOUCH_BYTES = 1 << 30  # expert bytes the compute probe may page in, at most
DECODE_STEPS = 6  # timed decode steps per thread count
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
    all_threads: int  # every core (llama.cpp's threads)
    decode_all_s: float  # the same step with every core
    prompt_s: float  # compute of the whole prompt
    seconds: float  # the probes' wall time


@dataclass(frozen=True)
class Forecast:
    cache_slots: int  # high-precision slots (exact mode)
    hit_share: float  # of a layer's experts the cache holds
    bytes_per_token: float  # read in a decode step
    decode_read_s: float  # a decode step's wait for its reads
    decode_compute_s: float  # a decode step's compute, at the prompt's length
    decode_tok_s: float
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
    per_token = K * (1 - hit) * sum(layer_bytes)
    read_s = per_token / p.decode_read_Bps
    step_s = p.decode_s  # decoding after the prompt
    decode_tok_s = 1 / (step_s + read_s)
    lossy_bytes, lossy_note = _lossy_reads(w.path, sizing.cache, src, K)
    lossy = None if lossy_bytes is None else 1 / (step_s + lossy_bytes / p.decode_read_Bps)
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
        step_s,
        decode_tok_s,
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


# ---- probes --------------------------------------------------------------------------------


def read_rate(src: ExpertSource, batch: int, adjacent: bool, threads: int = 4) -> tuple[float, int]:
    """(bytes/s, experts read): experts read through hobbitd's I/O engine (direct I/O,
    `threads` readers as hobbitd's default), `batch` at a time, each batch waited for
    before the next, as the daemon serves one layer's misses. adjacent: a batch is
    neighbouring experts of one layer (a prompt's layer uses nearly all of them, and the
    engine merges neighbours' reads), else random experts of the model (a decode step's)."""
    from ...loader.shm import Segment, new_name

    fmt = src.format
    mean = src.total_bytes / (src.n_layer * src.n_expert)
    batch = min(batch, src.n_expert)
    # batches, the first untimed: the daemon's reader threads have their merge buffers
    n = 1 + max(2, min(PROBE_EXPERTS, int(PROBE_READ_BYTES // mean)) // batch)
    rng = random.Random(os.getpid() ^ time.time_ns())  # a fresh sample: no cache below us helps
    if adjacent:
        groups = []
        for _ in range(n):
            layer, first = rng.randrange(src.n_layer), rng.randrange(src.n_expert - batch + 1)
            groups.append([(layer, e) for e in range(first, first + batch)])
    else:
        picks = rng.sample(range(src.n_layer * src.n_expert), min(n * batch, src.n_layer * src.n_expert))
        picks = [divmod(i, src.n_expert) for i in picks]
        groups = [picks[i : i + batch] for i in range(0, len(picks), batch)]
    seg = Segment(new_name("hobbit-plan"), batch * fmt.slot_bytes, create=True)
    io = IOEngine(threads, direct=True)
    timed, errors = [], []  # (bytes, seconds) of every batch after the first
    try:
        for g, group in enumerate(groups):
            t0, nbytes = time.perf_counter(), 0
            left, done_all, lock = [len(group)], threading.Event(), threading.Lock()

            def done(job, err, left=left, done_all=done_all, lock=lock):
                if err:
                    errors.append(err)
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done_all.set()

            for i, (layer, e) in enumerate(group):
                base = seg.address + i * fmt.slot_bytes
                segs = [
                    (src.file_of(layer, p), off, nb, base + o)
                    for p, ((off, nb), o) in enumerate(zip(src.ranges(layer, e), fmt.offsets(layer)))
                ]
                io.submit(("plan", layer, e), segs, DEMAND, done)
                nbytes += src.expert_bytes(layer)
            done_all.wait()
            if g:
                timed.append((nbytes, time.perf_counter() - t0))
    finally:
        io.close()
        seg.close()
    if errors:
        raise HobbitError(f"{src.path}: reading experts failed: {errors[0]}")
    # the median batch's time: a few batches slowed by another process's I/O or CPU (a
    # shared machine) do not set the forecast, which is for the machine as it runs alone
    seconds = statistics.median(t for _, t in timed) * len(timed)
    return sum(b for b, _ in timed) / seconds, sum(len(g) for g in groups[1:])


class ProbeExperts(LocalExperts):
    """LocalExperts whose layer computes each routed expert e with expert e mod S of that
    layer: the work of the real expert (same shapes, same types) on S experts' pages. It
    stands in for hobbitd (remote), so the model takes a client's thread count."""

    remote = True

    def __init__(self, weights, n_slots: int, every_expert: bool):
        """every_expert: hobbitd's cache holds every expert, so the client computes each
        forward in one graph on them (ExpertProvider.resident), as it will then."""
        super().__init__(weights, None, Thresholds(dynamic=False))
        self.n_slots = n_slots
        src = self.sources[HIGH]
        self.table = np.arange(src.n_expert, dtype=np.int32)[None, :].repeat(src.n_layer, 0) % n_slots
        self.every_expert = every_expert

    def resident(self):
        return self.table if self.every_expert else None

    def fetch(self, layer: int, experts, scores, seq: int = 0, token: int = 0, n_tokens: int = 1) -> list:
        return [Handle(HIGH, int(e) % self.n_slots) for e in experts]

    def fetch_pairs(self, layer: int, sel, scores, fetched: dict) -> list:
        return [[Handle(HIGH, int(e) % self.n_slots) for e in row] for row in sel]

    def touch(self) -> None:
        """Read the S experts' pages of every layer into the page cache (untimed)."""
        src = self.sources[HIGH]
        for il in range(src.n_layer):
            for p in range(len(src.format.parts)):
                start, end = src.part_base[il][p], src.part_base[il][p] + self.n_slots * src.part_stride[il][p]
                fd = os.open(src.file_of(il, p), os.O_RDONLY)
                try:
                    for at in range(start, end, 1 << 24):
                        os.pread(fd, min(1 << 24, end - at), at)
                finally:
                    os.close(fd)


def compute_probe(w: Weights, src: ExpertSource, n_prompt: int, every_expert: bool) -> tuple:
    """(S, T, client threads, decode step s, all threads, decode step s with them, prompt
    s), timed on the engine with ProbeExperts. The prompt: a chunk of T tokens at position
    0 and one ending at n_prompt, their cost per token taken as linear in between (the
    attention's share grows with the position). Decode: the median of DECODE_STEPS steps
    at position n_prompt. The probe moves its sequence there by setting Model.n_past, as a
    chat reusing a prefix sets it back: the KV slots in between hold zeros, which cost the
    attention the same work as a prompt's keys would. A model with sliding-window layers
    cannot jump (their ring must hold the window before the position): it computes the
    whole prompt in chunks of T, timed as the prompt's compute."""
    from ..engine.ggml import physical_cores

    a = w.args
    K, E = a.n_expert_used, src.n_expert
    n_batch = RunOptions().n_batch
    mean = src.total_bytes / (src.n_layer * E)
    # S slots a layer; a chunk gives each as many rows as a full batch gives an expert
    S = max(K, min(E, int(PROBE_TOUCH_BYTES // (mean * src.n_layer))))
    T = max(WIDE, min(n_batch, -(-n_batch * S // E)))
    D = DECODE_STEPS
    tokens = [1 + (i * 7919) % (a.n_vocab - 1) for i in range(max(n_prompt, T) + D + 2)]
    probe = ProbeExperts(w, S, every_expert)
    probe.touch()
    opts = RunOptions(n_ctx=max(n_prompt, T) + D + 8, lookahead=0)  # threads: the engine's through hobbitd
    model = Model(w, opts, experts=probe)

    def chunk_s(at: int) -> float:  # seconds per token of a T-token chunk at position `at`
        model.n_past = at
        t0 = time.perf_counter()
        model.forward(tokens[:T])
        return (time.perf_counter() - t0) / T

    def step_s() -> tuple[int, float]:  # (threads, median seconds of a decode step at n_prompt)
        model.n_past = n_prompt
        times = []
        for t in tokens[T : T + D]:
            t0 = time.perf_counter()
            model.forward([t])
            times.append(time.perf_counter() - t0)
        return model.n_threads, sorted(times)[D // 2]

    try:
        model.forward(tokens[:T])  # warm: graphs built, pages in
        for t in tokens[T : T + 2]:
            model.forward([t])
        if model.resumable(max(0, n_prompt - T)):
            first = chunk_s(0)
            last = chunk_s(max(0, n_prompt - T)) if n_prompt > T else first
            prompt = n_prompt * (first + last) / 2
        else:  # a sliding window's ring holds only what was computed: the whole prompt, then
            model.reset()
            t0 = time.perf_counter()
            for at in range(0, n_prompt, T):
                model.forward(tokens[at : min(at + T, n_prompt)])
            prompt = time.perf_counter() - t0
        client = step_s()
        opts.n_threads = physical_cores()  # llama.cpp's: every core (the model reads opts per forward)
        model.forward([tokens[T]])  # its decode graph warm
        every = step_s()
    finally:
        model.close()
    return S, T, *client, *every, prompt


def plan_json(plan: Plan) -> dict:
    """The plan as JSON-ready data (--json)."""
    from dataclasses import asdict

    d = asdict(plan)
    d["sizing"]["shm_bound"] = plan.sizing.shm_bound
    return d
