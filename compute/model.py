"""The transformer forward pass, built as ggml graphs over weights that stay in place.

Legend of dimensions (ggml order, contiguous axis first):
  T tokens in the batch   D n_embd      F n_ff (per expert)   V vocabulary
  E experts               K experts used per token
  H query heads           Hkv KV heads  Dh head dim           N KV slots visible (n_kv)

A graph is built once per shape (T, N, all_logits) and reused for every later call with
that shape: only its input tensors (tokens, positions, KV slots, mask) are rewritten.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
import ctypes

import numpy as np

from ..protocol.errors import InputError
from . import ggml
from .ggml import lib
from .weights import ModelArgs, Weights

GRAPH_SIZE = 8192        # max nodes per graph
KV_PAD = 256             # N is rounded up to this, so decode graphs are reused for 256 tokens
MAX_GRAPHS = 12          # graphs kept per model (each owns its activation buffer)


@dataclass
class RunOptions:
    """How a Model runs. n_ctx: KV cache length in tokens; n_batch: prompt chunk size."""
    n_ctx: int = 2048
    n_batch: int = 512
    n_threads: int = 0   # 0: physical cores


@dataclass
class _Graph:
    ctx: ggml.Context
    graph: int
    galloc: int
    inputs: dict = field(default_factory=dict)
    logits: object = None

    def free(self) -> None:
        if self.galloc:
            lib.ggml_gallocr_free(self.galloc)
            self.galloc = None
        self.ctx.free()


def _write(tensor, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    ctypes.memmove(tensor.contents.data, array.ctypes.data, array.nbytes)


def _read_f32(tensor, shape) -> np.ndarray:
    n = int(np.prod(shape))
    buf = (ctypes.c_float * n).from_address(tensor.contents.data)
    return np.ctypeslib.as_array(buf).reshape(shape).copy()


class Model:
    """One sequence's forward pass: weights (shared mmap), a KV cache, cached graphs.

    forward(tokens) appends tokens at position n_past and returns float32 logits:
    shape (V,) for the last token, or (T, V) with all_logits=True.
    """

    def __init__(self, weights: Weights, opts: RunOptions | None = None):
        self.w = weights
        self.args: ModelArgs = weights.args
        self.opts = opts or RunOptions()
        a = self.args
        if self.opts.n_ctx <= 0:
            raise InputError(f"context size {self.opts.n_ctx} must be positive")
        self.n_ctx = self.opts.n_ctx
        self.n_past = 0
        self.backend = lib.ggml_backend_cpu_init()
        lib.ggml_backend_cpu_set_n_threads(self.backend, self.opts.n_threads or ggml.physical_cores())
        self.buft = lib.ggml_backend_cpu_buffer_type()

        # Weight tensors point straight into the mmapped GGUF.
        self.wctx = ggml.Context(len(weights.tensors) + 2 * a.n_layer + 4)
        self.t = {}
        for name, info in weights.tensors.items():
            self.t[name] = self.wctx.tensor(info.type, info.shape, name, weights.address(name))
        if "output.weight" not in self.t:  # tied embeddings
            self.t["output.weight"] = self.t["token_embd.weight"]

        # KV cache: per layer, N slots of Hkv*Dh F16 values; slot i holds position i.
        self.k_cache = [np.zeros((self.n_ctx, a.n_embd_kv), np.float16) for _ in range(a.n_layer)]
        self.v_cache = [np.zeros((self.n_ctx, a.n_embd_kv), np.float16) for _ in range(a.n_layer)]
        self.tk = [self.wctx.tensor(ggml.F16, (a.n_embd_kv, self.n_ctx), f"cache_k_l{i}", c.ctypes.data)
                   for i, c in enumerate(self.k_cache)]
        self.tv = [self.wctx.tensor(ggml.F16, (a.n_embd_kv, self.n_ctx), f"cache_v_l{i}", c.ctypes.data)
                   for i, c in enumerate(self.v_cache)]
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()

    # ---- public -------------------------------------------------------------------------

    def reset(self) -> None:
        """Start a new sequence (the cache contents are simply overwritten later)."""
        self.n_past = 0

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

    def close(self) -> None:
        for g in self.graphs.values():
            g.free()
        self.graphs.clear()
        if self.backend:
            lib.ggml_backend_free(self.backend)
            self.backend = None
        self.wctx.free()

    # ---- one chunk ------------------------------------------------------------------------

    def _forward_chunk(self, tokens: np.ndarray, all_logits: bool) -> np.ndarray:
        n_tokens = tokens.size
        pos = np.arange(self.n_past, self.n_past + n_tokens, dtype=np.int32)
        n_kv = min(self.n_ctx, -(-(self.n_past + n_tokens) // KV_PAD) * KV_PAD)
        g = self._graph(n_tokens, n_kv, all_logits)

        # mask[t, j] = 0 where slot j holds a position <= pos[t], else -inf (causal, no gaps)
        mask = np.where(np.arange(n_kv)[None, :] <= pos[:, None], 0.0, -np.inf).astype(np.float16)
        _write(g.inputs["tokens"], tokens)
        _write(g.inputs["pos"], pos)
        _write(g.inputs["kv_idx"], pos.astype(np.int64))
        _write(g.inputs["mask"], mask)
        status = lib.ggml_backend_graph_compute(self.backend, g.graph)
        if status != 0:
            raise RuntimeError(f"ggml graph compute failed with status {status}")
        self.n_past += n_tokens
        n_out = n_tokens if all_logits else 1
        return _read_f32(g.logits, (n_out, self.args.n_vocab))

    def _graph(self, n_tokens: int, n_kv: int, all_logits: bool) -> _Graph:
        key = (n_tokens, n_kv, all_logits)
        g = self.graphs.get(key)
        if g is not None:
            self.graphs.move_to_end(key)
            return g
        if len(self.graphs) >= MAX_GRAPHS:
            self.graphs.popitem(last=False)[1].free()
        g = self._build(n_tokens, n_kv, all_logits)
        self.graphs[key] = g
        return g

    # ---- graph construction -------------------------------------------------------------

    def _build(self, n_tokens: int, n_kv: int, all_logits: bool) -> _Graph:
        a = self.args
        T, N = n_tokens, n_kv
        ctx = ggml.Context(GRAPH_SIZE, GRAPH_SIZE)
        c = ctx.ptr
        gf = lib.ggml_new_graph_custom(c, GRAPH_SIZE, False)
        g = _Graph(ctx, gf, None)

        def inp(name, t, shape):
            x = ctx.tensor(t, shape, name)
            lib.ggml_set_input(x)
            g.inputs[name] = x
            return x

        tokens = inp("tokens", ggml.I32, (T,))
        pos = inp("pos", ggml.I32, (T,))
        kv_idx = inp("kv_idx", ggml.I64, (T,))
        mask = inp("mask", ggml.F16, (N, T))
        W = lambda n: self.t[n]  # noqa: E731

        x = lib.ggml_get_rows(c, W("token_embd.weight"), tokens)            # [D, T]
        for il in range(a.n_layer):
            p = f"blk.{il}."
            h = self._norm(c, x, W(p + "attn_norm.weight"))                   # [D, T]
            att = self._attention(c, h, il, pos, kv_idx, mask, T, N)         # [D, T]
            if il == a.n_layer - 1 and not all_logits:
                # only the last token's logits are wanted: drop the other rows early
                att = _last_row(c, att, T)
                x = _last_row(c, x, T)
            x = lib.ggml_add(c, att, x)
            h = self._norm(c, x, W(p + "ffn_norm.weight"))
            if a.is_moe:
                f = moe_ffn(c, h, W(p + "ffn_gate_inp.weight"), W(p + "ffn_gate_exps.weight"),
                            W(p + "ffn_up_exps.weight"), W(p + "ffn_down_exps.weight"),
                            a.n_expert_used)
            else:
                f = dense_ffn(c, h, W(p + "ffn_gate.weight"), W(p + "ffn_up.weight"),
                              W(p + "ffn_down.weight"))
            x = lib.ggml_add(c, f, x)                                        # [D, T']
        x = self._norm(c, x, W("output_norm.weight"))
        logits = lib.ggml_mul_mat(c, W("output.weight"), x)                  # [V, T']
        lib.ggml_set_output(logits)
        lib.ggml_build_forward_expand(gf, logits)
        g.logits = logits

        g.galloc = lib.ggml_gallocr_new(self.buft)
        if not lib.ggml_gallocr_alloc_graph(g.galloc, gf):
            g.free()
            raise MemoryError(f"could not allocate activations for a {T}-token graph")
        return g

    def _norm(self, c, x, weight):
        return lib.ggml_mul(c, lib.ggml_rms_norm(c, x, self.args.rms_eps), weight)

    def _attention(self, c, h, il, pos, kv_idx, mask, T, N):
        a = self.args
        p = f"blk.{il}."
        Dh, H, Hkv = a.head_dim, a.n_head, a.n_head_kv
        q = lib.ggml_reshape_3d(c, lib.ggml_mul_mat(c, self.t[p + "attn_q.weight"], h), Dh, H, T)
        k = lib.ggml_reshape_3d(c, lib.ggml_mul_mat(c, self.t[p + "attn_k.weight"], h), Dh, Hkv, T)
        v = lib.ggml_mul_mat(c, self.t[p + "attn_v.weight"], h)             # [Hkv*Dh, T]
        q = self._rope(c, q, pos)                                            # [Dh, H, T]
        k = self._rope(c, k, pos)                                            # [Dh, Hkv, T]

        # write this chunk's K and V into their cache slots, then attend over N slots
        kc = lib.ggml_set_rows(c, self.tk[il], lib.ggml_reshape_2d(c, k, Dh * Hkv, T), kv_idx)
        vc = lib.ggml_set_rows(c, self.tv[il], v, kv_idx)
        es = 2  # F16 bytes
        kv = lambda t: lib.ggml_permute(  # noqa: E731
            c, lib.ggml_view_3d(c, t, Dh, Hkv, N, Dh * es, Dh * Hkv * es, 0), 0, 2, 1, 3)  # [Dh, N, Hkv]
        qp = lib.ggml_permute(c, q, 0, 2, 1, 3)                              # [Dh, T, H]
        o = lib.ggml_flash_attn_ext(c, qp, kv(kc), kv(vc), mask, 1.0 / Dh ** 0.5, 0.0, 0.0)
        if hasattr(lib, "ggml_prec_set_acc"):
            lib.ggml_prec_set_acc(o, ggml.PREC_F32)
        o = lib.ggml_reshape_2d(c, o, Dh * H, T)                             # [H*Dh, T]
        return lib.ggml_mul_mat(c, self.t[p + "attn_output.weight"], o)      # [D, T]

    def _rope(self, c, x, pos):
        a = self.args
        return lib.ggml_rope_ext(c, x, pos, None, a.rope_dim, ggml.ROPE_NORMAL, a.n_ctx_train,
                                 a.rope_base, 1.0, 0.0, 1.0, 32.0, 1.0)


def _last_row(c, x, T):
    nb1 = x.contents.nb[1]
    return lib.ggml_view_2d(c, x, x.contents.ne[0], 1, nb1, (T - 1) * nb1)


def dense_ffn(c, h, gate, up, down):
    """SwiGLU FFN: down(silu(gate h) * up h). h: [D, T] -> [D, T]."""
    g = lib.ggml_mul_mat(c, gate, h)                                         # [F, T]
    u = lib.ggml_mul_mat(c, up, h)                                           # [F, T]
    return lib.ggml_mul_mat(c, down, lib.ggml_swiglu_split(c, g, u))         # [D, T]


def moe_ffn(c, h, gate_inp, gate_exps, up_exps, down_exps, n_used, *, norm_weights=True):
    """Mixture of SwiGLU experts. h: [D, T] -> [D, T].

    Router: softmax over E logits, top-K, weights renormalised to sum 1 (Mixtral).
    Experts are stacked [D, F, E] / [F, D, E] tensors and run quantised via mul_mat_id.
    """
    D, T = h.contents.ne[0], h.contents.ne[1]
    E = gate_inp.contents.ne[1]
    K = n_used
    probs = lib.ggml_soft_max(c, lib.ggml_mul_mat(c, gate_inp, h))           # [E, T]
    sel = lib.ggml_argsort_top_k(c, probs, K)                                # [K, T] i32
    w = lib.ggml_get_rows(c, lib.ggml_reshape_3d(c, probs, 1, E, T), sel)    # [1, K, T]
    if norm_weights:
        w = lib.ggml_reshape_2d(c, w, K, T)
        s = lib.ggml_clamp(c, lib.ggml_sum_rows(c, w), 6.103515625e-5, float("inf"))  # [1, T]
        w = lib.ggml_reshape_3d(c, lib.ggml_div(c, w, s), 1, K, T)
    hx = lib.ggml_reshape_3d(c, h, D, 1, T)                                  # [D, 1, T]
    up = lib.ggml_mul_mat_id(c, up_exps, hx, sel)                            # [F, K, T]
    gate = lib.ggml_mul_mat_id(c, gate_exps, hx, sel)                        # [F, K, T]
    y = lib.ggml_mul_mat_id(c, down_exps, lib.ggml_swiglu_split(c, gate, up), sel)  # [D, K, T]
    y = lib.ggml_mul(c, y, w)                                                # [D, K, T]
    nb1, nb2 = y.contents.nb[1], y.contents.nb[2]
    out = lib.ggml_view_2d(c, y, D, T, nb2, 0)
    for i in range(1, K):
        out = lib.ggml_add(c, out, lib.ggml_view_2d(c, y, D, T, nb2, i * nb1))
    return out                                                               # [D, T]
