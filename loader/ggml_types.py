"""ggml tensor types and their sizes, from the gguf package's tables (no libggml needed).

The daemon plans slots and reads bytes; it never computes, so it learns how large a row of
a quantised type is from gguf's GGML_QUANT_SIZES (block size, bytes per block) rather than
from libggml. tests/test_ggml_binding.py checks these tables against libggml itself.
"""

from __future__ import annotations

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# enum ggml_type (append-only in ggml, so the numbers are stable)
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K = 10, 11, 12, 13, 14, 15
I8, I16, I32, I64, BF16 = 24, 25, 26, 27, 30
IQ4_NL, IQ4_XS, MXFP4 = 20, 23, 39

TYPES_BY_NAME = {t.name: int(t) for t in GGMLQuantizationType}


def block_size(t: int) -> int:
    """Values per block of type t (1 for plain types)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(t)][0]


def type_size(t: int) -> int:
    """Bytes per block of type t."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(t)][1]


def row_size(t: int, n: int) -> int:
    """Bytes of a row of n values of type t (n a multiple of the block size)."""
    return type_size(t) * n // block_size(t)


def type_name(t: int) -> str:
    try:
        return GGMLQuantizationType(t).name
    except ValueError:
        return f"type {t}"


def bits_per_weight(t: int) -> float:
    return type_size(t) * 8 / block_size(t)
