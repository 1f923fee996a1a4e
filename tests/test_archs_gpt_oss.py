"""gpt-oss, as test_archs.py tests the other MoE architectures, on the two sources its
files come in: F16 and MXFP4 experts made by llama.cpp's own quantizer (MXFP4_MOE). The
synthetic file's shape is conftest.py's GPT_OSS."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from hobbit.compute.engine import ggml
from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.engine.tokenizer import Tokenizer
from hobbit.compute.engine.weights import open_model
from hobbit.compute.make.convert import convert
from hobbit.loader.companion import default_low_type, open_companion
from hobbit.loader.ggml_types import type_name
from hobbit.loader.layout import BIAS_PARTS, PARTS, gguf_experts
from hobbit.protocol.errors import InputError

from test_archs import assert_parity_through_daemon, mixed_precision_vs_high
from test_parity import PROMPT, assert_parity

# F16 experts as converted from the checkpoint; MXFP4 as the files people download
OSS_SOURCES = ["F16", "MXFP4_MOE"]


@pytest.fixture(scope="module")
def oss_f16(gpt_oss):
    """The F16 GPT_OSS file, opened once (parsing its 49k-token vocabulary takes seconds)."""
    return open_model(gpt_oss("F16"))


def test_gpt_oss_args_read_from_the_file(oss_f16):
    a = oss_f16.args
    assert (a.arch, a.n_layer, a.n_embd, a.n_ff, a.n_expert, a.n_expert_used, a.head_dim) == (
        "gpt-oss",
        4,
        256,
        256,
        8,
        4,
        64,
    )
    assert (a.gating, a.norm_weights, a.ffn_act, a.ffn_norm) == (
        "softmax_weight",
        False,
        "swiglu_oai",
        "post_attention_norm",
    )
    assert a.n_swa == 16 and a.swa_layers == (True, False, True, False)  # even layers windowed
    # YaRN: frequencies scaled by 1/32 from 4096 positions on; the attention factor that
    # llama.cpp computes cancels the magnitude ggml's rope adds (to float32 rounding)
    assert (a.rope_freq_scale, a.rope_ext_factor, a.n_ctx_orig, a.n_ctx_train) == (1 / 32, 1.0, 4096, 32 * 4096)
    assert a.rope_attn_factor == pytest.approx(1.0, abs=1e-6)


# F16: also a prompt of over 256 tokens in batches of 64, so that the windowed layers'
# ring of 256 slots (16 + 64, padded) wraps (llama.cpp's, 768 slots, does not)
OSS_PARITY = {"F16": dict(prompt_text=" ".join([PROMPT] * 11), n_batch=64), "MXFP4_MOE": {}}


@pytest.mark.parametrize("source", OSS_SOURCES)
def test_gpt_oss_in_process_matches_llama_cpp(gpt_oss, source):
    """Sinks, the sliding window, YaRN, swiglu_oai, softmax over the top 4 and every bias:
    llama.cpp's tokens and logits."""
    worst = assert_parity(gpt_oss(source), **OSS_PARITY[source])
    print(f"gpt-oss {source}: max relative L2 {worst:.3g}")


def test_gpt_oss_experts_carry_their_biases_into_slots_and_the_companion(oss_f16, tmp_path):
    """The three F32 biases are parts of an expert's slot (cached and evicted with it) and
    are copied as they are into the low-precision companion, beside the Q4_0 matrices."""
    w = oss_f16
    high = gguf_experts(w)
    assert high.format.parts == PARTS + BIAS_PARTS
    assert high.format.shapes[3:] == ((256,), (256,), (256,))  # gate F, up F, down D
    assert high.format.types(0)[3:] == (ggml.F32,) * 3
    out = convert(w, ggml.Q4_0, out=str(tmp_path / "c.hobbit"), progress=False)
    low, _ = open_companion(w, out)
    assert low.format.types(0) == (ggml.Q4_0,) * 3 + (ggml.F32,) * 3
    data = np.fromfile(out, dtype=np.uint8)
    for layer, e in [(0, 0), (3, 7)]:
        for p in range(3, 6):
            (hoff, n), (loff, ln) = high.ranges(layer, e)[p], low.ranges(layer, e)[p]
            assert ln == n and data[loff : loff + n].tobytes() == w.reader.data[hoff : hoff + n].tobytes()


def test_gpt_oss_rewind_within_the_window_only(oss_f16):
    """A rewind (chat reusing a prefix) past a longer continuation given up on gives what
    decoding straight on gave, while the ring still holds the window before the new
    position; once that was overwritten, it is refused with one line."""
    tokens = Tokenizer(oss_f16.path).encode(" ".join([PROMPT] * 11))
    head, tail = tokens[:-3], tokens[-3:]
    model = Model(oss_f16, RunOptions(n_ctx=1024, n_batch=64))
    assert model.swa_cells == 256 and len(tokens) > 256
    model.forward(head)
    want = model.forward(tail)
    model.forward(tokens[:6])  # a continuation of 6 tokens, given up on
    model.n_past = len(head)
    assert np.array_equal(model.forward(tail), want)
    assert model.resumable(len(head)) and not model.resumable(10)
    model.n_past = 10  # positions 0..9 were overwritten by 256..265
    with pytest.raises(InputError, match="sliding-window cache") as e:
        model.forward(tokens[10:11])
    assert "\n" not in str(e.value)
    model.close()


@pytest.mark.slow
@pytest.mark.parametrize("source", [pytest.param("F16", marks=pytest.mark.every_ftype), "MXFP4_MOE"])
def test_gpt_oss_through_daemon_with_a_quarter_cache_matches_llama_cpp(gpt_oss, tmp_path, source):
    """Every expert with its biases from hobbitd's shared memory, in high precision, a
    quarter of them cached: llama.cpp's tokens and logits."""
    assert assert_parity_through_daemon(gpt_oss(source), tmp_path) == {"high"}


@pytest.mark.slow
@pytest.mark.parametrize("source", [pytest.param("F16", marks=pytest.mark.every_ftype), "MXFP4_MOE"])
def test_gpt_oss_mixed_precision_through_daemon(gpt_oss, tmp_path, source):
    """The default companion (F16: Q4_K; MXFP4: Q2_K, biases F32 in both) loaded for the
    less important experts by hobbitd: close to all-high precision."""
    path = str(tmp_path / f"gpt-oss-{source}.gguf")
    shutil.copy(gpt_oss(source), path)
    low = type_name(default_low_type(gguf_experts(open_model(path)).format))
    kld, agree, m = mixed_precision_vs_high(path, tmp_path, low)
    print(
        f"gpt-oss {source} -> {low}: mean KLD {kld:.4f}, top-1 agreement {agree:.2f}, "
        f"{m['misses_low']} low loads, {m['skipped']} skipped"
    )
    assert m["misses_low"] > 0, "no expert was loaded in low precision"
    assert kld < 0.1, f"mean KLD {kld:.4f}"
    # top-1 over 16 positions of random weights (near-ties) moves with which experts the
    # prefetch timing leaves low or skipped: 0.44-0.88 in five runs at KLD 0.016-0.027
    assert agree >= 0.3, f"top-1 agreement {agree:.2f}"
