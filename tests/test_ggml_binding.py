"""The ctypes binding against independent numpy code (gguf-py's reference quants)."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from hobbit.compute.engine import ggml
from hobbit.compute.engine.ggml import lib

MATMUL_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q2_K", "Q3_K", "Q4_K",
                "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4"]
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
            continue   # an activation type (never in a file); gguf 0.19 sizes its block 40, ggml 36
        name = lib.ggml_type_name(int(t))
        if not name or t.name not in name.decode().upper().replace("-", "_"):
            continue   # a retired or renamed type number
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
    ids = np.array([[0, 3], [2, 1], [3, 3]], np.int32)        # [T, n_used]
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
