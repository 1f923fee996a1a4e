"""ggml's CPU weight repacking on memory we own.

llama.cpp's CPU backend copies some weight types, at load, into an "extra buffer type"
(CPU_REPACK) in an interleaved layout (rows in groups of 8: Q4_0, Q4_K, IQ4_NL, MXFP4 on
AVX2; Q2_K on AVX512), and its matmuls read a weight in that layout with other kernels
(gemv/gemm over 8 rows at once) when the weight's buffer is of that type: ggml-cpu looks
at op->src[0]->buffer->buft and takes the kernels from tensor->extra, which the buffer's
init_tensor sets. The layout is a permutation of the same blocks: the same bytes per
expert, and a stacked tensor's experts stay independent (8 divides every expert's rows).

So we never reimplement the layout: Repacker.repack lets ggml write the repacked bytes
of a tensor straight to an address of ours (the buffer's set_tensor writes to
tensor->data, wherever that is), and Repacker.mark makes a view of ours (a pool view, a
weight over our copy) look like it lives in such a buffer, so that the graph computes
it with the repacked kernels. The buffer itself holds nothing.
"""

from __future__ import annotations

import ctypes

from . import ggml
from .ggml import lib

REPACK_BUFT = b"CPU_REPACK"
_EXTRA_BUFTS = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)


def _repack_buft():
    """ggml-cpu's CPU_REPACK buffer type, or None where this libggml has none (built
    without GGML_CPU_REPACK)."""
    reg = lib.ggml_backend_cpu_reg()
    fn = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
    if not fn:
        return None
    bufts = _EXTRA_BUFTS(fn)(lib.ggml_backend_reg_dev_get(reg, 0))
    i = 0
    while bufts[i]:
        if lib.ggml_backend_buft_name(bufts[i]) == REPACK_BUFT:
            return bufts[i]
        i += 1
    return None


class Repacker:
    """A CPU_REPACK buffer that owns no weights (64 bytes: a zero-sized buffer would have
    no set_tensor), and scratch tensors to repack through."""

    def __init__(self) -> None:
        buft = _repack_buft()
        self.buffer = lib.ggml_backend_buft_alloc_buffer(buft, 64) if buft else None
        self._ctx = ggml.Context(64)
        self._scratch: dict = {}  # (type, shape) -> marked tensor, or None: not repacked

    def mark(self, t) -> bool:
        """Make tensor t (its data ours, in the repacked layout) computed with the repacked
        kernels: True, or False (t unchanged) where ggml repacks no tensor of its type and
        shape on this CPU. A view t keeps the mark when re-pointed (data, ne of the slot
        dimension); ggml chose the kernels from type and ne[1] only."""
        if self.buffer is None:
            return False
        x = t.contents
        old = x.buffer, x.extra
        x.buffer = self.buffer
        lib.ggml_backend_buffer_init_tensor(self.buffer, t)
        if not x.extra:
            x.buffer, x.extra = old
            return False
        return True

    def repacks(self, t: int, shape) -> bool:
        """Whether ggml repacks a tensor of ggml type t and shape (ggml order) on this CPU."""
        key = (t, tuple(shape))
        if key not in self._scratch:
            x = self._ctx.tensor(t, shape)
            self._scratch[key] = x if self.mark(x) else None
        return self._scratch[key] is not None

    def repack(self, t: int, shape, src: int, dst: int) -> bool:
        """Write the repacked layout of the tensor of ggml type t and shape (ggml order)
        whose file bytes are at address src to address dst (nbytes, the same size; src and
        dst must not overlap). False (nothing written) where ggml repacks no such tensor.
        One Repacker per thread: its scratch tensors are re-pointed at each call."""
        if not self.repacks(t, shape):
            return False
        x = self._scratch[(t, tuple(shape))]
        x.contents.data = dst
        lib.ggml_backend_tensor_set(x, src, 0, lib.ggml_nbytes(x))
        return True

    def copy(self, t):
        """Point weight tensor t at a repacked copy of its data, marked (mark): the copy
        (numpy, anonymous memory; t views it while it lives), or None (t unchanged) where
        ggml repacks no tensor like t. Not for a tensor read by get_rows (an embedding):
        only the matmul kernels read the repacked layout."""
        import numpy as np

        x = t.contents
        shape = tuple(x.ne[d] for d in range(ggml.MAX_DIMS) if d < 2 or x.ne[d] > 1)
        n = lib.ggml_nbytes(t)
        raw = np.empty(n + 64, np.uint8)
        dst = raw[-raw.ctypes.data % 64 :][:n]
        if not self.repack(x.type, shape, x.data, dst.ctypes.data):
            return None
        x.data = dst.ctypes.data
        assert self.mark(t)
        return dst

    def free(self) -> None:
        """Only once nothing marked by this Repacker is computed on any more: a marked
        tensor's buffer is read at every compute."""
        if self.buffer:
            lib.ggml_backend_buffer_free(self.buffer)
            self.buffer = None
        self._ctx.free()


_shared: Repacker | None = None


def shared() -> Repacker:
    """The process's Repacker for weights that live as long as it does (never freed)."""
    global _shared
    if _shared is None:
        _shared = Repacker()
    return _shared


def repack_weights(tensors: dict, stacked: set) -> list:
    """Point the matmul weights among tensors (name -> tensor) at repacked copies where
    ggml repacks them: the 2-D ones (mul_mat) and those named in `stacked` (the routed
    experts, 3-D, mul_mat_id). Not a 3-D weight mul_mat reads (ggml's repacked mul_mat
    takes 2-D only) nor one get_rows reads: the caller leaves the embedding out. Returns
    the copies, which the tensors view: keep them while the tensors are computed on."""
    rp, copies = shared(), []
    for name, t in tensors.items():
        x = t.contents
        two_d = all(x.ne[d] == 1 for d in range(2, ggml.MAX_DIMS))
        if two_d or name in stacked:
            copy = rp.copy(t)
            if copy is not None:
                copies.append(copy)
    return copies
