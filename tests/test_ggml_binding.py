"""The ctypes binding against independent numpy code (gguf-py's reference quants)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from hobbit.compute.engine import ggml
from hobbit.compute.engine.ggml import lib

MATMUL_TYPES = [
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "IQ4_NL",
    "IQ4_XS",
    "MXFP4",
]
# gguf-py quantises these bit for bit like ggml's reference code
NUMPY_QUANT_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _compute(ctx, out) -> None:
    """Compute the graph ending in `out` on the CPU backend, then free the context."""
    graph = lib.ggml_new_graph_custom(ctx.ptr, 64, False)
    lib.ggml_build_forward_expand(graph, out)
    backend = lib.ggml_backend_cpu_init()
    try:
        assert lib.ggml_backend_graph_compute(backend, graph) == 0
    finally:
        lib.ggml_backend_free(backend)
        ctx.free()


def _rand(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


@pytest.mark.parametrize("name", NUMPY_QUANT_TYPES)
def test_quantize_matches_gguf_numpy_bit_for_bit(name):
    x = _rand((8, 256))
    ours = ggml.quantize(ggml.TYPES_BY_NAME[name], x, 256)
    ref = quants.quantize(x, Q[name]).reshape(-1)
    assert ours.tobytes() == ref.tobytes()


@pytest.mark.parametrize("name", MATMUL_TYPES)
def test_matmul_on_quantized_weights_in_place(name):
    """mul_mat reads the quantised bytes where they lie (no copy) and equals
    dequantise-then-multiply within the activation rounding ggml applies."""
    t = ggml.TYPES_BY_NAME[name]
    K, M, N = 512, 64, 3
    w = _rand((M, K), 1)
    if t == ggml.F32:
        wq = w.copy()
        wd = w
    elif t == ggml.F16:
        wq = w.astype(np.float16)
        wd = wq.astype(np.float32)
    else:
        wq = ggml.quantize(t, w, K)
        wd = quants.dequantize(wq.reshape(M, -1), Q[name]).reshape(M, K)
    x = _rand((N, K), 2)

    ctx = ggml.Context(8, 64)
    tw = ctx.tensor(t, (K, M), "w", wq.ctypes.data)
    tx = ctx.tensor(ggml.F32, (K, N), "x", x.ctypes.data)
    y = np.zeros((N, M), np.float32)
    out = lib.ggml_mul_mat(ctx.ptr, tw, tx)
    out.contents.data = y.ctypes.data
    assert ggml.row_size(t, K) * M == lib.ggml_nbytes(tw)
    _compute(ctx, out)
    ref = x @ wd.T
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    # quantised types multiply against Q8-quantised activations: ~1e-2 at most
    assert err < (1e-6 if t == ggml.F32 else 2e-2), err


def test_type_sizes_match_gguf_tables():
    for name in MATMUL_TYPES:
        t = ggml.TYPES_BY_NAME[name]
        blck, size = quants.GGML_QUANT_SIZES[Q[name]]
        assert (ggml.block_size(t), ggml.type_size(t)) == (blck, size)


def test_tensor_struct_layout_matches_c():
    ctx = ggml.Context(2)
    x = ctx.tensor(ggml.Q8_0, (64, 5, 3), "probe")
    c = x.contents
    assert list(c.ne) == [64, 5, 3, 1]
    assert c.nb[1] == ggml.row_size(ggml.Q8_0, 64) and c.nb[2] == c.nb[1] * 5
    assert c.name.decode() == "probe" and c.type == ggml.Q8_0
    assert lib.ggml_nbytes(x) == c.nb[1] * 15
    ctx.free()


@pytest.mark.parametrize("name", ["F16", "Q8_0", "Q4_0", "Q4_K", "Q6_K", "Q2_K"])
def test_dequantize_matches_gguf_numpy(name):
    t = ggml.TYPES_BY_NAME[name]
    x = _rand((4, 256), 3)
    raw = x.astype(np.float16).view(np.uint8) if t == ggml.F16 else ggml.quantize(t, x, 256)
    ours = ggml.dequantize(t, raw, x.size)
    ref = quants.dequantize(raw.reshape(4, -1), Q[name]).reshape(-1)
    np.testing.assert_array_equal(ours, ref)


def test_type_tables_match_libggml():
    """The daemon sizes slots from gguf's tables (loader/ggml_types.py); libggml agrees for
    every type it knows by name."""
    from hobbit.loader import ggml_types

    for t in Q:
        if t.name in ("Q8_1",):
            continue  # an activation type (never in a file); gguf 0.19 sizes its block 40, ggml 36
        name = lib.ggml_type_name(int(t))
        if not name or t.name not in name.decode().upper().replace("-", "_"):
            continue  # a retired or renamed type number
        assert ggml_types.block_size(t) == lib.ggml_blck_size(int(t)), t.name
        assert ggml_types.type_size(t) == lib.ggml_type_size(int(t)), t.name
        bs = ggml_types.block_size(t)
        assert ggml_types.row_size(t, 4 * bs) == lib.ggml_row_size(int(t), 4 * bs), t.name


def test_every_weight_type_is_matmul_tested():
    """WEIGHT_TYPES (what open_model accepts) are the types tested here."""
    assert {ggml.type_name(t) for t in ggml.WEIGHT_TYPES} == set(MATMUL_TYPES) | {"Q5_1"}


@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4"])
def test_mul_mat_id_on_quantized_experts_in_place(name):
    """mul_mat_id (the MoE matmul: each token's chosen experts from one stacked tensor)
    equals dequantise-then-multiply per chosen expert."""
    t = ggml.TYPES_BY_NAME[name]
    K, M, E, n_used, T = 256, 32, 4, 2, 3
    w = _rand((E * M, K), 4)
    wq = ggml.quantize(t, w, K)
    wd = quants.dequantize(wq.reshape(E * M, -1), Q[name]).reshape(E, M, K)
    x = _rand((T, n_used, K), 5)
    ids = np.array([[0, 3], [2, 1], [3, 3]], np.int32)  # [T, n_used]
    ctx = ggml.Context(8, 64)
    tw = ctx.tensor(t, (K, M, E), "w", wq.ctypes.data)
    tx = ctx.tensor(ggml.F32, (K, n_used, T), "x", x.ctypes.data)
    tid = ctx.tensor(ggml.I32, (n_used, T), "ids", ids.ctypes.data)
    y = np.zeros((T, n_used, M), np.float32)
    out = lib.ggml_mul_mat_id(ctx.ptr, tw, tx, tid)
    out.contents.data = y.ctypes.data
    _compute(ctx, out)
    ref = np.einsum("tuk,tumk->tum", x, wd[ids])
    err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err


def test_swiglu_oai_is_gpt_oss_clamped_swiglu():
    """gpt-oss's activation: gate clamped from above and up to [-limit, limit], then
    gate * sigmoid(alpha gate) * (up + 1)."""
    from hobbit.compute.engine.moe import SWIGLU_OAI

    alpha, limit = SWIGLU_OAI
    gate, up = 4 * _rand((3, 64), 6), 4 * _rand((3, 64), 7)  # both beyond the limit at times
    assert (gate > limit).any() and (np.abs(up) > limit).any()
    ctx = ggml.Context(8, 64)
    tg = ctx.tensor(ggml.F32, (64, 3), "g", gate.ctypes.data)
    tu = ctx.tensor(ggml.F32, (64, 3), "u", up.ctypes.data)
    y = np.zeros((3, 64), np.float32)
    out = lib.ggml_swiglu_oai(ctx.ptr, tg, tu, alpha, limit)
    out.contents.data = y.ctypes.data
    _compute(ctx, out)
    g, u = np.minimum(gate, limit), np.clip(up, -limit, limit)
    np.testing.assert_allclose(y, g / (1 + np.exp(-alpha * g)) * (u + 1), rtol=1e-5, atol=1e-6)


def test_add_id_adds_each_chosen_experts_bias_from_strided_slots():
    """ggml_add_id (expert biases): row (k, t) gets bias column ids[t, k], read with the
    bias tensor's own stride, as the pool views lay biases out one slot apart."""
    F, S, K, T, stride = 16, 5, 2, 3, 32  # a slot is 32 floats, its bias the first 16
    slots = _rand((S, stride), 8)
    x = _rand((T, K, F), 9)
    ids = np.array([[4, 0], [1, 1], [2, 3]], np.int32)
    ctx = ggml.Context(8, 64)
    tx = ctx.tensor(ggml.F32, (F, K, T), "x", x.ctypes.data)
    tb = ctx.tensor(ggml.F32, (F, S), "b", slots.ctypes.data)
    tb.contents.nb[1] = stride * 4
    tb.contents.nb[2] = tb.contents.nb[3] = stride * 4 * S
    tid = ctx.tensor(ggml.I32, (K, T), "ids", ids.ctypes.data)
    y = np.zeros((T, K, F), np.float32)
    out = lib.ggml_add_id(ctx.ptr, tx, tb, tid)
    out.contents.data = y.ctypes.data
    _compute(ctx, out)
    np.testing.assert_array_equal(y, x + slots[ids][..., :F])
