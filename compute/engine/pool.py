"""An expert provider's slots as ggml tensors: what a graph's mul_mat_id computes on.

Per precision, MoE layer and part (gate, up, down, then the expert biases where the model
has them): every slot of that precision as one stacked tensor [.., .., S] (a bias: [.., S])
of that layer's type (quantizer mixes differ by layer) whose stride is the provider's.
The tensors are views: they own no memory and are re-pointed at the provider's memory
before a layer runs (point), at the few slots a layer's experts sit in.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...loader.precision import HIGH
from . import ggml
from .experts import ExpertProvider
from .moe import ExpertTensors
from .weights import ModelArgs


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
