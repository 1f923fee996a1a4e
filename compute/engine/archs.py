"""The architectures the engine runs: how each one's graph differs from llama's (Arch),
one entry per loader/gguf_file.py SUPPORTED_ARCHS name, in its order."""

from __future__ import annotations

from dataclasses import dataclass

from ...loader.gguf_file import SUPPORTED_ARCHS
from . import ggml


@dataclass(frozen=True)
class Arch:
    """How one architecture's graph differs from llama's, as llama.cpp builds it (its
    src/models/ARCH.cpp). Everything else is shared; optional biases (attention q/k/v/output,
    norms, output, router, experts) and attention sinks are used wherever the file has them,
    as llama.cpp does."""

    rope: int = ggml.ROPE_NORMAL  # NORMAL: adjacent pairs rotate; NEOX: halves rotate
    qk_norm: str = ""  # "": none; "head": RMS over each head's Dh (qwen3moe);
    # "full": RMS over all heads' H*Dh, before the head split (olmoe)
    qk_norm_optional: bool = False  # qk_norm only where the file has attn_q_norm (glm4moe:
    # GLM-4.5 has it, GLM-4.5-Air not)
    norm_weights: bool = True  # the top-K weights renormalised to sum 1 (Mixtral, Qwen3)
    routing_keys: tuple = ()  # what the file says of the routing, where it says it,
    # as llama.cpp reads it for the architecture: "norm"
    # (expert_weights_norm over norm_weights), "scale"
    # (expert_weights_scale), "gating" (expert_gating_func)
    shared_expert: str = ""  # an always-on expert ffn_*_shexp: "gated": scaled by
    # sigmoid(ffn_gate_inp_shexp . h), as wide as the file's
    # expert_shared_feed_forward_length or else the dense
    # FFN (qwen2moe); "sized": ungated, where the file gives
    # that width (Granite MoE Shared); "counted": ungated,
    # expert_shared_count times the file's
    # expert_shared_feed_forward_length (or else one
    # expert's width) wide (glm4moe, bailingmoe2)
    scale_q_first: bool = False  # Q scaled by 1/sqrt(Dh) before attention, not inside
    # it (phi3's graph; F16 rounding differs by ~1e-2)
    moe: bool = False  # every layer past the leading dense ones
    # ({arch}.leading_dense_block_count) has routed experts,
    # or every {arch}.interleave_moe_layer_step-th (ernie4_5-moe)
    gating: str = "softmax"  # "softmax": softmax over the E router logits, then top-K;
    # "softmax_weight": top-K of the logits, softmax over
    # those K (llama.cpp's SOFTMAX_WEIGHT, gpt-oss);
    # "sigmoid": each logit's sigmoid, then top-K (glm4moe).
    # A selection bias exp_probs_b, where the file has one,
    # is added for choosing the K only (DeepSeek-V3's)
    ffn_act: str = "swiglu"  # "swiglu_oai": gpt-oss's clamped SwiGLU (alpha 1.702,
    # limit 7.0), ggml_swiglu_oai; "reglu": relu(gate) * up
    router_first: bool = False  # the router reads the block's input, before attention
    # (smallthinker), not the FFN's normed input
    ffn_norm: str = "ffn_norm"  # the FFN's input norm (gpt-oss: post_attention_norm)
    swa_pattern: int = 0  # sliding-window attention (window from the file) on
    # every layer il with il % n < n - 1, full attention
    # on the others (gpt-oss: 2, even layers); 0: none
    swa_dense_first: bool = False  # windowed where il % n != 0 instead (smallthinker)
    swa_window: int = 0  # the window whatever the file says, where it has one
    # (smallthinker: 4096, as llama.cpp); 0: the file's
    nope_unwindowed: bool = False  # with a window, the unwindowed layers have no RoPE
    multipliers: bool = False  # Granite's scales from the file: embedding, residual
    # branches, attention logits and output logits
    fused_qkv: bool = False  # one attn_qkv projection, Q then K then V rows (bailingmoe2)
    mla: bool = False  # multi-head latent attention (deepseek2): one latent of
    # kv_lora_rank per token is cached with its RoPE part,
    # attn_k_b folds into the queries, attn_v_b follows
    layer_tensors: tuple = ()  # further tensors each block must have (suffixes)
    global_tensors: tuple = ()  # further tensors the file must have


ARCHS = {
    "llama": Arch(),  # dense llama, or Mixtral
    "qwen3moe": Arch(rope=ggml.ROPE_NEOX, qk_norm="head", moe=True),
    "olmoe": Arch(rope=ggml.ROPE_NEOX, qk_norm="full", norm_weights=False, moe=True),
    "qwen2moe": Arch(
        rope=ggml.ROPE_NEOX,
        norm_weights=False,
        shared_expert="gated",
        moe=True,
        layer_tensors=("ffn_gate_inp_shexp.weight",),
    ),
    # phimoe runs llama.cpp's phi3 graph: RMS norms with biases, LongRoPE factors
    "phimoe": Arch(
        rope=ggml.ROPE_NEOX,
        scale_q_first=True,
        moe=True,
        layer_tensors=("attn_norm.bias", "ffn_norm.bias", "attn_output.bias"),
        global_tensors=("output_norm.bias", "output.bias"),
    ),
    # gpt-oss runs llama.cpp's openai-moe graph: attention sinks, every other layer a
    # sliding window, YaRN RoPE, biases on q/k/v/o, the router and every expert
    "gpt-oss": Arch(
        rope=ggml.ROPE_NEOX,
        norm_weights=False,
        moe=True,
        gating="softmax_weight",
        ffn_act="swiglu_oai",
        ffn_norm="post_attention_norm",
        swa_pattern=2,
        layer_tensors=(
            "attn_sinks.weight",
            "attn_q.bias",
            "attn_k.bias",
            "attn_v.bias",
            "attn_output.bias",
            "ffn_gate_inp.bias",
            "ffn_gate_exps.bias",
            "ffn_up_exps.bias",
            "ffn_down_exps.bias",
        ),
    ),
    # granitemoe runs llama.cpp's granite graph: llama's with four multipliers (and, in
    # Granite MoE Shared files, an ungated shared expert)
    "granitemoe": Arch(moe=True, multipliers=True, shared_expert="sized"),
    # glm4moe (GLM-4.5, GLM-4.5-Air): leading dense blocks, sigmoid routing with a selection
    # bias and scaled weights, an ungated shared expert, q/k/v biases, partial RoPE, QK norm
    # in some files; the file's trailing MTP block (nextn_predict_layers) is not run
    "glm4moe": Arch(
        rope=ggml.ROPE_NEOX,
        qk_norm="head",
        qk_norm_optional=True,
        moe=True,
        norm_weights=False,
        routing_keys=("norm", "scale", "gating"),
        gating="sigmoid",
        shared_expert="counted",
        ffn_norm="post_attention_norm",
        layer_tensors=("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    ),
    # bailingmoe2 (Ling-mini-2.0, Ling-flash-2.0): glm4moe's routing with expert groups
    # (the top-2 sum of each group picks the groups the K experts are chosen in), a fused
    # QKV projection, QK norm per head, partial RoPE, leading dense blocks, an MTP block
    "bailingmoe2": Arch(
        rope=ggml.ROPE_NEOX,
        qk_norm="head",
        moe=True,
        norm_weights=False,
        routing_keys=("norm", "scale", "gating"),
        shared_expert="counted",
        fused_qkv=True,
    ),
    # ernie4_5-moe (ERNIE-4.5-21B-A3B, -300B-A47B): llama's blocks with a leading dense one,
    # MoE every interleave_moe_layer_step-th block after it, a selection bias, an ungated
    # shared expert, an attn_output bias where the file has one
    "ernie4_5-moe": Arch(moe=True, shared_expert="sized"),
    # deepseek2 (DeepSeek-V2, -V2-Lite, -V3): MLA attention, leading dense blocks, ungated
    # shared experts, the routing from the file (softmax by default)
    "deepseek2": Arch(moe=True, mla=True, routing_keys=("norm", "scale", "gating"), shared_expert="counted"),
    # smallthinker (SmallThinker-21B-A3B, -4B-A0.6B): the router reads the block's input,
    # ReLU-gated experts, the gating from the file; with a window, 3 of 4 layers windowed
    # (4096 tokens) and the others without RoPE
    "smallthinker": Arch(
        rope=ggml.ROPE_NEOX,
        moe=True,
        routing_keys=("gating",),
        ffn_act="reglu",
        router_first=True,
        swa_pattern=4,
        swa_dense_first=True,
        swa_window=4096,
        nope_unwindowed=True,
    ),
}
if tuple(ARCHS) != SUPPORTED_ARCHS:
    raise ImportError("compute/engine/archs.py: ARCHS must list loader/gguf_file.py's SUPPORTED_ARCHS, in its order")
