"""Where experts live: in a file (ExpertSource) and in a cache slot (SlotFormat).

An expert is three matrices (parts): gate [D, F], up [D, F], down [F, D] in ggml order.
In a GGUF they are slices of the stacked tensors blk.L.ffn_{gate,up,down}_exps; in the
companion low-precision file each expert is contiguous and 4 KiB-aligned. In a cache slot
each part starts at a 4 KiB-aligned offset, so a slot can be filled by direct I/O and the
compute side can view all slots of one precision as one stacked tensor (stride slot_bytes).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..protocol.errors import ModelError
from .gguf_file import GGUFFile

PARTS = ("gate", "up", "down")
PAGE = 4096


def align(n: int, a: int = PAGE) -> int:
    return -(-n // a) * a


@dataclass(frozen=True)
class SlotFormat:
    """Layout of one expert of one precision inside a cache slot. Same for every layer."""
    types: tuple          # ggml type per part
    shapes: tuple         # ggml ne per part: ((D, F), (D, F), (F, D))
    part_nbytes: tuple    # bytes of each part's data
    part_offsets: tuple   # byte offset of each part in the slot, multiples of PAGE
    slot_bytes: int       # multiple of PAGE

    @classmethod
    def build(cls, types, shapes, part_nbytes) -> "SlotFormat":
        # One spare page per part: a direct read of a part that starts mid-page in its file
        # reads from the page start, so it needs up to a page more room before it is moved.
        offsets, at = [], 0
        for n in part_nbytes:
            offsets.append(at)
            at += align(n) + PAGE
        return cls(tuple(types), tuple(tuple(s) for s in shapes), tuple(part_nbytes),
                   tuple(offsets), at)

    def to_wire(self) -> dict:
        return {"types": list(self.types), "shapes": [list(s) for s in self.shapes],
                "part_nbytes": list(self.part_nbytes), "part_offsets": list(self.part_offsets),
                "slot_bytes": self.slot_bytes}

    @classmethod
    def from_wire(cls, d: dict) -> "SlotFormat":
        return cls(tuple(d["types"]), tuple(tuple(s) for s in d["shapes"]),
                   tuple(d["part_nbytes"]), tuple(d["part_offsets"]), int(d["slot_bytes"]))


@dataclass(frozen=True)
class ExpertSource:
    """The experts of one model in one precision, in one file.

    part_base[l][p] is the file offset of layer l's part p for expert 0 and part_stride[p]
    the distance between experts, so expert e's part p is at part_base[l][p] + e*part_stride[p].
    """
    path: str
    precision: str        # "high" (the GGUF itself) or "low" (the companion file)
    n_layer: int
    n_expert: int
    format: SlotFormat
    part_base: tuple      # [n_layer][3] file offsets
    part_stride: tuple    # [3]

    def ranges(self, layer: int, expert: int) -> list[tuple[int, int]]:
        """[(file offset, nbytes)] of the three parts of one expert."""
        return [(self.part_base[layer][p] + expert * self.part_stride[p], self.format.part_nbytes[p])
                for p in range(len(PARTS))]

    @property
    def expert_bytes(self) -> int:
        return sum(self.format.part_nbytes)


def gguf_experts(file: GGUFFile) -> ExpertSource:
    """The high-precision experts of an open MoE GGUF, read in place (no copy of the file).
    ModelError when the file has no routed experts in the stacked layout."""
    arch = file.check_architecture()
    n_layer = int(file.require(f"{arch}.block_count"))
    n_expert = int(file.field(f"{arch}.expert_count", 0))
    if n_expert <= 0:
        raise ModelError(f"{file.path}: not a mixture-of-experts model (expert_count is 0); "
                         "hobbitd serves MoE models only")
    names = [f"ffn_{p}_exps.weight" for p in PARTS]
    missing = [f"blk.{il}.{n}" for il in range(n_layer) for n in names
               if f"blk.{il}.{n}" not in file.tensors]
    if missing:
        raise ModelError(f"{file.path}: tensor {missing[0]} is missing")
    first = [file.tensors[f"blk.0.{n}"] for n in names]
    part_nbytes = [t.nbytes // n_expert for t in first]
    fmt = SlotFormat.build([t.type for t in first], [t.shape[:2] for t in first], part_nbytes)
    base = []
    for il in range(n_layer):
        ts = [file.tensors[f"blk.{il}.{n}"] for n in names]
        if [(t.type, t.shape) for t in ts] != [(t.type, t.shape) for t in first]:
            raise ModelError(f"{file.path}: layer {il} experts differ in type or shape from "
                             "layer 0; hobbit needs one expert format per precision")
        base.append(tuple(t.offset for t in ts))
    return ExpertSource(file.path, "high", n_layer, n_expert, fmt, tuple(base),
                        tuple(part_nbytes))
