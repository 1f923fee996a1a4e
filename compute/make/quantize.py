"""Quantise a GGUF with llama.cpp's own quantizer (llama-quantize), as the files people
download were made.

`quantize_gguf(src, dst, ftype_name)` runs `llama_model_quantize` from llama-cpp-python on
src (typically an F16 file) and writes dst with llama.cpp's mix for that file type: not one
type throughout (Q4_K_M, for one, gives ffn_down Q6_K on some layers, attn_v Q8_0 on
8-expert models, output Q6_K), see tests/test_quantized.py for the rules checked.
`make_quantized(path, opts, ftype_name)` does it to a synthetic model (make/synth.py).

Contract:
- ftype_name is one of FTYPES (case-insensitive); another name raises InputError, one
  line listing the known names.
- dst appears atomically (DST.tmp-PID, then renamed); on failure nothing is left at dst.
- A nonzero return from the quantizer (unreadable src, a type needing an imatrix, ...)
  raises ModelError naming src; an unwritable dst raises InputError naming it.
- llama.cpp's log on fd 2 is silenced unless HOBBIT_GGML_LOG is set.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from ...protocol.errors import InputError, ModelError
from ..engine.ggml import physical_cores
from ..engine.tokenizer import quiet_stderr
from .synth import SynthOptions, make_synthetic

# Our name -> the LLAMA_FTYPE_MOSTLY_* (or ALL_*) suffix in llama_cpp; names as
# llama-quantize spells them.
FTYPES = {
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q8_0": "MOSTLY_Q8_0",
    "Q6_K": "MOSTLY_Q6_K",
    "Q5_K_M": "MOSTLY_Q5_K_M",
    "Q5_K_S": "MOSTLY_Q5_K_S",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q4_K_M": "MOSTLY_Q4_K_M",
    "Q4_K_S": "MOSTLY_Q4_K_S",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q3_K_L": "MOSTLY_Q3_K_L",
    "Q3_K_M": "MOSTLY_Q3_K_M",
    "Q3_K_S": "MOSTLY_Q3_K_S",
    "Q2_K": "MOSTLY_Q2_K",
    "IQ4_XS": "MOSTLY_IQ4_XS",
    "IQ4_NL": "MOSTLY_IQ4_NL",
    "MXFP4_MOE": "MOSTLY_MXFP4_MOE",
}


def ftype_value(name: str) -> int:
    """The llama_ftype number for one of FTYPES; InputError for another name."""
    import llama_cpp

    key = name.upper()
    if key not in FTYPES:
        raise InputError(f"unknown quantization type {name!r} (known: {' '.join(FTYPES)})")
    return int(getattr(llama_cpp, "LLAMA_FTYPE_" + FTYPES[key]))


def quantize_gguf(src: str, dst: str, ftype_name: str, threads: int = 0) -> None:
    """Write dst, src quantised by llama.cpp to ftype_name (see the module contract).
    threads: 0 = the physical cores."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_value(ftype_name)
    params.nthread = threads or physical_cores()
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        try:  # llama.cpp writes dst itself: find an unwritable place before it starts
            open(tmp, "wb").close()
        except OSError as e:
            raise InputError(f"{dst}: cannot write ({e.strerror or e})") from None
        with quiet_stderr():
            rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
        if rc != 0:
            raise ModelError(
                f"{src}: llama.cpp could not quantize it to {ftype_name.upper()} "
                f"(return code {rc}; HOBBIT_GGML_LOG=1 shows its log)"
            )
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_quantized(path: str, opts: SynthOptions, ftype_name: str, progress: bool = False) -> None:
    """A synthetic model (compute/make/synth.py) as llama.cpp quantises it: written F16
    next to path, quantised to ftype_name into path, the F16 file removed. opts.type is
    ignored (the source is F16)."""
    ftype_value(ftype_name)  # an unknown name, or no place to write, fails before minutes of writing
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
