"""What a synthetic model is made of: the options (SynthOptions) and, per architecture,
what its file has beyond llama's (Mixtral's) layout (SynthArch, one entry per name of
loader/gguf_file.py's SUPPORTED_ARCHS in SYNTH_ARCHS). compute/make/synth.py reads the
table; no code there names an architecture. Pure data: importing this module is cheap
(the CLI's parser reads its defaults)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ...loader.gguf_file import SUPPORTED_ARCHS
from ..engine.sampling import SamplingSettings

TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
GATINGS = ("softmax", "sigmoid")  # opts.gating (smallthinker's expert_gating_func)
GPT_OSS_SWA = 128  # gpt-oss: its sliding window (tokens), where opts.swa is 0
DENSE_FF = 4  # leading dense blocks are DENSE_FF x d_ff wide
# the norms of the trailing MTP block (besides its nextn.eh_proj), as GLM-4.5's
MTP_NORMS = ("nextn.enorm", "nextn.hnorm", "nextn.shared_head_norm")


@dataclass
class SynthOptions:
    layers: int = 4
    d_model: int = 256
    d_ff: int = 512  # per expert
    experts: int = 8  # 0 = dense llama model (ffn_gate/ffn_up/ffn_down, no router)
    top_k: int = 2
    heads: int = 8
    kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // heads
    type: str = "Q8_0"  # ggml type of the big matrices, one of TYPES
    seed: int = 0
    vocab_from: str | None = None  # GGUF to copy tokenizer.* metadata and vocab size from
    vocab_size: int | None = None  # the vocabulary grown to this many tokens (None: the source's)
    ctx: int = 4096  # {arch}.context_length (phimoe, gpt-oss: the original one)
    arch: str = "llama"  # one of SUPPORTED_ARCHS
    shared_ff: int = 0  # qwen2moe's shared expert width, 0: 4 x d_ff (as Qwen1.5-MoE);
    # granitemoe's, 0: none
    swa: int = 0  # gpt-oss's sliding window in tokens; 0: GPT_OSS_SWA
    dense: int = 1  # glm4moe's and bailingmoe2's leading dense blocks
    groups: int = 4  # bailingmoe2's expert groups (half of them used)
    gating: str = "softmax"  # smallthinker's expert_gating_func: one of GATINGS
    kv_lora: int = 64  # deepseek2: the cached latent's width R
    q_lora: int = 0  # deepseek2: the query's low rank; 0: one attn_q (V2-Lite)
    yarn: bool = False  # deepseek2: YaRN RoPE scaling as V2's
    qk_norm: bool = False  # glm4moe: per-head Q and K norms (GLM-4.5's)
    sampling: SamplingSettings | None = None  # written as general.sampling.* (None: no keys)


@dataclass(frozen=True)
class LongRope:
    """LongRoPE (phimoe): context_length `factor` x opts.ctx, the original one opts.ctx,
    per-pair frequency divisors rope_factors_{long,short} [Dh/2] and their attention factor."""

    factor: int


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling: context_length `factor` x opts.ctx, the original one opts.ctx."""

    factor: float
    mscale_all_dim: float | None = None  # rope_scaling.yarn_log_mul = 0.1 x this
    optional: bool = False  # only with opts.yarn


@dataclass(frozen=True)
class Routing:
    """What the file says of the routing (llama.cpp reads it for these architectures)."""

    scale: float  # expert_weights_scale
    norm: bool  # expert_weights_norm: the top-K weights renormalised
    gating: str  # expert_gating_func: "SIGMOID" or "SOFTMAX"


@dataclass(frozen=True)
class Multipliers:
    """Granite's scales (the attention one is written as 1 / head_dim)."""

    embedding: float
    residual: float
    logit: float


@dataclass(frozen=True)
class SynthArch:
    """How one architecture's synthetic file differs from llama's (Mixtral's)."""

    # --- the options it takes (synth.check) ---
    dense_ok: bool = False  # experts 0 makes a dense model (else at least one expert)
    square_attn: bool = False  # attention projections [D, D]: a head is D / heads wide
    mha_only: bool = False  # kv_heads must equal heads
    dense_lead: bool = False  # opts.dense leading dense blocks, DENSE_FF x d_ff wide
    expert_groups: bool = False  # experts in opts.groups groups, the best half chosen in
    # --- its tensors (synth.plan) ---
    norm_bias: bool = False  # every norm has a bias
    qkv_bias: bool = False  # attn_{q,k,v} have biases
    out_bias: bool = False  # attn_output has a bias
    output_bias: bool = False  # output has a bias
    fused_qkv: bool = False  # one attn_qkv projection, no q/k/v biases
    mla: bool = False  # multi-head latent attention (see the deepseek2 entry)
    qk_norm: str = ""  # attn_{q,k}_norm: "head": per head [Dh]; "full": over
    # all heads [H*Dh]; "": none
    qk_norm_optional: bool = False  # qk_norm only with opts.qk_norm
    sinks: bool = False  # attn_sinks [H]: one sink logit per head
    ffn_norm: str = "ffn_norm"  # the FFN's input norm
    expert_bias: bool = False  # biases on the router and every expert (F32, [F or D, E])
    gate_up_std: float = 1.0  # experts' gate and up drawn this much larger, down this
    # much smaller
    selection_bias: Callable[[int], float] | None = None  # exp_probs_b [E]: its std for E
    # experts (moves which experts are chosen, not their weights)
    shared_ff_times: int = 0  # a shared expert ffn_{gate,up,down}_shexp this many d_ff
    # wide (0: none) ...
    shared_ff_option: bool = False  # ... unless opts.shared_ff sets its width
    shared_gate: bool = False  # the shared expert's sigmoid gate ffn_gate_inp_shexp [D]
    mtp_norms: tuple[str, ...] = ()  # a trailing MTP block (nextn_predict_layers 1: a full
    # MoE block plus nextn.eh_proj and these norms), which
    # inference skips; (): none
    # --- its metadata (synth._writer) ---
    rope_scaling: LongRope | Yarn | None = None
    partial_rope: bool = False  # RoPE on half of each head (rope_dimension_count Dh / 2)
    window: int | None = None  # a sliding window always, opts.swa or this (written
    # with the RoPE scaling, as the real file)
    window_option: bool = False  # a sliding window only with opts.swa
    gating_option: bool = False  # expert_gating_func from opts.gating
    ffn_length_shared: bool = False  # feed_forward_length is the shared expert's width
    expert_ffn_length: bool = False  # expert_feed_forward_length written
    interleave: int | None = None  # interleave_moe_layer_step (with leading_dense_block_count)
    routing: Routing | None = None  # expert_weights_{scale,norm}, gating, one shared expert
    multipliers: Multipliers | None = None


SYNTH_ARCHS = {
    # Mixtral: stacked 3-D experts ffn_{gate,up,down}_exps and an F32 router ffn_gate_inp
    # (with experts=0 a dense llama with ffn_{gate,up,down})
    "llama": SynthArch(dense_ok=True),
    # Qwen3-MoE: + attn_{q,k}_norm per head [Dh]; expert_feed_forward_length
    "qwen3moe": SynthArch(qk_norm="head", expert_ffn_length=True),
    # OLMoE: + attn_{q,k}_norm over all heads [D]; MHA only (its K norm spans D)
    "olmoe": SynthArch(square_attn=True, mha_only=True, qk_norm="full"),
    # Qwen1.5/2-MoE: + q/k/v biases, a shared expert (width opts.shared_ff, 0: 4 x d_ff, as
    # Qwen1.5-MoE) and its sigmoid gate; feed_forward_length is the shared expert's
    "qwen2moe": SynthArch(
        square_attn=True,
        qkv_bias=True,
        shared_ff_times=4,
        shared_ff_option=True,
        shared_gate=True,
        ffn_length_shared=True,
        expert_ffn_length=True,
    ),
    # Phi-3.5-MoE: + biases on the norms, q/k/v, attn_output and output; LongRoPE with the
    # context length 32x the original one (128k / 4k), as the real file has
    "phimoe": SynthArch(
        square_attn=True, norm_bias=True, qkv_bias=True, out_bias=True, output_bias=True, rope_scaling=LongRope(32)
    ),
    # gpt-oss-20b/120b: biases on q/k/v/o, the router and every expert, attention sinks,
    # post_attention_norm as the FFN's norm, sliding window opts.swa (0: 128 tokens) on even
    # layers, YaRN RoPE (factor 32: 128k / 4k). Its experts' gate and up are drawn twice as
    # wide, so swiglu_oai's limit (7) is hit now and then
    "gpt-oss": SynthArch(
        qkv_bias=True,
        out_bias=True,
        sinks=True,
        ffn_norm="post_attention_norm",
        expert_bias=True,
        gate_up_std=2.0,
        rope_scaling=Yarn(32),
        window=GPT_OSS_SWA,
        expert_ffn_length=True,
    ),
    # Granite-3.x MoE: llama's layout with Granite's four multipliers (Granite-3.0-1B-A400M's);
    # with opts.shared_ff a Granite MoE Shared file (an ungated shared expert). The token
    # embeddings and the residual branches are drawn smaller by the multipliers, so the
    # residual stream has the scale of the other architectures'
    "granitemoe": SynthArch(shared_ff_option=True, multipliers=Multipliers(embedding=12.0, residual=0.22, logit=6.0)),
    # GLM-4.5 / GLM-4.5-Air: opts.dense leading dense blocks, then MoE blocks with q/k/v
    # biases, post_attention_norm as the FFN's norm, a sigmoid router with a selection bias,
    # weights normalised and scaled (GLM-4.5's routed_scaling_factor 2.5), an ungated shared
    # expert as wide as one expert; partial RoPE; with opts.qk_norm QK norm per head (GLM-4.5's;
    # the Air has none); one trailing MTP block
    "glm4moe": SynthArch(
        dense_lead=True,
        qkv_bias=True,
        qk_norm="head",
        qk_norm_optional=True,
        ffn_norm="post_attention_norm",
        selection_bias=lambda E: 0.1,
        shared_ff_times=1,
        mtp_norms=MTP_NORMS,
        partial_rope=True,
        expert_ffn_length=True,
        routing=Routing(2.5, True, "SIGMOID"),
    ),
    # Ling-mini-2.0 / Ling-flash-2.0: glm4moe's blocks (sigmoid routing with a selection
    # bias, scaled weights, one shared expert, partial RoPE, opts.dense leading dense blocks,
    # a trailing MTP block) with a fused attn_qkv projection, ffn_norm, QK norm per head
    # always, no q/k/v biases, and experts in opts.groups groups, the best half chosen in
    "bailingmoe2": SynthArch(
        square_attn=True,
        dense_lead=True,
        expert_groups=True,
        fused_qkv=True,
        qk_norm="head",
        selection_bias=lambda E: 0.1,
        shared_ff_times=1,
        mtp_norms=(*MTP_NORMS, "layer_output_norm"),
        partial_rope=True,
        expert_ffn_length=True,
        routing=Routing(2.5, True, "SIGMOID"),
    ),
    # ERNIE-4.5-21B-A3B: llama's blocks, opts.dense leading dense ones, then MoE blocks
    # (interleave_moe_layer_step 1) with a softmax router, a selection bias (small beside
    # the probabilities), an ungated shared expert of opts.shared_ff (0: two experts wide,
    # as the real one); no MTP
    "ernie4_5-moe": SynthArch(
        dense_lead=True,
        selection_bias=lambda E: 0.5 / E,
        shared_ff_times=2,
        shared_ff_option=True,
        expert_ffn_length=True,
        interleave=1,
    ),
    # DeepSeek-V2-Lite / -V2: multi-head latent attention as current conversions write it
    # (attn_kv_a_mqa [D, R + r], attn_kv_a_norm, attn_k_b [nope, R, H], attn_v_b [R, Dv, H];
    # the query through attn_q, or with opts.q_lora through attn_q_a, its norm and
    # attn_q_b), R = opts.kv_lora, r = Dh / 2 rotated, nope = Dh / 2, Dv = Dh; opts.dense
    # leading dense blocks; softmax routing, an ungated shared expert as wide as one expert;
    # with opts.yarn YaRN as V2's (factor 40, mscale_all_dim 0.707: 163840 = 40 x 4096)
    "deepseek2": SynthArch(
        dense_lead=True,
        mla=True,
        shared_ff_times=1,
        partial_rope=True,
        rope_scaling=Yarn(40.0, mscale_all_dim=0.707, optional=True),
        expert_ffn_length=True,
        routing=Routing(1.0, False, "SOFTMAX"),
    ),
    # SmallThinker-4B-A0.6B / -21B-A3B: llama's layout with ReLU-gated experts routed from
    # the block's input, expert_gating_func opts.gating; with opts.swa a sliding window
    # (llama.cpp then uses 4096 whatever the value) on 3 of 4 layers, the others without RoPE
    "smallthinker": SynthArch(window_option=True, gating_option=True, expert_ffn_length=True),
}
if tuple(SYNTH_ARCHS) != SUPPORTED_ARCHS:
    raise ImportError(
        "compute/make/synth_archs.py: SYNTH_ARCHS must list loader/gguf_file.py's SUPPORTED_ARCHS, in its order"
    )
