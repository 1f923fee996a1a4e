"""One MoE layer's FFN (moe_ffn: mul_mat_id gate/up, swiglu, down) on a GGUF's real
experts, in the file's layout and in ggml's CPU repacked layout, side by side.

    python -m hobbit.compute.measure.bench_repack MODEL [--layer L] [--types Q4_K,Q4_0,..]

Both layouts sit in anonymous memory of this process (every expert cached): what differs
is the kernels only. "file" is the layer's own types; another type is the layer's first
`--distinct` experts dequantised, quantised to it and repeated to the layer's count (the
bytes read per token are the same as with distinct experts). Each sample computes
`--iters` graphs, each on a new random top-K per token; samples of the two layouts
alternate, and the ratio is the median of the paired samples' ratios. The whole model,
with llama.cpp beside: bench_repack_model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

from ...loader.gguf_file import open_gguf
from ..engine import ggml
from ..engine.graph import Arena, Graph, Timing
from ..engine.moe import ExpertTensors, moe_ffn
from ..engine.repack import Repacker

PARTS = ("gate", "up", "down")
ALIGN = 64


def aligned(nbytes: int) -> np.ndarray:
    """nbytes of anonymous memory starting on a 64-byte boundary."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip : skip + nbytes]


class Part:
    """One part's stacked experts: type, shape (D or F, F or D) in ggml order without the
    expert axis, and the bytes (E, nbytes per expert) in the file's layout."""

    def __init__(self, type_: int, shape: tuple, data: np.ndarray):
        self.type, self.shape, self.data = type_, shape, data

    @property
    def n(self) -> int:
        return self.shape[0] * self.shape[1]


def file_parts(path: str, layer: int) -> list[Part]:
    """The layer's gate, up, down experts as the file has them, copied to anonymous memory."""
    f = open_gguf(path)
    out = []
    for p in PARTS:
        t = f.tensors[f"blk.{layer}.ffn_{p}_exps.weight"]
        E = t.shape[2]
        data = aligned(t.nbytes).reshape(E, -1)
        data[:] = f.data(t.name).reshape(E, -1)
        out.append(Part(t.type, t.shape[:2], data))
    return out


def converted(parts: list[Part], type_: int, distinct: int) -> list[Part]:
    """parts in ggml type type_: the first `distinct` experts re-quantised, repeated."""
    out = []
    for p in parts:
        E = p.data.shape[0]
        q = [ggml.quantize(type_, ggml.dequantize(p.type, p.data[e], p.n), p.shape[0]) for e in range(distinct)]
        data = aligned(E * q[0].size).reshape(E, -1)
        for e in range(E):
            data[e] = q[e % distinct]
        out.append(Part(type_, p.shape, data))
    return out


def repacked(rp: Repacker, parts: list[Part]) -> tuple[list[np.ndarray | None], float]:
    """Each part's experts repacked one by one (None: ggml repacks no such part), and the
    seconds per expert of the repacking (all parts of one expert)."""
    out, seconds = [], 0.0
    E = parts[0].data.shape[0]
    for p in parts:
        dst = aligned(p.data.size).reshape(p.data.shape)
        dst[:] = 0  # faulted in: a slot's memory is, when an expert is read into it
        t0 = time.perf_counter()
        ok = all(rp.repack(p.type, p.shape, p.data[e].ctypes.data, dst[e].ctypes.data) for e in range(E))
        seconds += time.perf_counter() - t0
        out.append(dst if ok else None)
    return out, seconds / E


def stacked(wctx: ggml.Context, rp: Repacker, parts: list[Part], datas: list) -> ExpertTensors:
    """The parts as [.., .., E] tensors over datas, each in the file's layout
    (datas[i] None: parts[i].data) or repacked, computed with the repacked kernels."""
    ts = []
    for p, d in zip(parts, datas):
        t = wctx.tensor(p.type, (*p.shape, p.data.shape[0]), None, (p.data if d is None else d).ctypes.data)
        if d is not None:
            assert rp.mark(t)
        ts.append(t)
    return ExpertTensors(*ts)


def moe_graph(arena: Arena, experts: ExpertTensors, D: int, K: int, T: int) -> Graph:
    g = Graph.new()
    h = g.input("h", ggml.F32, (D, T))
    sel = g.input("sel", ggml.I32, (K, T))
    w = g.input("w", ggml.F32, (K, T))
    g.output("y", moe_ffn(g.c, h, experts, sel, w))
    g.allocate(arena)
    return g


def feeds(rng, E: int, D: int, K: int, T: int) -> dict:
    sel = np.argsort(rng.random((T, E)), axis=1)[:, :K].astype(np.int32)  # (T, K) distinct
    w = rng.random((T, K)).astype(np.float32)
    return {"h": rng.standard_normal((T, D)).astype(np.float32), "sel": sel, "w": w / w.sum(1, keepdims=True)}


def compare(backend, graphs: dict, E: int, D: int, K: int, T: int, threads: int, samples: int, iters: int) -> dict:
    """Seconds per graph of each layout (median of samples) and their paired ratio."""
    ggml.lib.ggml_backend_cpu_set_n_threads(backend, threads)
    timing = Timing()
    per: dict[str, list[float]] = {k: [] for k in graphs}
    for s in range(samples):
        for name, g in graphs.items():
            rng = np.random.default_rng(s)  # the same experts for both layouts
            t0 = time.perf_counter()
            for _ in range(iters):
                g.compute(backend, feeds(rng, E, D, K, T), timing)
            per[name].append((time.perf_counter() - t0) / iters)
    ratios = [f / r for f, r in zip(per["file"], per["repacked"])]
    return {
        "file_ms": 1e3 * statistics.median(per["file"]),
        "repacked_ms": 1e3 * statistics.median(per["repacked"]),
        "speedup": statistics.median(ratios),
    }


def agreement(backend, graphs: dict, E: int, D: int, K: int, T: int) -> float:
    """max |y_repacked - y_file| / max |y_file| on one random input."""
    ys = {n: g.compute(backend, feeds(np.random.default_rng(99), E, D, K, T), Timing())["y"] for n, g in graphs.items()}
    return float(np.abs(ys["repacked"] - ys["file"]).max() / np.abs(ys["file"]).max())


def bench_type(backend, rp: Repacker, parts: list[Part], args, label: str) -> list[dict]:
    datas, per_expert_s = repacked(rp, parts)
    marked = [d is not None for d in datas]
    E, D = parts[0].data.shape[0], parts[0].shape[0]
    rows = []
    if not any(marked):
        print(f"{label}: ggml repacks none of its parts on this CPU")
        return [{"type": label, "repacked_parts": []}]
    wctx = ggml.Context(8)
    layouts = {"file": stacked(wctx, rp, parts, [None] * len(parts)), "repacked": stacked(wctx, rp, parts, datas)}
    arena = Arena(ggml.lib.ggml_backend_cpu_buffer_type())
    for T in args.tokens:
        graphs = {n: moe_graph(arena, ex, D, args.k, T) for n, ex in layouts.items()}
        err = agreement(backend, graphs, E, D, args.k, T)
        for threads in args.threads:
            iters = max(1, args.iters // T)
            r = compare(backend, graphs, E, D, args.k, T, threads, args.samples, iters)
            row = {
                "type": label,
                "types": [ggml.type_name(p.type) for p in parts],
                "repacked_parts": [n for n, m in zip(PARTS, marked) if m],
                "repack_us_per_expert": 1e6 * per_expert_s,
                "tokens": T,
                "threads": threads,
                "rel_err": err,
                **r,
            }
            rows.append(row)
            print(
                f"{label:8s} T={T:<4d} thr={threads} file {r['file_ms']:8.3f} ms  repacked {r['repacked_ms']:8.3f} ms"
                f"  x{r['speedup']:.3f}  err {err:.1e}  repack {row['repack_us_per_expert']:.0f} us/expert"
                f"  ({'+'.join(row['repacked_parts'])})",
                flush=True,
            )
        for g in graphs.values():
            g.free()
    arena.free()
    wctx.free()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--layer", type=int, default=0)
    ap.add_argument("--types", default="file,Q4_K,Q4_0,IQ4_NL,Q8_0,MXFP4")
    ap.add_argument("--tokens", default="1,16,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--k", type=int, default=8, help="experts per token")
    ap.add_argument("--distinct", type=int, default=8, help="experts re-quantised for another type")
    ap.add_argument("--samples", type=int, default=7)
    ap.add_argument("--iters", type=int, default=64, help="graphs per sample at 1 token (divided by T)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    args.tokens = [int(x) for x in args.tokens.split(",")]
    args.threads = [int(x) for x in args.threads.split(",")]
    print(f"loadavg {os.getloadavg()[0]:.2f}", flush=True)
    rp = Repacker()
    backend = ggml.lib.ggml_backend_cpu_init()
    base = file_parts(args.model, args.layer)
    rows = []
    for name in args.types.split(","):
        parts = base if name == "file" else converted(base, ggml.TYPES_BY_NAME[name], args.distinct)
        rows += bench_type(backend, rp, parts, args, name)
    ggml.lib.ggml_backend_free(backend)
    rp.free()
    if args.json:
        with open(args.json, "w") as f:
            end = os.getloadavg()[0]
            json.dump({"model": args.model, "layer": args.layer, "loadavg_end": end, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
