"""The synthetic model maker: valid GGUFs that llama.cpp loads, deterministic per seed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hobbit.compute.engine import ggml
from hobbit.compute.make.synth import SynthOptions, make_synthetic, smollm2_path
from hobbit.compute.engine.archs import ARCHS
from hobbit.compute.engine.weights import open_model
from hobbit.compute.make.synth_archs import SYNTH_ARCHS
from hobbit.loader.gguf_file import SUPPORTED_ARCHS
from hobbit.protocol.errors import InputError, ModelError

SMALL = dict(layers=2, d_model=128, d_ff=256, experts=4, top_k=2, heads=4, kv_heads=2)
CLI = [sys.executable, "-m", "hobbit.compute.apps.cli"]


def make(tmp_path, name="m.gguf", **kw) -> str:
    path = str(tmp_path / name)
    make_synthetic(path, SynthOptions(**{**SMALL, **kw}))
    return path


def test_smollm2_path_exists():
    assert os.path.isfile(smollm2_path())


def test_one_list_of_architectures():
    """The loader's list is the one the engine's graph options and synth's files follow."""
    assert tuple(ARCHS) == tuple(SYNTH_ARCHS) == SUPPORTED_ARCHS


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(experts=0),  # dense llama
        dict(head_dim=48, heads=4, kv_heads=1, ctx=512),  # head_dim != d_model / heads
        dict(experts=8, top_k=1, type="Q4_0"),
    ],
)
def test_file_opens_and_args_match(tmp_path, kw):
    o = SynthOptions(**{**SMALL, **kw})
    w = open_model(make(tmp_path, **kw))
    a = w.args
    dh = o.head_dim or o.d_model // o.heads
    assert (a.arch, a.n_vocab, a.n_layer, a.n_embd, a.n_ff) == ("llama", 49152, o.layers, o.d_model, o.d_ff)
    assert (a.n_head, a.n_head_kv, a.head_dim, a.rope_dim, a.n_ctx_train) == (o.heads, o.kv_heads, dh, dh, o.ctx)
    assert (a.n_expert, a.n_expert_used) == (o.experts, o.top_k if o.experts else 0)
    assert w.field("tokenizer.ggml.model") == "gpt2"
    assert w.field("general.name").startswith("hobbit-synth-")
    D, F, E = o.d_model, o.d_ff, o.experts
    t = w.tensors
    assert t["token_embd.weight"].shape == (D, 49152)
    assert t["blk.1.attn_q.weight"].shape == (D, o.heads * dh)
    assert t["blk.1.attn_output.weight"].shape == (o.heads * dh, D)
    assert t["blk.0.attn_norm.weight"].type == ggml.F32
    if E:
        assert t["blk.0.ffn_gate_inp.weight"].type == ggml.F32
        assert t["blk.0.ffn_gate_exps.weight"].shape == (D, F, E)
        assert t["blk.0.ffn_down_exps.weight"].shape == (F, D, E)
        assert t["blk.0.ffn_up_exps.weight"].type == ggml.TYPES_BY_NAME[o.type]
    else:
        assert t["blk.0.ffn_down.weight"].shape == (F, D)


def test_rows_that_do_not_fit_the_block_fall_back(tmp_path):
    # Q4_K needs rows of 256: D=128 rows fall back to Q8_0, D=48 rows (not /32) to F16
    w = open_model(make(tmp_path, d_model=128, d_ff=256, type="Q4_K"))
    assert w.tensors["blk.0.ffn_down_exps.weight"].type == ggml.Q4_K  # rows of F=256
    assert w.tensors["blk.0.ffn_up_exps.weight"].type == ggml.Q8_0  # rows of D=128
    w = open_model(make(tmp_path, "f.gguf", d_model=48, heads=2, kv_heads=2, type="Q8_0"))
    assert w.tensors["token_embd.weight"].type == ggml.F16


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(experts=0, type="F16"),
        dict(arch="qwen3moe", head_dim=64),
        dict(arch="olmoe", kv_heads=4),
        dict(arch="qwen2moe"),
        dict(arch="phimoe"),
        dict(arch="gpt-oss", head_dim=64, swa=8),
    ],
)
def test_llama_cpp_loads_and_generates_varied_text(tmp_path, kw):
    import llama_cpp
    from hobbit.compute.engine.tokenizer import quiet_stderr

    path = make(tmp_path, **kw)
    with quiet_stderr():
        llm = llama_cpp.Llama(model_path=path, n_ctx=256, verbose=False, flash_attn=True)
        prompt = llm.tokenize(b"Once upon a time")
        tokens = []
        for t in llm.generate(prompt, temp=0.0):
            tokens.append(t)
            if len(tokens) == 32:
                break
    assert len(set(tokens)) > 8, tokens


@pytest.mark.parametrize(
    "kw, flag",
    [
        (dict(heads=3), "--heads"),
        (dict(kv_heads=3), "--kv-heads"),
        (dict(top_k=5), "--top-k"),
        (dict(top_k=0), "--top-k"),
        (dict(type="Q7_0"), "--type"),
        (dict(layers=0), "--layers"),
        (dict(head_dim=33), "--head-dim"),
        (dict(arch="mamba"), "--arch"),
        (dict(arch="qwen3moe", experts=0), "--experts"),
        (dict(arch="olmoe"), "--kv-heads"),  # olmoe is MHA only
        (dict(arch="qwen2moe", head_dim=64), "--head-dim"),  # its attention is [D, D]
        (dict(arch="qwen2moe", shared_ff=-1), "--shared-ff"),
        (dict(arch="gpt-oss", swa=-1), "--swa"),
    ],
)
def test_bad_options_raise_input_error(tmp_path, kw, flag):
    with pytest.raises(InputError, match=flag):
        make(tmp_path, **kw)
    assert os.listdir(tmp_path) == []


def test_missing_vocab_source_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        make(tmp_path, vocab_from=str(tmp_path / "nope.gguf"))


def test_unwritable_path_leaves_nothing(tmp_path):
    with pytest.raises(InputError, match="cannot write"):
        make(tmp_path, "missing-dir/m.gguf")
    assert os.listdir(tmp_path) == []


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    read = lambda p: open(p, "rb").read()
    a = read(make(tmp_path, "a.gguf", seed=7))
    b = read(make(tmp_path, "b.gguf", seed=7))
    c = read(make(tmp_path, "c.gguf", seed=8))
    assert a == b
    assert len(a) == len(c) and a != c
    assert sorted(os.listdir(tmp_path)) == ["a.gguf", "b.gguf", "c.gguf"]  # no temp files


def _synth_cli(path, flags: str):
    """`hobbit-cli synth PATH FLAGS`, which must succeed."""
    r = subprocess.run([*CLI, "synth", str(path), *flags.split()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r


def test_cli_writes_the_file(tmp_path):
    path = tmp_path / "cli.gguf"
    r = _synth_cli(
        path,
        "--layers 1 --d-model 64 --d-ff 64 --experts 2 --top-k 1 --heads 2 --kv-heads 1 --type q8_0 --seed 3 --ctx 128",
    )
    assert str(path) in r.stdout and "MB" in r.stdout
    a = open_model(str(path)).args
    assert (a.n_layer, a.n_embd, a.n_expert, a.n_expert_used, a.n_ctx_train) == (1, 64, 2, 1, 128)


def test_cli_writes_a_qwen2moe_with_its_shared_expert(tmp_path):
    path = tmp_path / "q2.gguf"
    _synth_cli(
        path,
        "--arch qwen2moe --layers 1 --d-model 64 --d-ff 64 --experts 4 --top-k 2 "
        "--heads 2 --kv-heads 1 --shared-ff 96 --ctx 128",
    )
    w = open_model(str(path))
    assert (w.args.arch, w.args.n_ff, w.args.n_ff_shexp) == ("qwen2moe", 64, 96)
    assert w.tensors["blk.0.ffn_up_shexp.weight"].shape == (64, 96)
    assert w.tensors["blk.0.attn_q.bias"].shape == (64,)
    assert w.field("general.name").startswith("hobbit-synth-qwen2moe-")


def test_cli_bad_flag_is_one_line(tmp_path):
    path = tmp_path / "bad.gguf"
    r = subprocess.run([*CLI, "synth", str(path), "--heads", "6"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--heads" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not path.exists()


def test_cli_writes_a_gpt_oss_with_its_biases_sinks_and_window(tmp_path):
    path = tmp_path / "oss.gguf"
    _synth_cli(
        path,
        "--arch gpt-oss --layers 2 --d-model 64 --d-ff 64 --experts 4 --top-k 2 "
        "--heads 4 --kv-heads 2 --head-dim 32 --swa 8 --ctx 128",
    )
    w = open_model(str(path))
    assert (w.args.arch, w.args.n_swa, w.args.swa_layers) == ("gpt-oss", 8, (True, False))
    assert (w.args.n_ctx_orig, w.args.n_ctx_train, w.args.rope_freq_scale) == (128, 32 * 128, 1 / 32)
    assert w.tensors["blk.0.attn_sinks.weight"].shape == (4,)
    assert w.tensors["blk.0.attn_q.weight"].shape == (64, 128)  # H * Dh != D
    assert w.tensors["blk.1.ffn_gate_inp.bias"].shape == (4,)
    assert w.tensors["blk.1.ffn_down_exps.bias"].shape == (64, 4)  # [D, E]
    assert "blk.0.post_attention_norm.weight" in w.tensors and "blk.0.ffn_norm.weight" not in w.tensors
    assert w.field("general.name").startswith("hobbit-synth-gpt-oss-")
