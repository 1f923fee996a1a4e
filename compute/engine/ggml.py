"""ctypes binding over the libggml shipped inside llama-cpp-python.

Every C function we call is declared here, with argtypes and restype, and nowhere
else. Tensors are plain `ggml_tensor` structs; a weight tensor is created in a
no-alloc context and its `data` pointer set to memory we own (an mmapped GGUF, a
shared-memory slot), so ggml computes on it in place without a copy.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int, c_int32, c_int64, c_size_t, c_void_p

# ggml types and their sizes come from gguf's tables (the daemon needs them without libggml)
from ...loader.ggml_types import (
    BF16,
    F16,
    F32,
    I32,
    I64,
    IQ4_NL,
    IQ4_XS,
    MXFP4,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    row_size,
    type_name,
)

# re-exported for compute/make/ (`x as x` marks a re-export for linters and type checkers)
from ...loader.ggml_types import TYPES_BY_NAME as TYPES_BY_NAME, block_size as block_size, type_size as type_size

MAX_DIMS = 4
MAX_SRC = 10
MAX_OP_PARAMS = 64
MAX_NAME = 64

# Weight types our matmuls are tested on (see tests/test_ggml_binding.py).
WEIGHT_TYPES = (
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    IQ4_NL,
    IQ4_XS,
    MXFP4,
)  # the last three: llama.cpp's IQ4_* and MXFP4_MOE mixes

ROPE_NORMAL, ROPE_NEOX = 0, 2
PREC_F32 = 10


class Tensor(ctypes.Structure):
    _fields_ = [
        ("type", c_int),
        ("buffer", c_void_p),
        ("ne", c_int64 * MAX_DIMS),
        ("nb", c_size_t * MAX_DIMS),
        ("op", c_int),
        ("op_params", c_int32 * (MAX_OP_PARAMS // 4)),
        ("flags", c_int32),
        ("src", c_void_p * MAX_SRC),
        ("view_src", c_void_p),
        ("view_offs", c_size_t),
        ("data", c_void_p),
        ("name", ctypes.c_char * MAX_NAME),
        ("extra", c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, c_void_p, c_void_p, c_int64)


class TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", c_char_p),
        ("blck_size", c_int64),
        ("blck_size_interleave", c_int64),
        ("type_size", c_size_t),
        ("is_quantized", c_bool),
        ("to_float", c_void_p),
        ("from_float_ref", c_void_p),
    ]


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", c_size_t), ("mem_buffer", c_void_p), ("no_alloc", c_bool)]


T = POINTER(Tensor)
CTX = c_void_p
GRAPH = c_void_p

# name: (restype, [argtypes])
_SIGNATURES = {
    # context and tensors
    "ggml_init": (CTX, [InitParams]),
    "ggml_free": (None, [CTX]),
    "ggml_tensor_overhead": (c_size_t, []),
    "ggml_graph_overhead_custom": (c_size_t, [c_size_t, c_bool]),
    "ggml_new_tensor_1d": (T, [CTX, c_int, c_int64]),
    "ggml_new_tensor_2d": (T, [CTX, c_int, c_int64, c_int64]),
    "ggml_new_tensor_3d": (T, [CTX, c_int, c_int64, c_int64, c_int64]),
    "ggml_new_tensor_4d": (T, [CTX, c_int, c_int64, c_int64, c_int64, c_int64]),
    "ggml_set_name": (T, [T, c_char_p]),
    "ggml_set_input": (None, [T]),
    "ggml_set_output": (None, [T]),
    "ggml_nbytes": (c_size_t, [T]),
    "ggml_blck_size": (c_int64, [c_int]),
    "ggml_type_size": (c_size_t, [c_int]),
    "ggml_row_size": (c_size_t, [c_int, c_int64]),
    "ggml_type_name": (c_char_p, [c_int]),
    # views
    "ggml_view_2d": (T, [CTX, T, c_int64, c_int64, c_size_t, c_size_t]),
    "ggml_view_3d": (T, [CTX, T, c_int64, c_int64, c_int64, c_size_t, c_size_t, c_size_t]),
    "ggml_reshape_2d": (T, [CTX, T, c_int64, c_int64]),
    "ggml_reshape_3d": (T, [CTX, T, c_int64, c_int64, c_int64]),
    "ggml_reshape_4d": (T, [CTX, T, c_int64, c_int64, c_int64, c_int64]),
    "ggml_cont": (T, [CTX, T]),
    "ggml_concat": (T, [CTX, T, T, c_int]),
    "ggml_permute": (T, [CTX, T, c_int, c_int, c_int, c_int]),
    # ops
    "ggml_add": (T, [CTX, T, T]),
    "ggml_mul": (T, [CTX, T, T]),
    "ggml_div": (T, [CTX, T, T]),
    "ggml_sub": (T, [CTX, T, T]),
    "ggml_scale": (T, [CTX, T, c_float]),
    "ggml_clamp": (T, [CTX, T, c_float, c_float]),
    "ggml_fill": (T, [CTX, T, c_float]),
    "ggml_sum_rows": (T, [CTX, T]),
    "ggml_cumsum": (T, [CTX, T]),
    "ggml_sigmoid": (T, [CTX, T]),
    "ggml_swiglu_split": (T, [CTX, T, T]),
    "ggml_reglu_split": (T, [CTX, T, T]),
    "ggml_swiglu_oai": (T, [CTX, T, T, c_float, c_float]),
    "ggml_add_id": (T, [CTX, T, T, T]),
    "ggml_rms_norm": (T, [CTX, T, c_float]),
    "ggml_mul_mat": (T, [CTX, T, T]),
    "ggml_mul_mat_id": (T, [CTX, T, T, T]),
    "ggml_get_rows": (T, [CTX, T, T]),
    "ggml_set_rows": (T, [CTX, T, T, T]),
    "ggml_soft_max": (T, [CTX, T]),
    "ggml_argsort_top_k": (T, [CTX, T, c_int]),
    "ggml_rope_ext": (T, [CTX, T, T, T, c_int, c_int, c_int, c_float, c_float, c_float, c_float, c_float, c_float]),
    "ggml_flash_attn_ext": (T, [CTX, T, T, T, T, c_float, c_float, c_float]),
    "ggml_flash_attn_ext_add_sinks": (None, [T, T]),
    "ggml_prec_set_acc": (None, [T, c_int]),
    # graphs
    "ggml_new_graph_custom": (GRAPH, [CTX, c_size_t, c_bool]),
    "ggml_build_forward_expand": (None, [GRAPH, T]),
    # quantisation
    "ggml_quantize_chunk": (c_size_t, [c_int, c_void_p, c_void_p, c_int64, c_int64, c_int64, c_void_p]),
    "ggml_quantize_requires_imatrix": (c_bool, [c_int]),
    "ggml_get_type_traits": (POINTER(TypeTraits), [c_int]),
    # allocation and the CPU backend
    "ggml_gallocr_new": (c_void_p, [c_void_p]),
    "ggml_gallocr_free": (None, [c_void_p]),
    "ggml_gallocr_alloc_graph": (c_bool, [c_void_p, GRAPH]),
    "ggml_gallocr_get_buffer_size": (c_size_t, [c_void_p, c_int]),
    "ggml_get_first_tensor": (T, [CTX]),
    "ggml_get_next_tensor": (T, [CTX, T]),
    "ggml_backend_cpu_buffer_type": (c_void_p, []),
    "ggml_backend_cpu_init": (c_void_p, []),
    "ggml_backend_cpu_set_n_threads": (None, [c_void_p, c_int]),
    "ggml_backend_graph_compute": (c_int, [c_void_p, GRAPH]),
    "ggml_backend_free": (None, [c_void_p]),
    "ggml_log_set": (None, [c_void_p, c_void_p]),
    # the CPU backend's extra buffer types (its weight repacking; engine/repack.py)
    "ggml_backend_cpu_reg": (c_void_p, []),
    "ggml_backend_reg_dev_get": (c_void_p, [c_void_p, c_size_t]),
    "ggml_backend_reg_get_proc_address": (c_void_p, [c_void_p, c_char_p]),
    "ggml_backend_buft_name": (c_char_p, [c_void_p]),
    "ggml_backend_buft_alloc_buffer": (c_void_p, [c_void_p, c_size_t]),
    "ggml_backend_buffer_free": (None, [c_void_p]),
    "ggml_backend_buffer_init_tensor": (c_int, [c_void_p, T]),
    "ggml_backend_tensor_set": (None, [T, c_void_p, c_size_t, c_size_t]),
}

# ggml_prec_set_acc is newer than some releases; keep the set of optional names explicit.
_OPTIONAL = {"ggml_prec_set_acc"}


def library_dir() -> str:
    """The folder holding llama-cpp-python's shared libraries (libggml*.so)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("llama-cpp-python is not installed; hobbit needs its libggml")
    return os.path.join(spec.submodule_search_locations[0], "lib")


class _Lib:
    """All declared functions as attributes: `lib.ggml_mul_mat(ctx, a, b)`."""

    def __init__(self) -> None:
        d = library_dir()
        handles = []
        for name in ("libggml-base.so", "libggml-cpu.so", "libggml.so"):
            path = os.path.join(d, name)
            if os.path.exists(path):
                handles.append(ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL))
        if not handles:
            raise ImportError(f"no libggml found in {d}")
        for fname, (restype, argtypes) in _SIGNATURES.items():
            fn = None
            for h in handles:
                fn = getattr(h, fname, None)
                if fn is not None:
                    break
            if fn is None:
                if fname in _OPTIONAL:
                    continue
                raise ImportError(f"{fname} missing from libggml in {d}")
            fn.restype = restype
            fn.argtypes = argtypes
            setattr(self, fname, fn)
        # ggml prints through its logger; route it to nothing unless debugging.
        if not os.environ.get("HOBBIT_GGML_LOG"):
            self._log_cb = ctypes.CFUNCTYPE(None, c_int, c_char_p, c_void_p)(lambda *a: None)
            self.ggml_log_set(ctypes.cast(self._log_cb, c_void_p), None)


lib = _Lib()


def quantize(t: int, src, n_per_row: int) -> bytes:
    """Quantise a float32 numpy array (rows of n_per_row) to ggml type t, through ggml."""
    import numpy as np

    src = np.ascontiguousarray(src, dtype=np.float32)
    nrows = src.size // n_per_row
    out = np.empty(row_size(t, n_per_row) * nrows, dtype=np.uint8)
    n = lib.ggml_quantize_chunk(t, src.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None)
    return out[:n]


def dequantize(t: int, raw, n: int):
    """n float32 values from raw bytes of ggml type t, through ggml's own to_float."""
    import numpy as np

    raw = np.ascontiguousarray(raw)
    out = np.empty(n, dtype=np.float32)
    if t == F32:
        out[:] = raw.view(np.float32)[:n]
        return out
    fn = lib.ggml_get_type_traits(t).contents.to_float
    if not fn:
        raise ValueError(f"ggml cannot convert {type_name(t)} to float")
    _TO_FLOAT(fn)(raw.ctypes.data, out.ctypes.data, n)
    return out


class Context:
    """A ggml context holding tensor and graph metadata only (no_alloc): data lives elsewhere."""

    def __init__(self, n_tensors: int, graph_size: int = 0) -> None:
        size = n_tensors * lib.ggml_tensor_overhead()
        if graph_size:
            size += lib.ggml_graph_overhead_custom(graph_size, False)
        self.ptr = lib.ggml_init(InitParams(size, None, True))
        if not self.ptr:
            raise MemoryError("ggml_init failed")

    def tensor(self, t: int, shape, name: str | None = None, data: int | None = None):
        """A new tensor of ggml type t; shape in ggml order (ne0 first, the contiguous axis)."""
        fn = (None, lib.ggml_new_tensor_1d, lib.ggml_new_tensor_2d, lib.ggml_new_tensor_3d, lib.ggml_new_tensor_4d)[
            len(shape)
        ]
        x = fn(self.ptr, t, *shape)
        if name:
            lib.ggml_set_name(x, name.encode()[: MAX_NAME - 1])
        if data is not None:
            x.contents.data = data
        return x

    def free(self) -> None:
        if self.ptr:
            lib.ggml_free(self.ptr)
            self.ptr = None

    def __del__(self) -> None:
        self.free()


_NUMPY_TYPES = {F32: "float32", F16: "float16", I32: "int32", I64: "int64"}


def array(t, shape=None):
    """A numpy view of contiguous tensor t's data, flat or in `shape` (numpy order: the
    last axis is ne0). The view does not own the memory: it is valid while the tensor's
    buffer is (a graph's allocator, a mapping)."""
    import numpy as np

    x = t.contents
    dtype = np.dtype(_NUMPY_TYPES[x.type])
    n = 1
    for d in range(MAX_DIMS):
        n *= x.ne[d]
    buf = (ctypes.c_char * (n * dtype.itemsize)).from_address(x.data)
    view = np.frombuffer(buf, dtype)
    return view if shape is None else view.reshape(shape)


def physical_cores() -> int:
    """Default thread count: physical cores (hyper-threads do not help memory-bound matmuls)."""
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1
