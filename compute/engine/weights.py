"""A GGUF model: its hyper-parameters (ModelArgs) and its tensors, mmapped in place.

`open_model(path)` validates the file up front (loader/gguf_file.py: missing, not a GGUF,
truncated; here: unsupported architecture, missing tensors, types we do not compute on)
and raises ModelError with one line that names the file and the reason. Tensor data is
never copied: `Weights.address(name)` points into the read-only shared mmap (of the part
holding it, for a model split by gguf-split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...loader.gguf_file import GGUFFile, open_gguf
from ...loader.layout import moe_blocks, trunk_blocks
from ...protocol.errors import ModelError
from . import ggml
from .archs import ARCHS


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a model, dense (n_expert = 0) or MoE, with the few switches by
    which the supported architectures differ (see Arch)."""

    arch: str
    n_vocab: int
    n_embd: int  # D
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int  # F, per expert for a MoE
    n_ctx_train: int
    rope_base: float
    rope_dim: int
    rms_eps: float
    n_expert: int = 0  # E
    n_expert_used: int = 0  # K (top-k)
    rope_type: int = ggml.ROPE_NORMAL
    rope_attn_factor: float = 1.0  # scales RoPE's cos/sin (LongRoPE's attention factor)
    n_ctx_orig: int = 0  # context the model was pre-trained for (LongRoPE picks
    # its short factors up to it); 0: n_ctx_train
    qk_norm: str = ""  # "", "head" or "full" (Arch.qk_norm)
    scale_q_first: bool = False  # Arch.scale_q_first
    norm_weights: bool = True  # renormalise the top-K routing weights
    n_ff_shexp: int = 0  # F of the shared expert; 0: none
    gating: str = "softmax"  # Arch.gating
    weights_scale: float = 0.0  # the top-K weights times this (glm4moe); 0: none
    n_expert_groups: int = 0  # experts in this many groups, chosen within the best
    n_group_used: int = 0  # n_group_used of them (bailingmoe2); 0: no groups
    moe_layers: tuple = ()  # the blocks with routed experts, in order (all of them
    # but the leading dense ones); MoE layer m is block
    # moe_layers[m], and hobbitd numbers layers by m
    ffn_act: str = "swiglu"  # Arch.ffn_act
    ffn_norm: str = "ffn_norm"  # Arch.ffn_norm
    # RoPE scaling as llama.cpp's rope_ext takes it (YaRN: freq_scale 1/factor, ext_factor 1)
    rope_freq_scale: float = 1.0
    rope_ext_factor: float = 0.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_base_swa: float = 0.0  # RoPE base of the sliding-window layers; 0: rope_base
    n_swa: int = 0  # sliding window in tokens (a query sees n_swa positions,
    # its own included); 0: none
    swa_layers: tuple = ()  # per layer: True where attention is windowed
    rope_layers: tuple = ()  # per layer: False where queries and keys get no RoPE;
    # (): every layer has it
    router_first: bool = False  # Arch.router_first
    # MLA (Arch.mla): the latent's width R, and a head's query/key and value widths
    # (head_dim is then R + rope_dim, the cached width, and n_head_kv 1); 0: not MLA
    kv_lora_rank: int = 0
    mla_head_k: int = 0
    mla_head_v: int = 0
    # Granite's multipliers (Arch.multipliers); 0: none (attention: 1/sqrt(Dh))
    embedding_scale: float = 0.0  # the token embeddings times this
    residual_scale: float = 0.0  # each attention and FFN output times this before the add
    attention_scale: float = 0.0  # the attention logits' scale
    logit_scale: float = 0.0  # the output logits divided by this

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def n_moe_layer(self) -> int:
        return len(self.moe_layers)

    @property
    def routing(self) -> Routing:
        return Routing(
            self.n_expert_used,
            self.norm_weights,
            self.gating,
            self.weights_scale,
            self.n_expert_groups,
            self.n_group_used,
        )

    def is_swa(self, layer: int) -> bool:
        return bool(self.swa_layers) and self.swa_layers[layer]


@dataclass(frozen=True)
class Routing:
    """How a router's logits become K experts and their weights (llama.cpp's
    build_moe_ffn with softmax, softmax-weight or sigmoid gating, its norm_w flag and
    w_scale); the graph's routing and its numpy twin (engine/moe.py) both follow it."""

    n_used: int  # K
    norm_weights: bool = True  # weights / their sum (Mixtral, Qwen3) or the softmax as is
    gating: str = "softmax"  # Arch.gating
    scale: float = 0.0  # then times this; 0 (or 1): as they are
    groups: int = 0  # E experts in this many groups of E / groups; a group's
    groups_used: int = 0  # score is its top-2 sum and the K are chosen within the
    # best groups_used groups (DeepSeek-V3's); 0: no groups


class Weights(GGUFFile):
    """An open GGUF model: the file (tensor table, shared read-only mmap) and its ModelArgs."""

    def __init__(self, file: GGUFFile, args: ModelArgs):
        super().__init__(file.path, file.reader, file.tensors, file.readers, file.identities)
        self.args = args

    def dequantized(self, name: str):
        """A small 2-D tensor as float32 (rows, cols) in numpy order (copied)."""
        info = self.tensors[name]
        raw = self.data(name)
        n = info.shape[0] * info.shape[1]
        return ggml.dequantize(info.type, raw, n).reshape(info.shape[1], info.shape[0])

    def router(self, block: int):
        """A block's router (ffn_gate_inp) as float32 (E, D)."""
        return self.dequantized(f"blk.{block}.ffn_gate_inp.weight")

    def router_bias(self, block: int):
        """A block's router bias as float32 (E,), zeros where the file has none."""
        return self._vector(f"blk.{block}.ffn_gate_inp.bias")

    def selection_bias(self, block: int):
        """A block's expert selection bias (exp_probs_b) as float32 (E,), zeros where the
        file has none."""
        return self._vector(f"blk.{block}.exp_probs_b.bias")

    def _vector(self, name: str):
        info = self.tensors.get(name)
        if info is None:
            return np.zeros(self.args.n_expert, np.float32)
        return ggml.dequantize(info.type, self.data(name), info.shape[0])


def _field(reader, key, default=None, required=True, path=""):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise ModelError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def _uniform(value, key: str, path: str):
    """A key llama.cpp reads as a scalar or one value per layer (get_key_or_arr): the one
    value. Our architectures' graphs, like llama.cpp's for them, size every layer's experts
    and top-k from one value, so an array whose values differ is refused."""
    if not isinstance(value, list):
        return value
    if len(set(value)) > 1:
        raise ModelError(
            f"{path}: {key} differs across layers ({min(value)}..{max(value)}), which hobbit does not support"
        )
    return value[0] if value else None


GATING_FUNCS = {1: "softmax", 2: "sigmoid"}  # llama.cpp's expert_gating_func values


def read_args(file: GGUFFile) -> ModelArgs:
    reader, path = file.reader, file.path
    arch = file.check_architecture()
    spec = ARCHS[arch]
    k = lambda name, **kw: _uniform(_field(reader, f"{arch}.{name}", path=path, **kw), f"{arch}.{name}", path)
    n_embd = int(k("embedding_length"))
    n_head = int(k("attention.head_count"))
    head_dim = int(k("attention.key_length", default=n_embd // n_head))
    vocab = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(k("vocab_size", default=len(vocab.data) if vocab else 0))
    n_ctx_train = int(k("context_length"))
    scaling = k("rope.scaling.type", required=False)
    factor = float(k("rope.scaling.factor", default=1.0))
    if scaling not in (None, "none", "yarn") and factor != 1.0:
        raise ModelError(f"{path}: RoPE scaling {scaling!r} (factor {factor:g}) is not supported")
    # YaRN as llama.cpp sets it up: ext_factor 1 whatever the factor (0 in the file: 1)
    yarn = scaling == "yarn"
    attn_factor = float(k("rope.scaling.attn_factor", default=1.0))
    freq_scale = np.float32(1.0) / np.float32(factor) if yarn and factor else np.float32(1.0)
    if yarn:
        attn_factor = yarn_attn_factor(freq_scale, attn_factor)
    n_ff_dense = k("feed_forward_length", required=False)
    n_layer = trunk_blocks(file)
    n_swa = 0
    if spec.swa_window:  # a window only where the file has one, of a fixed size
        n_swa = spec.swa_window if int(k("attention.sliding_window", default=0, required=False) or 0) > 0 else 0
    elif spec.swa_pattern:
        n_swa = int(k("attention.sliding_window"))
    windowed = swa_layers(reader, arch, n_layer, spec.swa_pattern, spec.swa_dense_first) if n_swa else ()
    scale = lambda key: float(k(key, default=0.0, required=False) or 0.0) if spec.multipliers else 0.0
    # a shared expert: llama.cpp makes qwen2moe's as wide as the dense FFN unless the file
    # says; granite has one only where the file gives its width (Granite MoE Shared)
    n_ff = int(k("expert_feed_forward_length", default=0, required=False) or k("feed_forward_length"))
    n_ff_shexp = 0
    if spec.shared_expert in ("gated", "sized"):
        n_ff_shexp = int(k("expert_shared_feed_forward_length", default=0, required=False) or 0)
        if spec.shared_expert == "gated" and not n_ff_shexp:
            n_ff_shexp = int(n_ff_dense or 0)
    elif spec.shared_expert == "counted":
        width = int(k("expert_shared_feed_forward_length", default=0, required=False) or 0) or n_ff
        n_ff_shexp = width * int(k("expert_shared_count", default=0, required=False) or 0)
    norm_weights, gating, weights_scale = spec.norm_weights, spec.gating, 0.0
    if "norm" in spec.routing_keys:
        norm_weights = bool(k("expert_weights_norm", default=norm_weights, required=False))
    if "scale" in spec.routing_keys:
        weights_scale = float(k("expert_weights_scale", default=0.0, required=False) or 0.0)
    if "gating" in spec.routing_keys:
        func = int(k("expert_gating_func", default=0, required=False) or 0)
        if func and func not in GATING_FUNCS:
            raise ModelError(f"{path}: {arch}.expert_gating_func {func} is not supported (1: softmax, 2: sigmoid)")
        gating = GATING_FUNCS.get(func, gating)
    groups = int(k("expert_group_count", default=0, required=False) or 0)
    groups_used = int(k("expert_group_used_count", default=0, required=False) or 0)
    sections = _field(reader, f"{arch}.rope.dimension_sections", required=False)
    if sections and any(sections if isinstance(sections, list) else [sections]):
        raise ModelError(f"{path}: {arch}.rope.dimension_sections: multimodal RoPE is not supported")
    n_expert = int(k("expert_count", default=0, required=False) or 0)
    n_lead = int(k("leading_dense_block_count", default=0, required=False) or 0)
    step = int(k("interleave_moe_layer_step", default=1, required=False) or 1)
    kv_lora_rank = mla_k = mla_v = 0
    attention_scale = scale("attention.scale")
    if spec.mla:
        if "blk.0.attn_kv_b.weight" in file.tensors:
            raise ModelError(
                f"{path}: tensor blk.0.attn_kv_b.weight: a {arch} file converted "
                "without MLA (attn_k_b, attn_v_b), which hobbit does not run; "
                "convert it again with a current llama.cpp"
            )
        kv_lora_rank = int(k("attention.kv_lora_rank"))
        mla_k, mla_v = int(k("attention.key_length_mla")), int(k("attention.value_length_mla"))
        # YaRN as llama.cpp sets it up for deepseek2 (float32 throughout): the file holds
        # 0.1 x mscale_all_dim; RoPE's factor is then 1 / (1 + 0.1 ln factor) (the two
        # mscales cancel), and the attention logits' scale is mscale^2 / sqrt(key width)
        f32 = np.float32
        log_mul = f32(float(k("rope.scaling.yarn_log_multiplier", default=0.0, required=False) or 0.0)) / f32(0.1)
        ln = f32(np.log(f32(1.0) / f32(freq_scale)))
        if yarn and log_mul:
            attn_factor = (
                f32(1.0)
                / (f32(1.0) + f32(0.1) * f32(np.log(f32(factor))))
                * f32(k("rope.scaling.attn_factor", default=1.0))
            )
        mscale = f32(attn_factor) * (f32(1.0) + f32(0.1) * ln) * (f32(1.0) + f32(0.1) * log_mul * ln)
        attention_scale = float(f32(1.0) * mscale * mscale / f32(np.sqrt(f32(mla_k))))
    qk_norm = spec.qk_norm
    if spec.qk_norm_optional and "blk.0.attn_q_norm.weight" not in file.tensors:
        qk_norm = ""
    return ModelArgs(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_head_kv=int(k("attention.head_count_kv", default=n_head)),
        head_dim=head_dim,
        n_ff=n_ff,
        n_ctx_train=n_ctx_train,
        rope_base=float(k("rope.freq_base", default=10000.0)),
        rope_dim=int(k("rope.dimension_count", default=head_dim)),
        rms_eps=float(k("attention.layer_norm_rms_epsilon")),
        n_expert=n_expert,
        n_expert_used=int(k("expert_used_count", default=0, required=False)),
        rope_type=spec.rope,
        rope_attn_factor=float(attn_factor),
        n_ctx_orig=int(k("rope.scaling.original_context_length", default=n_ctx_train)),
        qk_norm=qk_norm,
        scale_q_first=spec.scale_q_first,
        norm_weights=norm_weights,
        n_ff_shexp=n_ff_shexp,
        gating=gating,
        weights_scale=weights_scale,
        n_expert_groups=groups if groups > 1 else 0,
        n_group_used=groups_used if groups > 1 else 0,
        moe_layers=tuple(il for il in range(n_lead, n_layer) if (il + 1) % step == 0) if n_expert else (),
        ffn_act=spec.ffn_act,
        ffn_norm=spec.ffn_norm,
        rope_freq_scale=float(freq_scale),
        rope_ext_factor=1.0 if yarn else 0.0,
        rope_base_swa=float(k("rope.freq_base_swa", default=0.0, required=False) or 0.0),
        n_swa=n_swa,
        swa_layers=windowed,
        rope_layers=tuple(not spec.nope_unwindowed or w for w in windowed),
        router_first=spec.router_first,
        embedding_scale=scale("embedding_scale"),
        residual_scale=scale("residual_scale"),
        attention_scale=attention_scale,
        kv_lora_rank=kv_lora_rank,
        mla_head_k=mla_k,
        mla_head_v=mla_v,
        logit_scale=scale("logit_scale"),
    )


def yarn_attn_factor(freq_scale, attn_factor: float) -> np.float32:
    """llama.cpp's YaRN attention factor (llama_context's constructor), in float32 as it
    computes it: get_mscale(1/freq_scale) times the inverse of the magnitude scale ggml's
    rope applies itself with ext_factor != 0 (the two nearly cancel), times the file's
    rope.scaling.attn_factor."""
    f32 = np.float32
    factor = f32(1.0) / f32(freq_scale)
    log = f32(np.log(factor))
    mscale = f32(0.1) * log + f32(1.0) if factor > 1 else f32(1.0)
    return mscale * (f32(1.0) / (f32(1.0) + f32(0.1) * log)) * f32(attn_factor)


def swa_layers(reader, arch: str, n_layer: int, pattern: int, dense_first: bool = False) -> tuple:
    """Which layers use sliding-window attention, as llama.cpp's load_swa_pattern reads it:
    the file's {arch}.attention.sliding_window_pattern (one flag per layer, or a period n),
    else the architecture's period; with period n, layer il is windowed when
    il % n < n - 1, or with dense_first when il % n != 0 (n = 0: every layer)."""
    f = reader.fields.get(f"{arch}.attention.sliding_window_pattern")
    value = f.contents() if f is not None else pattern
    if isinstance(value, list):
        if len(value) != n_layer:
            raise ModelError(f"{arch}.attention.sliding_window_pattern has {len(value)} flags for {n_layer} layers")
        return tuple(bool(v) for v in value)
    n = int(value)
    if dense_first:
        return tuple(n == 0 or il % n != 0 for il in range(n_layer))
    return tuple(n == 0 or il % n < n - 1 for il in range(n_layer))


def open_model(path: str) -> Weights:
    """Open and validate a GGUF model; raise ModelError naming the file and the reason."""
    f = open_gguf(path)
    w = Weights(f, read_args(f))
    _check_tensors(w)
    return w


def _check_tensors(w: Weights) -> None:
    a = w.args
    spec = ARCHS[a.arch]
    if spec.moe and not a.is_moe:
        raise ModelError(f"{w.path}: a {a.arch} model needs {a.arch}.expert_count > 0")
    need = ["token_embd.weight", "output_norm.weight", *spec.global_tensors]
    moe = set(a.moe_layers)
    for i in range(a.n_layer):
        names = ["attn_norm.weight", "attn_output.weight", f"{a.ffn_norm}.weight"]
        if spec.mla:
            names += ["attn_kv_a_mqa.weight", "attn_kv_a_norm.weight", "attn_k_b.weight", "attn_v_b.weight"]
            names += (
                ["attn_q_a.weight", "attn_q_a_norm.weight", "attn_q_b.weight"]
                if f"blk.{i}.attn_q_a.weight" in w.tensors
                else ["attn_q.weight"]
            )
        elif spec.fused_qkv:
            names += ["attn_qkv.weight"]
        else:
            names += ["attn_q.weight", "attn_k.weight", "attn_v.weight"]
        if a.qk_norm:
            names += ["attn_q_norm.weight", "attn_k_norm.weight"]
        if i in moe:
            names += [
                "ffn_gate_inp.weight",
                "ffn_gate_exps.weight",
                "ffn_up_exps.weight",
                "ffn_down_exps.weight",
                *spec.layer_tensors,
            ]
            if a.n_ff_shexp:  # (qwen2moe's gate ffn_gate_inp_shexp: its layer_tensors)
                names += ["ffn_gate_shexp.weight", "ffn_up_shexp.weight", "ffn_down_shexp.weight"]
        else:
            names += ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
        need += [f"blk.{i}.{n}" for n in names]
    for name in need:
        if name not in w.tensors:
            raise ModelError(f"{w.path}: tensor {name} is missing")
        t = w.tensors[name].type
        if t not in ggml.WEIGHT_TYPES:
            raise ModelError(f"{w.path}: tensor {name} has type {ggml.type_name(t)}, which hobbit does not compute on")
    if a.is_moe and a.moe_layers != moe_blocks(w):
        raise ModelError(
            f"{w.path}: blocks {list(moe_blocks(w))} have routed experts, but "
            f"{a.arch}.leading_dense_block_count says blocks {list(a.moe_layers)}"
        )
    G = a.n_expert_groups
    if G and (
        a.n_expert % G
        or not 0 < a.n_group_used <= G
        or a.n_group_used * (a.n_expert // G) < a.n_expert_used
        or a.n_expert // G < 2
    ):
        raise ModelError(
            f"{w.path}: expert groups {G} (using {a.n_group_used}) do not fit "
            f"{a.n_expert} experts, {a.n_expert_used} used"
        )
    if a.is_moe and not 0 < a.n_expert_used <= a.n_expert:
        raise ModelError(f"{w.path}: expert_used_count {a.n_expert_used} is not in 1..{a.n_expert}")
    if a.n_head % a.n_head_kv:
        raise ModelError(f"{w.path}: head_count {a.n_head} is not a multiple of head_count_kv {a.n_head_kv}")
