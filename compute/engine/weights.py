"""A GGUF model: its hyper-parameters (ModelArgs) and its tensors, mmapped in place.

`open_model(path)` validates the file up front (loader/gguf_file.py: missing, not a GGUF,
truncated; here: unsupported architecture, missing tensors, types we do not compute on)
and raises ModelError with one line that names the file and the reason. Tensor data is
never copied: `Weights.address(name)` points into the read-only shared mmap.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...loader.gguf_file import SUPPORTED_ARCHS, GGUFFile, open_gguf
from ...protocol.errors import ModelError
from . import ggml


@dataclass(frozen=True)
class Arch:
    """How one architecture's graph differs from llama's, as llama.cpp builds it (its
    src/models/ARCH.cpp). Everything else is shared; optional biases (attention q/k/v/output,
    norms, output) are used wherever the file has them, as llama.cpp does."""
    rope: int = ggml.ROPE_NORMAL     # NORMAL: adjacent pairs rotate; NEOX: halves rotate
    qk_norm: str = ""                # "": none; "head": RMS over each head's Dh (qwen3moe);
                                     # "full": RMS over all heads' H*Dh, before the head split (olmoe)
    norm_weights: bool = True        # the top-K weights renormalised to sum 1 (Mixtral, Qwen3)
    shared_expert: bool = False      # an always-on expert ffn_*_shexp scaled by
                                     # sigmoid(ffn_gate_inp_shexp . h) (qwen2moe)
    scale_q_first: bool = False      # Q scaled by 1/sqrt(Dh) before attention, not inside
                                     # it (phi3's graph; F16 rounding differs by ~1e-2)
    moe: bool = False                # every layer must have routed experts
    layer_tensors: tuple = ()        # further tensors each block must have (suffixes)
    global_tensors: tuple = ()       # further tensors the file must have


ARCHS = {
    "llama": Arch(),                                          # dense llama, or Mixtral
    "qwen3moe": Arch(rope=ggml.ROPE_NEOX, qk_norm="head", moe=True),
    "olmoe": Arch(rope=ggml.ROPE_NEOX, qk_norm="full", norm_weights=False, moe=True),
    "qwen2moe": Arch(rope=ggml.ROPE_NEOX, norm_weights=False, shared_expert=True, moe=True),
    # phimoe runs llama.cpp's phi3 graph: RMS norms with biases, LongRoPE factors
    "phimoe": Arch(rope=ggml.ROPE_NEOX, scale_q_first=True, moe=True,
                   layer_tensors=("attn_norm.bias", "ffn_norm.bias", "attn_output.bias"),
                   global_tensors=("output_norm.bias", "output.bias")),
}
assert tuple(ARCHS) == SUPPORTED_ARCHS, "loader/gguf_file.py lists the architectures"


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a model, dense (n_expert = 0) or MoE, with the few switches by
    which the supported architectures differ (see Arch)."""
    arch: str
    n_vocab: int
    n_embd: int          # D
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int            # F, per expert for a MoE
    n_ctx_train: int
    rope_base: float
    rope_dim: int
    rms_eps: float
    n_expert: int = 0    # E
    n_expert_used: int = 0  # K (top-k)
    rope_type: int = ggml.ROPE_NORMAL
    rope_attn_factor: float = 1.0   # scales RoPE's cos/sin (LongRoPE's attention factor)
    n_ctx_orig: int = 0             # context the model was pre-trained for (LongRoPE picks
                                    # its short factors up to it); 0: n_ctx_train
    qk_norm: str = ""               # "", "head" or "full" (Arch.qk_norm)
    scale_q_first: bool = False     # Arch.scale_q_first
    norm_weights: bool = True       # renormalise the top-K routing weights
    n_ff_shexp: int = 0             # F of the shared expert; 0: none

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim

    @property
    def routing(self) -> "Routing":
        return Routing(self.n_expert_used, self.norm_weights)


@dataclass(frozen=True)
class Routing:
    """How a router's softmax becomes K experts and their weights (llama.cpp's
    build_moe_ffn with softmax gating and its norm_w flag); the graph and Python's
    routing (compute/model.py) both follow it."""
    n_used: int                 # K
    norm_weights: bool = True   # weights / their sum (Mixtral, Qwen3) or the softmax as is


class Weights(GGUFFile):
    """An open GGUF model: the file (tensor table, shared read-only mmap) and its ModelArgs."""

    def __init__(self, file: GGUFFile, args: ModelArgs):
        super().__init__(file.path, file.reader, file.tensors)
        self.args = args

    def dequantized(self, name: str):
        """A small 2-D tensor as float32 (rows, cols) in numpy order (copied)."""
        info = self.tensors[name]
        raw = self.reader.data[info.offset:info.offset + info.nbytes]
        n = info.shape[0] * info.shape[1]
        return ggml.dequantize(info.type, raw, n).reshape(info.shape[1], info.shape[0])

    def router(self, layer: int):
        """Layer's router (ffn_gate_inp) as float32 (E, D)."""
        return self.dequantized(f"blk.{layer}.ffn_gate_inp.weight")


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
        raise ModelError(f"{path}: {key} differs across layers ({min(value)}..{max(value)}), "
                         f"which hobbit does not support")
    return value[0] if value else None


def read_args(reader, path: str) -> ModelArgs:
    arch = GGUFFile(path, reader, {}).check_architecture()
    spec = ARCHS[arch]
    k = lambda name, **kw: _uniform(_field(reader, f"{arch}.{name}", path=path, **kw),  # noqa: E731
                                    f"{arch}.{name}", path)
    n_embd = int(k("embedding_length"))
    n_head = int(k("attention.head_count"))
    head_dim = int(k("attention.key_length", default=n_embd // n_head))
    vocab = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(k("vocab_size", default=len(vocab.data) if vocab else 0))
    n_ctx_train = int(k("context_length"))
    scaling = k("rope.scaling.type", required=False)
    factor = float(k("rope.scaling.factor", default=1.0))
    if scaling not in (None, "none") and factor != 1.0:
        raise ModelError(f"{path}: RoPE scaling {scaling!r} (factor {factor:g}) is not supported")
    n_ff_dense = k("feed_forward_length", required=False)
    return ModelArgs(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=int(k("block_count")),
        n_head=n_head,
        n_head_kv=int(k("attention.head_count_kv", default=n_head)),
        head_dim=head_dim,
        n_ff=int(k("expert_feed_forward_length", default=0, required=False) or k("feed_forward_length")),
        n_ctx_train=n_ctx_train,
        rope_base=float(k("rope.freq_base", default=10000.0)),
        rope_dim=int(k("rope.dimension_count", default=head_dim)),
        rms_eps=float(k("attention.layer_norm_rms_epsilon")),
        n_expert=int(k("expert_count", default=0, required=False)),
        n_expert_used=int(k("expert_used_count", default=0, required=False)),
        rope_type=spec.rope,
        rope_attn_factor=float(k("rope.scaling.attn_factor", default=1.0)),
        n_ctx_orig=int(k("rope.scaling.original_context_length", default=n_ctx_train)),
        qk_norm=spec.qk_norm,
        scale_q_first=spec.scale_q_first,
        norm_weights=spec.norm_weights,
        # llama.cpp: the shared expert is as wide as the dense FFN unless the file says
        n_ff_shexp=int(k("expert_shared_feed_forward_length", default=0, required=False)
                       or n_ff_dense or 0) if spec.shared_expert else 0,
    )


def open_model(path: str) -> Weights:
    """Open and validate a GGUF model; raise ModelError naming the file and the reason."""
    f = open_gguf(path)
    w = Weights(f, read_args(f.reader, path))
    _check_tensors(w)
    return w


def _check_tensors(w: Weights) -> None:
    a = w.args
    spec = ARCHS[a.arch]
    if spec.moe and not a.is_moe:
        raise ModelError(f"{w.path}: a {a.arch} model needs {a.arch}.expert_count > 0")
    need = ["token_embd.weight", "output_norm.weight", *spec.global_tensors]
    for i in range(a.n_layer):
        names = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                 "attn_output.weight", "ffn_norm.weight", *spec.layer_tensors]
        if a.qk_norm:
            names += ["attn_q_norm.weight", "attn_k_norm.weight"]
        if a.is_moe:
            names += ["ffn_gate_inp.weight", "ffn_gate_exps.weight", "ffn_up_exps.weight",
                      "ffn_down_exps.weight"]
        else:
            names += ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
        if a.n_ff_shexp:
            names += ["ffn_gate_inp_shexp.weight", "ffn_gate_shexp.weight",
                      "ffn_up_shexp.weight", "ffn_down_shexp.weight"]
        need += [f"blk.{i}.{n}" for n in names]
    for name in need:
        if name not in w.tensors:
            raise ModelError(f"{w.path}: tensor {name} is missing")
        t = w.tensors[name].type
        if t not in ggml.WEIGHT_TYPES:
            raise ModelError(f"{w.path}: tensor {name} has type {ggml.type_name(t)}, "
                             f"which hobbit does not compute on")
    if a.is_moe and not 0 < a.n_expert_used <= a.n_expert:
        raise ModelError(f"{w.path}: expert_used_count {a.n_expert_used} is not in 1..{a.n_expert}")
    if a.n_head % a.n_head_kv:
        raise ModelError(f"{w.path}: head_count {a.n_head} is not a multiple of head_count_kv {a.n_head_kv}")
