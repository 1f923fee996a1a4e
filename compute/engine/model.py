"""The transformer forward pass, built as ggml graphs over weights that stay in place.

Legend of dimensions (ggml order, contiguous axis first):
  T tokens in the batch   D n_embd      F n_ff (per expert)   V vocabulary
  E experts               K experts used per token
  H query heads           Hkv KV heads  Dh head dim           N KV slots visible (n_kv)

One forward for every supported architecture (weights.ARCHS: llama/Mixtral, qwen3moe,
olmoe, qwen2moe, phimoe, gpt-oss, granitemoe, glm4moe, bailingmoe2, ernie4_5-moe,
deepseek2, smallthinker): they differ only through ModelArgs (QK norm, RoPE type and
scaling, routing, the FFN activation, sliding-window layers, shared experts, leading dense
blocks; see weights.Arch) and through the optional tensors their files have (biases,
attention sinks, RoPE factors, selection biases), as llama.cpp's graphs do; moe_ffn is the
one MoE function, route() its Python twin. deepseek2's multi-head latent attention is its
own function (_attention_mla) beside _attention.

Blocks and MoE layers: a model's blocks are its transformer layers; the MoE layers are the
blocks with routed experts (ModelArgs.moe_layers), numbered 0.. as hobbitd numbers them.
Leading dense blocks run like attention does, always in this process.

Sliding-window layers (gpt-oss) keep their own, smaller KV cache, as llama.cpp does: a ring
of swa_cells slots (slot = position mod swa_cells) that holds the window plus one batch.

Two ways to run, one set of layer functions:
- in-process: experts are the stacked tensors of the mmapped GGUF and routing happens
  inside the graph; one graph per forward.
- with an expert provider (ExpertClient: hobbitd's shared memory; LocalExperts: the
  model's own files in two precisions): the forward is cut into segments at each router.
  Segment m runs MoE layer m-1's experts, the dense blocks after it, and MoE layer m's
  attention and router, routed in the graph as in one graph: it hands back only the
  top-K ids, their weights and unimportance scores, and the lookahead's prediction of
  the next layers (their routers on this layer's input). Between segments Python fetches
  the experts (each in the precision the provider chose, or skipped), hints the coming
  layers' predicted experts, and releases the previous layer's experts.

An expert provider is an ExpertProvider (engine/experts.py).
A graph (or a segment list) is built once per shape (T, N, all_logits) and reused: only
its input tensors are rewritten.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ...loader.layout import routed_expert_tensors
from ...loader.precision import HIGH, LOW, unimportance
from ...protocol.errors import InputError
from . import ggml
from .experts import ExpertProvider
from .ggml import lib
from .weights import ModelArgs, Routing, Weights

GRAPH_SIZE = 8192        # max nodes per graph
KV_PAD = 256             # N is rounded up to this, so decode graphs are reused for 256 tokens
WIDE = 16                # tokens from which a forward through hobbitd computes on every core
MAX_PLANS = 12           # shapes kept per model (each owns its activation buffers)
PARTS = ("gate", "up", "down")
SWIGLU_OAI = (1.702, 7.0)   # gpt-oss's swiglu: alpha, limit (llama.cpp's build_moe_ffn)


@dataclass
class RunOptions:
    """How a Model runs. n_ctx: KV cache length in tokens; n_batch: prompt chunk size."""
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int = 0   # 0: physical cores, one fewer when hobbitd serves the experts
    taps: tuple = ()     # intermediates to keep, by name: "ffn_in" (each layer's normed FFN
                         # input), "router_in" (each MoE layer's router input: ffn_in, or
                         # the block's input where the router reads it), "ffn_out" (its FFN
                         # output; in-process runs only)
    lookahead: int = 3   # layers ahead the prefetch predicts (0: no hints)
    resident: bool = True    # when the provider holds every expert (ExpertProvider.resident),
                             # compute each forward in one graph, asking nothing per layer


@dataclass
class _Graph:
    ctx: ggml.Context
    graph: int
    galloc: int = None
    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    # numpy views of the allocated inputs (flat) and outputs ((T', X)): made once, so a
    # forward's writes and reads are plain numpy copies
    feeds: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    def allocate(self, buft) -> None:
        """Give the graph its activations and make the views. An input no node reads has
        no memory and no view (positions in a segment whose layers all go without RoPE)."""
        self.galloc = lib.ggml_gallocr_new(buft)
        if not lib.ggml_gallocr_alloc_graph(self.galloc, self.graph):
            raise MemoryError("could not allocate the graph's activations")
        self.feeds = {name: ggml.array(x) for name, x in self.inputs.items() if x.contents.data}
        self.results = {name: ggml.array(t, (t.contents.ne[1], t.contents.ne[0]))
                        for name, t in self.outputs.items()}

    def free(self) -> None:
        self.feeds, self.results = {}, {}
        if self.galloc:
            lib.ggml_gallocr_free(self.galloc)
            self.galloc = None
        self.ctx.free()


@dataclass
class Timing:
    """Seconds spent, summed over forwards: computing, and waiting for the daemon."""
    compute_s: float = 0.0
    expert_wait_s: float = 0.0
    last_graph_s: float = 0.0     # the latest graph alone: the next one of a forward takes about as long


class Model:
    """One sequence's forward pass: weights (shared mmap), a KV cache, cached graphs.

    forward(tokens) appends tokens at position n_past and returns float32 logits:
    shape (V,) for the last token, or (T, V) with all_logits=True. With `experts` (an
    ExpertProvider: hobbitd's shared memory, or LocalExperts) the forward is segmented
    and the routed experts come from the provider.
    """

    def __init__(self, weights: Weights, opts: RunOptions | None = None,
                 experts: ExpertProvider | None = None):
        self.w = weights
        self.args: ModelArgs = weights.args
        self.opts = opts or RunOptions()
        a = self.args
        if self.opts.n_ctx <= 0:
            raise InputError(f"context size {self.opts.n_ctx} must be positive")
        self.n_ctx = self.opts.n_ctx
        self.n_past = 0
        self.seq = 0
        self.taps: dict = {}     # name -> (T', X) array from the last forward (RunOptions.taps)
        self.timing = Timing()
        self.backend = lib.ggml_backend_cpu_init()
        self.n_threads = 0
        self._set_threads(self.opts.n_threads or default_threads(experts))
        self.buft = lib.ggml_backend_cpu_buffer_type()

        # Weight tensors point straight into the mmapped GGUF; + per layer the K and V
        # caches, one view per expert part and precision (the pools below) and a slot table
        parts = sum(len(r.format.parts) for r in experts.regions.values()) if experts else 0
        self.wctx = ggml.Context(len(weights.tensors) + (3 + parts) * a.n_layer + 16)
        self.t = {}
        for name, info in weights.tensors.items():
            self.t[name] = self.wctx.tensor(info.type, info.shape, name, weights.address(name))
        if "output.weight" not in self.t:  # tied embeddings
            self.t["output.weight"] = self.t["token_embd.weight"]
        # RoPE frequency factors (Llama 3.1's rope_freqs; LongRoPE's short and long sets,
        # the long ones for contexts beyond the pre-training one), as llama.cpp picks them
        long = "rope_factors_long" if self.n_ctx > a.n_ctx_orig else "rope_factors_short"
        self.rope_factors = self.t.get("rope_freqs.weight", self.t.get(long + ".weight"))

        # KV cache: per layer, n_ctx slots of Hkv*Dh F16 values; slot i holds position i.
        # Sliding-window layers: swa_cells slots as llama.cpp sizes its SWA cache (the
        # window plus a batch, padded to 256), slot = position mod swa_cells; swa_pos holds
        # the position each slot has (-1: none yet).
        self.swa_cells = min(self.n_ctx, -(-(a.n_swa + self.opts.n_batch) // KV_PAD) * KV_PAD) \
            if a.n_swa else 0
        self.swa_pos = np.full(self.swa_cells, -1, np.int64)
        cells = [self.swa_cells if a.is_swa(il) else self.n_ctx for il in range(a.n_layer)]
        self.k_cache = [np.zeros((n, a.n_embd_kv), np.float16) for n in cells]
        # MLA caches one latent per token, its first kv_lora_rank values are the V
        self.v_cache = [np.zeros((n, 0 if a.kv_lora_rank else a.n_embd_kv), np.float16) for n in cells]
        self.tk = [self.wctx.tensor(ggml.F16, (a.n_embd_kv, len(c)), f"cache_k_l{i}", c.ctypes.data)
                   for i, c in enumerate(self.k_cache)]
        self.tv = [self.wctx.tensor(ggml.F16, (a.n_embd_kv, len(c)), f"cache_v_l{i}", c.ctypes.data)
                   for i, c in enumerate(self.v_cache)] if not a.kv_lora_rank else []
        self.plans: OrderedDict[tuple, list[_Graph]] = OrderedDict()

        self.moe_index = {il: m for m, il in enumerate(a.moe_layers)}   # block -> MoE layer
        self.experts = experts
        self.prefetch = PrefetchStats()
        if experts is not None and experts.remote:
            # what this process reads itself (attention, routers, embeddings, output): read
            # ahead now; the routed experts come from hobbitd's slots, never from the file
            weights.will_need(routed_expert_tensors(weights))
        if experts is not None:
            # Per precision, layer and part: every slot of that precision as one stacked
            # tensor [.., .., S] (a bias: [.., S]) of that layer's type (quantizer mixes
            # differ by layer) whose stride is the provider's; re-pointed before the layer
            # runs. Parts: gate, up, down, then the expert biases where the model has them.
            self.pool = {}
            for prec, r in experts.regions.items():
                f = r.format
                self.pool[prec] = []
                for m, il in enumerate(a.moe_layers):
                    strides, views = experts.part_strides(prec, m), []
                    for p, name in enumerate(f.parts):
                        shape = f.shapes[p]
                        t = self.wctx.tensor(f.types(m)[p], (*shape, r.n_slots),
                                             f"pool_{prec}_{name}_l{il}")
                        t.contents.nb[len(shape)] = strides[p]
                        for d in range(len(shape) + 1, ggml.MAX_DIMS):
                            t.contents.nb[d] = strides[p] * r.n_slots
                        views.append(t)
                    self.pool[prec].append(views)
            self._pointed = {}     # (precision, layer) -> (bases, strides, first, count) viewed now
            # the provider's slot of each expert, per MoE layer [1, E] i32, for the one-graph
            # forward on resident experts (routing in the graph, then a lookup of the slots)
            self.slot_table = np.zeros((a.n_moe_layer, a.n_expert), np.int32)
            self._resident_table = None   # the provider's table the views point at
            self.t_slots = [self.wctx.tensor(ggml.I32, (1, a.n_expert), f"slots_l{il}",
                                             self.slot_table[m].ctypes.data)
                            for m, il in enumerate(a.moe_layers)]

    def _point_pool(self, layer: int, spans: dict | None = None) -> None:
        """Point the pool views of MoE layer `layer` at the provider's slots: per precision
        the slots spans[precision] = (first, count) (the expert ids fed are then relative to
        first; a precision not in spans is left as it is), else all of them. ggml's
        mul_mat_id does bookkeeping per slot it views: every slot viewed for every layer
        cost ~10 % of a decode step on the default model."""
        for prec, layers in self.pool.items():
            if spans is not None and prec not in spans:
                continue          # the segment computes nothing in that precision
            first, count = (spans or {}).get(prec, (0, self.experts.regions[prec].n_slots))
            bases = self.experts.part_bases(prec, layer)
            strides = self.experts.part_strides(prec, layer)
            if self._pointed.get((prec, layer)) == (bases, strides, first, count):
                continue
            shapes = self.experts.regions[prec].format.shapes
            for t, base, stride, shape in zip(layers[layer], bases, strides, shapes):
                t.contents.data = base + first * stride
                dim = len(shape)                  # the slot dimension
                t.contents.ne[dim] = count
                for d in range(dim + 1, ggml.MAX_DIMS):
                    t.contents.nb[d] = stride * count
            self._pointed[prec, layer] = (bases, strides, first, count)

    # ---- public -------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new sequence (the cache contents are simply overwritten later)."""
        self.n_past = 0
        self.seq += 1     # the daemon's cache policy restarts its per-sequence counters
        self.swa_pos[:] = -1

    def forward(self, tokens, all_logits: bool = False) -> np.ndarray:
        tokens = np.asarray(tokens, dtype=np.int32)
        if tokens.ndim != 1 or tokens.size == 0:
            raise InputError("forward() needs a non-empty 1-D list of token ids")
        if self.n_past + tokens.size > self.n_ctx:
            raise InputError(f"{self.n_past + tokens.size} tokens do not fit the context of "
                             f"{self.n_ctx} tokens")
        if tokens.min() < 0 or tokens.max() >= self.args.n_vocab:
            raise InputError(f"token id out of range 0..{self.args.n_vocab - 1}")
        outs = []
        for start in range(0, tokens.size, self.opts.n_batch):
            chunk = tokens[start:start + self.opts.n_batch]
            last = start + chunk.size == tokens.size
            out = self._forward_chunk(chunk, all_logits or not last)
            if all_logits:
                outs.append(out)
        return np.concatenate(outs) if all_logits else out[-1]

    def resumable(self, n_past: int) -> bool:
        """Whether forward() can continue the cached sequence at position n_past (<= the
        current one; a chat reusing a prefix sets n_past back): always, except when a
        sliding-window layer's ring no longer holds the window before n_past."""
        if not self.swa_cells:
            return True
        first = np.arange(max(0, n_past - self.args.n_swa + 1), n_past)
        return bool((self.swa_pos[first % self.swa_cells] == first).all())

    def close(self) -> None:
        for plan in self.plans.values():
            for g in plan:
                g.free()
        self.plans.clear()
        if self.backend:
            lib.ggml_backend_free(self.backend)
            self.backend = None
        self.wctx.free()

    # ---- one chunk ------------------------------------------------------------------------

    def _forward_chunk(self, tokens: np.ndarray, all_logits: bool) -> np.ndarray:
        T = tokens.size
        pos = np.arange(self.n_past, self.n_past + T, dtype=np.int32)
        N = min(self.n_ctx, -(-(self.n_past + T) // KV_PAD) * KV_PAD)
        # mask[t, j] = 0 where slot j holds a position <= pos[t], else -inf (causal, no gaps)
        mask = np.where(np.arange(N)[None, :] <= pos[:, None], 0.0, -np.inf).astype(np.float16)
        feed = {"tokens": tokens, "pos": pos, "kv_idx": pos.astype(np.int64), "mask": mask}
        if self.swa_cells:
            held = self._swa_feed(pos, N, feed)
            self.swa_pos[pos % self.swa_cells] = -1   # overwritten even if the forward fails
        table = self.experts.resident() if self.experts is not None and self.opts.resident else None
        if table is not None:        # every expert pinned in shared memory: one graph
            # and every core: hobbitd has nothing to do for this forward
            self._set_threads(self.opts.n_threads or ggml.physical_cores())
            if table is not self._resident_table:    # new pins (a new hobbitd): re-point
                for m in range(self.args.n_moe_layer):
                    first = int(table[m].min())      # a layer's slots, usually side by side
                    self.slot_table[m] = table[m] - first
                    self._point_pool(m, {HIGH: (first, int(table[m].max()) - first + 1)})
                self._resident_table = table
        plan = self._plan(T, N, all_logits, resident=table is not None)
        if self.experts is None or table is not None:
            outs = self._run(plan[0], feed)
            logits = outs.pop("logits")
            self.taps = outs
            if table is not None:
                self.experts.used(T * self.args.n_moe_layer * self.args.n_expert_used, self.seq,
                                  self.n_past + T, T)
        else:
            self._set_threads(self.opts.n_threads or default_threads(self.experts, T))
            logits = self._run_segments(plan, feed)
        self.n_past += T
        if self.swa_cells:
            self.swa_pos = held
        return logits

    def _set_threads(self, n: int) -> None:
        if n != self.n_threads:
            lib.ggml_backend_cpu_set_n_threads(self.backend, n)
            self.n_threads = n

    def _swa_feed(self, pos: np.ndarray, N: int, feed: dict) -> np.ndarray:
        """The sliding-window layers' inputs for a chunk at positions pos: the slots it
        writes (kv_idx_swa) and mask_swa [T, N'] over the first N' = min(swa_cells, N)
        slots (0 where a slot holds a position in the query's window: pos - n_swa < p <=
        pos). Returns the slots' positions once the chunk is written. After a rewind
        (chat reusing a prefix) a slot may hold a position of the continuation given up
        on: past every query of the chunk, so masked, or rewritten by it. InputError if
        the window before the first position was overwritten meanwhile."""
        n_swa, cells = self.args.n_swa, self.swa_cells
        if not self.resumable(int(pos[0])):
            raise InputError(f"the sliding-window cache no longer holds the {n_swa - 1} positions "
                             f"before {pos[0]}; start the sequence again (reset) from position 0")
        held = self.swa_pos.copy()
        held[pos % cells] = pos
        p = held[:min(cells, N)][None, :]
        seen = (p >= 0) & (p <= pos[:, None]) & (pos[:, None] - p < n_swa)
        feed["kv_idx_swa"] = (pos % cells).astype(np.int64)
        feed["mask_swa"] = np.where(seen, 0.0, -np.inf).astype(np.float16)
        return held

    def _run(self, g: _Graph, feed: dict) -> dict:
        for name, view in g.feeds.items():
            if name in feed:
                view[:] = feed[name].ravel()
        t0 = time.perf_counter()
        status = lib.ggml_backend_graph_compute(self.backend, g.graph)
        self.timing.last_graph_s = time.perf_counter() - t0
        self.timing.compute_s += self.timing.last_graph_s
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")
        # copies: the graph's memory is rewritten by its next compute
        return {name: view.copy() for name, view in g.results.items()}

    def _run_segments(self, plan: list, feed: dict) -> np.ndarray:
        """Segment by segment; between them, route and fetch the experts of one MoE
        layer (m: its index among the MoE layers, as the provider numbers them)."""
        a, provider = self.args, self.experts
        held, variant, spans = [], None, None
        self._resident_table = None      # the views are re-pointed below
        try:
            for m, variants in enumerate(plan):
                if m > 0:
                    self._point_pool(m - 1, spans)
                out = self._run(variants(variant), feed)
                provider.release(held)          # the previous layer's experts are done with
                held = []
                if m == a.n_moe_layer:
                    return out["logits"]
                sel, w, scores = out["sel"], out["w"], out["scores"]        # (T', K) each
                self.prefetch.observe(m, sel)
                wanted, best = _wanted(sel, scores)
                t0 = time.perf_counter()
                T = feed["tokens"].size      # the last layer routes only the last row
                held = provider.fetch(m, wanted, best, seq=self.seq,
                                      token=self.n_past + T, n_tokens=T)
                self.timing.expert_wait_s += time.perf_counter() - t0
                # after the demand (never ahead of it): the coming layers' reads overlap
                # with this layer's compute (in a prompt too: the next layer streams in)
                if self.opts.lookahead > 0 and m + 1 < a.n_moe_layer:
                    self._hint(m, out)
                pairs = provider.fetch_pairs(m, sel, scores, dict(zip(wanted, held)))
                inputs, spans = _expert_inputs(sel, w, pairs, a.n_expert)
                feed = {**feed, "x": out["x"], **inputs}
                variant = (feed["has_high"], feed["has_low"])
        finally:
            provider.release(held)
            provider.flush()

    def _hint(self, il: int, out: dict) -> None:
        """Hint MoE layers il+1..il+p as MoE layer il's segment predicted them (its outputs
        ahead_sel.d, ahead_scores.d (T', K)); the daemon walks them and prefetches at the
        first predicted miss. Several tokens (a prompt): each layer's prediction is every
        expert some token is predicted to use, at its most important use."""
        last = min(self.args.n_moe_layer, il + 1 + self.opts.lookahead)
        if self.experts.holds(il + 1, last):   # cached already (most of a model that fits)
            return
        ahead = [(il + d, out[f"ahead_sel.{d}"], out[f"ahead_scores.{d}"]) for d in range(1, last - il)]
        if ahead[0][1].shape[0] == 1:
            preds = [(t, sel[0].tolist(), scores[0].tolist()) for t, sel, scores in ahead]
            self.prefetch.predict(il, preds)
        else:     # most important first: hobbitd prefetches in that order, within a budget
            preds = []
            for t, sel, scores in ahead:
                experts, best = _wanted(sel, scores)
                order = np.argsort(best, kind="stable")
                preds.append((t, [experts[i] for i in order], [best[i] for i in order]))
        # the next segment computes about as long as this one did: hobbitd's prefetch budget
        self.experts.hint(il, preds, self.timing.last_graph_s)

    def _plan(self, T: int, N: int, all_logits: bool, resident: bool = False) -> list[_Graph]:
        key = (T, N, all_logits, resident)
        plan = self.plans.get(key)
        if plan is not None:
            self.plans.move_to_end(key)
            return plan
        if len(self.plans) >= MAX_PLANS:
            for g in self.plans.popitem(last=False)[1]:
                g.free()
        if self.experts is None or resident:
            plan = [self._build(T, N, all_logits, None, resident=resident)]
        else:
            plan = [_Variants(self, T, N, all_logits, m) for m in range(self.args.n_moe_layer + 1)]
        self.plans[key] = plan
        return plan

    # ---- graph construction -------------------------------------------------------------

    def _build(self, T: int, N: int, all_logits: bool, segment: int | None, variant=None,
               resident: bool = False) -> _Graph:
        """The whole forward (segment None; its experts the file's, or with resident the
        provider's high-precision slots through slot_table), or segment m: MoE layer m-1's
        experts (m > 0; in high and/or low precision per variant = (has_high, has_low)),
        the dense blocks after it, then MoE layer m's attention and router (m < the MoE
        layers' count M), or the output head (m = M)."""
        a = self.args
        L, moe = a.n_layer, a.moe_layers
        M = len(moe)
        ctx = ggml.Context(GRAPH_SIZE, GRAPH_SIZE)
        c = ctx.ptr
        g = _Graph(ctx, lib.ggml_new_graph_custom(c, GRAPH_SIZE, False))

        def inp(name, t, shape):
            x = ctx.tensor(t, shape, name)
            lib.ggml_set_input(x)
            g.inputs[name] = x
            return x

        def out(name, x):
            lib.ggml_set_output(x)
            lib.ggml_build_forward_expand(g.graph, x)
            g.outputs[name] = x

        W = self.t.__getitem__
        if segment is None:
            blocks = range(0, L)
        else:       # from the block after MoE layer m-1's to MoE layer m's (or the last)
            blocks = range(moe[segment - 1] + 1 if segment else 0, moe[segment] + 1 if segment < M else L)
        if not segment:
            x = lib.ggml_get_rows(c, W("token_embd.weight"), inp("tokens", ggml.I32, (T,)))  # [D, T]
            x = self._scaled(c, x, a.embedding_scale)
        else:
            b = moe[segment - 1]
            T_in = 1 if b == L - 1 and not all_logits else T   # the last block keeps the last row
            x = inp("x", ggml.F32, (a.n_embd, T_in))
            h = self._norm(c, x, f"blk.{b}.{a.ffn_norm}")
            K = a.n_expert_used
            y = None
            for prec, present in zip(("high", "low"), variant):
                if present:
                    ids = inp(f"ids_{prec}", ggml.I32, (K, T_in))
                    wts = inp(f"w_{prec}", ggml.F32, (1, K, T_in))
                    views = self.pool[prec][segment - 1]
                    f = moe_ffn(c, h, views[:3], a.routing, biases=views[3:] or None, sel=ids,
                                weights=wts, act=a.ffn_act)
                    y = f if y is None else lib.ggml_add(c, y, f)
            y = self._add_shared_expert(c, h, b, y)
            if y is not None:      # None: every routed expert skipped, no shared one
                x = lib.ggml_add(c, self._scaled(c, y, a.residual_scale), x)
        if blocks:
            pos = inp("pos", ggml.I32, (T,))
        kv_inputs = {}

        def kv(il):
            """(slots written, mask, N) of layer il's KV cache, made on first use: a graph
            input that no node uses gets no memory."""
            swa = a.is_swa(il)
            if swa not in kv_inputs:
                n = min(self.swa_cells, N) if swa else N
                sfx = "_swa" if swa else ""
                kv_inputs[swa] = (inp("kv_idx" + sfx, ggml.I64, (T,)), inp("mask" + sfx, ggml.F16, (n, T)), n)
            return kv_inputs[swa]

        attention = self._attention_mla if a.kv_lora_rank else self._attention
        for il in blocks:
            p = f"blk.{il}."
            block_in = x
            att = attention(c, self._norm(c, x, p + "attn_norm"), il, pos, *kv(il), T)
            if il == L - 1 and not all_logits:
                # only the last token's logits are wanted: drop the other rows early
                att, x, block_in = _last_row(c, att, T), _last_row(c, x, T), _last_row(c, block_in, T)
            x = lib.ggml_add(c, self._scaled(c, att, a.residual_scale), x)  # [D, T']
            h = self._norm(c, x, p + a.ffn_norm)
            m = self.moe_index.get(il)      # its MoE layer; None: a dense block
            r_in = block_in if a.router_first else h
            if "ffn_in" in self.opts.taps:     # debug/calibration taps: [D, T']
                out(f"ffn_in.{il}", h)
            if "router_in" in self.opts.taps and m is not None:
                out(f"router_in.{il}", r_in)
            if segment is not None and m == segment:   # stop at the router: Python fetches the experts
                out("x", x)
                # routed here as moe_ffn routes in one graph: only ids and weights come back
                sel, w, scores = self._route(c, r_in, m)
                out("sel", sel)
                out("w", w)
                out("scores", scores)
                # the lookahead: the next layers' routers on this layer's input, the
                # residual stream where they read the block's input, else (as trained) the
                # normed FFN input
                for d in range(1, min(self.opts.lookahead, M - 1 - m) + 1):
                    sel, _, scores = self._route(c, x if a.router_first else h, m + d)
                    out(f"ahead_sel.{d}", sel)
                    out(f"ahead_scores.{d}", scores)
                break
            if m is not None:
                if resident:     # the provider's slots, looked up through slot_table
                    views = self.pool[HIGH][m]
                    experts, biases = views[:3], views[3:] or None
                else:
                    experts = [W(p + f"ffn_{n}_exps.weight") for n in PARTS]
                    biases = [self.t.get(p + f"ffn_{n}_exps.bias") for n in PARTS]
                    biases = biases if all(b is not None for b in biases) else None
                f = moe_ffn(c, h, experts, a.routing, biases=biases, router_in=r_in,
                            gate_inp=W(p + "ffn_gate_inp.weight"),
                            gate_inp_b=self.t.get(p + "ffn_gate_inp.bias"),
                            sel_bias=self.t.get(p + "exp_probs_b.bias"), act=a.ffn_act,
                            slot_table=self.t_slots[m] if resident else None)
                f = self._add_shared_expert(c, h, il, f)
            else:
                f = dense_ffn(c, h, W(p + "ffn_gate.weight"), W(p + "ffn_up.weight"), W(p + "ffn_down.weight"))
            if "ffn_out" in self.opts.taps:
                out(f"ffn_out.{il}", f)
            x = lib.ggml_add(c, self._scaled(c, f, a.residual_scale), x)    # [D, T']
        if segment is None or segment == M:
            x = self._norm(c, x, "output_norm")
            logits = self._linear(c, "output", x)                            # [V, T']
            out("logits", self._scaled(c, logits, 1.0 / a.logit_scale if a.logit_scale else 0.0))

        try:
            g.allocate(self.buft)
        except MemoryError:
            g.free()
            raise MemoryError(f"could not allocate activations for a {T}-token graph") from None
        return g

    def _route(self, c, r_in, m: int):
        """MoE layer m's routing of r_in [D, T] in the graph: (sel [K, T] i32, its weights,
        their unimportance scores), each contiguous."""
        p = f"blk.{self.args.moe_layers[m]}."
        probs = router(c, r_in, self.t[p + "ffn_gate_inp.weight"], self.t.get(p + "ffn_gate_inp.bias"),
                       self.args.routing)
        sel, w = topk_weights(c, probs, self.args.routing, self.t.get(p + "exp_probs_b.bias"))
        return lib.ggml_cont(c, sel), w, unimportance_scores(c, w)   # sel: a view of the argsort

    @staticmethod
    def _scaled(c, x, factor: float):
        """x times factor (Granite's multipliers); 0: x as it is."""
        return lib.ggml_scale(c, x, factor) if factor else x

    def _norm(self, c, x, name):
        """RMS norm times `name`.weight, plus `name`.bias where the file has one (phimoe)."""
        y = lib.ggml_mul(c, lib.ggml_rms_norm(c, x, self.args.rms_eps), self.t[name + ".weight"])
        bias = self.t.get(name + ".bias")
        return y if bias is None else lib.ggml_add(c, y, bias)

    def _linear(self, c, name, x):
        """`name`.weight x, plus `name`.bias where the file has one (qwen2moe's q/k/v, phimoe)."""
        y = lib.ggml_mul_mat(c, self.t[name + ".weight"], x)
        bias = self.t.get(name + ".bias")
        return y if bias is None else lib.ggml_add(c, y, bias)

    def _add_shared_expert(self, c, h, il, routed):
        """routed + the layer's shared expert (qwen2moe, Granite MoE Shared), which is always
        resident: it is computed from the mmapped file, never asked of the expert provider.
        Its output is scaled by sigmoid(gate_inp_shexp . h), one gate per token, where the
        file has that gate (qwen2moe's). h: [D, T] -> [D, T]."""
        if not self.args.n_ff_shexp:
            return routed
        W = lambda n: self.t[f"blk.{il}.{n}.weight"]  # noqa: E731
        y = dense_ffn(c, h, W("ffn_gate_shexp"), W("ffn_up_shexp"), W("ffn_down_shexp"))  # [D, T]
        gate = self.t.get(f"blk.{il}.ffn_gate_inp_shexp.weight")   # granite's has none
        if gate is not None:
            y = lib.ggml_mul(c, y, lib.ggml_sigmoid(c, lib.ggml_mul_mat(c, gate, h)))    # [1, T]
        return y if routed is None else lib.ggml_add(c, routed, y)

    def _attention(self, c, h, il, pos, kv_idx, mask, N, T):
        """Layer il's self-attention over N slots of its KV cache (the sliding-window one
        on windowed layers), with the file's attention sinks where it has them."""
        a = self.args
        p = f"blk.{il}."
        Dh, H, Hkv = a.head_dim, a.n_head, a.n_head_kv
        if p + "attn_qkv.weight" in self.t:     # one projection: Q, K, V rows (bailingmoe2)
            qkv = self._linear(c, p + "attn_qkv", h)                         # [(H+2Hkv)*Dh, T]
            nb1, f32 = qkv.contents.nb[1], 4
            q = lib.ggml_cont(c, lib.ggml_view_2d(c, qkv, H * Dh, T, nb1, 0))
            k = lib.ggml_cont(c, lib.ggml_view_2d(c, qkv, Hkv * Dh, T, nb1, H * Dh * f32))
            v = lib.ggml_cont(c, lib.ggml_view_2d(c, qkv, Hkv * Dh, T, nb1, (H + Hkv) * Dh * f32))
        else:
            q = self._linear(c, p + "attn_q", h)                             # [H*Dh, T]
            k = self._linear(c, p + "attn_k", h)                             # [Hkv*Dh, T]
            v = self._linear(c, p + "attn_v", h)                             # [Hkv*Dh, T]
        if a.qk_norm == "full":      # olmoe: one RMS norm over all heads
            q, k = self._norm(c, q, p + "attn_q_norm"), self._norm(c, k, p + "attn_k_norm")
        q = lib.ggml_reshape_3d(c, q, Dh, H, T)
        k = lib.ggml_reshape_3d(c, k, Dh, Hkv, T)
        if a.qk_norm == "head":      # qwen3moe: each head normed on its own
            q, k = self._norm(c, q, p + "attn_q_norm"), self._norm(c, k, p + "attn_k_norm")
        if not a.rope_layers or a.rope_layers[il]:       # (smallthinker: some layers have none)
            q = self._rope(c, q, pos, il)                                    # [Dh, H, T]
            k = self._rope(c, k, pos, il)                                    # [Dh, Hkv, T]

        # write this chunk's K and V into their cache slots, then attend over N slots
        kc = lib.ggml_set_rows(c, self.tk[il], lib.ggml_reshape_2d(c, k, Dh * Hkv, T), kv_idx)
        vc = lib.ggml_set_rows(c, self.tv[il], v, kv_idx)
        es = 2  # F16 bytes
        kv = lambda t: lib.ggml_permute(  # noqa: E731
            c, lib.ggml_view_3d(c, t, Dh, Hkv, N, Dh * es, Dh * Hkv * es, 0), 0, 2, 1, 3)  # [Dh, N, Hkv]
        scale = a.attention_scale or 1.0 / Dh ** 0.5
        if a.scale_q_first:     # the same product, rounded as llama.cpp's phi3 graph rounds it
            q, scale = lib.ggml_scale(c, q, scale), 1.0
        # [H] F32 attention sinks: a per-head logit every query also attends to (gpt-oss)
        o = flash_attention(c, q, kv(kc), kv(vc), mask, scale, self.t.get(p + "attn_sinks.weight"))
        o = lib.ggml_reshape_2d(c, o, Dh * H, T)                             # [H*Dh, T]
        return self._linear(c, p + "attn_output", o)                         # [D, T]

    def _attention_mla(self, c, h, il, pos, kv_idx, mask, N, T):
        """Layer il's multi-head latent attention (deepseek2), as llama.cpp computes it:
        each token caches one latent [R] (normed) and its RoPE part [r]; a head's query is
        its no-RoPE part folded through attn_k_b into latent space [R] beside its RoPE part
        [r]; keys are the cached [R + r], values the cached latents [R], and attn_v_b takes
        each head's output from latent space to its value width Dv."""
        a = self.args
        p = f"blk.{il}."
        W = lambda n: self.t[p + n + ".weight"]  # noqa: E731
        H, R, r = a.n_head, a.kv_lora_rank, a.rope_dim
        Dk, Dv, f32, f16 = a.mla_head_k, a.mla_head_v, 4, 2
        nope = Dk - r
        if p + "attn_q_a.weight" in self.t:      # the query through its own low rank (V2, V3)
            q = lib.ggml_mul_mat(c, W("attn_q_b"), self._norm(c, lib.ggml_mul_mat(c, W("attn_q_a"), h),
                                                               p + "attn_q_a_norm"))
        else:                                   # V2-Lite
            q = lib.ggml_mul_mat(c, W("attn_q"), h)
        q = lib.ggml_reshape_3d(c, q, Dk, H, T)                               # [Dk, H, T]
        kv_pe = lib.ggml_mul_mat(c, W("attn_kv_a_mqa"), h)                    # [R + r, T]
        row = kv_pe.contents.nb[1]
        latent = self._norm(c, lib.ggml_view_2d(c, kv_pe, R, T, row, 0), p + "attn_kv_a_norm")
        k_pe = self._rope(c, lib.ggml_view_3d(c, kv_pe, r, 1, T, row, row, R * f32), pos, il)  # [r, 1, T]
        nb1, nb2 = q.contents.nb[1], q.contents.nb[2]
        q_nope = lib.ggml_view_3d(c, q, nope, H, T, nb1, nb2, 0)
        q_pe = self._rope(c, lib.ggml_view_3d(c, q, r, H, T, nb1, nb2, nope * f32), pos, il)
        # W_kb [nope, R, H] per head: [nope, T, H] -> [R, T, H], back to [R, H, T]
        q_lat = lib.ggml_permute(c, lib.ggml_mul_mat(c, W("attn_k_b"), lib.ggml_permute(c, q_nope, 0, 2, 1, 3)),
                                 0, 2, 1, 3)
        q = lib.ggml_concat(c, q_lat, q_pe, 0)                                # [R + r, H, T]
        k = lib.ggml_concat(c, lib.ggml_reshape_3d(c, latent, R, 1, T), k_pe, 0)   # [R + r, 1, T]

        kc = lib.ggml_set_rows(c, self.tk[il], lib.ggml_reshape_2d(c, k, R + r, T), kv_idx)
        cached = lambda n: lib.ggml_permute(  # noqa: E731
            c, lib.ggml_view_3d(c, kc, n, 1, N, (R + r) * f16, (R + r) * f16, 0), 0, 2, 1, 3)  # [n, N, 1]
        o = flash_attention(c, q, cached(R + r), cached(R), mask, a.attention_scale)   # [R, H, T]
        # W_vb [R, Dv, H] per head: [R, T, H] -> [Dv, T, H], back to [Dv, H, T]
        o = lib.ggml_mul_mat(c, W("attn_v_b"), lib.ggml_permute(c, o, 0, 2, 1, 3))
        o = lib.ggml_cont(c, lib.ggml_permute(c, o, 0, 2, 1, 3))
        return self._linear(c, p + "attn_output", lib.ggml_reshape_2d(c, o, Dv * H, T))     # [D, T]

    def _rope(self, c, x, pos, il):
        a = self.args
        base = a.rope_base_swa if a.is_swa(il) and a.rope_base_swa else a.rope_base
        return lib.ggml_rope_ext(c, x, pos, self.rope_factors, a.rope_dim, a.rope_type, a.n_ctx_orig,
                                 base, a.rope_freq_scale, a.rope_ext_factor, a.rope_attn_factor,
                                 a.rope_beta_fast, a.rope_beta_slow)


class _Variants:
    """The graphs of one segment, built on first use per variant (has_high, has_low)."""

    def __init__(self, model, T, N, all_logits, segment):
        self.model, self.args, self.graphs = model, (T, N, all_logits, segment), {}

    def __call__(self, variant) -> _Graph:
        if variant not in self.graphs:
            self.graphs[variant] = self.model._build(*self.args, variant)
        return self.graphs[variant]

    def free(self) -> None:
        for g in self.graphs.values():
            g.free()
        self.graphs.clear()


def _wanted(sel: np.ndarray, scores: np.ndarray) -> tuple[list, list]:
    """The distinct experts of a routing sel (T', K), ascending, and each one's most
    important (lowest) score."""
    if sel.shape[0] == 1:         # one token: its experts are distinct already
        pairs = sorted(zip(sel[0].tolist(), scores[0].tolist()))
        return [e for e, _ in pairs], [s for _, s in pairs]
    wanted = np.unique(sel)
    return wanted.tolist(), [float(scores[sel == e].min()) for e in wanted]


def _expert_inputs(sel, w, pairs, block: int) -> tuple[dict, dict]:
    """Per precision: ids [K, T'] and weights [1, K, T'] for the segment, from pairs[t][k]
    = (precision, slot index) or None (skipped) of token t's k-th expert; and the spans
    {precision: (first slot, count)} the ids are relative to (Model._point_pool): the
    aligned `block` of slots that holds them all where one does (hobbitd's home slots,
    block = E: a layer's view stays the same token after token), else just theirs.
    An expert used in the other precision or skipped contributes weight 0 here; its id
    repeats an index already read for that token or batch, so no extra weights are read."""
    wl = w.tolist()
    out, spans = {}, {}
    used = {hd[0] for row in pairs for hd in row if hd is not None}
    for prec in (HIGH, LOW):
        if prec not in used:
            out[f"ids_{prec}"], out[f"has_{prec}"] = np.zeros(sel.shape, np.int32), False
            out[f"w_{prec}"] = np.zeros(sel.shape, np.float32)
            continue
        ids, wts, fill = [], [], None
        for row, ws in zip(pairs, wl):
            own = [hd[1] if hd is not None and hd[0] == prec else None for hd in row]
            first = next((i for i in own if i is not None), None)
            if fill is None:
                fill = first
            ids.append([first if i is None else i for i in own])
            wts.append([x if i is not None else 0.0 for i, x in zip(own, ws)])
        # rows with no own use repeat the batch's first own index
        ids = [[fill if i is None else i for i in row] for row in ids]
        lo, hi = min(map(min, ids)), max(map(max, ids))
        if hi - lo + 1 <= block and lo // block == hi // block:
            lo, hi = lo - lo % block, lo - lo % block + block - 1
        spans[prec] = (lo, hi - lo + 1)
        out[f"ids_{prec}"] = np.array([[i - lo for i in row] for row in ids], np.int32)
        out[f"w_{prec}"] = np.array(wts, np.float32)
        out[f"has_{prec}"] = True
    return out, spans


class PrefetchStats:
    """How well the lookahead predicted each layer's experts, per distance d (layers
    ahead): top-1 hits (the actual top expert was predicted) and expert recall. Only
    predictions made count: none is made while the coming layers are all cached."""

    def __init__(self):
        self.pending: dict = {}      # target layer -> [(distance, predicted set, predicted top1)]
        self.top1: dict = {}         # distance -> [hits, total]
        self.recall: dict = {}       # distance -> [experts predicted and used, experts used]

    def predict(self, layer: int, preds) -> None:
        for target, experts, _ in preds:
            self.pending.setdefault(target, []).append((target - layer, set(experts), experts[0]))

    def observe(self, layer: int, sel) -> None:
        if sel.shape[0] != 1:
            return
        actual = sel[0].tolist()
        for d, predicted, top1 in self.pending.pop(layer, []):
            t = self.top1.setdefault(d, [0, 0])
            t[0] += top1 == actual[0]
            t[1] += 1
            r = self.recall.setdefault(d, [0, 0])
            r[0] += len(predicted & set(actual))
            r[1] += len(actual)

    def summary(self) -> dict:
        return {d: {"top1": h / n if n else 0.0, "recall": self.recall[d][0] / max(self.recall[d][1], 1),
                    "n": n} for d, (h, n) in sorted(self.top1.items())}


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


SPLIT_KV = 512     # cells from which ggml's CPU attention splits a lone query's sums by thread


def flash_attention(c, q, k, v, mask, scale: float, sinks=None):
    """Attention of queries q [Dk, H, T] over k [Dk, N, Hkv] and v [Dv, N, Hkv] (views of
    the KV cache) with mask [N, T] F16 -> [Dv, H, T], accumulated in F32.

    A lone query (decode) over SPLIT_KV or more cells is computed as two identical rows:
    ggml splits one query's sums over the cells by thread and adds the parts, so its
    result would depend on the thread count (the one-graph and per-layer paths run with
    different counts: relative L2 7e-3 apart from position 257 on a random-weight model,
    growing with the context); rows are computed whole, one thread each, which is what
    llama.cpp computes with one thread."""
    T, N = q.contents.ne[2], k.contents.ne[1]
    one = T == 1 and N >= SPLIT_KV
    if one:
        q = lib.ggml_concat(c, q, q, 2)                                      # [Dk, H, 2]
        mask = lib.ggml_concat(c, mask, mask, 1)                             # [N, 2]
    o = lib.ggml_flash_attn_ext(c, lib.ggml_permute(c, q, 0, 2, 1, 3), k, v, mask, scale, 0.0, 0.0)
    if sinks is not None:
        lib.ggml_flash_attn_ext_add_sinks(o, sinks)
    if hasattr(lib, "ggml_prec_set_acc"):
        lib.ggml_prec_set_acc(o, ggml.PREC_F32)
    if one:                                                                  # the first row
        o = lib.ggml_cont(c, lib.ggml_view_3d(c, o, o.contents.ne[0], o.contents.ne[1], 1,
                                              o.contents.nb[1], o.contents.nb[2], 0))
    return o                                                                 # [Dv, H, T]


def _last_row(c, x, T):
    nb1 = x.contents.nb[1]
    return lib.ggml_view_2d(c, x, x.contents.ne[0], 1, nb1, (T - 1) * nb1)


def dense_ffn(c, h, gate, up, down):
    """SwiGLU FFN: down(silu(gate h) * up h). h: [D, T] -> [D, T]."""
    g = lib.ggml_mul_mat(c, gate, h)                                         # [F, T]
    u = lib.ggml_mul_mat(c, up, h)                                           # [F, T]
    return lib.ggml_mul_mat(c, down, lib.ggml_swiglu_split(c, g, u))         # [D, T]


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32 (a router's probabilities)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def router_probs(logits: np.ndarray, routing: Routing) -> np.ndarray:
    """What route() takes, from a router's logits (T, E) (bias added): their softmax or
    sigmoid, or for softmax-weight gating the logits themselves (the top K are picked on
    them)."""
    if routing.gating == "softmax":
        return softmax(logits)
    if routing.gating == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits


def route(probs: np.ndarray, routing: Routing, selection_bias=None):
    """Python's routing, as moe_ffn routes in the graph: probs (T, E), a router's softmax
    or sigmoid (softmax-weight gating: its logits; see router_probs) -> (sel, w, scores),
    each (T, K): the top-K experts by probability plus selection_bias (E,) where given
    (ties to the lower index, as ggml's argsort), the weights their outputs are scaled by
    (the unbiased probabilities, renormalised to sum 1 or as they are per routing, then
    times routing.scale; softmax-weight: the softmax of the K logits, here in numpy,
    which rounds differently from ggml — the segmented forward takes ggml's,
    topk_weights), and HOBBIT's unimportance scores. The scores always come from the
    renormalised weights, whatever the FFN is fed: the thresholds T1/T2 are shares of the
    chosen experts' total weight."""
    choose = probs if selection_bias is None else probs + selection_bias
    if routing.groups:
        choose = _best_groups(choose, routing)
    sel = np.argsort(-choose, axis=-1, kind="stable")[..., :routing.n_used]
    w = np.take_along_axis(probs, sel, axis=-1)
    if routing.gating == "softmax_weight":
        w = softmax(w)
    # summed in double and rounded once, as ggml_sum_rows does: the same weights to the bit
    total = w.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)
    share = w / np.maximum(total, np.float32(6.103515625e-5))
    scores = unimportance(share.reshape(-1, share.shape[-1])).reshape(share.shape)
    w = share if routing.norm_weights else w
    if routing.scale and routing.scale != 1.0:
        w = w * np.float32(routing.scale)
    return sel, w, scores


def _best_groups(choose: np.ndarray, routing: Routing) -> np.ndarray:
    """choose (.., E) with every expert outside the routing.groups_used best groups at
    -inf; a group's score is the sum of its two highest values (group_mask's twin)."""
    G = routing.groups
    grouped = choose.reshape(*choose.shape[:-1], G, -1)                        # (.., G, E/G)
    top2 = np.sort(grouped, axis=-1)[..., -2:]
    score = top2[..., 1] + top2[..., 0]                                        # (.., G)
    best = np.argsort(-score, axis=-1, kind="stable")[..., :routing.groups_used]
    keep = np.zeros(score.shape, bool)
    np.put_along_axis(keep, best, True, axis=-1)
    return np.where(keep[..., None], grouped, -np.inf).reshape(choose.shape).astype(choose.dtype)


class Routers:
    """Every MoE layer's router in numpy, for routing outside the graph (the lookahead's
    prediction, calibration's traces): weights (M, E, D), biases and selection biases
    (M, E), routed as route() routes."""

    def __init__(self, weights: Weights):
        blocks = weights.args.moe_layers
        self.routing = weights.args.routing
        self.weights = np.stack([weights.router(b) for b in blocks])
        self.biases = np.stack([weights.router_bias(b) for b in blocks])
        self.selection = np.stack([weights.selection_bias(b) for b in blocks])

    def route(self, h: np.ndarray, first: int, last: int):
        """Route MoE layers first..last-1 on gate inputs h: (T, D), the same for every
        layer, or (p, T, D), one per layer. Returns route()'s (sel, w, scores), (p, T, K)."""
        if h.ndim == 2:
            logits = np.einsum("led,td->lte", self.weights[first:last], h)
        else:
            logits = np.einsum("led,ltd->lte", self.weights[first:last], h)
        logits = logits + self.biases[first:last, None, :]                    # (p, T, E)
        return route(router_probs(logits, self.routing), self.routing,
                     self.selection[first:last, None, :])


def router(c, h, gate_inp, gate_inp_b, routing: Routing):
    """A router in the graph: gate_inp h (+ bias) -> [E, T], through a softmax or sigmoid
    unless the gating is softmax-weight (route()'s probs, as llama.cpp's build_moe_ffn
    computes them)."""
    logits = lib.ggml_mul_mat(c, gate_inp, h)                                # [E, T]
    if gate_inp_b is not None:
        logits = lib.ggml_add(c, logits, gate_inp_b)
    if routing.gating == "softmax":
        return lib.ggml_soft_max(c, logits)
    if routing.gating == "sigmoid":
        return lib.ggml_sigmoid(c, logits)
    return logits


def topk_weights(c, probs, routing: Routing, selection_bias=None):
    """(sel [K, T] i32, weights [K, T]) of a router's probs [E, T] in the graph: the top-K
    experts by probs + selection_bias [E] if given (argsort, descending), their unbiased
    probabilities; softmax over the K for softmax-weight gating, renormalised to sum 1 if
    routing.norm_weights, times routing.scale if set."""
    E, T = probs.contents.ne[0], probs.contents.ne[1]
    K = routing.n_used
    choose = probs if selection_bias is None else lib.ggml_add(c, probs, selection_bias)
    if routing.groups:
        choose = group_mask(c, choose, routing)
    sel = lib.ggml_argsort_top_k(c, choose, K)                               # [K, T] i32
    w = lib.ggml_get_rows(c, lib.ggml_reshape_3d(c, probs, 1, E, T), sel)   # [1, K, T]
    w = lib.ggml_reshape_2d(c, w, K, T)
    if routing.gating == "softmax_weight":
        w = lib.ggml_soft_max(c, w)
    if routing.norm_weights:
        s = lib.ggml_clamp(c, lib.ggml_sum_rows(c, w), 6.103515625e-5, float("inf"))  # [1, T]
        w = lib.ggml_div(c, w, s)
    if routing.scale and routing.scale != 1.0:
        w = lib.ggml_scale(c, w, routing.scale)
    return sel, w


def unimportance_scores(c, w):
    """HOBBIT's unimportance scores [K, T] of the top-K weights w [K, T] (rank order) in
    the graph, as loader.precision.unimportance computes them: the share of the token's
    chosen weight ranked above each expert (0 for the first), whatever w's scale."""
    total = lib.ggml_clamp(c, lib.ggml_sum_rows(c, w), 6.103515625e-5, float("inf"))  # [1, T]
    return lib.ggml_div(c, lib.ggml_sub(c, lib.ggml_cumsum(c, w), w), total)


def group_mask(c, choose, routing: Routing):
    """choose [E, T] with every expert outside the routing.groups_used best groups at
    -inf, a group's score being the sum of its two highest values (llama.cpp's
    build_moe_ffn with expert groups)."""
    E, T = choose.contents.ne[0], choose.contents.ne[1]
    G = routing.groups
    n = E // G
    grouped = lib.ggml_reshape_3d(c, choose, n, G, T)                        # [E/G, G, T]
    top2 = lib.ggml_argsort_top_k(c, grouped, 2)                             # [2, G, T]
    top2 = lib.ggml_get_rows(c, lib.ggml_reshape_4d(c, grouped, 1, n, G, T), top2)   # [1, 2, G, T]
    score = lib.ggml_sum_rows(c, lib.ggml_reshape_3d(c, top2, 2, G, T))      # [1, G, T]
    best = lib.ggml_argsort_top_k(c, lib.ggml_reshape_2d(c, score, G, T), routing.groups_used)
    kept = lib.ggml_get_rows(c, grouped, best)                               # [E/G, used, T]
    masked = lib.ggml_set_rows(c, lib.ggml_fill(c, grouped, float("-inf")), kept, best)
    return lib.ggml_reshape_2d(c, masked, E, T)


def moe_ffn(c, h, experts, routing: Routing, *, biases=None, gate_inp=None, gate_inp_b=None,
            sel_bias=None, router_in=None, sel=None, weights=None, act="swiglu", slot_table=None):
    """Mixture of gated experts. h: [D, T] -> [D, T].

    experts: (gate [D, F, S], up [D, F, S], down [F, D, S]) stacked tensors, computed on in
    their quantised form by mul_mat_id; S is E for a GGUF's own tensors or the number of
    cache slots for a shared-memory pool view. biases: None, or the experts' (gate [F, S],
    up [F, S], down [D, S]) F32 biases, added per selected expert (ggml_add_id; gpt-oss).
    act: "swiglu" (silu(gate) * up), "swiglu_oai" (gpt-oss's clamped one, SWIGLU_OAI) or
    "reglu" (relu(gate) * up, smallthinker). router_in [D, T]: what the router reads, if
    not h (smallthinker's: the block's input).
    Routing in the graph (gate_inp, and its bias gate_inp_b if any, given): router() and
    topk_weights(): softmax over E logits then top-K, weights renormalised to sum 1 if
    routing.norm_weights (Mixtral, Qwen3, Phi) or kept (OLMoE, Qwen2); or top-K logits
    and their softmax (gpt-oss); or sigmoids, top-K of them plus sel_bias [E], scaled
    (glm4moe). Or given: sel [K, T] i32 (indices into S) and weights [1, K, T] (from
    route()).
    slot_table [1, E] i32 (with gate_inp): expert e is index slot_table[e] of the stacked
    tensors (a pool of cache slots holding every expert).
    """
    D, T = h.contents.ne[0], h.contents.ne[1]
    K = routing.n_used
    if sel is None:
        probs = router(c, h if router_in is None else router_in, gate_inp, gate_inp_b, routing)
        sel, w = topk_weights(c, probs, routing, sel_bias)
        weights = lib.ggml_reshape_3d(c, w, 1, K, T)                         # [1, K, T]
    if slot_table is not None:           # expert ids -> the slots holding them
        flat = lib.ggml_reshape_2d(c, lib.ggml_cont(c, sel), K * T, 1)
        sel = lib.ggml_reshape_2d(c, lib.ggml_get_rows(c, slot_table, flat), K, T)   # [K, T]
    gate_exps, up_exps, down_exps = experts
    gate_b, up_b, down_b = biases or (None, None, None)
    hx = lib.ggml_reshape_3d(c, h, D, 1, T)                                  # [D, 1, T]
    up = lib.ggml_mul_mat_id(c, up_exps, hx, sel)                            # [F, K, T]
    if up_b is not None:
        up = lib.ggml_add_id(c, up, up_b, sel)
    gate = lib.ggml_mul_mat_id(c, gate_exps, hx, sel)                        # [F, K, T]
    if gate_b is not None:
        gate = lib.ggml_add_id(c, gate, gate_b, sel)
    if act == "swiglu_oai":
        g = lib.ggml_swiglu_oai(c, gate, up, *SWIGLU_OAI)                    # [F, K, T]
    elif act == "reglu":
        g = lib.ggml_reglu_split(c, gate, up)
    else:
        g = lib.ggml_swiglu_split(c, gate, up)
    y = lib.ggml_mul_mat_id(c, down_exps, g, sel)                            # [D, K, T]
    if down_b is not None:
        y = lib.ggml_add_id(c, y, down_b, sel)
    y = lib.ggml_mul(c, y, weights)                                          # [D, K, T]
    nb1, nb2 = y.contents.nb[1], y.contents.nb[2]
    out = lib.ggml_view_2d(c, y, D, T, nb2, 0)
    for i in range(1, K):
        out = lib.ggml_add(c, out, lib.ggml_view_2d(c, y, D, T, nb2, i * nb1))
    return out                                                               # [D, T]
