"""Our engine against llama.cpp on the same GGUF: same greedy tokens, same logits."""

from __future__ import annotations

import numpy as np
import pytest

from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.engine.tokenizer import Tokenizer
from hobbit.compute.engine.weights import open_model

from conftest import llama_oracle, rel_l2

PROMPT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the "
    "steps and listening to the sea against the rocks below."
)
N_DECODE = 32
TOL = 1e-2

# Synthetic MoE configurations: they differ in experts, top-k, GQA ratio and weight type.
MOE_CONFIGS = {
    "e8k2-gqa2-q8_0": dict(experts=8, top_k=2, heads=8, kv_heads=4, type="Q8_0"),
    "e4k1-gqa4-q4_0": dict(experts=4, top_k=1, heads=8, kv_heads=2, type="Q4_0"),
    "e16k4-mha-f16": dict(experts=16, top_k=4, heads=4, kv_heads=4, type="F16"),
    "e8k2-gqa2-q4_k": dict(experts=8, top_k=2, heads=8, kv_heads=4, type="Q4_K", d_model=256),
}


def assert_parity(
    path: str, prompt_text: str = PROMPT, n_decode: int = N_DECODE, n_ctx: int = 1024, experts=None, n_batch: int = 512
) -> float:
    """Greedy decoding of n_decode tokens by our engine and llama.cpp gives the same tokens,
    and logits within TOL (relative L2) at every step; returns the largest error seen.
    experts: an expert provider (hobbitd's ExpertClient) for the segmented forward;
    n_batch: our engine's prompt chunk (llama.cpp's stays 512)."""
    tok = Tokenizer(path)
    prompt = tok.encode(prompt_text)
    ours = Model(open_model(path), RunOptions(n_ctx=n_ctx, n_batch=n_batch), experts=experts)
    ref = llama_oracle(path, n_ctx=n_ctx)

    logits = ours.forward(prompt)
    ref.eval(prompt)
    ref_logits = np.array(ref.scores[ref.n_tokens - 1])
    worst = rel_l2(logits, ref_logits)
    assert worst <= TOL, "logits after the prompt"
    ours_tokens, ref_tokens = [], []
    for step in range(n_decode):
        ours_tokens.append(int(np.argmax(logits)))
        ref_tokens.append(int(np.argmax(ref_logits)))
        assert ours_tokens == ref_tokens, f"greedy tokens diverge at step {step}"
        logits = ours.forward([ours_tokens[-1]])
        ref.eval([ref_tokens[-1]])
        ref_logits = np.array(ref.scores[ref.n_tokens - 1])
        err = rel_l2(logits, ref_logits)
        assert err <= TOL, f"logits after decode step {step}: relative L2 {err:.3g}"
        worst = max(worst, err)
    assert len(set(ours_tokens)) > 1, "a degenerate model would make this test meaningless"
    ours.close()
    return worst


def test_dense_smollm2_matches_llama_cpp(smollm2):
    assert_parity(smollm2)


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_synthetic_moe_matches_llama_cpp(synth, name):
    assert_parity(synth(**MOE_CONFIGS[name]))


@pytest.mark.slow
def test_long_prompt_in_several_batches_matches_llama_cpp(smollm2):
    """A prompt longer than one batch (512) and several KV pads (256) long."""
    assert_parity(smollm2, prompt_text=" ".join([PROMPT] * 24), n_decode=8, n_ctx=2048)


def test_all_logits_match_llama_cpp(smollm2):
    """Every position's logits (what perplexity needs), not only the last."""
    tok = Tokenizer(smollm2)
    prompt = tok.encode(PROMPT)
    ours = Model(open_model(smollm2), RunOptions(n_ctx=256)).forward(prompt, all_logits=True)
    ref = llama_oracle(smollm2, n_ctx=256)
    ref.eval(prompt)
    assert ours.shape == (len(prompt), ref.n_vocab())
    for i in range(len(prompt)):
        assert rel_l2(ours[i], ref.scores[i]) <= TOL, f"position {i}"
