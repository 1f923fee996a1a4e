"""`hobbit-cli bench slots MODEL`: what caching a model's experts costs in shared memory with
slots sized for the largest layer (what hobbitd does) against one region per size class.

llama.cpp's quantizer mixes types across layers (Q4_K_M: Q6_K down experts on some layers),
so one expert's bytes differ by layer. A slot sized for the largest layer holds any layer's
expert, which wastes the difference on the smaller layers; size classes waste nothing but
split the cache into regions that cannot lend each other slots. The types are the file's;
with --dims the bytes are recomputed for another model's dimensions (a small synthetic made
by the real quantizer stands in for a 48-layer Qwen3-30B-A3B, whose file does not fit here).
"""

from __future__ import annotations

from ...loader import ggml_types as gt
from ...loader.gguf_file import open_gguf
from ...loader.layout import SlotFormat, gguf_experts


def layer_nbytes(fmt: SlotFormat, dims: tuple | None) -> list:
    """Bytes of each part per layer: the file's, or for dims (D, F) with the file's types."""
    if dims is None:
        return [list(fmt.part_nbytes(il)) for il in range(fmt.n_layer)]
    shapes = part_shapes(fmt, dims)
    return [
        [gt.row_size(t, s[0]) * (s[1] if len(s) > 1 else 1) for t, s in zip(fmt.types(il), shapes)]
        for il in range(fmt.n_layer)
    ]


def part_shapes(fmt: SlotFormat, dims: tuple | None) -> tuple:
    """ggml ne of each part: the file's, or for dims (D, F): gate, up, down, and the
    expert biases (F, F, D) where the file has them."""
    if dims is None:
        return fmt.shapes
    D, F = dims
    return ((D, F), (D, F), (F, D), (F,), (F,), (D,))[: len(fmt.parts)]


def run(model: str, dims: tuple | None = None, n_expert: int | None = None) -> dict:
    src = gguf_experts(open_gguf(model))
    fmt, E = src.format, n_expert or src.n_expert
    nbytes = layer_nbytes(fmt, dims)
    shapes = part_shapes(fmt, dims)
    largest = SlotFormat.build(shapes, fmt.layer_types, nbytes, fmt.parts)
    classes: dict = {}  # a layer's (types, bytes) -> its layers
    for il in range(fmt.n_layer):
        classes.setdefault((fmt.types(il), tuple(nbytes[il])), []).append(il)
    per_class = []
    for (types, nb), layers in classes.items():
        cls = SlotFormat.build(shapes, [types], [nb], fmt.parts)
        per_class.append(
            {
                "types": [gt.type_name(t) for t in types],
                "layers": layers,
                "expert_bytes": sum(nb),
                "slot_bytes": cls.slot_bytes,
            }
        )
    data = E * sum(sum(nb) for nb in nbytes)
    one_size = E * fmt.n_layer * largest.slot_bytes
    by_class = E * sum(len(c["layers"]) * c["slot_bytes"] for c in per_class)
    return {
        "model": model,
        "n_layer": fmt.n_layer,
        "n_expert": E,
        "dims": list(dims) if dims else [shapes[0][0], shapes[0][1]],
        "classes": per_class,
        "expert_data_bytes": data,
        "largest_layer_slots": {"slot_bytes": largest.slot_bytes, "bytes": one_size, "overhead": one_size / data - 1},
        "size_classes": {"regions": len(per_class), "bytes": by_class, "overhead": by_class / data - 1},
    }


def print_table(r: dict) -> None:
    GiB = 2**30
    print(
        f"bench slots: {r['model']}: {r['n_layer']} layers x {r['n_expert']} experts, "
        f"D {r['dims'][0]}, F {r['dims'][1]}"
    )
    for c in r["classes"]:
        print(
            f"  {'/'.join(c['types']):<18} {len(c['layers']):3d} layers  expert {c['expert_bytes']:>11,} B"
            f"  slot {c['slot_bytes']:>11,} B"
        )
    print(f"  {'every expert cached':<34} {'GiB':>8} {'over the data':>14}")
    print(f"  {'expert data':<34} {r['expert_data_bytes'] / GiB:8.3f}")
    for name, key, extra in (
        ("slots sized for the largest layer", "largest_layer_slots", ""),
        ("one region per size class", "size_classes", f" ({r['size_classes']['regions']} regions)"),
    ):
        v = r[key]
        print(f"  {name:<34} {v['bytes'] / GiB:8.3f} {v['overhead']:13.1%}{extra}")
