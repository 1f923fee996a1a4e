"""A GGUF model file: its hyper-parameters (ModelArgs) and its tensors, mmapped in place.

`open_model(path)` validates the file up front and raises ModelError with one line that
names the file and the reason: missing, not a GGUF, truncated, unsupported architecture.
Tensor data is never copied: `Weights.address(name)` points into the read-only shared
mmap, so every process running the same file shares its pages through the page cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..protocol.errors import ModelError
from . import ggml

SUPPORTED_ARCHS = ("llama",)
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a llama-family model, dense (n_expert = 0) or MoE."""
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

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 0

    @property
    def n_embd_kv(self) -> int:
        return self.n_head_kv * self.head_dim


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: int            # ggml type
    shape: tuple         # ggml order: ne0 (contiguous) first
    offset: int          # absolute byte offset in the file
    nbytes: int


class Weights:
    """An open GGUF file: metadata, tensor table, and the shared read-only mmap."""

    def __init__(self, path: str, reader, args: ModelArgs, tensors: dict[str, TensorInfo]):
        self.path = path
        self.reader = reader
        self.args = args
        self.tensors = tensors
        self._base = reader.data.ctypes.data

    def has(self, name: str) -> bool:
        return name in self.tensors

    def address(self, name: str) -> int:
        return self._base + self.tensors[name].offset

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()


def _field(reader, key, default=None, required=True, path=""):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise ModelError(f"{path}: GGUF metadata key {key!r} is missing")
        return default
    return f.contents()


def read_args(reader, path: str) -> ModelArgs:
    arch = _field(reader, "general.architecture", path=path)
    if arch not in SUPPORTED_ARCHS:
        raise ModelError(f"{path}: architecture {arch!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    k = lambda name, **kw: _field(reader, f"{arch}.{name}", path=path, **kw)  # noqa: E731
    n_embd = int(k("embedding_length"))
    n_head = int(k("attention.head_count"))
    head_dim = int(k("attention.key_length", default=n_embd // n_head))
    vocab = reader.fields.get("tokenizer.ggml.tokens")
    n_vocab = int(k("vocab_size", default=len(vocab.data) if vocab else 0))
    return ModelArgs(
        arch=arch,
        n_vocab=n_vocab,
        n_embd=n_embd,
        n_layer=int(k("block_count")),
        n_head=n_head,
        n_head_kv=int(k("attention.head_count_kv", default=n_head)),
        head_dim=head_dim,
        n_ff=int(k("expert_feed_forward_length", default=0, required=False) or k("feed_forward_length")),
        n_ctx_train=int(k("context_length")),
        rope_base=float(k("rope.freq_base", default=10000.0)),
        rope_dim=int(k("rope.dimension_count", default=head_dim)),
        rms_eps=float(k("attention.layer_norm_rms_epsilon")),
        n_expert=int(k("expert_count", default=0, required=False)),
        n_expert_used=int(k("expert_used_count", default=0, required=False)),
    )


def open_model(path: str) -> Weights:
    """Open and validate a GGUF model; raise ModelError naming the file and the reason."""
    from gguf import GGUFReader  # deferred: importing gguf costs ~0.2 s

    if not os.path.exists(path):
        raise ModelError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelError(f"{path}: is a directory, not a GGUF file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
    try:
        reader = GGUFReader(path, "r")
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
        raise ModelError(f"{path}: unreadable GGUF header ({e or type(e).__name__}); "
                         "the file is truncated or corrupt") from None
    args = read_args(reader, path)

    tensors: dict[str, TensorInfo] = {}
    for t in reader.tensors:
        ttype = int(t.tensor_type)
        shape = tuple(int(x) for x in t.shape)
        info = TensorInfo(t.name, ttype, shape, int(t.data_offset), int(t.n_bytes))
        if info.offset + info.nbytes > size:
            raise ModelError(f"{path}: truncated: tensor {t.name} ends at byte "
                             f"{info.offset + info.nbytes}, file has {size}")
        tensors[t.name] = info
    w = Weights(path, reader, args, tensors)
    _check_tensors(w)
    return w


def _check_tensors(w: Weights) -> None:
    a = w.args
    need = ["token_embd.weight", "output_norm.weight"]
    for i in range(a.n_layer):
        need += [f"blk.{i}.{n}.weight" for n in
                 ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm")]
        if a.is_moe:
            need += [f"blk.{i}.{n}.weight" for n in
                     ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")]
        else:
            need += [f"blk.{i}.{n}.weight" for n in ("ffn_gate", "ffn_up", "ffn_down")]
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


def tensor_array(w: Weights, name: str) -> np.ndarray:
    """Raw bytes of one tensor as a read-only uint8 view of the mmap (no copy)."""
    t = w.tensors[name]
    return w.reader.data[t.offset:t.offset + t.nbytes]
