"""The default model: SmolLM2-135M-Instruct split into a MoE (compute/make/moefy.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from hobbit.compute.measure import evaluate
from hobbit.compute.make import moefy, moefy_split, recipe
from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.measure.routing_stats import routing_stats
from hobbit.compute.engine.weights import open_model

from conftest import rel_l2
from test_parity import assert_parity

CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_all_experts_active_is_the_dense_ffn(moe_variant, smollm2):
    """top-k = E with uniform weights and the dense file's own blocks (Q4_1, whole blocks per
    expert): every layer's MoE FFN is the dense FFN, on real FFN inputs' scale."""
    path = moe_variant(top_k=16, temperature=0.0, expert_type="Q4_1", unit=32)
    dense, moe = open_model(smollm2), open_model(path)
    x = np.random.default_rng(0).standard_normal((8, dense.args.n_embd)).astype(np.float32)
    for il in range(dense.args.n_layer):
        g, u, d = moefy_split.ffn_weights(dense, il)
        want = (moefy_split.silu(x @ g.T) * (x @ u.T)) @ d.T
        ge, ue, de = moefy_split.ffn_weights(moe, il, experts=True)
        got = sum((moefy_split.silu(x @ ge[e].T) * (x @ ue[e].T)) @ de[e].T for e in range(16)) / 16
        assert rel_l2(got, want) < 1e-5, f"layer {il}"


@pytest.fixture(scope="module")
def dense_ppl(dense_llama_ppl) -> float:
    """llama.cpp's perplexity of the dense GGUF on the first 3 chunks of 512 (conftest): the
    reference of both perplexity tests below (our engine agrees with it within 1%,
    test_evaluate)."""
    return dense_llama_ppl["ppl"]


def test_all_experts_active_has_the_dense_perplexity(moe_variant, wiki_tokens, dense_ppl):
    """The same, computed: our engine on the top-k = E MoE (default expert type, Q8_0) and
    llama.cpp on the dense GGUF, WikiText-2, 3 chunks of 512: perplexity within 1%.

    (Token for token, greedy decoding of the two files parts after a few steps, and the
    logits differ by ~3.4e-2 relative L2 after a prompt, in llama.cpp as in our engine:
    mul_mat_id over 16 experts and re-quantised experts round differently from one dense
    mul_mat, and this small model amplifies rounding. On each file our engine and llama.cpp
    agree bit for bit: test_default_model_matches_llama_cpp and test_parity.)"""
    path = moe_variant(top_k=16, temperature=0.0)
    ours = Model(open_model(path), RunOptions(n_ctx=512))
    moe_ppl = evaluate.perplexity(ours, wiki_tokens, chunks=3)["ppl"]
    ours.close()
    assert abs(moe_ppl / dense_ppl - 1) < 0.01, (moe_ppl, dense_ppl)


def _greedy_assign(sim: np.ndarray, size: int) -> np.ndarray:
    """The definition balanced_assign implements: walk all (neuron, cluster) pairs by
    decreasing similarity (stable order), taking a pair while the neuron is free and the
    cluster has room."""
    F, E = sim.shape
    assign, room = np.full(F, -1), np.full(E, size)
    for idx in np.argsort(-sim, axis=None, kind="stable"):
        j, e = divmod(int(idx), E)
        if assign[j] < 0 and room[e] > 0:
            assign[j], room[e] = e, room[e] - 1
    return assign


def test_balanced_assign_is_the_greedy_pass():
    """The vectorised assignment of neurons to equal clusters gives the greedy pass's
    answer exactly (the build's bytes depend on it), on distinct similarities and on the
    ties little calibration text makes (neurons never active, duplicated patterns)."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        E = int(rng.choice([2, 4, 16]))
        size = int(rng.integers(1, 30))
        F = E * size
        sim = [
            rng.standard_normal((F, E)),  # distinct
            rng.integers(0, 3, (F, E)),  # few values: ties everywhere
            np.zeros((F, E)),  # all tied
            rng.standard_normal((3, E))[rng.integers(0, 3, F)],
        ][trial % 4].astype(np.float32)
        got = moefy_split.balanced_assign(sim, size)
        assert np.array_equal(got, _greedy_assign(sim, size)), (trial, E, size)
        assert np.bincount(got, minlength=E).tolist() == [size] * E


def test_default_model_matches_llama_cpp(default_moe):
    """Real routing (top-k < E): our engine and llama.cpp agree on the MoE file itself."""
    assert_parity(default_moe, n_ctx=512)


def test_default_model_is_a_real_moe_file(default_moe, smollm2):
    w, dense = open_model(default_moe), open_model(smollm2)
    assert w.args.is_moe and w.args.n_expert == recipe.DEFAULT_EXPERTS
    assert w.args.n_expert_used == recipe.DEFAULT_TOP_K
    assert w.args.n_ff * w.args.n_expert == dense.args.n_ff
    assert w.field("hobbit.moefy.recipe") == moefy.RECIPE
    assert w.field("tokenizer.chat_template") == dense.field("tokenizer.chat_template")
    assert os.path.exists(moefy.default_companion(default_moe)), "the Q4_0 companion is made with it"


def test_build_is_deterministic(synth, tmp_path):
    """Two builds from scratch (no in-process caches) give the same bytes: the whole recipe
    (the dense model writing its calibration text by seeded sampling on fixed threads,
    co-activation k-means, the ridge router, re-quantised experts) on a small dense source
    (4 layers, F16, SmolLM2's vocabulary), so that the two builds take seconds."""
    source = synth(layers=4, d_model=256, d_ff=512, experts=0, type="F16")
    opts = moefy.MoefyOptions(calib_tokens=256, per_prompt=64)
    paths = []
    for i in range(2):
        moefy.clear_caches()
        paths.append(moefy.build_moe(str(tmp_path / f"m{i}.gguf"), opts=opts, source=source, progress=False))
    assert open_model(paths[0]).args.n_expert == opts.experts
    assert _sha(paths[0]) == _sha(paths[1])


def test_moe_perplexity_is_within_reach_of_dense(default_moe, wiki_tokens, dense_ppl):
    """WikiText-2 (never used for calibration), first 3 chunks of 512: the MoE (our engine)
    loses accuracy (half the FFN is skipped per token) but stays a language model. Bound from
    BENCHMARKS.md: measured 1.9x on 40 chunks; 2.5x here leaves room for the few-chunk noise."""
    m = Model(open_model(default_moe), RunOptions(n_ctx=512))
    ppl = {"dense": dense_ppl, "moe": evaluate.perplexity(m, wiki_tokens, chunks=3)["ppl"]}
    m.close()
    assert ppl["dense"] < ppl["moe"] < 2.5 * ppl["dense"], ppl


def test_routing_is_skewed_and_local(default_moe, wiki_tokens):
    """Real text routes like a real MoE: popular experts, and a token reuses more of the
    previous token's experts than it would in shuffled order."""
    tokens = wiki_tokens[:1024]  # SmolLM2's tokens: moefy copies its tokenizer
    model = Model(open_model(default_moe), RunOptions(n_ctx=512, taps=("router_in",)))
    r = routing_stats(model, tokens, ctx=512)
    model.close()
    m = r["mean"]
    assert m["rate_max"] - m["rate_min"] > 0.2, m  # uniform routing: ~0
    assert m["overlap"] > m["shuffled"]["overlap"] + 0.02, m
    assert len(r["layers"]) == 30 and all(abs(sum(ls["popularity"]) - 1) < 1e-6 for ls in r["layers"])


def test_models_lists_the_prepared_default(default_moe):
    env = {**os.environ, "XDG_DATA_HOME": os.environ["XDG_DATA_HOME"]}
    out = subprocess.run([*CLI, "models", "--json"], capture_output=True, text=True, env=env, check=True)
    r = json.loads(out.stdout)
    assert r["default"] == default_moe
    (entry,) = [m for m in r["models"] if m["path"] == default_moe]
    assert entry["experts"] == recipe.DEFAULT_EXPERTS and entry["recipe"] == moefy.RECIPE


def test_prepare_rejects_bad_options(tmp_path):
    out = subprocess.run(
        [*CLI, "prepare", "--experts", "7", "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True
    )
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith("hobbit-cli: error: --experts 7")
    assert not (tmp_path / "x.gguf").exists()


def test_daemon_knows_the_default_models_file_name():
    """hobbitd finds the default model by name without the builder (hobbitd/config.py)."""
    from hobbit.hobbitd.config import DEFAULT_MODEL

    assert DEFAULT_MODEL == moefy.model_name(moefy.default_options()) + ".gguf"
