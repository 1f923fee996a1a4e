"""An expert provider's slots as ggml tensors: what a graph's mul_mat_id computes on.

Per precision, MoE layer and part (gate, up, down, then the expert biases where the model
has them): every slot of that precision as one stacked tensor [.., .., S] (a bias: [.., S])
of that layer's type (quantizer mixes differ by layer) whose stride is the provider's.
The tensors are views: they own no memory and are re-pointed at the provider's memory
before a layer runs (point), at the few slots a layer's experts sit in. A part the
provider's format says is repacked (SlotFormat.layer_repacked: hobbitd serves a repacked
image) has its views marked (engine/repack.py), so that ggml computes them with its repacked
kernels; check_repacked() first makes sure this process's ggml lays them out the same way.
"""

from __future__ import annotations

import ctypes
from typing import NamedTuple

import numpy as np

from ...loader.layout import PARTS
from ...loader.precision import HIGH
from ...protocol.errors import ModelError
from . import ggml, repack
from .experts import ExpertProvider
from .moe import ExpertTensors
from .weights import ModelArgs


_NOT_HERE = (
    "hobbitd serves {what} in a repacked layout this process's ggml does not compute with "
    "(another CPU or ggml made the image): serve without it (hobbitd --repack off) or run "
    "hobbit-cli convert --repack here again"
)


def check_repacked(provider: ExpertProvider, weights, moe_layers) -> None:
    """ModelError (one line) unless the provider's repacked high-precision slots hold what
    this process's ggml makes of the file's experts: per distinct (type, shape) repacked,
    expert 0 of the first such layer is repacked here and compared with its slot. A
    mismatch (another CPU or ggml made the image) would compute wrong, so nothing is."""
    region = provider.regions.get(HIGH)
    if region is None or not region.format.any_repacked:
        return
    f, todo = region.format, {}  # (type, shape) -> (layer, part), first use
    for m in range(f.n_layer):
        for p in range(len(PARTS)):
            if f.repacked(m, p):
                todo.setdefault((f.types(m)[p], f.shapes[p]), (m, p))
    rp = repack.shared()
    for m in sorted({m for m, _ in todo.values()}):
        handles = provider.fetch(m, [0], [0.0])  # the most important: high precision
        try:
            h = handles[0]
            if h is None or h.precision != HIGH:
                raise ModelError(
                    f"hobbitd served no high-precision slot to check its repacked layer {moe_layers[m]} with"
                )
            for (t, shape), (_, p) in ((k, v) for k, v in todo.items() if v[0] == m):
                n = f.part_nbytes(m)[p]
                mine = np.empty(n, np.uint8)  # [n] bytes: expert 0 of the file, repacked here
                src = weights.address(f"blk.{moe_layers[m]}.ffn_{PARTS[p]}_exps.weight")
                ok = rp.repack(t, shape, src, mine.ctypes.data)
                at = provider.part_bases(HIGH, m)[p] + h.slot * provider.part_strides(HIGH, m)[p]
                if not ok or ctypes.string_at(at, n) != mine.tobytes():
                    raise ModelError(_NOT_HERE.format(what=f"layer {moe_layers[m]}'s {PARTS[p]} experts"))
        finally:
            provider.release(handles)
            provider.flush()


class Span(NamedTuple):
    """The slots a layer's view covers: count slots from slot first on; the expert ids
    fed to a graph are relative to first."""

    first: int
    count: int


class Pool:
    """The views of one provider's slots, made once in the model's weight context."""

    def __init__(self, wctx: ggml.Context, args: ModelArgs, provider: ExpertProvider):
        self.provider = provider
        self.views: dict[str, list[list]] = {}  # precision -> MoE layer -> part -> tensor
        for prec, r in provider.regions.items():
            f = r.format
            self.views[prec] = []
            for m, il in enumerate(args.moe_layers):
                strides, views = provider.part_strides(prec, m), []
                for p, name in enumerate(f.parts):
                    shape = f.shapes[p]
                    t = wctx.tensor(f.types(m)[p], (*shape, r.n_slots), f"pool_{prec}_{name}_l{il}")
                    t.contents.nb[len(shape)] = strides[p]
                    for d in range(len(shape) + 1, ggml.MAX_DIMS):
                        t.contents.nb[d] = strides[p] * r.n_slots
                    if f.repacked(m, p) and not repack.shared().mark(t):
                        raise ModelError(_NOT_HERE.format(what=f"layer {il}'s {name} experts"))
                    views.append(t)
                self.views[prec].append(views)
        self._pointed: dict = {}  # (precision, layer) -> (bases, strides, first, count) viewed now
        # the provider's slot of each expert, per MoE layer [1, E] i32, for the one-graph
        # forward on resident experts (routing in the graph, then a lookup of the slots)
        self.slot_table = np.zeros((args.n_moe_layer, args.n_expert), np.int32)
        self.slot_tensors = [
            wctx.tensor(ggml.I32, (1, args.n_expert), f"slots_l{il}", self.slot_table[m].ctypes.data)
            for m, il in enumerate(args.moe_layers)
        ]
        self._resident = None  # the provider's resident table the views point at

    def experts(self, precision: str, layer: int) -> ExpertTensors:
        """MoE layer `layer`'s views in `precision`, as moe_ffn takes them."""
        views = self.views[precision][layer]
        return ExpertTensors(*views[:3], tuple(views[3:]) or None)

    def point(self, layer: int, spans: dict[str, Span] | None = None) -> None:
        """Point the views of MoE layer `layer` at the provider's slots: per precision the
        slots spans[precision] (the expert ids fed are then relative to its first; a
        precision not in spans is left as it is), else all of them. ggml's mul_mat_id does
        bookkeeping per slot it views: every slot viewed for every layer cost ~10 % of a
        decode step on the default model."""
        self._resident = None  # whatever pointed at the resident slots may move now
        self._point(layer, spans)

    def point_resident(self, table: np.ndarray) -> None:
        """Point every layer at the resident experts, table (M, E) int32 their slots
        (ExpertProvider.resident), and fill slot_table; nothing to do while the views point
        at this table already. A layer's slots are usually side by side."""
        if table is self._resident:
            return
        for m in range(len(self.slot_table)):
            first = int(table[m].min())
            self.slot_table[m] = table[m] - first
            self._point(m, {HIGH: Span(first, int(table[m].max()) - first + 1)})
        self._resident = table

    def _point(self, layer: int, spans: dict[str, Span] | None) -> None:
        provider = self.provider
        for prec, layers in self.views.items():
            if spans is not None and prec not in spans:
                continue  # the segment computes nothing in that precision
            first, count = (spans or {}).get(prec, (0, provider.regions[prec].n_slots))
            bases = provider.part_bases(prec, layer)
            strides = provider.part_strides(prec, layer)
            if self._pointed.get((prec, layer)) == (bases, strides, first, count):
                continue
            shapes = provider.regions[prec].format.shapes
            for t, base, stride, shape in zip(layers[layer], bases, strides, shapes):
                t.contents.data = base + first * stride
                dim = len(shape)  # the slot dimension
                t.contents.ne[dim] = count
                for d in range(dim + 1, ggml.MAX_DIMS):
                    t.contents.nb[d] = stride * count
            self._pointed[prec, layer] = (bases, strides, first, count)
