"""Splitting one dense FFN layer into experts, and the router that picks them
(make/moefy.py's steps 2 and 3; its module docstring tells the recipe).

`plan_layer(X, gate, up, down, opts, layer)` groups the layer's F neurons into E experts
of F/E (co-activation clustering by balanced k-means, or random / contiguous groups) and
fits the router: a ridge regression from the FFN input to each expert's log output norm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...protocol.errors import InputError
from ..engine import ggml
from .recipe import MoefyOptions


CLUSTERINGS = ("coact", "random", "contiguous")
CO_ACTIVE = 0.10  # share of a token's neurons that count as "active" for clustering
KMEANS_ITERS = 30
RIDGE = 1e-2  # ridge penalty, relative to the mean diagonal of X^T X


def ffn_weights(weights, il: int, experts: bool = False):
    """(gate (F, D), up (F, D), down (D, F)) of layer il as float32, numpy order; with
    experts, the expert tensors: (E, Fe, D), (E, Fe, D), (E, D, Fe)."""
    out = []
    for part in ("gate", "up", "down"):
        info = weights.tensors[f"blk.{il}.ffn_{part}{'_exps' if experts else ''}.weight"]
        out.append(
            ggml.dequantize(info.type, weights.data(info.name), int(np.prod(info.shape))).reshape(info.shape[::-1])
        )
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def balanced_assign(sim: np.ndarray, size: int) -> np.ndarray:
    """Each row (neuron) to one column (cluster), every cluster exactly `size` rows (F = E *
    size; check() makes it so): as if greedily by decreasing similarity over all pairs
    (stable order, so deterministic).

    Computed by deferred acceptance (neurons propose to clusters in their order, a cluster
    keeps its `size` best proposals) in vectorised rounds instead of a Python loop over the
    F*E pairs: when both sides rank pairs by one common order, the stable assignment is
    unique and is exactly what the greedy pass gives (tests/test_default_model.py checks the two
    against each other, ties included). With little calibration text (many tied
    similarities, k-means running all its iterations) the loop was ~40% of a layer's split."""
    F, E = sim.shape
    order = np.argsort(-sim, axis=None, kind="stable")
    rank = np.empty(F * E, np.int64)
    rank[order] = np.arange(F * E)
    rank = rank.reshape(F, E)  # (F, E): each pair's place in the order
    prefs = np.argsort(rank, axis=1)  # (F, E): each neuron's clusters, best first
    tried = np.zeros(F, np.int64)  # (F,): proposals made per neuron
    assign = np.full(F, -1, np.int64)
    free = np.arange(F)
    while free.size:
        assign[free] = prefs[free, tried[free]]
        tried[free] += 1
        # every cluster keeps its `size` best-ranked neurons (held and new), rejects the rest
        by_cluster = np.argsort(assign * (F * E) + rank[np.arange(F), assign], kind="stable")
        e = assign[by_cluster]
        place = np.arange(F) - np.searchsorted(e, e, side="left")
        free = np.sort(by_cluster[place >= size])
        assign[free] = -1
    return assign


def balanced_kmeans(feat: np.ndarray, n_clusters: int, seed: int, iters: int = KMEANS_ITERS) -> list:
    """Spherical k-means of the rows of feat (N, d) into equal clusters; sorted index arrays."""
    N = feat.shape[0]
    size = N // n_clusters
    # rows contiguous: the features come transposed (F, T) from (T, F) activations, and
    # gathering a cluster's rows from that layout each iteration took ~10x longer
    feat = np.ascontiguousarray(feat / np.maximum(np.linalg.norm(feat, axis=1, keepdims=True), 1e-12))
    rng = np.random.default_rng(seed)
    centers = feat[np.sort(rng.choice(N, n_clusters, replace=False))]
    assign = None
    for _ in range(iters):
        new = balanced_assign(feat @ centers.T, size)  # (N,)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        centers = np.stack([feat[assign == e].mean(axis=0) for e in range(n_clusters)])
        centers /= np.maximum(np.linalg.norm(centers, axis=1, keepdims=True), 1e-12)
    return [np.flatnonzero(assign == e) for e in range(n_clusters)]


@dataclass
class LayerPlan:
    groups: list  # E sorted arrays of F/E neuron indices
    router: np.ndarray  # (E, D) float32: x -> predicted log ||FFN_e(x)|| (before temperature)
    down: np.ndarray | None = None  # (D, F) refitted down (opts.refit), else the dense one


def plan_layer(X: np.ndarray, gate, up, down, opts: MoefyOptions, layer: int) -> LayerPlan:
    """Split one FFN: X (T, D) calibration inputs; gate/up (F, D), down (D, F) float32."""
    F = gate.shape[0]
    E = opts.experts
    A = silu(X @ gate.T) * (X @ up.T)  # (T, F)
    if opts.clustering == "coact":
        imp = np.abs(A) * np.linalg.norm(down, axis=0)  # (T, F)
        n_act = max(1, int(round(CO_ACTIVE * F)))
        thresh = -np.partition(-imp, n_act - 1, axis=1)[:, n_act - 1 : n_act]  # (T, 1)
        feat = (imp >= thresh).T.astype(np.float32)  # (F, T)
        u = opts.unit  # cluster runs of u neurons: whole quant blocks can be copied
        groups = balanced_kmeans(feat.reshape(F // u, u, -1).mean(axis=1), E, seed=opts.seed + layer)
        groups = [(g[:, None] * u + np.arange(u)).ravel() for g in groups]
    elif opts.clustering == "random":
        perm = np.random.default_rng(opts.seed + layer).permutation(F)
        groups = [np.sort(perm[e * (F // E) : (e + 1) * (F // E)]) for e in range(E)]
    elif opts.clustering == "contiguous":
        groups = [np.arange(e * (F // E), (e + 1) * (F // E)) for e in range(E)]
    else:
        raise InputError(f"--clustering {opts.clustering!r} is not one of {' '.join(CLUSTERINGS)}")
    # each expert's output norm per token, and a ridge fit x -> log norm
    c = np.stack([np.linalg.norm(A[:, g] @ down[:, g].T, axis=1) for g in groups], axis=1)  # (T, E)
    target = np.log(c.astype(np.float64) + 1e-6)
    X64 = X.astype(np.float64)
    xtx = X64.T @ X64  # (D, D)
    lam = RIDGE * float(np.mean(np.diag(xtx)))
    W = np.linalg.solve(xtx + lam * np.eye(xtx.shape[0]), X64.T @ target)  # (D, E)
    plan = LayerPlan(groups=groups, router=W.T.astype(np.float32))
    if opts.refit > 0 and opts.top_k < E:
        # least squares: the routed experts' sum should give the dense output, pulled
        # towards the dense down matrix (ridge) so that it generalises
        sel = np.argsort(-(X @ plan.router.T), axis=1, kind="stable")[:, : opts.top_k]  # (T, K)
        used = np.zeros((len(X), E), bool)
        np.put_along_axis(used, sel, True, axis=1)
        member = np.empty(F, np.int64)
        for e, g in enumerate(groups):
            member[g] = e
        At = (A * used[:, member]).astype(np.float64)  # (T, F)
        S = At.T @ At
        lam = opts.refit * float(np.mean(np.diag(S)))
        Y = A.astype(np.float64) @ down.T.astype(np.float64)  # (T, D)
        plan.down = np.linalg.solve(S + lam * np.eye(F), At.T @ Y + lam * down.T).T.astype(np.float32)
    return plan
