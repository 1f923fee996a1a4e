"""Positions past 256, 512 and 1,024, in every path: in-process, one graph through hobbitd
(every expert cached) and per layer through hobbitd (half of the experts cached: one layer of two).

A 1,300-token prompt (three batches of at most 512) is scored at every position, then 200
tokens are decoded one at a time, teacher-forced on a fixed sequence, to position 1,500;
every position's logits are compared with llama.cpp's. Decoding over 512 or more KV cells
is where ggml's attention would split its sums by thread; the engine computes it the same
whatever its threads (as llama.cpp does with one), so llama.cpp decodes with one thread
here and all three paths must agree with it."""

from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import llama_oracle, rel_l2
from daemon_util import run_daemon
from hobbit.compute.client.expert_client import ExpertClient
from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.engine.weights import open_model
from hobbit.loader.layout import gguf_experts

N_PROMPT, N_TOTAL, N_CTX = 1300, 1500, 2048
TOL = 1e-4
MODELS = {
    "llama": dict(layers=2, d_model=128, d_ff=256, experts=8, top_k=2, heads=4, kv_heads=2),
    "qwen3moe": dict(arch="qwen3moe", layers=2, d_model=128, d_ff=128, experts=16, top_k=4, heads=4, kv_heads=2),
}


def cache_bytes(path: str, fraction: float) -> int:
    src = gguf_experts(open_model(path))
    return int(fraction * src.n_layer * src.n_expert * src.format.slot_bytes)


@pytest.fixture(scope="module", params=list(MODELS))
def case(request, synth):
    """(model path, token sequence, llama.cpp's logits at every position (N_TOTAL, V))."""
    path = synth(**MODELS[request.param])
    tokens = np.random.default_rng(0).integers(100, 40000, N_TOTAL).tolist()
    ref = llama_oracle(path, n_ctx=N_CTX)
    ref.eval(tokens[:N_PROMPT])
    for t in tokens[N_PROMPT:]:
        ref.eval([t])
    logits = np.array(ref.scores[:N_TOTAL], dtype=np.float32)
    return path, tokens, logits


def assert_every_position(path, tokens, ref, experts=None, resident=True):
    model = Model(open_model(path), RunOptions(n_ctx=N_CTX, resident=resident), experts=experts)
    try:
        got = [*model.forward(tokens[:N_PROMPT], all_logits=True)]
        for t in tokens[N_PROMPT:]:
            got.append(model.forward([t]))
    finally:
        model.close()
    errs = np.array([rel_l2(g, r) for g, r in zip(got, ref)])
    bad = np.flatnonzero(errs > TOL)
    assert not bad.size, (
        f"{bad.size} positions differ from llama.cpp, the first at position "
        f"{bad[0] + 1} (relative L2 {errs[bad[0]]:.2e}); largest {errs.max():.2e}"
    )


def test_in_process(case):
    assert_every_position(*case)


def test_one_graph_through_hobbitd(case, tmp_path):
    path = case[0]
    with run_daemon([path], cache_bytes(path, 1.0), tmp_path) as d:
        client = ExpertClient(d.socket, path)
        try:
            deadline = time.monotonic() + 30
            while client.resident() is None:  # hobbitd reads them all at the first ask
                assert time.monotonic() < deadline, "hobbitd never held every expert"
                time.sleep(0.05)
            assert_every_position(*case, experts=client)
        finally:
            client.close()


def test_per_layer_through_hobbitd(case, tmp_path):
    path = case[0]
    with run_daemon([path], cache_bytes(path, 0.5), tmp_path) as d:
        client = ExpertClient(d.socket, path)
        try:
            assert_every_position(*case, experts=client, resident=False)
        finally:
            client.close()
