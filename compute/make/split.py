"""Splitting a GGUF into parts as llama.cpp's gguf-split does (`--split-max-size`), so the
suite and users can make the split files big models come as (loader/gguf_split.py).

What gguf-split writes, and so what `split_gguf` writes: the tensors in the source's
order, a new part when the next tensor (its size padded to 32 bytes, GGUF's default
alignment, whatever the file's) would take the current part's tensor bytes past SIZE — so
a part holds at least one tensor and a tensor larger than SIZE gets a part of its own,
except the very first, which gguf-split refuses ("one of splits have 0 tensors"); every
part carries split.no (u16, 0-based), split.count (u16) and split.tensors.count (i32); the
first part carries every metadata key of the source before them, later parts only the
three split keys (not even general.architecture). Parts are named PREFIX-00001-of-0000N.gguf.
"""

from __future__ import annotations

import os
import re

from ...loader.gguf_file import GGUFFile, open_gguf
from ...loader.gguf_split import SPLIT_COUNT, SPLIT_NO, SPLIT_TENSORS, split_path
from ...protocol.errors import InputError
from .gguf_writer import TensorEntry, copied_fields, write_gguf

GGUF_DEFAULT_ALIGNMENT = 32  # gguf-split pads each tensor's size to this when it plans


def parse_split_size(text: str) -> int:
    """gguf-split's --split-max-size: N followed by M or G, in decimal units (1M = 10^6
    bytes, as gguf-split counts), or N bytes. InputError otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*([MG]?)\s*", str(text), re.IGNORECASE)
    if not m or int(m[1]) == 0:
        raise InputError(f"--split-max-size {text!r}: give a size such as 2G or 500M")
    return int(m[1]) * {"": 1, "M": 10**6, "G": 10**9}[m[2].upper()]


def plan_parts(file: GGUFFile, max_bytes: int) -> list[list[str]]:
    """The tensor names of each part, in file order, by gguf-split's rule (module docstring)."""
    parts: list[list[str]] = [[]]
    size = 0
    for name, t in file.tensors.items():
        n = -(-t.nbytes // GGUF_DEFAULT_ALIGNMENT) * GGUF_DEFAULT_ALIGNMENT
        if size + n > max_bytes:
            if not parts[-1]:
                raise InputError(
                    f"--split-max-size {max_bytes} bytes: the first tensor, {name}, is {n} bytes; "
                    "gguf-split would leave a part with no tensor"
                )
            parts.append([])
            size = 0
        parts[-1].append(name)
        size += n
    return parts


def split_gguf(source: str, prefix: str, max_bytes: int, progress: bool = False) -> list[str]:
    """Write the GGUF at `source` as the parts PREFIX-0000i-of-0000N.gguf of at most about
    `max_bytes` of tensor data each (gguf-split --split-max-size); the paths written, the
    first part first. A single part is still named -00001-of-00001, as gguf-split names it.
    Each part is written to a temporary file and renamed."""
    import gguf

    src = open_gguf(source)
    parts = plan_parts(src, max_bytes)
    paths = [split_path(prefix, i, len(parts)) for i in range(len(parts))]
    written: list[str] = []
    try:
        for i, (path, names) in enumerate(zip(paths, parts)):
            tmp = f"{path}.tmp-{os.getpid()}"
            w = gguf.GGUFWriter(tmp, src.arch)
            try:
                if i == 0:
                    for key, value, vtype, sub in copied_fields(src.reader, _copied):
                        if key == "general.alignment":  # the writer pads to it only when told so
                            w.add_custom_alignment(int(value))
                        else:
                            w.add_key_value(key, value, vtype, sub)
                else:
                    del w.kv_data[0]["general.architecture"]  # only the split keys
                w.add_uint16(SPLIT_NO, i)
                w.add_uint16(SPLIT_COUNT, len(parts))
                w.add_int32(SPLIT_TENSORS, len(src.tensors))
            except BaseException:
                w.close()
                raise
            entries = [TensorEntry(n, src.tensors[n].type, src.tensors[n].shape, src.tensors[n].nbytes) for n in names]
            label = f"{os.path.basename(path)}" if progress else ""
            write_gguf(w, entries, lambda e: [src.data(e.name)], label, progress, "split")
            os.replace(tmp, path)
            written.append(path)
    except OSError as e:
        raise InputError(f"{prefix}: cannot write the parts ({e.strerror or e})") from None
    finally:
        for path in paths:
            tmp = f"{path}.tmp-{os.getpid()}"
            if os.path.exists(tmp):
                os.remove(tmp)
    return written


def _copied(key: str) -> bool:
    """Metadata copied into the first part: the source's, but the reader's own GGUF.* keys,
    the architecture the writer adds first, and split keys (written anew)."""
    return not key.startswith(("GGUF.", "split.")) and key != "general.architecture"
