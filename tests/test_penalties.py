"""The repetition penalties are llama.cpp's: the same penalised logits as its own penalties
sampler over the same history, first in the chain; generation passes the history (prompt,
cached tokens and generated ones). The file keys, flags and request fields:
tests/test_model_sampling.py."""

from __future__ import annotations

import ctypes
import numpy as np
import pytest

from hobbit.compute.engine.sampling import (
    Sampler,
    SamplingOptions,
    SamplingSettings,
    SamplingValueError,
    penalise,
)

SMALL = dict(experts=0, layers=2, d_model=128, d_ff=256, heads=4, kv_heads=2)


def _token_array(L, logits):
    data = (L.llama_token_data * len(logits))(*[L.llama_token_data(i, float(v), 0.0) for i, v in enumerate(logits)])
    return data, L.llama_token_data_array(data, len(logits), -1, False)


def _llama_penalised(logits, history, last_n, repeat, freq, present) -> np.ndarray:
    """The logits after llama.cpp's own penalties sampler (llama_sampler_init_penalties) has
    accepted `history`, as its common sampler accepts the prompt and each generated token."""
    import llama_cpp as L

    smpl = L.llama_sampler_init_penalties(len(logits), last_n, repeat, freq, present)
    data, size = _llama_apply(L, smpl, logits, history)
    assert size == len(logits)  # penalties keep every token, in place
    return np.array([data[i].logit for i in range(len(logits))], np.float32)


def _llama_apply(L, smpl, logits, history):
    """(the token data, how many are kept) after llama.cpp's sampler smpl (freed here) has
    accepted each token of history and been applied to logits."""
    data, cur = _token_array(L, logits)
    try:
        for t in history:
            L.llama_sampler_accept(smpl, int(t))
        L.llama_sampler_apply(smpl, ctypes.byref(cur))
    finally:
        L.llama_sampler_free(smpl)
    return data, cur.size


def _case(V=64, n=100, seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(V) * 3).astype(np.float32)
    logits[[3, 7]] = 0.0  # a zero logit is multiplied, as a negative one
    history = rng.integers(0, min(24, V), n)  # repeats: counts up to ~10
    return logits, history


# (last_n, repeat, freq, present)
SETTINGS = [
    (64, 1.1, 0.0, 0.0),  # llama.cpp's default window, a usual penalty
    (32, 1.3, 0.5, 0.25),
    (8, 0.9, -0.3, 0.7),  # below 1 and negative: rewards repetition, as llama.cpp allows
    (1, 2.0, 0.0, 0.0),
    (100, 1.0, 0.2, 0.0),  # frequency only
    (500, 1.0, 0.0, 1.5),  # presence only, a window longer than the history
    (64, 1.0, 0.0, 0.0),  # off
    (0, 1.5, 1.0, 1.0),  # off
]


def test_penalised_logits_are_llama_cpps():
    for seed in range(3):
        logits, history = _case(seed=seed)
        for last_n, repeat, freq, present in SETTINGS:
            o = SamplingOptions(
                penalty_repeat=repeat, penalty_last_n=last_n, penalty_freq=freq, penalty_present=present
            )
            got = penalise(logits, list(history), o)
            want = _llama_penalised(logits, history, last_n, repeat, freq, present)
            assert np.array_equal(got, want), (seed, last_n, repeat, freq, present)


def test_last_n_minus_one_is_the_whole_history():
    """-1: every token of the history (llama.cpp's meaning of -1 before it clamped negative
    windows to 0: its context size, which the history never exceeds)."""
    logits, history = _case(n=300)
    o = SamplingOptions(penalty_repeat=1.2, penalty_last_n=-1, penalty_freq=0.1)
    want = _llama_penalised(logits, history, len(history), 1.2, 0.1, 0.0)
    assert np.array_equal(penalise(logits, list(history), o), want)


def test_only_the_historys_tokens_change_on_a_large_vocabulary():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal(262144) * 4).astype(np.float32)
    history = list(rng.integers(0, 262144, 64))
    got = penalise(logits, history, SamplingOptions(penalty_repeat=1.3))
    changed = np.flatnonzero(got != logits)
    assert set(changed) <= set(history) and len(changed) >= len(set(history)) - 1  # a 0 logit stays 0


def test_the_sampler_penalises_first_as_llama_cpps_chain():
    """Greedy picks the best penalised logit; a seeded draw is the draw from llama.cpp's
    penalised logits; top-k and min-p see the penalised logits (the tokens that can come
    out are those llama.cpp's chain penalties -> top-k -> min-p keeps)."""
    import llama_cpp as L

    logits, history = _case(V=12, n=40, seed=5)
    fresh = next(t for t in range(len(logits)) if t not in history[-16:])
    top = logits.max()
    logits[int(history[-1])], logits[fresh] = top + 0.5, top - 0.5  # the best token was just generated
    pen = dict(penalty_repeat=1.5, penalty_last_n=16, penalty_freq=0.1, penalty_present=0.2)
    want = _llama_penalised(logits, history, 16, 1.5, 0.1, 0.2)
    assert int(np.argmax(logits)) == history[-1] and int(np.argmax(want)) == fresh  # the penalty matters here

    assert Sampler(SamplingOptions(temperature=0.0, **pen))(logits, list(history)) == int(np.argmax(want))

    opts = SamplingOptions(temperature=0.7, top_k=0, top_p=1.0, seed=3, **pen)
    z = want.astype(np.float64) / 0.7
    idx = np.argsort(-z, kind="stable")
    p = np.exp(z[idx] - z[idx[0]])
    assert Sampler(opts)(logits, list(history)) == int(np.random.default_rng(3).choice(idx, p=p / p.sum()))

    for top_k, min_p in ((4, 0.0), (0, 0.2), (5, 0.05)):
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(len(logits), 16, 1.5, 0.1, 0.2))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(top_k if top_k else len(logits)))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(min_p, 1))
        data, size = _llama_apply(L, chain, logits, history)
        kept = sorted(data[i].id for i in range(size))
        # at temperature 100 the kept tokens are near-uniform: 300 seeds draw each of them
        hot = dict(temperature=100.0, top_k=top_k, top_p=1.0, min_p=min_p, **pen)
        drawn = {Sampler(SamplingOptions(**hot, seed=s))(logits, list(history)) for s in range(300)}
        assert sorted(drawn) == kept, (top_k, min_p)


def test_penalty_values_out_of_range_are_refused():
    SamplingSettings(penalty_repeat=0.5, penalty_last_n=-1, penalty_freq=-5.0, penalty_present=3.0).check()
    for bad in (
        {"penalty_repeat": 0.0},
        {"penalty_repeat": -1.0},
        {"penalty_repeat": 1e-39},  # its float32 inverse is infinite: llama.cpp refuses it too
        {"penalty_repeat": float("nan")},
        {"penalty_repeat": float("inf")},
        {"penalty_last_n": -2},
        {"penalty_last_n": 2.5},
        {"penalty_last_n": 2**31},
        {"penalty_freq": float("nan")},
        {"penalty_present": float("-inf")},
    ):
        with pytest.raises(SamplingValueError) as e:
            SamplingSettings(**bad).check()
        assert e.value.field == next(iter(bad)) and "\n" not in str(e.value)


def test_the_model_keys_are_ggufs_constants():
    import gguf

    from hobbit.compute.engine.sampling import MODEL_KEYS

    K = gguf.Keys.General
    assert {K.SAMPLING_PENALTY_REPEAT, K.SAMPLING_PENALTY_LAST_N} <= set(MODEL_KEYS)
    assert set(MODEL_KEYS) <= {getattr(K, n) for n in dir(K) if n.startswith("SAMPLING_")}


# ---- generation passes the history ------------------------------------------------------------


def test_generation_penalises_prompt_cached_and_generated_tokens_as_llama_cpp(synth):
    """Greedy with penalties: each token is the argmax of llama.cpp's penalised logits over
    the prompt and the tokens generated so far; a continuation with the prefix in the KV
    cache (chat, serve) gives the tokens of the whole prompt computed afresh."""
    from hobbit.compute.engine.generate import generate_tokens
    from hobbit.compute.engine.model import RunOptions
    from hobbit.compute.runs import open_run

    run = open_run(synth(**SMALL), RunOptions(n_ctx=128, n_threads=1), None)
    try:
        model = run.model
        prompt = run.tok.encode("Once upon a time there was a time when")
        # a random model seldom repeats a token: penalties below 0 reward repeats, so they show
        pen = dict(penalty_repeat=0.8, penalty_last_n=12, penalty_freq=0.3, penalty_present=-2.0)
        opts = SamplingOptions(temperature=0.0, **pen)
        got = list(generate_tokens(model, prompt, 16, Sampler(opts)))

        model.reset()
        history = list(prompt)
        logits = model.forward(prompt)
        for _ in range(16):
            t = int(np.argmax(_llama_penalised(logits, history, 12, 0.8, 0.3, -2.0)))
            history.append(t)
            logits = model.forward([t])
        assert got == history[len(prompt) :]
        assert got != _greedy(model, prompt, 16)  # the penalties changed something

        keep = len(prompt) - 1  # the cache holds all but the last token (a next chat turn)
        model.reset()
        model.forward(prompt[:keep])
        cont = list(generate_tokens(model, prompt[keep:], 16, Sampler(opts), cached=prompt[:keep]))
        assert cont == got
        model.n_past = keep
        assert list(generate_tokens(model, prompt[keep:], 16, Sampler(opts))) != got  # the cached tokens count
    finally:
        run.close()


def _greedy(model, prompt, n):
    from hobbit.compute.engine.generate import generate_tokens

    model.reset()
    return list(generate_tokens(model, prompt, n, Sampler(SamplingOptions(temperature=0.0))))
