"""ggml's CPU repacking on memory we own (engine/repack.py): which types it takes, that a
stacked tensor's experts repack one by one, and that mul_mat_id on repacked slots agrees
with the file's layout, also after a view is re-pointed as the pool does."""

from __future__ import annotations

import numpy as np
import pytest

from hobbit.compute.engine import ggml
from hobbit.compute.engine.ggml import lib
from hobbit.compute.engine.graph import Arena, Graph, Timing
from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.engine.repack import Repacker
from hobbit.compute.engine.tokenizer import Tokenizer
from hobbit.compute.engine.weights import open_model

from conftest import llama_oracle, rel_l2

D, F, E, K = 512, 64, 6, 2
AVX2 = "avx2" in open("/proc/cpuinfo").read()
REPACKED_ON_AVX2 = ["Q4_0", "Q4_K", "IQ4_NL", "MXFP4"]
NEVER_ON_X86 = ["Q8_0", "Q6_K", "Q5_K", "Q3_K"]


@pytest.fixture(scope="module")
def rp():
    r = Repacker()
    yield r
    r.free()


def _experts(name: str) -> np.ndarray:
    """E experts [D, F] of type name, (E, bytes) in the file's layout."""
    t = ggml.TYPES_BY_NAME[name]
    w = np.random.default_rng(0).standard_normal((E, F, D), dtype=np.float32)
    return np.stack([ggml.quantize(t, w[e], D) for e in range(E)])


@pytest.mark.skipif(not AVX2, reason="ggml repacks these on AVX2")
@pytest.mark.parametrize("name", REPACKED_ON_AVX2)
def test_stacked_experts_repack_one_by_one(rp, name):
    t, raw = ggml.TYPES_BY_NAME[name], _experts(name)
    whole, each = np.empty_like(raw), np.empty_like(raw)
    assert rp.repack(t, (D, F, E), raw.ctypes.data, whole.ctypes.data)
    for e in range(E):
        assert rp.repack(t, (D, F), raw[e].ctypes.data, each[e].ctypes.data)
    assert whole.tobytes() == each.tobytes()
    assert whole.tobytes() != raw.tobytes()  # the layout differs, not the size


@pytest.mark.parametrize("name", NEVER_ON_X86)
def test_types_not_repacked_on_x86_are_left_alone(rp, name):
    if not AVX2:
        pytest.skip("x86 only")
    raw = _experts(name)
    out = np.zeros_like(raw)
    assert not rp.repack(ggml.TYPES_BY_NAME[name], (D, F, E), raw.ctypes.data, out.ctypes.data)
    assert not out.any()
    ctx = ggml.Context(1)
    x = ctx.tensor(ggml.TYPES_BY_NAME[name], (D, F, E), None, raw.ctypes.data)
    assert not rp.mark(x) and not x.contents.buffer and not x.contents.extra


def _mul_mat_id(rp, t: int, raw: np.ndarray, first: int, count: int, repacked: bool, h, ids) -> np.ndarray:
    """mul_mat_id (T, K, F) over experts first..first+count-1 of raw (ids relative to
    first), through a view made for all E and re-pointed as Pool.point does."""
    wctx = ggml.Context(1)
    w = wctx.tensor(t, (D, F, E), None, raw.ctypes.data)
    if repacked:
        assert rp.mark(w)
    x = w.contents
    x.data, x.ne[2] = raw[first].ctypes.data, count
    x.nb[3] = x.nb[2] * count
    T = h.shape[0]
    g, arena, backend = Graph.new(), Arena(lib.ggml_backend_cpu_buffer_type()), lib.ggml_backend_cpu_init()
    hx = lib.ggml_reshape_3d(g.c, g.input("h", ggml.F32, (D, T)), D, 1, T)
    y = lib.ggml_mul_mat_id(g.c, w, hx, g.input("ids", ggml.I32, (K, T)))  # [F, K, T]
    g.output("y", lib.ggml_reshape_2d(g.c, y, F * K, T))
    g.allocate(arena)
    try:
        return g.compute(backend, {"h": h, "ids": ids}, Timing())["y"].reshape(T, K, F)
    finally:
        g.free()
        arena.free()
        lib.ggml_backend_free(backend)
        wctx.free()


@pytest.mark.skipif(not AVX2, reason="ggml repacks these on AVX2")
@pytest.mark.parametrize("name", REPACKED_ON_AVX2)
@pytest.mark.parametrize("T", [1, 5])
def test_mul_mat_id_on_repacked_slots_agrees(rp, name, T):
    t, raw = ggml.TYPES_BY_NAME[name], _experts(name)
    packed = np.empty_like(raw)
    assert rp.repack(t, (D, F, E), raw.ctypes.data, packed.ctypes.data)
    rng = np.random.default_rng(1)
    h = rng.standard_normal((T, D), dtype=np.float32)
    ids = np.stack([rng.permutation(3)[:K] for _ in range(T)]).astype(np.int32)  # slots 2..4
    ref = _mul_mat_id(rp, t, raw, 2, 3, False, h, ids)
    got = _mul_mat_id(rp, t, packed, 2, 3, True, h, ids)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_model_with_repack_computes_as_llama_cpp_with_repacking(synth):
    """RunOptions.repack: every repackable weight (attention and the experts) on ggml's
    repacked layout, so the logits are llama.cpp's with its repacking — the same kernels on
    the same bytes — not those of the file's layout (llama.cpp --no-repack, our default)."""
    path = synth(experts=8, top_k=2, heads=8, kv_heads=4, type="Q4_K", d_model=256)
    prompt = Tokenizer(path).encode("The old lighthouse keeper climbed the spiral stairs every evening.")
    weights = open_model(path)
    ours = Model(weights, RunOptions(n_ctx=256, repack=True))
    plain = Model(weights, RunOptions(n_ctx=256))
    assert ours.repacked and not plain.repacked
    ref = llama_oracle(path, n_ctx=256, repack=True)
    a, b = ours.forward(prompt), plain.forward(prompt)
    ref.eval(prompt)
    worst, apart = 0.0, 0.0
    for _ in range(8):
        r = np.array(ref.scores[ref.n_tokens - 1])
        worst, apart = max(worst, rel_l2(a, r)), max(apart, rel_l2(b, r))
        t = int(np.argmax(r))
        assert int(np.argmax(a)) == t
        a, b = ours.forward([t]), plain.forward([t])
        ref.eval([t])
    ours.close()
    plain.close()
    print(f"relative L2 to llama.cpp with repacking: repacked {worst:.2e}, file layout {apart:.2e}")
    assert worst < 1e-6 < apart
