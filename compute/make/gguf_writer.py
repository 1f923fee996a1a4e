"""Writing a GGUF tensor by tensor (moefy's MoE, synth's random models) with gguf's
GGUFWriter, never holding more than one piece of one tensor in memory.

`copied_fields(reader, keep)` reads metadata to copy from another GGUF; `add_sampling(writer,
settings)` adds a model's recommended sampling (general.sampling.*); `write_gguf(writer,
tensors, pieces, ...)` writes a writer that holds the metadata: the tensor table, then each
tensor's bytes as `pieces(tensor)` yields them, laid out as GGUFWriter.write_tensors_to_file
lays them (aligned start, each tensor padded to the alignment), and closes it. A tensor
whose bytes are not the size its entry says is a ModelError.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...protocol.errors import ModelError
from ..engine.sampling import MODEL_KEYS, SamplingSettings
from ..progress import progress_bar


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the table: name, ggml type, shape ne (ggml order), size in bytes."""

    name: str
    type: int
    ne: tuple
    nbytes: int


def copied_fields(reader, keep) -> list:
    """[(key, value, type, sub_type)] of the reader's metadata keys for which keep(key)."""
    from gguf import GGUFValueType

    out = []
    for key, f in reader.fields.items():
        if keep(key):
            sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
            out.append((key, f.contents(), f.types[0], sub))
    return out


def add_sampling(writer, s: SamplingSettings) -> None:
    """The general.sampling.* keys of the fields s sets, in the types llama.cpp's converter
    writes (gguf's add_sampling_*): the defaults chat, generate and serve (and llama.cpp) take."""
    for key, name in MODEL_KEYS.items():  # gguf's writer has add_sampling_<key> for each
        value = getattr(s, name)
        if value is not None:
            getattr(writer, "add_sampling_" + key.rsplit(".", 1)[1])(value)
    # penalty_freq and penalty_present: no general.sampling key holds them (llama.cpp has none)


def write_gguf(writer, tensors: list, pieces, bar: str = "", progress: bool = False, what: str = "gguf") -> None:
    """Write the table of `tensors` (TensorEntry) and their data, pieces(entry) yielding
    each one's bytes (numpy arrays) in order; a bar titled `bar` counts the bytes."""
    import gguf

    try:
        for t in tensors:
            # shape in numpy order; a dtype other than uint8 with raw_dtype means "in elements"
            writer.add_tensor_info(
                t.name, t.ne[::-1], np.dtype(np.float32), t.nbytes, raw_dtype=gguf.GGMLQuantizationType(t.type)
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        f = writer.fout[0]
        writer.write_padding(f, f.tell())
        with progress_bar(sum(t.nbytes for t in tensors), bar, progress, "B") as b:
            for t in tensors:
                n = 0
                for data in pieces(t):
                    data = np.ascontiguousarray(data)
                    data.tofile(f)
                    n += data.nbytes
                    b.update(data.nbytes)
                if n != t.nbytes:
                    raise ModelError(f"{what}: {t.name} came out as {n} bytes, expected {t.nbytes}")
                writer.write_padding(f, n)
    finally:
        writer.close()
