"""ggml graphs: the model's weight tensors as a graph reads them (Tensors), one built
graph (Graph), the one activation buffer a model's graphs take turns in (Arena), and the
cache of them (Plans): a graph (or a forward's list of segments) is built once per shape
and reused, only its input tensors rewritten.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from . import ggml
from .ggml import lib

GRAPH_SIZE = 8192  # max nodes per graph
MAX_PLANS = 12  # shapes kept per model (their graphs share one activation buffer: Arena)


class Tensors(dict):
    """A model's weight tensors by GGUF name (ggml tensors viewing the mmapped file), with
    the two things every layer does with them."""

    def __init__(self, rms_eps: float):
        super().__init__()
        self.rms_eps = rms_eps

    def norm(self, c, x, name: str):
        """RMS norm of x times `name`.weight, plus `name`.bias where the file has one (phimoe)."""
        y = lib.ggml_mul(c, lib.ggml_rms_norm(c, x, self.rms_eps), self[name + ".weight"])
        bias = self.get(name + ".bias")
        return y if bias is None else lib.ggml_add(c, y, bias)

    def linear(self, c, name: str, x):
        """`name`.weight x, plus `name`.bias where the file has one (qwen2moe's q/k/v, phimoe)."""
        y = lib.ggml_mul_mat(c, self[name + ".weight"], x)
        bias = self.get(name + ".bias")
        return y if bias is None else lib.ggml_add(c, y, bias)


def scaled(c, x, factor: float):
    """x times factor (Granite's multipliers); 0: x as it is."""
    return lib.ggml_scale(c, x, factor) if factor else x


@dataclass
class Timing:
    """Seconds spent, summed over forwards: computing, and waiting for the daemon."""

    compute_s: float = 0.0
    expert_wait_s: float = 0.0
    last_graph_s: float = 0.0  # the latest graph alone: the next one of a forward takes about as long


class Arena:
    """One activation buffer for all of a model's graphs, which run one at a time. ggml's
    allocator lays each graph out in it when the graph is built (offsets from the buffer's
    start, reusing memory as tensors die); graphs overlap, so every input is written before
    each compute. When a new graph needs more, the buffer is reallocated and `epoch` grows:
    the graphs laid out before are laid out again before their next compute. A buffer per
    graph held every segment's activations at once: the 9 graphs of a 512-token chunk of a
    128-expert model took 600 MB (the expert outputs alone, K x D x T floats, are 33 MB a
    graph), and each new chunk shape 600 MB more."""

    def __init__(self, buft):
        self.galloc = lib.ggml_gallocr_new(buft)
        self.epoch = 0

    def lay_out(self, g: Graph) -> None:
        """Give g's unallocated tensors their addresses (growing the buffer if g needs more)."""
        size = lib.ggml_gallocr_get_buffer_size(self.galloc, 0)
        if not lib.ggml_gallocr_alloc_graph(self.galloc, g.graph):
            raise MemoryError("could not allocate the graph's activations")
        if lib.ggml_gallocr_get_buffer_size(self.galloc, 0) != size:  # a new buffer
            self.epoch += 1

    def free(self) -> None:
        if self.galloc:
            lib.ggml_gallocr_free(self.galloc)
            self.galloc = None


@dataclass
class Graph:
    """One graph: its context, its named inputs (written before each compute) and outputs."""

    ctx: ggml.Context
    graph: int
    arena: Arena | None = None
    epoch: int = -1  # the arena's epoch the graph was laid out in
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    # numpy views of the allocated inputs (flat) and outputs ((T', X)): made once, so a
    # forward's writes and reads are plain numpy copies
    feeds: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    @classmethod
    def new(cls) -> Graph:
        ctx = ggml.Context(GRAPH_SIZE, GRAPH_SIZE)
        return cls(ctx, lib.ggml_new_graph_custom(ctx.ptr, GRAPH_SIZE, False))

    @property
    def c(self):
        """The ggml context pointer the graph's operations are made in."""
        return self.ctx.ptr

    def input(self, name: str, t: int, shape):
        """The input tensor `name`, made on first use (of ggml type t, shape in ggml order):
        an input no node reads gets no memory."""
        if name not in self.inputs:
            x = self.ctx.tensor(t, shape, name)
            lib.ggml_set_input(x)
            self.inputs[name] = x
        return self.inputs[name]

    def output(self, name: str, x) -> None:
        """Compute x and hand it back as `name`."""
        lib.ggml_set_output(x)
        lib.ggml_build_forward_expand(self.graph, x)
        self.outputs[name] = x

    def allocate(self, arena: Arena) -> None:
        """Lay the graph out in the model's arena now (a graph too large fails when it is
        built), and again before a compute if the arena's buffer changed meanwhile. An input
        no node reads has no memory and no view (positions in a segment whose layers all go
        without RoPE)."""
        self.arena = arena
        self._place()

    def _place(self) -> None:
        arena = self.arena
        assert arena is not None, "allocate() the graph first"
        if self.epoch == arena.epoch:
            return
        if self.epoch >= 0:  # laid out in a buffer since freed: forget those addresses
            t = lib.ggml_get_first_tensor(self.c)
            while t:
                if t.contents.buffer:  # allocated (or viewed) in the arena, not given memory
                    t.contents.data, t.contents.buffer = None, None
                t = lib.ggml_get_next_tensor(self.c, t)
        arena.lay_out(self)
        self.epoch = arena.epoch
        self.feeds = {name: ggml.array(x) for name, x in self.inputs.items() if x.contents.data}
        self.results = {name: ggml.array(t, (t.contents.ne[1], t.contents.ne[0])) for name, t in self.outputs.items()}

    def compute(self, backend, feed: dict, timing: Timing) -> dict:
        """Write the inputs feed names (the others hold whatever the graph run before left:
        feed every input), compute, and return every output (T', X) as a copy: the arena is
        rewritten by the next graph."""
        self._place()
        for name, view in self.feeds.items():
            if name in feed:
                view[:] = feed[name].ravel()
        t0 = time.perf_counter()
        status = lib.ggml_backend_graph_compute(backend, self.graph)
        timing.last_graph_s = time.perf_counter() - t0
        timing.compute_s += timing.last_graph_s
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")
        return {name: view.copy() for name, view in self.results.items()}

    def free(self) -> None:
        self.feeds, self.results = {}, {}
        self.arena = None
        self.ctx.free()


class Plans:
    """The graphs of the MAX_PLANS shapes used last, by key: each plan is a list of
    things with free() (a Graph, or a segment's graphs), freed when pushed out."""

    def __init__(self):
        self._plans: OrderedDict[tuple, list] = OrderedDict()

    def get(self, key: tuple, make: Callable[[], list]) -> list:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        if len(self._plans) >= MAX_PLANS:
            for g in self._plans.popitem(last=False)[1]:
                g.free()
        plan = self._plans[key] = make()
        return plan

    def clear(self) -> None:
        for plan in self._plans.values():
            for g in plan:
                g.free()
        self._plans.clear()
