"""The whole model on ggml's CPU repacked layout, beside llama.cpp with and without its
repacking (every expert in memory).

    python -m hobbit.compute.measure.bench_repack_model MODEL decode [--threads N]
    python -m hobbit.compute.measure.bench_repack_model MODEL parity

decode: tokens per second, rounds interleaved: llama.cpp repack on (its default) and off,
hobbit in-process as it is, and with repacked copies (Repacker.copy) of every matmul
weight ggml repacks, of the dense ones only, of the routed experts only; plus each one's
first logits against its counterpart's.
parity: the logits of the prompt and of greedy steps, per step: hobbit's segmented forward
on an expert provider whose slots hold the repacked layout (LocalExperts over a repacked
image of the experts, its pool views marked: what repacked hobbitd slots would give), the
one-graph forward with every weight repacked, and llama.cpp with repacking.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics

import numpy as np

from ...loader.layout import routed_expert_tensors
from ...loader.precision import HIGH
from ..engine.experts import LocalExperts
from ..engine.model import Model, RunOptions
from ..engine.repack import Repacker, repack_weights
from ..engine.weights import Weights, open_model
from ..runs import Run
from .engines import HobbitEngine, LlamaCppEngine, bench_prompt, run_once

CTX = 512


def repacked_subset(model: Model, weights: Weights, wanted) -> list[np.ndarray]:
    """What RunOptions.repack does, for the weights named `wanted(name)` only (a model
    made without it): their copies (keep them while the model computes)."""
    skip = {"token_embd.weight"} | ({"output.weight"} if "output.weight" not in weights.tensors else set())
    chosen = {n: t for n, t in model.t.items() if n not in skip and wanted(n)}
    return repack_weights(chosen, routed_expert_tensors(weights))


def decode(path: str, threads: int, prompt_tokens: int, n_decode: int, repeat: int) -> dict:
    """Decode tokens per second (median of rounds) per engine, and first-logit agreement."""
    weights = open_model(path)
    prompt = bench_prompt(path, prompt_tokens)
    experts = routed_expert_tensors(weights)
    which = {  # what each hobbit engine repacks, by tensor name (hobbit_repacked: all)
        "hobbit": lambda n: False,
        "hobbit_dense_repacked": lambda n: n not in experts,
        "hobbit_experts_repacked": lambda n: n in experts,
    }
    hobbit = {k: Model(weights, RunOptions(CTX, 512, threads)) for k in which}
    keep = [repacked_subset(m, weights, which[k]) for k, m in hobbit.items()]
    hobbit["hobbit_repacked"] = Model(weights, RunOptions(CTX, 512, threads, repack=True))
    engines = {
        "llamacpp_repack": LlamaCppEngine(path, CTX, threads),
        "llamacpp": LlamaCppEngine(path, CTX, threads, repack=False),
        **{k: HobbitEngine(Run(path, weights, None, m)) for k, m in hobbit.items()},
    }
    first = {k: np.array(e.prefill(prompt), copy=True) for k, e in engines.items()}  # also the warm-up
    times: dict[str, list[float]] = {k: [] for k in engines}
    tokens = {}
    for _ in range(repeat):
        for k, e in engines.items():
            _, decode_s, toks = run_once(e, prompt, n_decode)
            times[k].append(decode_s)
            tokens[k] = toks
    for e in engines.values():
        e.close()
    del keep
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {k: {"decode_tok_s": n_decode / med[k], "vs_llamacpp_repack": med["llamacpp_repack"] / med[k]} for k in med}
    pairs = (("llamacpp_repack", "llamacpp"), ("hobbit_repacked", "hobbit"), ("hobbit", "llamacpp"))
    for a, b in (*pairs, ("hobbit_repacked", "llamacpp_repack")):
        d = np.abs(first[a] - first[b])
        out[a].setdefault("logits", {})[b] = {"max_abs": float(d.max()), "tokens_match": tokens[a] == tokens[b]}
    return out


def repacked_image(rp: Repacker, weights: Weights) -> np.ndarray:
    """The model's file as a repacked image would hold its experts: anonymous memory the
    size of the file, every routed-expert tensor at its file offset, repacked where ggml
    repacks it (else copied). Only those pages are touched."""
    image = np.empty(weights.total_bytes, np.uint8)
    for name in routed_expert_tensors(weights):
        t = weights.tensors[name]
        if not rp.repack(t.type, t.shape, weights.address(name), image.ctypes.data + t.offset):
            image[t.offset : t.offset + t.nbytes] = weights.data(name)
    return image


def parity(path: str, prompt_tokens: int, n_steps: int) -> dict:
    """max |logits - logits'| per step (the prompt's last row, then greedy steps)."""
    weights = open_model(path)
    if len(weights.paths) != 1:
        raise SystemExit("parity: a single-file model only")
    prompt = bench_prompt(path, prompt_tokens)
    rp = Repacker()
    image = repacked_image(rp, weights)
    local = LocalExperts(weights)
    local.bases[HIGH] = {weights.path: image.ctypes.data}
    segmented = Model(weights, RunOptions(CTX, 512, 1, repack=True), experts=local)  # dense repacked
    marked = sum(rp.mark(t) for views in segmented.pool.views[HIGH] for t in views)
    one_graph = Model(weights, RunOptions(CTX, 512, 1, repack=True))
    engines = {
        "segmented_repacked_slots": HobbitEngine(Run(path, weights, None, segmented)),
        "one_graph_repacked": HobbitEngine(Run(path, weights, None, one_graph)),
        "llamacpp_repack": LlamaCppEngine(path, CTX, 1),
    }
    logits = {}
    for k, e in engines.items():
        rows = [np.array(e.prefill(prompt), copy=True)]
        for _ in range(n_steps):
            rows.append(np.array(e.step(int(np.argmax(rows[-1]))), copy=True))
        logits[k] = np.stack(rows)
        # (Run.close would close the provider too: a LocalExperts has nothing to close)
        e.model.close() if isinstance(e, HobbitEngine) else e.close()
    del image
    rp.free()
    pairs = (("segmented_repacked_slots", "one_graph_repacked"), ("one_graph_repacked", "llamacpp_repack"))
    return {
        "pool_views_marked": marked,
        **{f"{a} vs {b}": np.abs(logits[a] - logits[b]).max(axis=1).tolist() for a, b in pairs},
    }


def repack_slots_in_place(client, rp: Repacker, table: np.ndarray, pool) -> int:
    """MEASUREMENT ONLY: rewrite the resident experts' slots of a hobbitd (every expert
    pinned, table (M, E) their slots) into the repacked layout through a writable mapping of
    its shared memory, and mark the pool's views; the daemon does not know (no other client
    may use it, nothing may be re-read). What slots kept in the repacked layout (design B/C
    in the notes) would give. Returns the views marked."""
    from ...loader.shm import Segment

    fmt = client.regions[HIGH].format
    shm = Segment(client.shm.name, client.shm.size, writable=True)
    shift = shm.address - client.shm.address
    marked = 0
    for m in range(table.shape[0]):
        bases, strides = client.part_bases(HIGH, m), client.part_strides(HIGH, m)
        for p, (t, shape, n) in enumerate(zip(fmt.types(m), fmt.shapes, fmt.part_nbytes(m))):
            if not rp.mark(pool.views[HIGH][m][p]):
                continue
            marked += 1
            bounce = np.empty(n, np.uint8)
            for slot in table[m]:
                dst = bases[p] + int(slot) * strides[p] + shift
                bounce[:] = np.frombuffer((ctypes.c_char * n).from_address(dst), np.uint8)
                assert rp.repack(t, shape, bounce.ctypes.data, dst)
    shm.close()
    return marked


def resident(path: str, threads: int, prompt_tokens: int, n_decode: int, repeat: int) -> dict:
    """Through hobbitd, every expert resident (one graph on its slots, bench fit's
    "resident"), the client's own weights repacked: decode with the slots in the file's
    layout, then repacked in place (repack_slots_in_place), each phase interleaved with
    llama.cpp with repacking; and the last phase's logits against llama.cpp's."""
    import tempfile

    from ...loader.layout import gguf_experts
    from ..client.expert_client import ExpertClient
    from .bench_ablation import daemon

    weights = open_model(path)
    prompt = bench_prompt(path, prompt_tokens)
    src = gguf_experts(weights)
    cache = src.n_layer * src.n_expert * src.format.slot_bytes
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="hobbit-repack-") as tmp, daemon(path, cache, [], tmp) as sock:
        client = ExpertClient(sock, path)
        model = Model(weights, RunOptions(CTX, 512, threads, repack=True), experts=client)
        engines = {
            "llamacpp_repack": LlamaCppEngine(path, CTX, threads),
            "hobbitd": HobbitEngine(Run(path, weights, None, model)),
        }
        for _ in range(100):  # until hobbitd has read every expert
            run_once(engines["hobbitd"], prompt, 2)
            if client.resident() is not None:
                break
        rp = Repacker()
        for phase in ("file_layout_slots", "repacked_slots"):
            if phase == "repacked_slots":
                out["views_marked"] = repack_slots_in_place(client, rp, client.resident(), model.pool)
            times: dict[str, list[float]] = {k: [] for k in engines}
            for _ in range(repeat):
                for k, e in engines.items():
                    times[k].append(run_once(e, prompt, n_decode)[1])
            ratio = statistics.median(times["llamacpp_repack"]) / statistics.median(times["hobbitd"])
            out[phase] = {
                "hobbitd_vs_llamacpp_repack": ratio,
                "llamacpp_tok_s": n_decode / statistics.median(times["llamacpp_repack"]),
            }
        first = {k: np.array(e.prefill(prompt), copy=True) for k, e in engines.items()}
        out["repacked_slots"]["logits_max_abs_vs_llamacpp_repack"] = float(
            np.abs(first["hobbitd"] - first["llamacpp_repack"]).max()
        )
        for e in engines.values():
            e.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("what", choices=("decode", "parity", "resident"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--n-decode", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    if args.what == "decode":
        out = decode(args.model, args.threads, args.prompt_tokens, args.n_decode, args.repeat)
    elif args.what == "resident":
        out = resident(args.model, args.threads, args.prompt_tokens, args.n_decode, args.repeat)
    else:
        out = parity(args.model, args.prompt_tokens, 8)
    out = {"loadavg": [load, os.getloadavg()[0]], **out}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
