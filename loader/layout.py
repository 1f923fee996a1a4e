"""Where experts live: in a file (ExpertSource) and in a cache slot (SlotFormat).

An expert is three matrices: gate [D, F], up [D, F], down [F, D] in ggml order, and in
some architectures (gpt-oss) three F32 bias vectors: gate [F], up [F], down [D]. Each is a
part. In a GGUF they are slices of the stacked tensors blk.L.ffn_{gate,up,down}_exps.weight
(and .bias, [F or D, E]); in the companion low-precision file each expert is contiguous and
4 KiB-aligned. In a cache slot each part has a room that starts at a 4 KiB-aligned offset,
so a slot can be filled by direct I/O, and within it the part starts where its read lands
(SlotFormat.offsets, per layer); the compute side views all slots of one precision as one
stacked tensor per part and layer (stride slot_bytes). The biases travel in the slot, so
an expert is cached, evicted and handed out whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..protocol.errors import ModelError
from .gguf_file import GGUFFile

PARTS = ("gate", "up", "down")  # the weight matrices, always
BIAS_PARTS = ("gate_bias", "up_bias", "down_bias")  # per-expert biases, where the file has them
PAGE = 4096


def align(n: int, a: int = PAGE) -> int:
    return -(-n // a) * a


class Handle(NamedTuple):
    """One fetched expert: the precision it is computed in and its index among that
    precision's slots (SlotRegion; LocalExperts: its index in the file's stacked tensors).
    Where a handle may be absent, None means the expert is skipped."""

    precision: str
    slot: int


@dataclass(frozen=True)
class SlotRegion:
    """What a compute process sees of one precision's cache slots: how many there are and
    how an expert lies in each (its SlotFormat). offset: the region's first byte in the
    shared-memory segment (None where the slots are a file's own tensors, LocalExperts);
    first_slot and directory: its place in the control block (None without one)."""

    n_slots: int
    format: SlotFormat
    offset: int | None = None
    first_slot: int | None = None
    directory: int | None = None


@dataclass(frozen=True)
class SlotFormat:
    """Layout of one expert of one precision inside a cache slot.

    llama.cpp's quantizer mixes types across layers (Q4_K_M gives some layers' down
    experts Q6_K), so a part's type and size are per layer: layer_types[l][p] and
    layer_nbytes[l][p]. Each part's room starts at part_offsets[p], sized for the largest
    layer's part, so any slot holds any layer's expert (slots sized for the largest layer; the
    alternative, a region per size class, is measured in BENCHMARKS.md).
    A layer's part whose experts all start the same number of bytes past a page boundary in
    their file (a GGUF aligns tensors to 32 bytes only) starts that many bytes, its
    layer_shifts entry, past part_offsets[p] in the slot: a direct read from the page
    boundary then puts it in place, where otherwise it would be moved after the read.
    offsets(layer) gives where a layer's parts start.
    parts names the parts in slot order: PARTS, then BIAS_PARTS where the model has expert
    biases; every per-part tuple below follows that order.
    layer_repacked[l][p] says that layer l's part p lies in ggml's CPU repacked layout (a
    slot filled from a repacked image, compute/make/repack_image.py): the compute side marks
    its view so that ggml reads it with the repacked kernels; () = none is."""

    shapes: tuple  # ggml ne per part, every layer: ((D, F), (D, F), (F, D)[, (F,), (F,), (D,)])
    layer_types: tuple  # [n_layer][parts] ggml type
    layer_nbytes: tuple  # [n_layer][parts] bytes of each part's data
    part_offsets: tuple  # byte offset of each part's room in the slot, multiples of PAGE
    slot_bytes: int  # multiple of PAGE
    parts: tuple = PARTS
    layer_shifts: tuple = ()  # [n_layer][parts] bytes (< PAGE) a part starts past its room; () = 0
    layer_repacked: tuple = ()  # [n_layer][parts] bool: in ggml's repacked layout; () = none

    @classmethod
    def build(cls, shapes, layer_types, layer_nbytes, parts=PARTS, layer_shifts=()) -> SlotFormat:
        # One spare page per part: a part that starts mid-page in its file is read from the
        # page start, so its room is a page longer than its largest layer's bytes.
        offsets, at = [], 0
        for p in range(len(parts)):
            offsets.append(at)
            at += align(max(n[p] for n in layer_nbytes)) + PAGE
        return cls(
            tuple(tuple(s) for s in shapes),
            tuple(tuple(t) for t in layer_types),
            tuple(tuple(n) for n in layer_nbytes),
            tuple(offsets),
            at,
            tuple(parts),
            tuple(tuple(x) for x in layer_shifts),
        )

    def offsets(self, layer: int) -> tuple:
        """Byte offsets of layer's parts in a slot."""
        if not self.layer_shifts:
            return self.part_offsets
        return tuple(o + x for o, x in zip(self.part_offsets, self.layer_shifts[layer]))

    def repacked(self, layer: int, part: int) -> bool:
        """Whether layer's part lies in ggml's repacked layout (layer_repacked)."""
        return bool(self.layer_repacked) and self.layer_repacked[layer][part]

    @property
    def any_repacked(self) -> bool:
        return any(any(r) for r in self.layer_repacked)

    @property
    def has_biases(self) -> bool:
        return len(self.parts) > len(PARTS)

    @property
    def n_layer(self) -> int:
        return len(self.layer_types)

    def types(self, layer: int) -> tuple:
        return self.layer_types[layer]

    def part_nbytes(self, layer: int) -> tuple:
        return self.layer_nbytes[layer]

    def expert_bytes(self, layer: int) -> int:
        return sum(self.layer_nbytes[layer])

    @property
    def type_set(self) -> list:
        """The distinct types of the weight matrices (not of the F32 biases), in order of
        first use."""
        return list(dict.fromkeys(t for types in self.layer_types for t in types[: len(PARTS)]))

    def to_wire(self) -> dict:
        return {
            "shapes": [list(s) for s in self.shapes],
            "layer_types": [list(t) for t in self.layer_types],
            "layer_nbytes": [list(n) for n in self.layer_nbytes],
            "part_offsets": list(self.part_offsets),
            "slot_bytes": self.slot_bytes,
            "parts": list(self.parts),
            "layer_shifts": [list(x) for x in self.layer_shifts],
            **({"layer_repacked": [list(r) for r in self.layer_repacked]} if self.layer_repacked else {}),
        }

    @classmethod
    def from_wire(cls, d: dict) -> SlotFormat:
        return cls(
            tuple(tuple(s) for s in d["shapes"]),
            tuple(tuple(t) for t in d["layer_types"]),
            tuple(tuple(n) for n in d["layer_nbytes"]),
            tuple(d["part_offsets"]),
            int(d["slot_bytes"]),
            tuple(d["parts"]),
            tuple(tuple(x) for x in d.get("layer_shifts", ())),  # () in companions
            tuple(tuple(bool(b) for b in r) for r in d.get("layer_repacked", ())),
        )


@dataclass(frozen=True)
class ExpertSource:
    """The experts of one model in one precision, in one file or, for a model split by
    gguf-split, in several: the stacked tensors of one expert's parts may be in different
    parts of the model.

    part_base[l][p] is the offset of layer l's part p for expert 0 in file file_of(l, p)
    and part_stride[l][p] the distance between experts, so expert e's part p is at
    part_base[l][p] + e * part_stride[l][p] there.
    """

    path: str
    precision: str  # "high" (the GGUF itself) or "low" (the companion file)
    n_layer: int
    n_expert: int
    format: SlotFormat
    part_base: tuple  # [n_layer][parts] file offsets
    part_stride: tuple  # [n_layer][parts]
    part_file: tuple = ()  # [n_layer][parts] path of the file holding the part; (): all in path

    def file_of(self, layer: int, part: int) -> str:
        """The path of the file holding layer `layer`'s part `part`."""
        return self.part_file[layer][part] if self.part_file else self.path

    @property
    def files(self) -> tuple:
        """Every file the experts are read from, path first."""
        return tuple(dict.fromkeys((self.path, *(f for fs in self.part_file for f in fs))))

    def ranges(self, layer: int, expert: int) -> list[tuple[int, int]]:
        """[(file offset, nbytes)] of every part of one expert, in format.parts order (the
        file of each: file_of)."""
        nbytes = self.format.part_nbytes(layer)
        return [
            (self.part_base[layer][p] + expert * self.part_stride[layer][p], nbytes[p])
            for p in range(len(self.format.parts))
        ]

    def expert_bytes(self, layer: int) -> int:
        """Bytes read for one expert of `layer`."""
        return self.format.expert_bytes(layer)

    @property
    def total_bytes(self) -> int:
        """Bytes of every expert of every layer."""
        return self.n_expert * sum(self.expert_bytes(il) for il in range(self.n_layer))


def trunk_blocks(file: GGUFFile) -> int:
    """The blocks inference runs: block_count, less the next-token-prediction blocks some
    files append ({arch}.nextn_predict_layers, glm4moe's MTP block), which it skips."""
    arch = file.check_architecture()
    return int(file.require(f"{arch}.block_count")) - int(file.field(f"{arch}.nextn_predict_layers", 0) or 0)


def moe_blocks(file: GGUFFile) -> tuple:
    """The blocks of the trunk that have routed experts, in order. These are the MoE layers
    hobbitd serves: a layer index anywhere in the loader, the daemon and the wire is a
    position in this tuple, not a block number. Leading dense blocks (glm4moe, deepseek2)
    have none, and their FFN stays with the compute side like attention does."""
    names = [f"ffn_{p}_exps.weight" for p in PARTS]
    return tuple(il for il in range(trunk_blocks(file)) if any(f"blk.{il}.{n}" in file.tensors for n in names))


def routed_expert_tensors(file: GGUFFile) -> set:
    """Names of the stacked routed-expert tensors (weights and biases) the file has: what
    hobbitd serves from its slots and a client never reads from the file."""
    return {
        f"blk.{il}.ffn_{p}_exps.{kind}" for il in moe_blocks(file) for p in PARTS for kind in ("weight", "bias")
    } & set(file.tensors)


def rows_on_use(file: GGUFFile) -> set:
    """Tensors a client reads a few rows of per token: the token embedding, unless the output
    matrix is tied to it. Their pages come in as rows are used (as llama.cpp's mmap does),
    so they are neither read ahead nor counted as resident."""
    return {"token_embd.weight"} & set(file.tensors) if "output.weight" in file.tensors else set()


def client_resident_bytes(file: GGUFFile) -> int:
    """The bytes of the file a client keeps in memory: every tensor but the routed experts
    (hobbitd's slots) and the rows read on use. A memory budget gives hobbitd's cache the rest."""
    skip = routed_expert_tensors(file) | rows_on_use(file)
    return sum(t.nbytes for name, t in file.tensors.items() if name not in skip)


def gguf_experts(file: GGUFFile) -> ExpertSource:
    """The high-precision experts of an open MoE GGUF, read in place (no copy of the file),
    with their biases where every layer has all three (gpt-oss). Its layer l is block
    moe_blocks(file)[l]. ModelError when the file has no routed experts in the stacked
    layout, or biases on some parts or layers only."""
    arch = file.check_architecture()
    n_expert = int(file.field(f"{arch}.expert_count", 0))
    if n_expert <= 0:
        raise ModelError(
            f"{file.path}: not a mixture-of-experts model (expert_count is 0); hobbitd serves MoE models only"
        )
    blocks = moe_blocks(file)
    if not blocks:
        raise ModelError(f"{file.path}: tensor blk.0.ffn_gate_exps.weight is missing (no block has routed experts)")
    n_layer = len(blocks)
    names = [f"ffn_{p}_exps.weight" for p in PARTS]
    bias_names = [f"blk.{il}.ffn_{p}_exps.bias" for il in blocks for p in PARTS]
    have = [n in file.tensors for n in bias_names]
    if any(have) and not all(have):
        raise ModelError(f"{file.path}: tensor {bias_names[have.index(False)]} is missing (other experts have biases)")
    parts = PARTS + BIAS_PARTS if all(have) else PARTS
    if all(have):
        names += [f"ffn_{p}_exps.bias" for p in PARTS]
    missing = [f"blk.{il}.{n}" for il in blocks for n in names if f"blk.{il}.{n}" not in file.tensors]
    if missing:
        raise ModelError(f"{file.path}: tensor {missing[0]} is missing")
    layers = [[file.tensors[f"blk.{il}.{n}"] for n in names] for il in blocks]
    # per expert: a matrix's first two dimensions, a bias's first (the last one is E)
    shapes = [t.shape[:-1] for t in layers[0]]
    for il, ts in enumerate(layers):
        if [t.shape for t in ts] != [t.shape for t in layers[0]]:
            raise ModelError(
                f"{file.path}: block {blocks[il]} experts differ in shape from block {blocks[0]}; "
                "hobbit needs one expert shape across layers"
            )
    nbytes = [[t.nbytes // n_expert for t in ts] for ts in layers]
    # where every expert of a part is the same distance past a page boundary, the slot
    # keeps that distance, so its direct read lands in place (SlotFormat)
    shifts = [[t.offset % PAGE if n % PAGE == 0 else 0 for t, n in zip(ts, ns)] for ts, ns in zip(layers, nbytes)]
    fmt = SlotFormat.build(shapes, [[t.type for t in ts] for ts in layers], nbytes, parts, shifts)
    return ExpertSource(
        file.path,
        "high",
        n_layer,
        n_expert,
        fmt,
        tuple(tuple(t.offset for t in ts) for ts in layers),
        tuple(tuple(n) for n in nbytes),
        tuple(tuple(file.paths[t.file] for t in ts) for ts in layers) if len(file.paths) > 1 else (),
    )
