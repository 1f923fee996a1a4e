"""The MoE FFN and its routing: in the graph (ggml) and their numpy twin, side by side.

Legend of dimensions (ggml order, contiguous axis first; numpy arrays in the reverse):
  T tokens in the batch   D n_embd      F n_ff (per expert)   E experts
  K experts used per token              S stacked experts: E of a GGUF's own tensors, or
  G expert groups                         the cache slots of a pool view (engine/pool.py)

One MoE path for every architecture, as llama.cpp's build_moe_ffn: a router's logits
become K experts and their weights as Routing says (weights.Routing: softmax, softmax over
the top K, or sigmoid gating; selection biases; expert groups; renormalised or not;
scaled), and moe_ffn computes the K experts on stacked tensors, whoever routed them.

  in the graph                          numpy twin (outside the graph)
  router()       logits -> probs        router_probs()
  topk_weights() probs -> K, weights    route() (also returns the scores)
  group_mask()   the best groups only   _best_groups()
  unimportance_scores()                 loader.precision.unimportance
  route_in_graph(): router, top K, scores: what a segment hands back (engine/segments.py)
  Routers: every MoE layer's router in numpy (calibration's traces, routing statistics)

The twins agree to the bit on the same logits, except softmax-weight gating's softmax
over the K (numpy rounds differently from ggml; the segmented forward takes ggml's).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...loader.precision import unimportance
from ...protocol.errors import ModelError
from .ggml import lib
from .weights import Routing, Weights

SWIGLU_OAI = (1.702, 7.0)  # gpt-oss's swiglu: alpha, limit (llama.cpp's build_moe_ffn)
MIN_TOTAL = 6.103515625e-5  # a token's weight sum is clamped to this before dividing by it


class RouterTensors(NamedTuple):
    """A MoE layer's router in the graph: gate_inp [D, E], its bias [E] and the selection
    bias [E] added to the probabilities only to choose the K (None where the file has
    none)."""

    weight: object
    bias: object = None
    selection_bias: object = None


class ExpertTensors(NamedTuple):
    """A MoE layer's routed experts as stacked tensors, computed on in their quantised
    form by mul_mat_id: gate [D, F, S], up [D, F, S], down [F, D, S]; biases: None, or the
    experts' F32 biases (gate [F, S], up [F, S], down [D, S]; gpt-oss)."""

    gate: object
    up: object
    down: object
    biases: tuple | None = None


# ---- the router's probabilities ------------------------------------------------------------


def router(c, h, r: RouterTensors, routing: Routing):
    """A router in the graph: gate_inp h (+ bias) -> [E, T], through a softmax or sigmoid
    unless the gating is softmax-weight (route()'s probs, as llama.cpp's build_moe_ffn
    computes them)."""
    logits = lib.ggml_mul_mat(c, r.weight, h)  # [E, T]
    if r.bias is not None:
        logits = lib.ggml_add(c, logits, r.bias)
    if routing.gating == "softmax":
        return lib.ggml_soft_max(c, logits)
    if routing.gating == "sigmoid":
        return lib.ggml_sigmoid(c, logits)
    return logits


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, float32 (a router's probabilities)."""
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def router_probs(logits: np.ndarray, routing: Routing) -> np.ndarray:
    """router()'s twin from a router's logits (T, E) (bias added): their softmax or
    sigmoid, or for softmax-weight gating the logits themselves (the top K are picked on
    them)."""
    if routing.gating == "softmax":
        return softmax(logits)
    if routing.gating == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    return logits


# ---- the top K and their weights -----------------------------------------------------------


def topk_weights(c, probs, routing: Routing, selection_bias=None):
    """(sel [K, T] i32, weights [K, T]) of a router's probs [E, T] in the graph: the top-K
    experts by probs + selection_bias [E] if given (argsort, descending), their unbiased
    probabilities; softmax over the K for softmax-weight gating, renormalised to sum 1 if
    routing.norm_weights, times routing.scale if set. sel is a view of the argsort."""
    E, T = probs.contents.ne[0], probs.contents.ne[1]
    K = routing.n_used
    choose = probs if selection_bias is None else lib.ggml_add(c, probs, selection_bias)
    if routing.groups:
        choose = group_mask(c, choose, routing)
    sel = lib.ggml_argsort_top_k(c, choose, K)  # [K, T] i32
    w = lib.ggml_get_rows(c, lib.ggml_reshape_3d(c, probs, 1, E, T), sel)  # [1, K, T]
    w = lib.ggml_reshape_2d(c, w, K, T)
    if routing.gating == "softmax_weight":
        w = lib.ggml_soft_max(c, w)
    if routing.norm_weights:
        s = lib.ggml_clamp(c, lib.ggml_sum_rows(c, w), MIN_TOTAL, float("inf"))  # [1, T]
        w = lib.ggml_div(c, w, s)
    if routing.scale and routing.scale != 1.0:
        w = lib.ggml_scale(c, w, routing.scale)
    return sel, w


def route(probs: np.ndarray, routing: Routing, selection_bias=None):
    """The numpy twin of the graph's routing: probs (T, E), a router's softmax or sigmoid
    (softmax-weight gating: its logits; see router_probs) -> (sel, w, scores), each
    (T, K): the top-K experts by probability plus selection_bias (E,) where given (ties to
    the lower index, as ggml's argsort), the weights their outputs are scaled by (the
    unbiased probabilities, renormalised to sum 1 or as they are per routing, then times
    routing.scale; softmax-weight: the softmax of the K logits, here in numpy, which rounds
    differently from ggml — the segmented forward takes ggml's, topk_weights), and
    HOBBIT's unimportance scores. The scores always come from the renormalised weights,
    whatever the FFN is fed: the thresholds T1/T2 are shares of the chosen experts' total
    weight."""
    choose = probs if selection_bias is None else probs + selection_bias
    if routing.groups:
        choose = _best_groups(choose, routing)
    sel = np.argsort(-choose, axis=-1, kind="stable")[..., : routing.n_used]  # (T, K)
    w = np.take_along_axis(probs, sel, axis=-1)  # (T, K)
    if routing.gating == "softmax_weight":
        w = softmax(w)
    # summed in double and rounded once, as ggml_sum_rows does: the same weights to the bit
    total = w.sum(axis=-1, keepdims=True, dtype=np.float64).astype(np.float32)  # (T, 1)
    share = w / np.maximum(total, np.float32(MIN_TOTAL))
    scores = unimportance(share.reshape(-1, share.shape[-1])).reshape(share.shape)
    w = share if routing.norm_weights else w
    if routing.scale and routing.scale != 1.0:
        w = w * np.float32(routing.scale)
    return sel, w, scores


def group_mask(c, choose, routing: Routing):
    """choose [E, T] with every expert outside the routing.groups_used best groups at
    -inf, a group's score being the sum of its two highest values (llama.cpp's
    build_moe_ffn with expert groups)."""
    E, T = choose.contents.ne[0], choose.contents.ne[1]
    G = routing.groups
    n = E // G
    grouped = lib.ggml_reshape_3d(c, choose, n, G, T)  # [E/G, G, T]
    top2 = lib.ggml_argsort_top_k(c, grouped, 2)  # [2, G, T]
    top2 = lib.ggml_get_rows(c, lib.ggml_reshape_4d(c, grouped, 1, n, G, T), top2)  # [1, 2, G, T]
    score = lib.ggml_sum_rows(c, lib.ggml_reshape_3d(c, top2, 2, G, T))  # [1, G, T]
    best = lib.ggml_argsort_top_k(c, lib.ggml_reshape_2d(c, score, G, T), routing.groups_used)
    kept = lib.ggml_get_rows(c, grouped, best)  # [E/G, used, T]
    masked = lib.ggml_set_rows(c, lib.ggml_fill(c, grouped, float("-inf")), kept, best)
    return lib.ggml_reshape_2d(c, masked, E, T)


def _best_groups(choose: np.ndarray, routing: Routing) -> np.ndarray:
    """choose (.., E) with every expert outside the routing.groups_used best groups at
    -inf; a group's score is the sum of its two highest values (group_mask's twin)."""
    G = routing.groups
    grouped = choose.reshape(*choose.shape[:-1], G, -1)  # (.., G, E/G)
    top2 = np.sort(grouped, axis=-1)[..., -2:]
    score = top2[..., 1] + top2[..., 0]  # (.., G)
    best = np.argsort(-score, axis=-1, kind="stable")[..., : routing.groups_used]
    keep = np.zeros(score.shape, bool)
    np.put_along_axis(keep, best, True, axis=-1)
    return np.where(keep[..., None], grouped, -np.inf).reshape(choose.shape).astype(choose.dtype)


def unimportance_scores(c, w):
    """HOBBIT's unimportance scores [K, T] of the top-K weights w [K, T] (rank order) in
    the graph, as loader.precision.unimportance computes them: the share of the token's
    chosen weight ranked above each expert (0 for the first), whatever w's scale."""
    total = lib.ggml_clamp(c, lib.ggml_sum_rows(c, w), MIN_TOTAL, float("inf"))  # [1, T]
    return lib.ggml_div(c, lib.ggml_sub(c, lib.ggml_cumsum(c, w), w), total)


def route_in_graph(c, h, r: RouterTensors, routing: Routing):
    """route()'s twin in the graph, on a router's input h [D, T]: (sel [K, T] i32, w [K, T],
    scores [K, T]), each contiguous (what a segment hands back to be fetched)."""
    sel, w = topk_weights(c, router(c, h, r, routing), routing, r.selection_bias)
    return lib.ggml_cont(c, sel), w, unimportance_scores(c, w)  # sel: a view of the argsort


def check_routing(layer: int, w: np.ndarray, scores: np.ndarray) -> None:
    """ModelError when MoE layer `layer`'s routing (w, scores (T', K), read back from the
    graph) holds NaN or inf: no threshold takes such a score, so its expert would be
    skipped, even in exact mode. One pass over T' x K floats."""
    if not (np.isfinite(w).all() and np.isfinite(scores).all()):
        raise ModelError(
            f"MoE layer {layer}: the router gave NaN or inf weights for this input "
            "(the model's weights or activations are not finite); stopped rather than skip experts"
        )


class Routers:
    """Every MoE layer's router in numpy, for routing outside the graph (calibration's
    traces, routing statistics): weights (M, E, D), biases and selection biases (M, E),
    routed as route() routes."""

    def __init__(self, weights: Weights):
        blocks = weights.args.moe_layers
        self.routing = weights.args.routing
        self.weights = np.stack([weights.router(b) for b in blocks])  # (M, E, D)
        self.biases = np.stack([weights.router_bias(b) for b in blocks])  # (M, E)
        self.selection = np.stack([weights.selection_bias(b) for b in blocks])  # (M, E)

    def route(self, h: np.ndarray, first: int, last: int):
        """Route MoE layers first..last-1 on gate inputs h: (T, D), the same for every
        layer, or (p, T, D), one per layer. Returns route()'s (sel, w, scores), (p, T, K)."""
        if h.ndim == 2:
            logits = np.einsum("led,td->lte", self.weights[first:last], h)
        else:
            logits = np.einsum("led,ltd->lte", self.weights[first:last], h)
        logits = logits + self.biases[first:last, None, :]  # (p, T, E)
        return route(router_probs(logits, self.routing), self.routing, self.selection[first:last, None, :])


# ---- the FFNs ------------------------------------------------------------------------------


def slots_of(c, sel, slot_table):
    """Expert ids sel [K, T] -> the slots holding them: slot_table [1, E] i32 maps expert
    e to its index among stacked tensors that hold every expert (a resident pool)."""
    K, T = sel.contents.ne[0], sel.contents.ne[1]
    flat = lib.ggml_reshape_2d(c, lib.ggml_cont(c, sel), K * T, 1)
    return lib.ggml_reshape_2d(c, lib.ggml_get_rows(c, slot_table, flat), K, T)  # [K, T]


def moe_ffn(c, h, experts: ExpertTensors, sel, weights, act: str = "swiglu"):
    """Mixture of gated experts. h: [D, T] -> [D, T], the sum over each token's K experts
    sel [K, T] i32 (indices into the stacked S) of its output times weights [K, T].

    act: "swiglu" (silu(gate) * up), "swiglu_oai" (gpt-oss's clamped one, SWIGLU_OAI) or
    "reglu" (relu(gate) * up, smallthinker). Expert biases are added per selected expert
    (ggml_add_id). Who chose sel does not matter here: the graph's routing (topk_weights,
    with slots_of on a resident pool) or a segment's inputs (engine/segments.py).
    """
    D, T = h.contents.ne[0], h.contents.ne[1]
    K = sel.contents.ne[0]
    weights = lib.ggml_reshape_3d(c, weights, 1, K, T)  # [1, K, T]
    gate_b, up_b, down_b = experts.biases or (None, None, None)
    hx = lib.ggml_reshape_3d(c, h, D, 1, T)  # [D, 1, T]
    up = lib.ggml_mul_mat_id(c, experts.up, hx, sel)  # [F, K, T]
    if up_b is not None:
        up = lib.ggml_add_id(c, up, up_b, sel)
    gate = lib.ggml_mul_mat_id(c, experts.gate, hx, sel)  # [F, K, T]
    if gate_b is not None:
        gate = lib.ggml_add_id(c, gate, gate_b, sel)
    if act == "swiglu_oai":
        g = lib.ggml_swiglu_oai(c, gate, up, *SWIGLU_OAI)  # [F, K, T]
    elif act == "reglu":
        g = lib.ggml_reglu_split(c, gate, up)
    else:
        g = lib.ggml_swiglu_split(c, gate, up)
    y = lib.ggml_mul_mat_id(c, experts.down, g, sel)  # [D, K, T]
    if down_b is not None:
        y = lib.ggml_add_id(c, y, down_b, sel)
    y = lib.ggml_mul(c, y, weights)  # [D, K, T]
    nb1, nb2 = y.contents.nb[1], y.contents.nb[2]
    out = lib.ggml_view_2d(c, y, D, T, nb2, 0)
    for i in range(1, K):
        out = lib.ggml_add(c, out, lib.ggml_view_2d(c, y, D, T, nb2, i * nb1))
    return out  # [D, T]


def dense_ffn(c, h, gate, up, down):
    """SwiGLU FFN (a dense block's, a shared expert's): down(silu(gate h) * up h).
    h: [D, T] -> [D, T]."""
    g = lib.ggml_mul_mat(c, gate, h)  # [F, T]
    u = lib.ggml_mul_mat(c, up, h)  # [F, T]
    return lib.ggml_mul_mat(c, down, lib.ggml_swiglu_split(c, g, u))  # [D, T]
