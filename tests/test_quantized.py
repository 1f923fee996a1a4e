"""Files as people download them: made by llama.cpp's own quantizer (compute/make/quantize.py)
from an F16 synthetic Mixtral. Their tensor types follow llama-quant.cpp's mixes (restated
below), and our engine runs every one of them as llama.cpp does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from hobbit.compute.make.quantize import FTYPES, quantize_gguf
from hobbit.loader.companion import default_low_type
from hobbit.loader.ggml_types import type_name
from hobbit.loader.gguf_file import SUPPORTED_ARCHS
from hobbit.loader.gguf_file import open_gguf
from hobbit.loader.layout import gguf_experts
from hobbit.protocol.errors import InputError, ModelError

from test_archs import assert_parity_through_daemon, mixed_precision_vs_high
from test_parity import assert_parity

# Mixtral's layout, small: rows of 256 and 512 fit every 256-block type, so nothing falls
# back; 8 experts switch on llama.cpp's 8-expert rules (attn_k/attn_v Q8_0, ...).
MIXTRAL = dict(layers=8, d_model=256, d_ff=512, experts=8, top_k=2, heads=8, kv_heads=4)
CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


def every_ftype(fast: set) -> list:
    """FTYPES as test parameters; those not in `fast` are marked `every_ftype` and run only
    when asked for (`pytest -m every_ftype tests/test_quantized.py`; quantizing one takes
    1-13 s and a daemon run ~15 s on 2 cores, too long for every change's suite)."""
    return [f if f in fast else pytest.param(f, marks=pytest.mark.every_ftype) for f in FTYPES]


# One file type per rule of llama-quant.cpp's mix (the rest: -m every_ftype)
TYPES_FAST = {"BF16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K", "IQ4_XS", "MXFP4_MOE"}
# One of each family: BF16, a K-quant mix with Q6_K/Q5_K/Q8_0 layers, Q2_K/Q3_K, IQ4_XS, MXFP4
PARITY_FAST = {"BF16", "Q4_K_M", "Q2_K", "IQ4_XS", "MXFP4_MOE"}
# 16 layers: Q3_K_M's first layer (n/16) has Q5_K only from 16 layers on
DEEP_FAST = {"Q3_K_M", "Q4_K_M"}

# the ggml type a file type starts from (llama_ftype_get_default_type)
BASE = {
    "F16": "F16",
    "BF16": "BF16",
    "Q8_0": "Q8_0",
    "Q6_K": "Q6_K",
    "Q5_K_M": "Q5_K",
    "Q5_K_S": "Q5_K",
    "Q5_0": "Q5_0",
    "Q5_1": "Q5_1",
    "Q4_K_M": "Q4_K",
    "Q4_K_S": "Q4_K",
    "Q4_0": "Q4_0",
    "Q4_1": "Q4_1",
    "Q3_K_L": "Q3_K",
    "Q3_K_M": "Q3_K",
    "Q3_K_S": "Q3_K",
    "Q2_K": "Q2_K",
    "IQ4_XS": "IQ4_XS",
    "IQ4_NL": "IQ4_NL",
    "MXFP4_MOE": "MXFP4",
}
# file types whose attn_output goes to Q5_K on an 8-expert model
ATTN_OUTPUT_Q5_K = {"Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "IQ4_NL", "IQ4_XS"}


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def ffn_down_type(ftype: str, i: int, n: int) -> str:
    """llama-quant.cpp's ffn_down rule (non-Falcon, no imatrix) for layer i of n."""
    base = BASE[ftype]
    if ftype in ("Q4_K_M", "Q5_K_M"):
        return "Q6_K" if use_more_bits(i, n) else base
    if ftype in ("Q4_K_S", "IQ4_XS", "IQ4_NL"):
        return "Q5_K" if i < n // 8 else base
    if ftype == "Q3_K_M":
        return "Q5_K" if i < n // 16 else "Q4_K"
    return {"Q3_K_L": "Q5_K", "Q2_K": "Q3_K"}.get(ftype, base)


def expected_types(ftype: str, n: int) -> dict:
    """Every tensor's type in a quantised MIXTRAL of n layers, per llama-quant.cpp."""
    base = BASE[ftype]
    plain = ftype in ("F16", "BF16")  # not a quantised type: no mix at all
    mxfp4 = ftype == "MXFP4_MOE"  # experts MXFP4, every other matrix Q8_0
    other = "Q8_0" if mxfp4 else base
    t = {
        "token_embd.weight": other,
        "output_norm.weight": "F32",
        "output.weight": base if plain else "Q8_0" if ftype in ("Q8_0", "MXFP4_MOE") else "Q6_K",
    }
    for i in range(n):
        p = f"blk.{i}."
        t |= {
            p + "attn_norm.weight": "F32",
            p + "ffn_norm.weight": "F32",
            p + "ffn_gate_inp.weight": "F32",
            p + "attn_q.weight": other,
            p + "attn_k.weight": base if plain else "Q8_0",  # 8 experts: Q8_0
            p + "attn_v.weight": base if plain else "Q8_0",
            p + "attn_output.weight": "Q5_K" if ftype in ATTN_OUTPUT_Q5_K else other,
            p + "ffn_gate_exps.weight": base,
            p + "ffn_up_exps.weight": base,
            p + "ffn_down_exps.weight": base if plain else ffn_down_type(ftype, i, n),
        }
    return t


def types_of(path: str) -> dict:
    return {name: type_name(info.type) for name, info in open_gguf(path).tensors.items()}


@pytest.mark.parametrize("ftype", every_ftype(TYPES_FAST))
def test_types_follow_llama_quants_mix(quantized, ftype):
    assert types_of(quantized(ftype, **MIXTRAL)) == expected_types(ftype, 8)


@pytest.mark.parametrize("ftype", every_ftype(DEEP_FAST))
def test_types_follow_llama_quants_mix_on_16_layers(quantized, ftype):
    assert types_of(quantized(ftype, **{**MIXTRAL, "layers": 16})) == expected_types(ftype, 16)


def test_the_ffn_down_mixes_as_written_out():
    """The rule above, spelt out per layer (so a slip in use_more_bits cannot pass)."""

    def down(ftype, n):
        return [ffn_down_type(ftype, i, n) for i in range(n)]

    def q(digits):  # "645" -> Q6_K, Q4_K, Q5_K
        return [f"Q{d}_K" for d in digits]

    assert down("Q4_K_M", 8) == q("64464466")
    assert down("Q5_K_M", 8) == q("65565566")
    assert down("Q5_K_M", 16) == q("6655655655655666")
    assert down("Q4_K_S", 8) == q("54444444")
    assert down("Q4_K_S", 16) == q("5544444444444444")
    assert down("IQ4_XS", 16) == q("55") + ["IQ4_XS"] * 14
    assert down("IQ4_NL", 8) == q("5") + ["IQ4_NL"] * 7
    assert down("Q3_K_M", 8) == q("44444444")  # n/16 = 0: no Q5_K layer
    assert down("Q3_K_M", 16) == q("5444444444444444")
    assert down("Q2_K", 8) == q("33333333")
    assert down("Q6_K", 8) == q("66666666")


@pytest.mark.parametrize("ftype", every_ftype(PARITY_FAST))
def test_in_process_matches_llama_cpp(quantized, ftype):
    """Our engine opens the file (every type is one it computes on) and gives llama.cpp's
    greedy tokens and logits within 1e-2 over the prompt and 32 decode steps."""
    assert_parity(quantized(ftype, **MIXTRAL))


# The companion convert makes by default (loader/companion.py LOW_TYPES, chosen by measured
# divergence and bytes: BENCHMARKS.md), per file type of a Mixtral-layout file
DEFAULT_LOW = {
    "F16": "Q4_K",
    "BF16": "Q4_K",
    "Q8_0": "Q4_K",
    "Q6_K": "Q3_K",
    "Q5_K_M": "Q3_K",
    "Q5_K_S": "Q3_K",
    "Q5_0": "Q3_K",
    "Q5_1": "Q3_K",
    "Q4_K_M": "Q2_K",
    "Q4_K_S": "Q2_K",
    "Q4_0": "Q2_K",
    "Q4_1": "Q2_K",
    "Q3_K_L": None,
    "Q3_K_M": None,
    "Q3_K_S": None,
    "Q2_K": None,
    "IQ4_XS": "Q2_K",
    "IQ4_NL": "Q2_K",
    "MXFP4_MOE": "Q2_K",
}


@pytest.mark.parametrize("rows", [256, 576])
def test_default_companion_type_per_file_type(rows):
    """From each file type's expert types per layer (as expected_types gives them); rows
    that are not 256-blocks (SmolLM2's 576) leave Q4_0 for 8-bit and wider experts."""
    from hobbit.loader.ggml_types import TYPES_BY_NAME, row_size
    from hobbit.loader.layout import SlotFormat

    assert set(DEFAULT_LOW) == set(FTYPES)
    shapes = ((rows, 512), (rows, 512), (512, rows))
    for ftype, low in DEFAULT_LOW.items():
        t = expected_types(ftype, 8)
        types = [[TYPES_BY_NAME[t[f"blk.{i}.ffn_{p}_exps.weight"]] for p in ("gate", "up", "down")] for i in range(8)]
        if rows == 576 and any(x in (10, 11, 12, 13, 14, 23) for x in sum(types, [])):
            continue  # K-quants and IQ4_XS need 256-blocks themselves
        nbytes = [[row_size(x, s[0]) * s[1] for x, s in zip(tl, shapes)] for tl in types]
        got = default_low_type(SlotFormat.build(shapes, types, nbytes))
        want = low if rows == 256 else "Q4_0" if low == "Q4_K" else None
        assert (type_name(got) if got is not None else None) == want, ftype


def test_unknown_ftype_is_one_line_naming_the_known(synth, tmp_path):
    with pytest.raises(InputError) as e:
        quantize_gguf(synth(**MIXTRAL, type="F16"), str(tmp_path / "q.gguf"), "Q4_K_X")
    msg = str(e.value)
    assert "\n" not in msg and "'Q4_K_X'" in msg
    assert msg.endswith(f"(known: {' '.join(FTYPES)})")
    assert os.listdir(tmp_path) == []


def test_quantizer_failure_names_the_file_and_leaves_nothing(tmp_path):
    src = tmp_path / "junk.gguf"
    src.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelError) as e:
        quantize_gguf(str(src), str(tmp_path / "q.gguf"), "Q8_0")
    assert str(src) in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path) == ["junk.gguf"]


def test_cli_synth_quantize(tmp_path):
    """`hobbit-cli synth OUT --quantize FTYPE`: llama.cpp's mix, no F16 file left behind,
    and without HOBBIT_GGML_LOG none of llama.cpp's log."""
    out = tmp_path / "m.gguf"
    env = {k: v for k, v in os.environ.items() if k != "HOBBIT_GGML_LOG"}
    r = subprocess.run(
        [*CLI, "synth", str(out), "--layers", "2", "--quantize", "q4_k_m"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == ["m.gguf"]
    assert "llama_model_quantize" not in r.stderr and "llama_model_loader" not in r.stderr
    t = types_of(str(out))
    # 2 layers: use_more_bits holds for layer 1 only (i >= 7n/8)
    assert [t[f"blk.{i}.ffn_down_exps.weight"] for i in range(2)] == ["Q4_K", "Q6_K"]
    assert t["blk.0.ffn_up_exps.weight"] == "Q4_K" and t["output.weight"] == "Q6_K"


def test_cli_quantize_with_type_is_one_line(tmp_path):
    r = subprocess.run(
        [*CLI, "synth", str(tmp_path / "m.gguf"), "--type", "Q4_0", "--quantize", "Q8_0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "--quantize" in r.stderr
    assert os.listdir(tmp_path) == []


# Through hobbitd: the mixes whose expert types differ across layers, and one uniform K-quant
DAEMON_FAST = {"Q4_K_M", "IQ4_XS", "MXFP4_MOE", "Q2_K"}


@pytest.mark.slow
@pytest.mark.parametrize("ftype", every_ftype(DAEMON_FAST))
def test_through_daemon_with_a_quarter_cache_matches_llama_cpp(quantized, tmp_path, ftype):
    """Every routed expert from a real hobbitd caching a quarter of the expert bytes, in
    high precision: slots sized for the largest layer hold each layer's own types."""
    assert assert_parity_through_daemon(quantized(ftype, **MIXTRAL), tmp_path) == {"high"}


@pytest.mark.slow
@pytest.mark.parametrize("ftype", every_ftype(DAEMON_FAST))
def test_mixed_precision_through_daemon(quantized, tmp_path, ftype):
    """convert (the default companion type for the mix), then low precision and skips for
    the less important experts through hobbitd: the KL divergence to all-high is small."""
    path = str(tmp_path / f"{ftype}.gguf")
    shutil.copy(quantized(ftype, **MIXTRAL), path)
    low = default_low_type(gguf_experts(open_gguf(path)).format)
    if low is None:  # 2- and 3-bit experts: no type worth loading instead
        r = subprocess.run([*CLI, "convert", path, "-q"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "1.5x smaller" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        return
    kld, agree, m = mixed_precision_vs_high(path, tmp_path, type_name(low))
    print(
        f"{ftype} -> {type_name(low)}: mean KLD {kld:.4f}, top-1 agreement {agree:.2f}, "
        f"{m['misses_low']} low loads, {m['skipped']} skipped"
    )
    assert m["misses_low"] > 0, "no expert was loaded in low precision"
    assert kld < 0.1, f"mean KLD {kld:.4f}"
    assert agree >= 0.5, f"top-1 agreement {agree:.2f}"


# Q4_K_M of every other architecture: the size "m" of test_archs (rows of 256 and 512, so no
# K-quant falls back), 6 layers: use_more_bits gives layers 2 and 5 Q6_K ffn_down, the others Q4_K
# qwen3moe (the most run) in every suite; the others with -m every_ftype (~40 s each here)
ARCH_Q4 = [
    pytest.param(a, id=a, marks=() if a == "qwen3moe" else pytest.mark.every_ftype)
    for a in SUPPORTED_ARCHS
    if a != "llama"
]


def arch_q4_k_m(quantized, arch: str) -> str:
    from conftest import GPT_OSS
    from test_archs import options

    kw = {**GPT_OSS, "layers": 6} if arch == "gpt-oss" else options(arch, "m")
    kw.pop("type", None)
    return quantized("Q4_K_M", **kw)


@pytest.mark.parametrize("arch", ARCH_Q4)
def test_q4_k_m_of_every_architecture_mixes_and_matches_llama_cpp(quantized, arch):
    path = arch_q4_k_m(quantized, arch)
    t = types_of(path)
    # the rule counts every block of the file (llama.cpp's n_layer_all): with 2 leading dense
    # blocks and, for glm4moe and bailingmoe2, the MTP block, the Q6_K ones fall elsewhere
    first = 2 if arch in ("glm4moe", "bailingmoe2", "ernie4_5-moe", "deepseek2") else 0
    n = first + 6 + (arch in ("glm4moe", "bailingmoe2"))
    got = [t[f"blk.{i}.ffn_down_exps.weight"] for i in range(first, first + 6)]
    assert got == [ffn_down_type("Q4_K_M", i, n) for i in range(first, first + 6)]
    assert set(got) == {"Q4_K", "Q6_K"}
    assert_parity(path)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH_Q4)
def test_q4_k_m_of_every_architecture_through_daemon(quantized, tmp_path, arch):
    """A quarter cache in high precision gives llama.cpp's tokens and logits; then with the
    Q2_K companion, mixed precision stays close to all-high."""
    path = str(tmp_path / f"{arch}-Q4_K_M.gguf")
    shutil.copy(arch_q4_k_m(quantized, arch), path)
    assert assert_parity_through_daemon(path, tmp_path) == {"high"}
    kld, agree, m = mixed_precision_vs_high(path, tmp_path, "Q2_K")
    print(
        f"{arch} Q4_K_M -> Q2_K: mean KLD {kld:.4f}, top-1 agreement {agree:.2f}, "
        f"{m['misses_low']} low loads, {m['skipped']} skipped"
    )
    assert m["misses_low"] > 0, "no expert was loaded in low precision"
    assert kld < 0.1, f"mean KLD {kld:.4f}"
    assert agree >= 0.5, f"top-1 agreement {agree:.2f}"
