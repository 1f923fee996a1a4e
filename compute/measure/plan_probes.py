"""`hobbit-cli plan`'s probes of this machine (measure/plan.py says what they stand for):
read_rate, a few dozen of the model's experts read by direct I/O through hobbitd's I/O
engine; compute_probe, the engine timed on the model's own weights with ProbeExperts."""

from __future__ import annotations

import os
import random
import statistics
import threading
import time

import numpy as np

from ...loader.io_engine import DEMAND, IOEngine
from ...loader.layout import ExpertSource, Handle
from ...loader.precision import HIGH, Thresholds
from ...protocol.errors import HobbitError
from ..engine.experts import LocalExperts
from ..engine.model import WIDE, Model, RunOptions
from ..engine.weights import Weights

MiB = 1 << 20
PROBE_READ_BYTES = 512 * MiB  # read per batch size probed (at most PROBE_EXPERTS experts)
PROBE_EXPERTS = 96
PROBE_TOUCH_BYTES = 1 << 30  # expert bytes the compute probe may page in, at most
DECODE_STEPS = 6  # timed decode steps per thread count


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

    def holds(self, first: int, last: int) -> bool:
        return self.every_expert  # else the lookahead hints, as it does to hobbitd

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
    """(S, T, client threads, decode step s, prefetch recall, all threads, decode step s
    with them, prompt s), timed on the engine with ProbeExperts. The prompt: a chunk of T
    tokens at position 0 and one ending at n_prompt, their cost per token taken as linear
    in between (the attention's share grows with the position). Decode: the median of
    DECODE_STEPS steps at position n_prompt. The probe moves its sequence there
    (Model.skip_to): the KV slots in between hold zeros, which cost the attention the same
    work as a prompt's keys would."""
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
    opts = RunOptions(n_ctx=max(n_prompt, T) + D + 8)  # threads: the engine's through hobbitd
    model = Model(w, opts, experts=probe)

    def chunk_s(at: int) -> float:  # seconds per token of a T-token chunk at position `at`
        model.skip_to(at)
        t0 = time.perf_counter()
        model.forward(tokens[:T])
        return (time.perf_counter() - t0) / T

    def step_s() -> tuple[int, float]:  # (threads, median seconds of a decode step at n_prompt)
        model.skip_to(n_prompt)
        model.prefetch.clear()  # the lookahead's recall over these steps alone
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
        first = chunk_s(0)
        last = chunk_s(n_prompt - T) if n_prompt > T else first
        prompt = n_prompt * (first + last) / 2
        client = step_s()
        ahead = model.prefetch.summary().get(1)
        recall = ahead["recall"] if ahead else 0.0
        opts.n_threads = physical_cores()  # llama.cpp's: every core (the model reads opts per forward)
        model.forward([tokens[T]])  # its decode graph warm
        every = step_s()
    finally:
        model.close()
    return S, T, *client, recall, *every, prompt
