"""The sampler picks its candidates without sorting the whole vocabulary, and picks the
same tokens as sorting it would."""

from __future__ import annotations

import numpy as np
import pytest

from hobbit.compute.engine.sampling import Sampler, SamplingOptions, candidates


def test_candidates_are_the_top_k_in_order():
    rng = np.random.default_rng(1)
    for V in (10, 1000, 262144):
        z = rng.standard_normal(V)
        z[rng.integers(0, V, 5)] = z.max()  # ties at the top: the lower index first
        for k in (1, 5, 40, V, 0):
            want = np.argsort(-z, kind="stable")[: k if k > 0 else V]
            assert (candidates(z, k) == want).all(), (V, k)


def test_sampling_a_large_vocabulary_matches_a_full_sort():
    """At a 262k vocabulary, seeded sampling gives the tokens a full sort would give."""
    rng = np.random.default_rng(2)
    logits = (rng.standard_normal(262144) * 4).astype(np.float32)
    opts = SamplingOptions(temperature=0.8, top_k=40, top_p=0.95, seed=7)
    got = [Sampler(opts)(logits) for _ in range(3)]

    ref_rng = np.random.default_rng(7)
    z = logits.astype(np.float64) / 0.8
    idx = np.argsort(-z, kind="stable")[:40]
    p = np.exp(z[idx] - z[idx[0]])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), 0.95)) + 1
    want = int(ref_rng.choice(idx[:keep], p=p[:keep] / p[:keep].sum()))
    assert got == [want] * 3
    assert len({Sampler(SamplingOptions(0.8, 40, 0.95, s))(logits) for s in range(20)}) > 1


def _support(logits, **kw) -> list:
    """The tokens a Sampler can pick: a high temperature makes the kept ones near-uniform, so
    300 seeds draw each of them (the chance to miss one of 5 is under 1e-28)."""
    return sorted({Sampler(SamplingOptions(**{"temperature": 100.0, **kw}, seed=s))(logits) for s in range(300)})


def _llama_min_p(logits, min_p: float) -> list:
    """The tokens llama.cpp's own min-p sampler keeps (llama_sampler_init_min_p)."""
    import ctypes

    import llama_cpp as L

    data = (L.llama_token_data * len(logits))(*[L.llama_token_data(i, float(v), 0.0) for i, v in enumerate(logits)])
    cur = L.llama_token_data_array(data, len(logits), -1, False)
    smpl = L.llama_sampler_init_min_p(min_p, 0)
    try:
        L.llama_sampler_apply(smpl, ctypes.byref(cur))
    finally:
        L.llama_sampler_free(smpl)
    return sorted(data[i].id for i in range(cur.size))


LOGITS = np.array([0.0, 2.0, -3.0, 1.0, -1.0], np.float32)


def test_min_p_keeps_what_llama_cpps_min_p_keeps():
    """min-p on the logits before temperature (llama.cpp's chain: top-k, top-p, min-p, then
    temperature), so even at temperature 100 it keeps p_i >= min_p * p_max of the raw logits."""
    table = [  # min_p, top_k, top_p: the tokens that can come out
        (0.0, 0, 1.0, [0, 1, 2, 3, 4]),
        (0.01, 0, 1.0, [0, 1, 3, 4]),
        (0.05, 0, 1.0, [0, 1, 3]),
        (0.3, 0, 1.0, [1, 3]),
        (0.5, 0, 1.0, [1]),
        (1.0, 0, 1.0, [1]),
        (0.05, 2, 1.0, [1, 3]),  # top-k first
        (0.01, 0, 0.5, [0, 1, 3]),  # near-uniform at temperature 100: top-p 0.5 keeps 3 of 5
        (0.3, 0, 0.5, [1, 3]),
    ]
    for min_p, top_k, top_p, want in table:
        assert _support(LOGITS, min_p=min_p, top_k=top_k, top_p=top_p) == want, (min_p, top_k, top_p)
        if top_k == 0 and top_p == 1.0:
            assert _llama_min_p(LOGITS, min_p) == want, min_p


def test_min_p_on_a_large_vocabulary_sorts_only_the_survivors_and_matches_a_full_sort():
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(262144) * 4).astype(np.float32)
    opts = SamplingOptions(temperature=0.7, top_k=0, top_p=1.0, min_p=0.05, seed=11)
    got = [Sampler(opts)(logits) for _ in range(3)]

    floor = np.float32(logits.max()) + np.log(np.float32(0.05))
    idx = np.argsort(-logits, kind="stable")
    idx = idx[logits[idx] >= floor]
    z = logits[idx].astype(np.float64) / 0.7
    p = np.exp(z - z[0])
    want = int(np.random.default_rng(11).choice(idx, p=p / p.sum()))
    assert got == [want] * 3


def test_sampling_settings_out_of_range_are_refused():
    from hobbit.compute.engine.sampling import SamplingSettings, SamplingValueError

    SamplingSettings(temperature=0.0, top_k=0, top_p=1.0, min_p=1.0, seed=-3).check()
    for bad in (
        {"min_p": 1.5},
        {"min_p": -0.1},
        {"min_p": float("nan")},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"top_p": 1.01},
        {"top_k": -1},
        {"top_k": 2.5},
    ):
        with pytest.raises(SamplingValueError) as e:
            SamplingSettings(**bad).check()
        assert e.value.field == next(iter(bad)) and "\n" not in str(e.value)


def test_precedence_is_flag_then_model_then_built_in():
    from hobbit.compute.engine.sampling import SamplingSettings, resolve

    flags = SamplingSettings(temperature=0.0)
    model = SamplingSettings(temperature=0.3, top_k=5, min_p=0.2)
    got = resolve(flags, model, builtin=SamplingOptions())
    assert got == SamplingOptions(temperature=0.0, top_k=5, top_p=0.95, min_p=0.2, seed=None)
    assert resolve(SamplingSettings(), SamplingSettings(), builtin=SamplingOptions()) == SamplingOptions()
