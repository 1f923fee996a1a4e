"""The transformer forward pass, built as ggml graphs over weights that stay in place.

Legend of dimensions (ggml order, contiguous axis first):
  T tokens in the batch   D n_embd      F n_ff (per expert)   V vocabulary
  E experts               K experts used per token
  H query heads           Hkv KV heads  Dh head dim           N KV slots visible (n_kv)

One forward for every supported architecture (weights.ARCHS): they differ only through
ModelArgs (QK norm, RoPE type and scaling, routing, the FFN activation, sliding-window
layers, shared experts, leading dense blocks; see weights.Arch) and through the optional
tensors their files have (biases, attention sinks, RoPE factors, selection biases), as
llama.cpp's graphs do. The attention and its KV cache are engine/attention.py's; the MoE
FFN and its routing engine/moe.py's (moe_ffn, the one MoE function; route(), its numpy
twin).

Blocks and MoE layers: a model's blocks are its transformer layers; the MoE layers are the
blocks with routed experts (ModelArgs.moe_layers), numbered 0.. as hobbitd numbers them.
Leading dense blocks run like attention does, always in this process. A block is built in
two halves: _attend (attention, up to the FFN's input) and _feed_forward.

Three ways to run, one set of layer functions:
- in-process: experts are the stacked tensors of the mmapped GGUF and routing happens
  inside the graph; one graph per forward (_build_forward).
- with an expert provider (ExpertClient: hobbitd's shared memory; LocalExperts: the
  model's own files in two precisions; engine/experts.py): the forward is cut into
  segments at each router (_build_segment), run by engine/segments.py, which fetches each
  layer's experts between two segments.
- with a provider holding every expert (ExpertProvider.resident): one graph per forward
  again, on the provider's slots (engine/pool.py) through a slot table.

A graph (or a segment list) is built once per shape (T, N, all_logits) and reused: only
its input tensors are rewritten (engine/graph.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from ...loader.layout import PARTS, routed_expert_tensors, rows_on_use
from ...loader.precision import HIGH, LOW
from ...protocol.errors import InputError
from . import ggml
from .attention import Attention, KVCache
from .experts import ExpertProvider
from .file_guard import FileGuard
from .ggml import lib
from .graph import Arena, Graph, Plans, Tensors, Timing, scaled
from .moe import ExpertTensors, RouterTensors, dense_ffn, moe_ffn, route_in_graph, router, slots_of, topk_weights
from .pool import Pool, check_repacked
from .repack import repack_weights
from .segments import PrefetchStats, Segments, Variant, Variants
from .weights import ModelArgs, Weights

WIDE = 16  # tokens from which a forward through hobbitd computes on every core


@dataclass
class RunOptions:
    """How a Model runs. n_ctx: KV cache length in tokens; n_batch: prompt chunk size."""

    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int = 0  # 0: physical cores, one fewer when hobbitd serves the experts
    taps: tuple = ()  # intermediates to keep, by name: "ffn_in" (each layer's normed FFN
    # input), "router_in" (each MoE layer's router input: ffn_in, or
    # the block's input where the router reads it), "ffn_out" (its FFN
    # output; in-process runs only)
    lookahead: int = 3  # layers ahead the prefetch predicts (0: no hints)
    resident: bool = True  # when the provider holds every expert (ExpertProvider.resident),
    # compute each forward in one graph, asking nothing per layer
    repack: bool = False  # compute on ggml's CPU repacked layout (engine/repack.py) as
    # llama.cpp does by default: anonymous repacked copies of this process's matmul weights
    # (in-process, the file's experts too: all of them in memory twice over the mmap's page
    # cache). Decode ~10 % faster with Q4_K, slower Q4_K prompts; logits are llama.cpp's
    # with its repacking, not --no-repack's


class Shape(NamedTuple):
    """What a graph is built for: T tokens, N KV slots visible, every row's logits or the
    last one's."""

    T: int
    N: int
    all_logits: bool


class Model:
    """One sequence's forward pass: weights (shared mmap), a KV cache, cached graphs.

    forward(tokens) appends tokens at position n_past and returns float32 logits:
    shape (V,) for the last token, or (T, V) with all_logits=True. With `experts` (an
    ExpertProvider: hobbitd's shared memory, or LocalExperts) the forward is segmented
    and the routed experts come from the provider.
    """

    def __init__(self, weights: Weights, opts: RunOptions | None = None, experts: ExpertProvider | None = None):
        self.w = weights
        self.args: ModelArgs = weights.args
        self.opts = opts or RunOptions()
        a = self.args
        if self.opts.n_ctx <= 0:
            raise InputError(f"context size {self.opts.n_ctx} must be positive")
        self.n_ctx = self.opts.n_ctx
        self.n_past = 0
        self.seq = 0
        self.taps: dict = {}  # name -> (T', X) array from the last forward (RunOptions.taps)
        self.timing = Timing()
        self.backend = lib.ggml_backend_cpu_init()
        self.n_threads = 0
        self._set_threads(self.opts.n_threads or default_threads(experts))
        self.buft = lib.ggml_backend_cpu_buffer_type()
        self.arena = Arena(self.buft)  # every graph's activations, one graph at a time

        # Weight tensors point straight into the mmapped GGUF; + per layer the K and V
        # caches, one view per expert part and precision (the pool) and a slot table
        parts = sum(len(r.format.parts) for r in experts.regions.values()) if experts else 0
        self.wctx = ggml.Context(len(weights.tensors) + (3 + parts) * a.n_layer + 16)
        self.t = Tensors(a.rms_eps)
        for name, info in weights.tensors.items():
            self.t[name] = self.wctx.tensor(info.type, info.shape, name, weights.address(name))
        if "output.weight" not in self.t:  # tied embeddings
            self.t["output.weight"] = self.t["token_embd.weight"]
        self.repacked: list = []  # the copies repacked weights view (RunOptions.repack)
        # slots served repacked (hobbitd's repacked image): the dense weights too, so that the
        # logits are llama.cpp's with its repacking (its attention is repacked as well)
        high = experts.regions.get(HIGH) if experts is not None else None
        served_repacked = high is not None and high.format.any_repacked
        if self.opts.repack or served_repacked:
            routed = routed_expert_tensors(weights)
            skip = {"token_embd.weight"}  # get_rows reads it (and the output, where tied)
            if "output.weight" not in weights.tensors:
                skip.add("output.weight")
            if experts is not None:
                skip |= routed  # the provider's slots hold them: never read here
            self.repacked = repack_weights({n: t for n, t in self.t.items() if n not in skip}, routed)
        self.kv = KVCache(self.wctx, a, self.n_ctx, self.opts.n_batch)
        self.attention = Attention(self.t, a, self.kv)
        self.plans = Plans()

        self.moe_index = {il: m for m, il in enumerate(a.moe_layers)}  # block -> MoE layer
        self.experts = experts
        # the weights are views of the mmapped file: each forward checks it is still the one
        # mapped; through hobbitd, where the process runs for long, it also holds a lease
        self.guard = FileGuard(weights.paths, weights.identities, lease=experts is not None and experts.remote)
        self.prefetch = PrefetchStats()
        self.pool: Pool | None = None
        self.segments: Segments | None = None
        weights.read_by_rows(rows_on_use(weights))  # as llama.cpp's mmap: a row's pages on use
        if experts is not None and experts.remote:
            # what this process reads itself (attention, routers, output): read ahead now;
            # the routed experts come from hobbitd's slots, embedding rows as they are used
            weights.will_need(routed_expert_tensors(weights) | rows_on_use(weights))
        if experts is not None:
            if served_repacked:
                check_repacked(experts, weights, a.moe_layers)
            self.pool = Pool(self.wctx, a, experts)
            self.segments = Segments(
                experts, self.pool, a.n_expert, self._run, self.timing, self.opts.lookahead, self.prefetch
            )

    # ---- public -------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new sequence (the cache contents are simply overwritten later)."""
        self.n_past = 0
        self.seq += 1  # the daemon's cache policy restarts its per-sequence counters
        self.kv.reset()

    def forward(self, tokens, all_logits: bool = False) -> np.ndarray:
        """The logits after `tokens` (continuing the sequence): (V,) for the last token, or
        (T, V) with all_logits. Without all_logits each batch computes its last row only: a
        prompt's (T, V) logits are 1 GiB at T = 1,024 and a 262k vocabulary."""
        if all_logits:
            return np.concatenate(list(self.logit_pieces(tokens, 0)))
        tokens = self._checked(tokens)
        for start in range(0, tokens.size, self.opts.n_batch):
            out = self._forward_chunk(tokens[start : start + self.opts.n_batch], False)
        return out[-1]

    def logit_pieces(self, tokens, first: int) -> Iterator[np.ndarray]:
        """The logits of rows first..T-1 of `tokens` (continuing the sequence), yielded in
        consecutive pieces of at most n_batch rows: evaluation holds one batch's rows at a
        time. Batches before `first` compute their last row only. Each piece is the
        caller's; the sequence advances as the pieces are taken."""
        return self._pieces(self._checked(tokens), first)

    def _pieces(self, tokens: np.ndarray, first: int) -> Iterator[np.ndarray]:
        for start in range(0, tokens.size, self.opts.n_batch):
            part = tokens[start : start + self.opts.n_batch]
            wanted = start + part.size > first
            out = self._forward_chunk(part, wanted)
            if wanted:
                yield out[max(first - start, 0) :]

    def _checked(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise InputError("forward() needs a non-empty 1-D list of token ids")
        if self.n_past + tokens.size > self.n_ctx:
            raise InputError(f"{self.n_past + tokens.size} tokens do not fit the context of {self.n_ctx} tokens")
        if tokens.min() < 0 or tokens.max() >= self.args.n_vocab:
            raise InputError(f"token id out of range 0..{self.args.n_vocab - 1}")
        return tokens

    def resumable(self, n_past: int) -> bool:
        """Whether forward() can continue the cached sequence at position n_past (<= the
        current one; a chat reusing a prefix sets n_past back): always, except when a
        sliding-window layer's ring no longer holds the window before n_past."""
        return self.kv.resumable(n_past)

    def skip_to(self, n_past: int) -> None:
        """Continue at position n_past as if every position before it were computed: their
        KV cells keep whatever they hold. The work of a chunk there is a real one's, its
        values are not (plan's compute probe times a prompt's last chunk so)."""
        self.kv.assume(n_past)
        self.n_past = n_past

    @property
    def swa_cells(self) -> int:
        """The KV slots of the sliding-window layers' ring (0: the model has none)."""
        return self.kv.swa_cells

    def close(self) -> None:
        self.guard.close()
        self.plans.clear()
        self.arena.free()
        if self.backend:
            lib.ggml_backend_free(self.backend)
            self.backend = None
        self.wctx.free()

    # ---- one chunk ------------------------------------------------------------------------

    def _forward_chunk(self, tokens: np.ndarray, all_logits: bool) -> np.ndarray:
        """One chunk's logits, computed only while the mmapped file is the one mapped (and
        the one hobbitd serves): checked before and after (engine/file_guard.py)."""
        served = getattr(self.experts, "served_file", None)  # hobbitd's identity of the file
        self.guard.enter(served)
        ok = False
        try:
            logits = self._chunk(tokens, all_logits)
            ok = True
        finally:
            self.guard.exit(served, ok)  # a change during the chunk: its logits are not used
        return logits

    def _chunk(self, tokens: np.ndarray, all_logits: bool) -> np.ndarray:
        T = tokens.size
        feed, N, held = self.kv.chunk(self.n_past, T)
        feed["tokens"] = tokens
        table = self.experts.resident() if self.experts is not None and self.opts.resident else None
        if table is not None:  # every expert pinned in shared memory: one graph
            # and every core: hobbitd has nothing to do for this forward
            self._set_threads(self.opts.n_threads or ggml.physical_cores())
            self.pool.point_resident(table)  # new pins (a new hobbitd): re-pointed
        plan = self._plan(Shape(T, N, all_logits), resident=table is not None)
        if self.segments is None or table is not None:
            outs = self._run(plan[0], feed)
            logits = outs.pop("logits")
            self.taps = outs
            if table is not None:
                self.experts.used(T * self.args.n_moe_layer * self.args.n_expert_used, self.seq, self.n_past + T, T)
        else:
            self._set_threads(self.opts.n_threads or default_threads(self.experts, T))
            logits = self.segments.run(plan, feed, seq=self.seq, token=self.n_past + T)
        self.n_past += T
        self.kv.commit(held)
        return logits

    def _set_threads(self, n: int) -> None:
        if n != self.n_threads:
            lib.ggml_backend_cpu_set_n_threads(self.backend, n)
            self.n_threads = n

    def _run(self, g: Graph, feed: dict) -> dict:
        return g.compute(self.backend, feed, self.timing)

    def _plan(self, s: Shape, resident: bool = False) -> list:
        """The graphs for chunks of shape s: the whole forward's one graph, or a segmented
        forward's M + 1 segments (each built on first use per variant)."""

        def make() -> list:
            if self.experts is None or resident:
                return [self._build_forward(s, resident)]
            return [Variants(partial(self._build_segment, s, m)) for m in range(self.args.n_moe_layer + 1)]

        return self.plans.get((*s, resident), make)

    # ---- graph construction -------------------------------------------------------------

    def _build_forward(self, s: Shape, resident: bool) -> Graph:
        """The whole forward in one graph, routed in the graph; the experts the file's, or
        with resident the provider's high-precision slots through the pool's slot table."""
        g = Graph.new()
        x = self._embed(g, s.T)
        for il in range(self.args.n_layer):
            x, h, r_in = self._attend(g, x, il, s)
            x = self._feed_forward(g, x, h, r_in, il, resident)
        self._output(g, x)
        return self._allocated(g, s.T)

    def _build_segment(self, s: Shape, m: int, variant: Variant | None) -> Graph:
        """Segment m of the forward through the expert provider (engine/segments.py): from
        the tokens (m = 0) or MoE layer m-1's experts in high and/or low precision per
        variant = (has_high, has_low), the dense blocks after it, then MoE layer m's
        attention and router (m < the MoE layers' count M), or the output head (m = M)."""
        a = self.args
        moe, M = a.moe_layers, a.n_moe_layer
        g = Graph.new()
        x = self._embed(g, s.T) if m == 0 else self._expert_head(g, m - 1, variant, s)
        first = moe[m - 1] + 1 if m else 0
        stop = moe[m] if m < M else a.n_layer
        for il in range(first, stop):  # dense blocks
            x, h, r_in = self._attend(g, x, il, s)
            x = self._feed_forward(g, x, h, r_in, il)
        if m < M:  # MoE layer m's block, up to its router
            x, h, r_in = self._attend(g, x, stop, s)
            self._router_outputs(g, m, x, h, r_in)
        else:
            self._output(g, x)
        return self._allocated(g, s.T)

    def _allocated(self, g: Graph, T: int) -> Graph:
        try:
            g.allocate(self.arena)
        except MemoryError:
            g.free()
            raise MemoryError(f"could not allocate activations for a {T}-token graph") from None
        return g

    def _embed(self, g: Graph, T: int):
        """The tokens' embeddings [D, T] (input "tokens")."""
        x = lib.ggml_get_rows(g.c, self.t["token_embd.weight"], g.input("tokens", ggml.I32, (T,)))
        return scaled(g.c, x, self.args.embedding_scale)  # [D, T]

    def _attend(self, g: Graph, x, il: int, s: Shape):
        """Block il up to its FFN: attention on the normed x [D, T] and the residual add.
        Returns x [D, T'] (the residual stream), h [D, T'] (the FFN's normed input) and the
        router's input (h, or the block's input where the router reads that); T' = 1 in
        the last block when only the last token's logits are wanted. Taps ffn_in and
        router_in."""
        a, c = self.args, g.c
        p = f"blk.{il}."
        block_in = x
        att = self.attention(g, self.t.norm(c, x, p + "attn_norm"), il, s.T, s.N)
        if il == a.n_layer - 1 and not s.all_logits:
            # only the last token's logits are wanted: drop the other rows early
            att, x, block_in = _last_row(c, att, s.T), _last_row(c, x, s.T), _last_row(c, block_in, s.T)
        x = lib.ggml_add(c, scaled(c, att, a.residual_scale), x)  # [D, T']
        h = self.t.norm(c, x, p + a.ffn_norm)
        r_in = block_in if a.router_first else h
        if "ffn_in" in self.opts.taps:  # debug/calibration taps: [D, T']
            g.output(f"ffn_in.{il}", h)
        if "router_in" in self.opts.taps and il in self.moe_index:
            g.output(f"router_in.{il}", r_in)
        return x, h, r_in

    def _feed_forward(self, g: Graph, x, h, r_in, il: int, resident: bool = False):
        """Block il's FFN on h [D, T'] and the residual add: a dense block's, or MoE
        routed in the graph on r_in, its experts the file's or (resident) the provider's
        slots through the slot table, plus the shared expert. Tap ffn_out."""
        a, c = self.args, g.c
        m = self.moe_index.get(il)  # its MoE layer; None: a dense block
        p = f"blk.{il}."
        if m is None:
            W = lambda n: self.t[p + n + ".weight"]
            f = dense_ffn(c, h, W("ffn_gate"), W("ffn_up"), W("ffn_down"))
        else:
            r = self._router_tensors(m)
            sel, w = topk_weights(c, router(c, r_in, r, a.routing), a.routing, r.selection_bias)
            if resident:
                experts, sel = self.pool.experts(HIGH, m), slots_of(c, sel, self.pool.slot_tensors[m])
            else:
                experts = self._file_experts(il)
            f = self._add_shared_expert(c, h, il, moe_ffn(c, h, experts, sel, w, a.ffn_act))
        if "ffn_out" in self.opts.taps:
            g.output(f"ffn_out.{il}", f)
        return lib.ggml_add(c, scaled(c, f, a.residual_scale), x)  # [D, T']

    def _expert_head(self, g: Graph, m: int, variant: Variant, s: Shape):
        """A segment's start: MoE layer m's experts, as the segment before fetched them
        (segments.Fetched), on x [D, T'] (input "x", the residual stream where that segment
        stopped): per precision in variant, moe_ffn over inputs ids_P [K, T'] (into the
        pool's views) and w_P [K, T'], then the shared expert and the residual add."""
        a, c = self.args, g.c
        b = a.moe_layers[m]
        T_in = 1 if b == a.n_layer - 1 and not s.all_logits else s.T  # the last block keeps the last row
        x = g.input("x", ggml.F32, (a.n_embd, T_in))
        h = self.t.norm(c, x, f"blk.{b}.{a.ffn_norm}")
        K = a.n_expert_used
        y = None
        for prec, present in zip((HIGH, LOW), variant):
            if present:
                ids = g.input(f"ids_{prec}", ggml.I32, (K, T_in))
                wts = g.input(f"w_{prec}", ggml.F32, (K, T_in))
                f = moe_ffn(c, h, self.pool.experts(prec, m), ids, wts, a.ffn_act)
                y = f if y is None else lib.ggml_add(c, y, f)
        y = self._add_shared_expert(c, h, b, y)
        if y is None:  # every routed expert skipped, no shared one
            return x
        return lib.ggml_add(c, scaled(c, y, a.residual_scale), x)

    def _router_outputs(self, g: Graph, m: int, x, h, r_in) -> None:
        """A segment's end at MoE layer m's router, routed as in one graph but only the
        routing comes back: outputs x (the residual stream), sel, w and scores [K, T']
        (moe.route_in_graph on r_in), and the lookahead: ahead_sel.d and ahead_scores.d,
        the next layers' routers (d = 1..lookahead) on this layer's input, the residual
        stream where they read the block's input, else (as trained) the normed FFN input."""
        a, c = self.args, g.c
        g.output("x", x)
        sel, w, scores = route_in_graph(c, r_in, self._router_tensors(m), a.routing)
        g.output("sel", sel)
        g.output("w", w)
        g.output("scores", scores)
        ahead_in = x if a.router_first else h
        for d in range(1, min(self.opts.lookahead, a.n_moe_layer - 1 - m) + 1):
            sel, _, scores = route_in_graph(c, ahead_in, self._router_tensors(m + d), a.routing)
            g.output(f"ahead_sel.{d}", sel)
            g.output(f"ahead_scores.{d}", scores)

    def _output(self, g: Graph, x) -> None:
        """The output head: logits [V, T'] (output "logits")."""
        c, a = g.c, self.args
        x = self.t.norm(c, x, "output_norm")
        logits = self.t.linear(c, "output", x)  # [V, T']
        g.output("logits", scaled(c, logits, 1.0 / a.logit_scale if a.logit_scale else 0.0))

    def _router_tensors(self, m: int) -> RouterTensors:
        p = f"blk.{self.args.moe_layers[m]}."
        return RouterTensors(
            self.t[p + "ffn_gate_inp.weight"], self.t.get(p + "ffn_gate_inp.bias"), self.t.get(p + "exp_probs_b.bias")
        )

    def _file_experts(self, il: int) -> ExpertTensors:
        """Block il's routed experts as the file stacks them (biases: all three or none)."""
        p = f"blk.{il}."
        biases = tuple(self.t.get(p + f"ffn_{n}_exps.bias") for n in PARTS)
        return ExpertTensors(
            *(self.t[p + f"ffn_{n}_exps.weight"] for n in PARTS), biases if all(b is not None for b in biases) else None
        )

    def _add_shared_expert(self, c, h, il, routed):
        """routed + the layer's shared expert (qwen2moe, Granite MoE Shared), which is always
        resident: it is computed from the mmapped file, never asked of the expert provider.
        Its output is scaled by sigmoid(gate_inp_shexp . h), one gate per token, where the
        file has that gate (qwen2moe's). h: [D, T] -> [D, T]."""
        if not self.args.n_ff_shexp:
            return routed
        W = lambda n: self.t[f"blk.{il}.{n}.weight"]
        y = dense_ffn(c, h, W("ffn_gate_shexp"), W("ffn_up_shexp"), W("ffn_down_shexp"))  # [D, T]
        gate = self.t.get(f"blk.{il}.ffn_gate_inp_shexp.weight")  # granite's has none
        if gate is not None:
            y = lib.ggml_mul(c, y, lib.ggml_sigmoid(c, lib.ggml_mul_mat(c, gate, h)))  # [1, T]
        return y if routed is None else lib.ggml_add(c, routed, y)


def default_threads(experts: ExpertProvider | None = None, tokens: int = 1) -> int:
    """Physical cores; one fewer when hobbitd serves the experts of a forward of fewer
    than WIDE tokens: hobbitd reads, answers and copies on the same cores, and ggml's
    OpenMP workers spin between graphs, so on two cores computing a decode step with both
    made every expert request and hint wait for a core (measured: ~25 vs ~12 ms per
    token outside compute and the daemon, same compute). A prompt's graphs are long and
    hobbitd answers one request per layer: there the spare core would idle."""
    cores = ggml.physical_cores()
    remote = experts is not None and experts.remote
    return max(1, cores - 1) if remote and tokens < WIDE else cores


def _last_row(c, x, T):
    nb1 = x.contents.nb[1]
    return lib.ggml_view_2d(c, x, x.contents.ne[0], 1, nb1, (T - 1) * nb1)
