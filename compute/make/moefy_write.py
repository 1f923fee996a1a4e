"""Writing moefy's MoE GGUF (make/moefy.py's "Tensors" paragraph tells the layout): the
dense file's tensors and metadata copied, each layer's FFN replaced by its experts and
router, the recipe recorded under hobbit.moefy.*."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict

import gguf
import numpy as np
from gguf import GGUFValueType

from ...protocol.errors import ModelError
from ..engine import ggml
from .gguf_writer import TensorEntry, add_sampling, copied_fields, write_gguf
from .moefy_split import LayerPlan
from .recipe import SAMPLING, MoefyOptions


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


_SCALES = {ggml.TYPES_BY_NAME[n]: k for n, k in (("Q4_0", 1), ("Q8_0", 1), ("Q5_0", 1), ("Q4_1", 2), ("Q5_1", 2))}


def _copy_blocks(raw, t: int, D: int, F: int, groups, K: int) -> np.ndarray:
    """Down experts from the dense down's own quantised blocks (groups of whole blocks):
    no re-quantising, only the fp16 scale (and min) of each block multiplied by K."""
    if t not in _SCALES:
        raise ModelError(f"moefy: cannot copy {ggml.type_name(t)} blocks; use another --down-type")
    bs = ggml.block_size(t)
    blocks = np.asarray(raw).reshape(D, F // bs, ggml.type_size(t))
    out = []
    for g in groups:
        b = blocks[:, g[::bs] // bs].copy()  # (D, Fe/bs, bytes)
        head = b[:, :, : 2 * _SCALES[t]].copy().view(np.float16)
        b[:, :, : 2 * _SCALES[t]] = (head.astype(np.float32) * K).astype(np.float16).view(np.uint8)
        out.append(b.reshape(-1))
    return np.concatenate(out)


def write_moe(
    path: str, source: str, weights, plans: list[LayerPlan], opts: MoefyOptions, recipe: str, progress: bool
) -> None:
    """Write the MoE of the dense `weights` (opened from `source`) split by `plans` to
    path, as recipe version `recipe` with opts."""
    a = weights.args
    E, K = opts.experts, opts.top_k
    D, F = a.n_embd, a.n_ff
    Fe = F // E
    exp_t = ggml.TYPES_BY_NAME[opts.expert_type]
    down_t = ggml.TYPES_BY_NAME[opts.down_type or opts.expert_type]

    # the new tensor table: the dense file's order, each layer's FFN replaced by its experts
    table = []  # (TensorEntry, producer)
    done = set()
    for name, info in weights.tensors.items():
        parts = name.split(".")
        if parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
            il = int(parts[1])
            if il in done:
                continue
            done.add(il)
            p = f"blk.{il}."
            table += [
                (TensorEntry(p + "ffn_gate_inp.weight", ggml.F32, (D, E), 4 * D * E), ("router", il)),
                (
                    TensorEntry(p + "ffn_gate_exps.weight", exp_t, (D, Fe, E), ggml.row_size(exp_t, D) * F),
                    ("rows", il, "gate"),
                ),
                (
                    TensorEntry(p + "ffn_up_exps.weight", exp_t, (D, Fe, E), ggml.row_size(exp_t, D) * F),
                    ("rows", il, "up"),
                ),
                (
                    TensorEntry(p + "ffn_down_exps.weight", down_t, (Fe, D, E), ggml.row_size(down_t, Fe) * D * E),
                    ("down", il),
                ),
            ]
        else:
            table.append((TensorEntry(name, info.type, info.shape, info.nbytes), ("copy", name)))

    def produce(how) -> bytes:
        kind = how[0]
        if kind == "copy":
            return weights.data(how[1])
        plan = plans[how[1]]
        if kind == "router":
            return (np.float32(opts.temperature) * plan.router).astype(np.float32)  # (E, D)
        if kind == "rows":  # a neuron is a row of gate/up: its bytes, or re-quantised
            t = weights.tensors[f"blk.{how[1]}.ffn_{how[2]}.weight"]
            rows = weights.data(t.name).reshape(F, -1)
            if t.type != exp_t:
                rows = ggml.dequantize(t.type, rows, F * D).reshape(F, D)
            rows = np.concatenate([rows[g] for g in plan.groups])
            return rows if t.type == exp_t else ggml.quantize(exp_t, rows, D)  # (E*Fe, bytes)
        # down: a neuron is a column; gather, scale by K, re-quantise expert by expert
        t = weights.tensors[f"blk.{how[1]}.ffn_down.weight"]
        if t.type == down_t and plan.down is None and opts.unit % ggml.block_size(t.type) == 0:
            return _copy_blocks(weights.data(t.name), t.type, D, F, plan.groups, K)
        down = plan.down
        if down is None:
            down = ggml.dequantize(t.type, weights.data(t.name), D * F).reshape(D, F)
        return np.concatenate([ggml.quantize(down_t, np.float32(K) * down[:, g], Fe) for g in plan.groups])

    src_name = os.path.basename(source)
    w = gguf.GGUFWriter(path, "llama")
    try:
        skip = ("GGUF.", "general.architecture", "general.sampling.")  # our measured sampling replaces the source's
        copied = copied_fields(weights.reader, lambda k: not k.startswith(skip))
        for key, value, vtype, sub in copied:
            if key == "general.name":
                value = f"{value} MoE {E}x{Fe} top-{K} (hobbit moefy {recipe})"
            elif key == "llama.feed_forward_length":
                value = Fe
            w.add_key_value(key, value, vtype, sub)
        w.add_expert_count(E)
        w.add_expert_used_count(K)
        add_sampling(w, SAMPLING)  # measured on the default model; its variants share the source's manners
        meta = {
            "recipe": recipe,
            "source": src_name,
            "source_sha256": _sha256(source),
            **{k: v for k, v in asdict(opts).items()},
        }
        for k, v in meta.items():
            key = f"hobbit.moefy.{k}"
            if isinstance(v, str):
                w.add_key_value(key, v, GGUFValueType.STRING)
            elif isinstance(v, float):
                w.add_key_value(key, v, GGUFValueType.FLOAT32)
            else:
                w.add_key_value(key, int(v), GGUFValueType.UINT32)
    except BaseException:
        w.close()
        raise
    how = {entry.name: h for entry, h in table}
    write_gguf(
        w, [entry for entry, _ in table], lambda entry: [produce(how[entry.name])], "moefy: write", progress, "moefy"
    )
