"""Models at the shapes people run: 128 experts top-8 and vocabularies of 151,936 and
262,144 tokens (synth --vocab-size), with prompts of 2,048 tokens."""

from __future__ import annotations

import numpy as np
import psutil

from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.engine.weights import open_model

from test_parity import assert_parity

QWEN3 = dict(arch="qwen3moe", layers=2, d_model=128, d_ff=128, experts=128, top_k=8, heads=4, kv_heads=2)


def test_a_qwen3_vocabulary_loads_in_llama_cpp_and_matches(synth):
    path = synth(**QWEN3, vocab_size=151936)
    assert open_model(path).args.n_vocab == 151936
    assert_parity(path, n_decode=8)


def test_a_long_prompt_on_a_262k_vocabulary_computes_one_row_of_logits(synth):
    """A 2,048-token prompt: the (T, V) logits of every position would be 2 GiB; generation
    asks for the last row's, and the process grows by far less than one chunk's rows."""
    path = synth(**QWEN3, vocab_size=262144)
    tokens = np.random.default_rng(0).integers(100, 40000, 2048)
    model = Model(open_model(path), RunOptions(n_ctx=2048))
    rss = psutil.Process().memory_info().rss
    try:
        logits = model.forward(tokens)
        grown = psutil.Process().memory_info().rss - rss
    finally:
        model.close()
    assert logits.shape == (262144,) and np.isfinite(logits).all()
    assert grown < 256 << 20, f"the forward grew the process by {grown >> 20} MiB"


def test_perplexity_of_a_long_chunk_on_a_262k_vocabulary_holds_one_batch_of_logits(synth):
    """Evaluation takes its logits a batch at a time and scores them in blocks: a chunk of
    1,024 positions held 1,083 MiB at once before (measured); a batch of 256 rows is 256 MiB
    in ggml's buffer and 256 MiB copied out, and the blocks scored are 32 rows."""
    from hobbit.compute.measure.evaluate import perplexity

    path = synth(**QWEN3, vocab_size=262144)
    tokens = np.random.default_rng(1).integers(100, 40000, 2048).tolist()
    model = Model(open_model(path), RunOptions(n_ctx=1024, n_batch=256))
    rss = psutil.Process().memory_info().rss
    try:
        r = perplexity(model, tokens, ctx=1024, chunks=1)
        grown = psutil.Process().memory_info().rss - rss
    finally:
        model.close()
    assert r["scored"] == 511 and np.isfinite(r["ppl"])
    assert grown < 704 << 20, f"perplexity grew the process by {grown >> 20} MiB"
