"""The MoE architectures besides llama/Mixtral (qwen3moe, olmoe, qwen2moe, phimoe,
granitemoe, glm4moe, bailingmoe2, ernie4_5-moe, smallthinker, deepseek2), each on
synthetic files of two sizes laid out as its real files are: llama.cpp loads them, our
engine matches it in-process and through a real hobbitd whose cache holds a quarter of the
experts, the low-precision companion converts, and a mixed-precision run stays close to
the all-high one. gpt-oss the same way in test_archs_gpt_oss.py."""

from __future__ import annotations

import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

from daemon_util import daemon_args, run_daemon
from hobbit.compute.client.expert_client import ExpertClient
from hobbit.compute.engine.model import Model, RunOptions
from hobbit.compute.engine.moe import softmax
from hobbit.compute.engine.tokenizer import Tokenizer
from hobbit.compute.engine.weights import open_model
from hobbit.loader.gguf_file import SUPPORTED_ARCHS
from hobbit.loader.companion import default_low_type
from hobbit.loader.ggml_types import type_name
from hobbit.loader.layout import gguf_experts
from hobbit.loader.precision import PAPER_T1, PAPER_T2
from hobbit.protocol.errors import ModelError

from test_daemon_lifecycle import run_failing
from test_parity import PROMPT, assert_parity

# every MoE architecture but gpt-oss (tests/test_archs_gpt_oss.py: its MXFP4 experts)
ARCHS = tuple(a for a in SUPPORTED_ARCHS if a not in ("llama", "gpt-oss"))
# Two sizes: they differ in depth, width, experts, top-k, GQA ratio and weight type. Four
# layers at least, so that a quarter of the experts is one layer's worth (hobbitd's minimum).
SIZES = {
    "s": dict(layers=4, d_model=128, d_ff=256, experts=8, top_k=2, heads=4, kv_heads=2, type="Q8_0"),
    "m": dict(layers=6, d_model=256, d_ff=512, experts=16, top_k=4, heads=8, kv_heads=2, type="Q4_0"),
}
CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


def options(arch: str, size: str) -> dict:
    kw = {**SIZES[size], "arch": arch}
    if arch == "olmoe":  # MHA only: its K norm spans all D
        kw["kv_heads"] = kw["heads"]
    if arch == "qwen3moe" and size == "m":
        kw["head_dim"] = 64  # H * Dh = 512 != D = 256, as Qwen3's 32 x 128 vs 2048
    if arch == "granitemoe" and size == "m":
        kw["shared_ff"] = 384  # Granite MoE Shared: an ungated shared expert
    if arch == "glm4moe":  # leading dense blocks (GLM-4.5-Air 1, GLM-4.5 3),
        # one more block so a quarter of the experts still holds one MoE layer; the larger
        # has GLM-4.5's QK norm and its wider heads (96 x 128 vs 5120)
        kw.update(layers=kw["layers"] + 1, dense=1) if size == "s" else kw.update(
            layers=kw["layers"] + 2, dense=2, qk_norm=True, head_dim=64
        )
    if arch == "smallthinker":  # the 4B's softmax; the 21B's sigmoid and windows
        kw.update(gating="softmax") if size == "s" else kw.update(gating="sigmoid", swa=64)
    if arch == "deepseek2":  # V2-Lite's one query projection; V2's low-rank one and YaRN
        kw.update(layers=kw["layers"] + 1, dense=1, kv_lora=64) if size == "s" else kw.update(
            layers=kw["layers"] + 2, dense=2, kv_lora=128, q_lora=96, yarn=True
        )
    if arch in ("bailingmoe2", "ernie4_5-moe"):  # the same depths (bailingmoe2: 4 expert
        # groups, 2 of them used; ernie4_5-moe: its shared expert two experts wide)
        kw.update(layers=kw["layers"] + 1, dense=1) if size == "s" else kw.update(layers=kw["layers"] + 2, dense=2)
    return kw


CASES = [pytest.param(a, s, id=f"{a}-{s}") for a in ARCHS for s in SIZES]


def expert_cache_bytes(path: str, fraction: float) -> int:
    """`fraction` of the bytes of every routed expert's cache slot."""
    src = gguf_experts(open_model(path))
    return int(fraction * src.n_layer * src.n_expert * src.format.slot_bytes)


@pytest.mark.parametrize("arch, size", CASES)
def test_args_read_from_the_file(synth, arch, size):
    o = options(arch, size)
    w = open_model(synth(**o))
    a = w.args
    assert (a.arch, a.n_layer, a.n_embd, a.n_ff, a.n_expert, a.n_expert_used) == (
        arch,
        o["layers"],
        o["d_model"],
        o["d_ff"],
        o["experts"],
        o["top_k"],
    )
    assert a.moe_layers == tuple(range(o.get("dense", 0), o["layers"]))
    Dh = o.get("head_dim", o["d_model"] // o["heads"])
    if arch == "deepseek2":  # MLA: the cached latent and its RoPE part, one "KV head"
        assert (a.head_dim, a.n_head_kv, a.kv_lora_rank, a.mla_head_k, a.mla_head_v, a.rope_dim) == (
            o["kv_lora"] + Dh // 2,
            1,
            o["kv_lora"],
            Dh,
            Dh,
            Dh // 2,
        )
        assert ("blk.1.attn_q_a.weight" in w.tensors) == bool(o.get("q_lora"))
        assert (a.rope_ext_factor, a.n_ctx_train) == ((1.0, 40 * 4096) if o.get("yarn") else (0.0, 4096))
    else:
        assert a.head_dim == Dh and a.kv_lora_rank == 0
    assert a.qk_norm == (
        "head" if arch in ("qwen3moe", "bailingmoe2") or o.get("qk_norm") else "full" if arch == "olmoe" else ""
    )
    mtp = arch in ("glm4moe", "bailingmoe2")
    shexp_one = mtp or arch == "deepseek2"  # one shared expert as wide as a routed one
    assert a.norm_weights == (arch in ("qwen3moe", "phimoe", "granitemoe", "ernie4_5-moe", "smallthinker") or mtp)
    assert a.n_ff_shexp == {"qwen2moe": 4 * o["d_ff"], "ernie4_5-moe": 2 * o["d_ff"]}.get(
        arch, o["d_ff"] if shexp_one else o.get("shared_ff", 0)
    )
    # glm4moe, bailingmoe2: sigmoid routing, weights scaled, RoPE on half of each head; the
    # trailing MTP block is in the file (block_count) but not run, and hobbitd serves the
    # MoE blocks only; bailingmoe2 chooses its experts in the best 2 of 4 groups
    assert (a.gating, a.weights_scale) == (
        ("sigmoid", 2.5) if mtp else (o.get("gating", "softmax"), 1.0 if arch == "deepseek2" else 0.0)
    )
    # smallthinker: with a window, llama.cpp's 4096 on layers il % 4 != 0, no RoPE on the others
    windowed = arch == "smallthinker" and o.get("swa")
    assert a.n_swa == (4096 if windowed else 0)
    assert a.swa_layers == a.rope_layers == (tuple(il % 4 != 0 for il in range(a.n_layer)) if windowed else ())
    assert a.router_first == (arch == "smallthinker")
    assert (a.n_expert_groups, a.n_group_used) == ((4, 2) if arch == "bailingmoe2" else (0, 0))
    assert a.rope_dim == (Dh // 2 if mtp or arch == "deepseek2" else Dh)
    assert w.field(f"{arch}.block_count") == o["layers"] + mtp
    assert gguf_experts(w).n_layer == len(a.moe_layers)
    scales = (a.embedding_scale, a.residual_scale, a.attention_scale, a.logit_scale)
    if arch == "granitemoe":  # Granite's multipliers, read from the file
        assert scales == pytest.approx((12.0, 0.22, 1 / a.head_dim, 6.0))
    elif arch == "deepseek2":  # 1/sqrt(a head's key width), times YaRN's mscale^2 (llama.cpp's)
        mscale = (1 + 0.1 * 0.707 * np.log(40)) if o.get("yarn") else 1.0
        assert scales == pytest.approx((0, 0, mscale**2 / Dh**0.5, 0), rel=1e-6)
    else:
        assert scales == (0, 0, 0, 0)
    if arch == "phimoe":  # LongRoPE: 32x the original context, its attention factor
        assert (a.n_ctx_train, a.n_ctx_orig) == (32 * 4096, 4096)
        assert a.rope_attn_factor == pytest.approx((1 + np.log(32) / np.log(4096)) ** 0.5)


@pytest.mark.parametrize(
    "arch, size", [pytest.param(a, s, id=f"{a}-{s}") for a in ("glm4moe", "bailingmoe2", "ernie4_5-moe") for s in SIZES]
)
def test_selection_bias_and_expert_groups_change_which_experts_run(synth, arch, size):
    """exp_probs_b (and bailingmoe2's expert groups) move the choice of experts, not their
    weights, for many tokens of the synthetic files, so the parity tests check that they
    are applied, and applied for choosing only."""
    from dataclasses import replace

    from hobbit.compute.engine.moe import Routers

    path = synth(**options(arch, size))
    w = open_model(path)
    model = Model(w, RunOptions(n_ctx=256, taps=("router_in",)))
    try:
        model.forward(Tokenizer(path).encode(PROMPT), all_logits=True)
        h = np.stack([model.taps[f"router_in.{il}"] for il in w.args.moe_layers])  # (M, T, D)
    finally:
        model.close()
    routers = Routers(w)
    changed = lambda x, y: np.any(np.sort(x, -1) != np.sort(y, -1), axis=-1).mean()
    chosen, _, _ = routers.route(h, 0, len(h))
    if arch == "bailingmoe2":
        routers.routing = replace(routers.routing, groups=0, groups_used=0)
        ungrouped, _, _ = routers.route(h, 0, len(h))
        assert 0.2 < changed(chosen, ungrouped) < 0.9, "groups"
        chosen = ungrouped
    routers.selection[:] = 0
    unbiased, _, _ = routers.route(h, 0, len(h))
    assert 0.2 < changed(chosen, unbiased) < 0.9, "bias"


def test_glm4moe_refuses_what_its_graph_would_compute_otherwise(synth, tmp_path):
    """Multimodal RoPE sections, which hobbit does not compute, and expert groups that do not
    divide the experts: one line naming the key or the numbers, not wrong output."""
    src = synth(**options("glm4moe", "s"))
    for keys, start in (
        (
            {"glm4moe.rope.dimension_sections": [8, 4, 4, 0]},
            "glm4moe.rope.dimension_sections: multimodal RoPE is not supported",
        ),
        (
            {"glm4moe.expert_group_count": [3], "glm4moe.expert_group_used_count": [2]},
            "expert groups 3 (using 2) do not fit 8 experts, 2 used",
        ),
    ):
        bad = with_per_layer(src, str(tmp_path / "bad.gguf"), keys)
        with pytest.raises(ModelError) as e:
            open_model(bad)
        assert str(e.value) == f"{bad}: {start}"


def with_per_layer(src: str, dst: str, arrays: dict) -> str:
    """src with the given metadata keys rewritten as one value per layer (llama.cpp reads
    expert_used_count and expert_feed_forward_length that way too: get_key_or_arr)."""
    from hobbit.compute.make.gguf_writer import TensorEntry, copied_fields, write_gguf
    from hobbit.loader.gguf_file import open_gguf

    f = open_gguf(src)
    w = gguf.GGUFWriter(dst, f.arch)
    for key, value, vtype, sub in copied_fields(
        f.reader, lambda k: not k.startswith("GGUF.") and k != "general.architecture"
    ):
        if key in arrays:
            value, vtype, sub = arrays[key], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32
        w.add_key_value(key, value, vtype, sub)
    for key in arrays.keys() - f.reader.fields.keys():
        w.add_key_value(key, arrays[key], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)
    data = f.reader.data
    write_gguf(
        w,
        [TensorEntry(t.name, t.type, t.shape, t.nbytes) for t in f.tensors.values()],
        lambda e: [data[f.tensors[e.name].offset : f.tensors[e.name].offset + e.nbytes]],
    )
    return dst


def test_per_layer_expert_arrays(synth, tmp_path):
    """Per-layer arrays of one value read as that value, and the file still matches
    llama.cpp; values that differ by layer are refused in one line naming the key."""
    o = options("qwen3moe", "s")
    n = o["layers"]
    uniform = with_per_layer(
        synth(**o),
        str(tmp_path / "u.gguf"),
        {"qwen3moe.expert_used_count": [o["top_k"]] * n, "qwen3moe.expert_feed_forward_length": [o["d_ff"]] * n},
    )
    assert open_model(uniform).args.n_expert_used == o["top_k"]
    assert_parity(uniform)
    varying = with_per_layer(
        synth(**o), str(tmp_path / "v.gguf"), {"qwen3moe.expert_used_count": [o["top_k"]] * (n - 1) + [1]}
    )
    with pytest.raises(ModelError) as e:
        open_model(varying)
    assert str(e.value) == (
        f"{varying}: qwen3moe.expert_used_count differs across layers (1..{o['top_k']}), which hobbit does not support"
    )


@pytest.mark.parametrize("arch, size", CASES)
def test_in_process_matches_llama_cpp(synth, arch, size):
    assert_parity(synth(**options(arch, size)))


@pytest.mark.slow
@pytest.mark.parametrize("arch, size", CASES)
def test_through_daemon_with_a_quarter_cache_matches_llama_cpp(synth, tmp_path, arch, size):
    """High precision only (no companion file), a cache of 25% of the expert bytes: every
    routed expert comes from hobbitd's shared memory, the shared expert (qwen2moe) from the
    mmapped file, and the tokens and logits are llama.cpp's."""
    path = synth(**options(arch, size))
    regions = assert_parity_through_daemon(path, tmp_path)
    assert regions == {"high"}


def assert_parity_through_daemon(path: str, tmp_path, **flags) -> set:
    """assert_parity with every routed expert from a real hobbitd caching a quarter of the
    expert bytes; the cache must evict, and nothing may be loaded low or skipped. Returns
    the precisions the daemon had regions for. 16 decode steps: the cache turns over
    within the prompt already (the in-process parity tests decode 32)."""
    with run_daemon([path], expert_cache_bytes(path, 0.25), tmp_path, **flags) as d:
        client = ExpertClient(d.socket, path)
        try:
            regions = set(client.regions)
            assert_parity(path, experts=client, n_decode=16)
            m = next(iter(client.stats()["models"].values()))
        finally:
            client.close()
    assert m["misses"] > m["regions"]["high"]["slots"], "a quarter cache must evict"
    assert m["misses_low"] == 0 and m["skipped"] == 0
    return regions


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_convert_then_mixed_precision_through_daemon(synth, tmp_path, arch):
    """`hobbit-cli convert` writes the Q4_0 companion; hobbitd then loads unimportant
    experts in low precision (or skips them). Greedy decoding that way stays close to the
    all-high model run on the same tokens: mean KL divergence and top-1 agreement."""
    path = str(tmp_path / f"{arch}.gguf")
    shutil.copy(synth(**options(arch, "s")), path)
    kld, agree, m = mixed_precision_vs_high(path, tmp_path, "Q4_0")
    assert m["misses_low"] > 0, "no expert was loaded in low precision"
    assert kld < 0.05, f"mean KLD {kld:.4f}"
    # KLD is the bound; top-1 agreement over 16 steps only catches gross errors: on random
    # weights the greedy choice is often near a tie, and which experts load low depends on
    # prefetch timing (smallthinker: 0.75-0.94 over six runs at KLD 0.0008-0.0015)
    assert agree >= 0.6, f"top-1 agreement {agree:.2f}"


# The architectures of issue #19, each at both sizes in both file types people have: uniform
# Q8_0 and llama.cpp's Q4_K_M (the suite's default cases above are "s" Q8_0, "m" Q4_0 and,
# in test_quantized, "m" Q4_K_M; these are the other two corners). `-m every_ftype`.
NEW_ARCHS = ("granitemoe", "glm4moe", "bailingmoe2", "ernie4_5-moe", "deepseek2", "smallthinker")


@pytest.mark.every_ftype
@pytest.mark.parametrize(
    "arch, size, source",
    [pytest.param(a, s, t, id=f"{a}-{s}-{t}") for a in NEW_ARCHS for s, t in (("m", "Q8_0"), ("s", "Q4_K_M"))],
)
def test_both_sizes_in_both_file_types(synth, quantized, tmp_path, arch, size, source):
    """In-process and through a quarter-cache hobbitd (high precision) the tokens and
    logits are llama.cpp's; mixed precision with the default companion stays close (where
    the file's expert types have one)."""
    kw = options(arch, size)
    if source == "Q8_0":
        src = synth(**{**kw, "type": "Q8_0"})
    else:
        kw.pop("type")
        src = quantized(source, **kw)
    path = str(tmp_path / f"{arch}-{size}-{source}.gguf")
    shutil.copy(src, path)
    assert_parity(path)
    assert assert_parity_through_daemon(path, tmp_path) == {"high"}
    if size == "s" and source == "Q4_K_M":
        # rows of 128 leave the quantizer's 4-6 bit fallbacks (Q5_0, Q4_K, Q6_K): no type
        # is 1.5x smaller, so there is no companion, said in one line, served high
        r = subprocess.run([*CLI, "convert", path, "-q"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "1.5x smaller" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        return
    low = type_name(default_low_type(gguf_experts(open_model(path)).format))
    kld, agree, m = mixed_precision_vs_high(path, tmp_path, low)
    print(
        f"{arch} {size} {source} -> {low}: mean KLD {kld:.4f}, top-1 agreement {agree:.2f}, "
        f"{m['misses_low']} low loads, {m['skipped']} skipped"
    )
    assert m["misses_low"] > 0, "no expert was loaded in low precision"
    assert kld < 0.1 and agree >= 0.5, (kld, agree)


def mixed_precision_vs_high(path: str, tmp_path, low_type: str, n_decode: int = 16):
    """`hobbit-cli convert` the file (its companion beside it), then decode greedily through a
    hobbitd with both precisions, the all-high in-process model fed the same tokens. Returns
    (mean KL divergence of the high model's next-token distribution to the mixed one's,
    top-1 agreement, the daemon's model stats)."""
    r = subprocess.run([*CLI, "convert", path, "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{low_type} experts" in r.stdout, r.stdout
    prompt = Tokenizer(path).encode(PROMPT)
    high = Model(open_model(path), RunOptions(n_ctx=256))
    # 3/4 of the expert bytes, a quarter of that for low precision (the default share):
    # both regions hold at least one layer's experts; the paper's thresholds asked for (an
    # uncalibrated model is otherwise served exactly)
    with run_daemon([path], expert_cache_bytes(path, 0.75), tmp_path, t1=PAPER_T1, t2=PAPER_T2) as d:
        client = ExpertClient(d.socket, path)
        mixed = Model(open_model(path), RunOptions(n_ctx=256), experts=client)
        try:
            assert set(client.regions) == {"high", "low"}
            p, q = mixed.forward(prompt), high.forward(prompt)
            klds, agree = [], []
            for _ in range(n_decode):
                token = int(np.argmax(p))
                agree.append(token == int(np.argmax(q)))
                pp, pq = softmax(q.astype(np.float64)), softmax(p.astype(np.float64))
                klds.append(float(np.sum(pp * (np.log(pp) - np.log(pq)))))
                p, q = mixed.forward([token]), high.forward([token])
            m = next(iter(client.stats()["models"].values()))
        finally:
            client.close()
            mixed.close()
            high.close()
    return float(np.mean(klds)), float(np.mean(agree)), m


def _header_only(path: str, arch: str) -> str:
    """A GGUF with the metadata of a real model of `arch` (Qwen3-Next's, DBRX's, ...)
    and no tensors: enough to be recognised, and refused."""
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(27)
    w.add_context_length(163840)
    w.add_embedding_length(2048)
    w.add_expert_count(64)
    w.add_expert_used_count(6)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["qwen3next", "dbrx", "mamba"])
def test_an_unsupported_architecture_is_one_line_naming_the_supported(tmp_path, arch):
    path = _header_only(str(tmp_path / f"{arch}.gguf"), arch)
    with pytest.raises(ModelError) as e:
        open_model(path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and repr(arch) in msg
    assert msg.endswith(f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    r = subprocess.run([*CLI, "generate", path, "-p", "hi"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.strip().endswith(msg), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert msg in run_failing(daemon_args([path], "8M", str(tmp_path / "s.sock")))


@pytest.mark.slow
def test_default_model_through_daemon_matches_llama_cpp(default_moe, tmp_path):
    """The default model (real weights, flat routers: its 12th and 13th experts are often
    near-tied) through hobbitd with a quarter cache, high precision only: llama.cpp's tokens
    and logits. Routing weights renormalised in float32 instead of ggml's double sum used
    to flip near-tied experts here (perplexity 44.80 vs 44.56)."""
    assert_parity_through_daemon(default_moe, tmp_path, no_dynamic=True)


# qwen2moe (a shared expert) and gpt-oss (expert biases) in every run; the rest (and llama:
# test_daemon_generate) with -m every_ftype
@pytest.mark.parametrize(
    "arch",
    [
        pytest.param(a, marks=() if a in ("qwen2moe", "gpt-oss") else pytest.mark.every_ftype)
        for a in (*ARCHS, "gpt-oss")
    ],
)
def test_every_expert_cached_one_graph_matches_llama_cpp(synth, gpt_oss, tmp_path, arch):
    """A cache with room for every expert: after the first forward asks, hobbitd pins them
    all and the rest of the run computes each forward in one graph on its slots (routing,
    expert biases, a shared expert in the graph), with llama.cpp's tokens and logits."""
    path = gpt_oss("MXFP4_MOE") if arch == "gpt-oss" else synth(**options(arch, "s"))
    with run_daemon([path], expert_cache_bytes(path, 1.0), tmp_path) as d:
        client = ExpertClient(d.socket, path)
        try:
            assert_parity(path, experts=client)
            assert client.resident() is not None, "every expert should be resident by now"
            m = next(iter(client.stats()["models"].values()))
        finally:
            client.close()
    assert m["holds_all"] and m["misses_low"] == 0 and m["skipped"] == 0
