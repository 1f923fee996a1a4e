"""`hobbit-cli bench io`: the daemon's I/O engine against dd, side by side in one run.

Reads every expert of a MoE GGUF through the IOEngine (direct I/O into a shared-memory
slot ring, as the daemon does), and the whole file with
`dd if=MODEL of=/dev/null bs=4M iflag=direct`; alternates the two `repeat` times and
reports the median throughput of each and their ratio.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import threading
import time

from ...loader.io_engine import DEMAND, IOEngine
from ...loader.layout import gguf_experts
from ...loader.shm import Segment, new_name
from ...protocol.errors import HobbitError
from ..engine.weights import open_model

RING = 64  # slots the reads cycle through (the memory the benchmark needs: RING slots)


def engine_pass(src, engine: IOEngine, seg: Segment) -> tuple[int, float]:
    """Read every expert once; returns (bytes, seconds)."""
    fmt = src.format
    inflight = threading.Semaphore(RING)
    errors = []
    done_all = threading.Event()
    total = src.n_layer * src.n_expert
    count = [0]
    lock = threading.Lock()

    def done(job, err):
        if err:
            errors.append(err)
        inflight.release()
        with lock:
            count[0] += 1
            if count[0] == total:
                done_all.set()

    t0 = time.perf_counter()
    for i in range(total):
        layer, e = divmod(i, src.n_expert)
        inflight.acquire()
        base = seg.address + (i % RING) * fmt.slot_bytes
        segs = [
            (src.file_of(layer, p), off, n, base + o)
            for p, ((off, n), o) in enumerate(zip(src.ranges(layer, e), fmt.offsets(layer)))
        ]
        engine.submit(("bench", i), segs, DEMAND, done)
    done_all.wait()
    dt = time.perf_counter() - t0
    if errors:
        raise HobbitError(f"I/O engine read failed: {errors[0]}")
    return src.total_bytes, dt


def dd_pass(path: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "iflag=direct"], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise HobbitError(f"dd failed on {path}: {r.stderr.strip().splitlines()[-1] if r.stderr else r.returncode}")
    m = re.search(r"^(\d+) bytes", r.stderr, re.M)
    return int(m.group(1)) if m else 0, dt


def run(model: str, repeat: int = 3, threads: int = 4) -> dict:
    w = open_model(model)
    if not w.args.is_moe:
        raise HobbitError(f"{model}: a dense model has no experts to read")
    src = gguf_experts(w)
    seg = Segment(new_name("hobbit-bench"), RING * src.format.slot_bytes, create=True)
    engine = IOEngine(threads, direct=True)
    rounds = []
    try:
        for _ in range(repeat):
            nb_e, t_e = engine_pass(src, engine, seg)
            nb_d, t_d = dd_pass(model)
            rounds.append({"engine_bytes": nb_e, "engine_s": t_e, "dd_bytes": nb_d, "dd_s": t_d})
        direct = engine.direct_reads == engine.reads
        reads = engine.reads
    finally:
        engine.close()
        seg.close()
    eng = statistics.median(r["engine_bytes"] / r["engine_s"] for r in rounds) / 1e6
    dd = statistics.median(r["dd_bytes"] / r["dd_s"] for r in rounds) / 1e6
    return {
        "model": model,
        "expert_bytes": src.total_bytes,
        "experts": src.n_layer * src.n_expert,
        "reads_per_expert": reads / (repeat * src.n_layer * src.n_expert),
        "io_threads": threads,
        "engine_MBps": eng,
        "dd_MBps": dd,
        "ratio": eng / dd if dd else 0.0,
        "engine_direct_io": direct,
        "repeat": repeat,
        "rounds": rounds,
        "method": (
            "engine: every expert of the GGUF read once through hobbit's IOEngine (its 3 "
            "parts by direct I/O into a ring of shared-memory slots, parts of queued "
            f"experts that touch in the file merged into one read, {threads} reader threads); "
            "dd: `dd if=MODEL of=/dev/null bs=4M iflag=direct` over the "
            f"whole file; alternated {repeat} times, median MB/s (1 MB = 1e6 bytes)"
        ),
    }


def print_table(r: dict) -> None:
    print(f"bench io: {r['model']} ({r['expert_bytes'] / 1e6:.0f} MB of experts, {r['experts']} experts)")
    print(f"  {'reader':34s} {'MB/s':>8s}")
    print(
        f"  {'hobbit I/O engine (O_DIRECT)':34s} {r['engine_MBps']:8.0f}   "
        f"({r['reads_per_expert']:.2f} reads per expert)"
    )
    print(f"  {'dd bs=4M iflag=direct':34s} {r['dd_MBps']:8.0f}")
    print(
        f"  ratio engine/dd: {r['ratio']:.2f}"
        + ("" if r["engine_direct_io"] else "  (the filesystem refused O_DIRECT: buffered reads)")
    )
    print(f"  method: {r['method']}")
