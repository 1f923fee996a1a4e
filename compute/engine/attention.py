"""Self-attention and its KV cache.

Legend of dimensions (ggml order, contiguous axis first):
  T tokens in the batch   D n_embd      H query heads   Hkv KV heads   Dh head dim
  N KV slots visible (n_kv)             R, r: MLA's latent rank and RoPE dims

KV cache: per layer, n_ctx slots of Hkv*Dh F16 values; slot i holds position i.
Sliding-window layers (gpt-oss) keep their own, smaller cache, as llama.cpp does: a ring of
swa_cells slots (the window plus a batch, padded to 256; slot = position mod swa_cells).
deepseek2's multi-head latent attention caches one latent per token (_mla).
"""

from __future__ import annotations

import numpy as np

from ...protocol.errors import InputError
from . import ggml
from .ggml import lib
from .graph import Graph, Tensors
from .weights import ModelArgs

KV_PAD = 256  # N is rounded up to this, so decode graphs are reused for 256 tokens


class KVCache:
    """Every layer's K and V slots (numpy arrays, viewed by tensors in the model's weight
    context), the sliding-window ring's positions, and what a chunk's graph reads of them
    (its inputs pos, kv_idx, mask and, with windowed layers, kv_idx_swa, mask_swa)."""

    def __init__(self, wctx: ggml.Context, args: ModelArgs, n_ctx: int, n_batch: int):
        a = self.args = args
        self.n_ctx = n_ctx
        # swa_pos holds the position each ring slot has (-1: none yet)
        self.swa_cells = min(n_ctx, -(-(a.n_swa + n_batch) // KV_PAD) * KV_PAD) if a.n_swa else 0
        self.swa_pos = np.full(self.swa_cells, -1, np.int64)
        cells = [self.swa_cells if a.is_swa(il) else n_ctx for il in range(a.n_layer)]
        self.k_cache = [np.zeros((n, a.n_embd_kv), np.float16) for n in cells]
        # MLA caches one latent per token, its first kv_lora_rank values are the V
        self.v_cache = [np.zeros((n, 0 if a.kv_lora_rank else a.n_embd_kv), np.float16) for n in cells]
        self.tk = [
            wctx.tensor(ggml.F16, (a.n_embd_kv, len(c)), f"cache_k_l{i}", c.ctypes.data)
            for i, c in enumerate(self.k_cache)
        ]
        self.tv = (
            [
                wctx.tensor(ggml.F16, (a.n_embd_kv, len(c)), f"cache_v_l{i}", c.ctypes.data)
                for i, c in enumerate(self.v_cache)
            ]
            if not a.kv_lora_rank
            else []
        )

    def reset(self) -> None:
        self.swa_pos[:] = -1

    def assume(self, n_past: int) -> None:
        """Take the ring's slots as holding the positions before n_past, whatever they
        hold (Model.skip_to)."""
        if self.swa_cells:
            before = np.arange(max(0, n_past - self.swa_cells), n_past)
            self.swa_pos[before % self.swa_cells] = before

    def resumable(self, n_past: int) -> bool:
        """Whether a chunk can start at position n_past (<= the current one): always,
        except when a sliding-window layer's ring no longer holds the window before it."""
        if not self.swa_cells:
            return True
        first = np.arange(max(0, n_past - self.args.n_swa + 1), n_past)
        return bool((self.swa_pos[first % self.swa_cells] == first).all())

    def chunk(self, n_past: int, T: int) -> tuple[dict, int, np.ndarray | None]:
        """A chunk of T tokens at n_past: (its graph inputs, N the slots visible, the ring's
        positions once it is written: commit() them after the forward). The ring slots it
        writes are marked empty now, in case the forward fails."""
        pos = np.arange(n_past, n_past + T, dtype=np.int32)
        N = min(self.n_ctx, -(-(n_past + T) // KV_PAD) * KV_PAD)
        # mask[t, j] = 0 where slot j holds a position <= pos[t], else -inf (causal, no gaps)
        mask = np.where(np.arange(N)[None, :] <= pos[:, None], 0.0, -np.inf).astype(np.float16)
        feed = {"pos": pos, "kv_idx": pos.astype(np.int64), "mask": mask}
        held = None
        if self.swa_cells:
            held = self._swa_feed(pos, N, feed)
            self.swa_pos[pos % self.swa_cells] = -1  # overwritten even if the forward fails
        return feed, N, held

    def commit(self, held: np.ndarray | None) -> None:
        """The chunk chunk() returned held for is written."""
        if self.swa_cells:
            self.swa_pos = held

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
            raise InputError(
                f"the sliding-window cache no longer holds the {n_swa - 1} positions "
                f"before {pos[0]}; start the sequence again (reset) from position 0"
            )
        held = self.swa_pos.copy()
        held[pos % cells] = pos
        p = held[: min(cells, N)][None, :]
        seen = (p >= 0) & (p <= pos[:, None]) & (pos[:, None] - p < n_swa)
        feed["kv_idx_swa"] = (pos % cells).astype(np.int64)
        feed["mask_swa"] = np.where(seen, 0.0, -np.inf).astype(np.float16)
        return held

    def inputs(self, g: Graph, il: int, T: int, N: int):
        """(slots written [T] i64, mask [N', T] f16, N') of layer il's cache in graph g: the
        ring's on windowed layers."""
        swa = self.args.is_swa(il)
        n = min(self.swa_cells, N) if swa else N
        sfx = "_swa" if swa else ""
        return g.input("kv_idx" + sfx, ggml.I64, (T,)), g.input("mask" + sfx, ggml.F16, (n, T)), n


class Attention:
    """Every layer's self-attention in the graph, over its KV cache: the standard one
    (grouped-query, optional QK norms, RoPE, sinks) or deepseek2's latent one."""

    def __init__(self, t: Tensors, args: ModelArgs, cache: KVCache):
        self.t, self.args, self.cache = t, args, cache
        # RoPE frequency factors (Llama 3.1's rope_freqs; LongRoPE's short and long sets,
        # the long ones for contexts beyond the pre-training one), as llama.cpp picks them
        long = "rope_factors_long" if cache.n_ctx > args.n_ctx_orig else "rope_factors_short"
        self.rope_factors = t.get("rope_freqs.weight", t.get(long + ".weight"))

    def __call__(self, g: Graph, h, il: int, T: int, N: int):
        """Layer il's attention on h [D, T] (normed), writing the chunk's K and V into
        their cache slots and attending over the first N: -> [D, T]."""
        pos = g.input("pos", ggml.I32, (T,))
        attend = self._mla if self.args.kv_lora_rank else self._standard
        return attend(g.c, h, il, pos, *self.cache.inputs(g, il, T, N), T)

    def _standard(self, c, h, il, pos, kv_idx, mask, N, T):
        """Layer il's self-attention over N slots of its KV cache (the sliding-window one
        on windowed layers), with the file's attention sinks where it has them."""
        a = self.args
        p = f"blk.{il}."
        Dh, H, Hkv = a.head_dim, a.n_head, a.n_head_kv
        if p + "attn_qkv.weight" in self.t:  # one projection: Q, K, V rows (bailingmoe2)
            qkv = self.t.linear(c, p + "attn_qkv", h)  # [(H+2Hkv)*Dh, T]
            nb1, f32 = qkv.contents.nb[1], 4
            q = lib.ggml_cont(c, lib.ggml_view_2d(c, qkv, H * Dh, T, nb1, 0))
            k = lib.ggml_cont(c, lib.ggml_view_2d(c, qkv, Hkv * Dh, T, nb1, H * Dh * f32))
            v = lib.ggml_cont(c, lib.ggml_view_2d(c, qkv, Hkv * Dh, T, nb1, (H + Hkv) * Dh * f32))
        else:
            q = self.t.linear(c, p + "attn_q", h)  # [H*Dh, T]
            k = self.t.linear(c, p + "attn_k", h)  # [Hkv*Dh, T]
            v = self.t.linear(c, p + "attn_v", h)  # [Hkv*Dh, T]
        if a.qk_norm == "full":  # olmoe: one RMS norm over all heads
            q, k = self.t.norm(c, q, p + "attn_q_norm"), self.t.norm(c, k, p + "attn_k_norm")
        q = lib.ggml_reshape_3d(c, q, Dh, H, T)
        k = lib.ggml_reshape_3d(c, k, Dh, Hkv, T)
        if a.qk_norm == "head":  # qwen3moe: each head normed on its own
            q, k = self.t.norm(c, q, p + "attn_q_norm"), self.t.norm(c, k, p + "attn_k_norm")
        if not a.rope_layers or a.rope_layers[il]:  # (smallthinker: some layers have none)
            q = self._rope(c, q, pos, il)  # [Dh, H, T]
            k = self._rope(c, k, pos, il)  # [Dh, Hkv, T]

        # write this chunk's K and V into their cache slots, then attend over N slots
        kc = lib.ggml_set_rows(c, self.cache.tk[il], lib.ggml_reshape_2d(c, k, Dh * Hkv, T), kv_idx)
        vc = lib.ggml_set_rows(c, self.cache.tv[il], v, kv_idx)
        es = 2  # F16 bytes
        kv = lambda t: lib.ggml_permute(
            c, lib.ggml_view_3d(c, t, Dh, Hkv, N, Dh * es, Dh * Hkv * es, 0), 0, 2, 1, 3
        )  # [Dh, N, Hkv]
        scale = a.attention_scale or 1.0 / Dh**0.5
        if a.scale_q_first:  # the same product, rounded as llama.cpp's phi3 graph rounds it
            q, scale = lib.ggml_scale(c, q, scale), 1.0
        # [H] F32 attention sinks: a per-head logit every query also attends to (gpt-oss)
        o = flash_attention(c, q, kv(kc), kv(vc), mask, scale, self.t.get(p + "attn_sinks.weight"))
        o = lib.ggml_reshape_2d(c, o, Dh * H, T)  # [H*Dh, T]
        return self.t.linear(c, p + "attn_output", o)  # [D, T]

    def _mla(self, c, h, il, pos, kv_idx, mask, N, T):
        """Layer il's multi-head latent attention (deepseek2), as llama.cpp computes it:
        each token caches one latent [R] (normed) and its RoPE part [r]; a head's query is
        its no-RoPE part folded through attn_k_b into latent space [R] beside its RoPE part
        [r]; keys are the cached [R + r], values the cached latents [R], and attn_v_b takes
        each head's output from latent space to its value width Dv."""
        a = self.args
        p = f"blk.{il}."
        W = lambda n: self.t[p + n + ".weight"]
        H, R, r = a.n_head, a.kv_lora_rank, a.rope_dim
        Dk, Dv, f32, f16 = a.mla_head_k, a.mla_head_v, 4, 2
        nope = Dk - r
        if p + "attn_q_a.weight" in self.t:  # the query through its own low rank (V2, V3)
            q = lib.ggml_mul_mat(
                c, W("attn_q_b"), self.t.norm(c, lib.ggml_mul_mat(c, W("attn_q_a"), h), p + "attn_q_a_norm")
            )
        else:  # V2-Lite
            q = lib.ggml_mul_mat(c, W("attn_q"), h)
        q = lib.ggml_reshape_3d(c, q, Dk, H, T)  # [Dk, H, T]
        kv_pe = lib.ggml_mul_mat(c, W("attn_kv_a_mqa"), h)  # [R + r, T]
        row = kv_pe.contents.nb[1]
        latent = self.t.norm(c, lib.ggml_view_2d(c, kv_pe, R, T, row, 0), p + "attn_kv_a_norm")
        k_pe = self._rope(c, lib.ggml_view_3d(c, kv_pe, r, 1, T, row, row, R * f32), pos, il)  # [r, 1, T]
        nb1, nb2 = q.contents.nb[1], q.contents.nb[2]
        q_nope = lib.ggml_view_3d(c, q, nope, H, T, nb1, nb2, 0)
        q_pe = self._rope(c, lib.ggml_view_3d(c, q, r, H, T, nb1, nb2, nope * f32), pos, il)
        # W_kb [nope, R, H] per head: [nope, T, H] -> [R, T, H], back to [R, H, T]
        q_lat = lib.ggml_permute(
            c, lib.ggml_mul_mat(c, W("attn_k_b"), lib.ggml_permute(c, q_nope, 0, 2, 1, 3)), 0, 2, 1, 3
        )
        q = lib.ggml_concat(c, q_lat, q_pe, 0)  # [R + r, H, T]
        k = lib.ggml_concat(c, lib.ggml_reshape_3d(c, latent, R, 1, T), k_pe, 0)  # [R + r, 1, T]

        kc = lib.ggml_set_rows(c, self.cache.tk[il], lib.ggml_reshape_2d(c, k, R + r, T), kv_idx)
        cached = lambda n: lib.ggml_permute(
            c, lib.ggml_view_3d(c, kc, n, 1, N, (R + r) * f16, (R + r) * f16, 0), 0, 2, 1, 3
        )  # [n, N, 1]
        o = flash_attention(c, q, cached(R + r), cached(R), mask, a.attention_scale)  # [R, H, T]
        # W_vb [R, Dv, H] per head: [R, T, H] -> [Dv, T, H], back to [Dv, H, T]
        o = lib.ggml_mul_mat(c, W("attn_v_b"), lib.ggml_permute(c, o, 0, 2, 1, 3))
        o = lib.ggml_cont(c, lib.ggml_permute(c, o, 0, 2, 1, 3))
        return self.t.linear(c, p + "attn_output", lib.ggml_reshape_2d(c, o, Dv * H, T))  # [D, T]

    def _rope(self, c, x, pos, il):
        a = self.args
        base = a.rope_base_swa if a.is_swa(il) and a.rope_base_swa else a.rope_base
        return lib.ggml_rope_ext(
            c,
            x,
            pos,
            self.rope_factors,
            a.rope_dim,
            a.rope_type,
            a.n_ctx_orig,
            base,
            a.rope_freq_scale,
            a.rope_ext_factor,
            a.rope_attn_factor,
            a.rope_beta_fast,
            a.rope_beta_slow,
        )


SPLIT_KV = 512  # cells from which ggml's CPU attention splits a lone query's sums by thread


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
        q = lib.ggml_concat(c, q, q, 2)  # [Dk, H, 2]
        mask = lib.ggml_concat(c, mask, mask, 1)  # [N, 2]
    o = lib.ggml_flash_attn_ext(c, lib.ggml_permute(c, q, 0, 2, 1, 3), k, v, mask, scale, 0.0, 0.0)
    if sinks is not None:
        lib.ggml_flash_attn_ext_add_sinks(o, sinks)
    if hasattr(lib, "ggml_prec_set_acc"):
        lib.ggml_prec_set_acc(o, ggml.PREC_F32)
    if one:  # the first row
        o = lib.ggml_cont(
            c, lib.ggml_view_3d(c, o, o.contents.ne[0], o.contents.ne[1], 1, o.contents.nb[1], o.contents.nb[2], 0)
        )
    return o  # [Dv, H, T]
