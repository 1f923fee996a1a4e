"""The sampler picks its candidates without sorting the whole vocabulary, and picks the
same tokens as sorting it would."""

from __future__ import annotations

import numpy as np

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
