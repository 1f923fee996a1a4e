"""A fast GGUF header reader: the metadata and tensor table of a GGUF file in tens of
milliseconds, with the subset of gguf-py's GGUFReader interface hobbit uses.

gguf-py's reader makes a numpy view per array element, so a 49k-token vocabulary (SmolLM2's,
copied into every synthetic and default model) took ~3 s of CPU per open, paid by every
hobbitd start and every client. This one walks the header with struct and decodes a string
array in one pass. Interface: `fields` (an ordered dict key -> Field with `types`, `data`
(one entry per element; `len()` is the array's length) and `contents()`, as gguf-py gives
them), `tensors` (name, tensor_type, shape in ggml order, n_elements, n_bytes, data_offset
absolute), `path`, `data` (a read-only numpy memmap of the whole file), `alignment`, `data_offset`.
Malformed headers raise ValueError (or EOFError / struct.error for a truncated one).
"""

from __future__ import annotations

import struct
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType

from .identity import identity

_SCALARS = {  # value type -> (struct format, numpy dtype)
    GGUFValueType.UINT8: ("<B", np.uint8),
    GGUFValueType.INT8: ("<b", np.int8),
    GGUFValueType.UINT16: ("<H", np.uint16),
    GGUFValueType.INT16: ("<h", np.int16),
    GGUFValueType.UINT32: ("<I", np.uint32),
    GGUFValueType.INT32: ("<i", np.int32),
    GGUFValueType.FLOAT32: ("<f", np.float32),
    GGUFValueType.UINT64: ("<Q", np.uint64),
    GGUFValueType.INT64: ("<q", np.int64),
    GGUFValueType.FLOAT64: ("<d", np.float64),
    GGUFValueType.BOOL: ("<?", np.bool_),
}
_SUPPORTED_VERSIONS = (2, 3)


class Field:
    """One metadata key: `types` ([type] or [ARRAY, element type]), `contents()` the value
    (str, int, float, bool, or a list of them), `data` one entry per element."""

    __slots__ = ("name", "types", "_value", "data")

    def __init__(self, name: str, types: list, value, n: int):
        self.name, self.types, self._value = name, types, value
        self.data = range(n)

    def contents(self):
        v = self._value
        if isinstance(v, np.ndarray):
            return v.tolist()
        return list(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple  # ggml order (ne0 first)
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute, in the file


class GGUFHeaderReader:
    def __init__(self, path: str):
        self.path = path
        self.identity = identity(path)  # before the mmap: a change after it shows as another
        self.data = np.memmap(path, mode="r")
        buf = self.data.data  # a memoryview of the mapping
        self._buf, self._size = buf, len(buf)
        magic, version = struct.unpack_from("<4sI", buf, 0)
        if magic != b"GGUF":
            raise ValueError("GGUF magic invalid")
        if version not in _SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        self.fields: OrderedDict[str, Field] = OrderedDict()
        for name, value, t in (
            ("GGUF.version", version, GGUFValueType.UINT32),
            ("GGUF.tensor_count", n_tensors, GGUFValueType.UINT64),
            ("GGUF.kv_count", n_kv, GGUFValueType.UINT64),
        ):
            self.fields[name] = Field(name, [t], value, 1)
        off = 24
        for _ in range(n_kv):
            key, off = self._str(off)
            (raw,), off = struct.unpack_from("<I", buf, off), off + 4
            types, value, n, off = self._value(GGUFValueType(raw), off)
            if key in self.fields:
                raise ValueError(f"duplicate metadata key {key}")
            self.fields[key] = Field(key, types, value, n)
        infos = []
        for _ in range(n_tensors):
            name, off = self._str(off)
            (n_dims,), off = struct.unpack_from("<I", buf, off), off + 4
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off)
            off += 8 * n_dims
            raw, rel = struct.unpack_from("<IQ", buf, off)
            off += 12
            infos.append((name, GGMLQuantizationType(raw), tuple(int(d) for d in dims), rel))
        align = self.fields.get("general.alignment")
        self.alignment = GGUF_DEFAULT_ALIGNMENT
        if align is not None:
            if align.types != [GGUFValueType.UINT32]:
                raise ValueError("bad type for general.alignment")
            self.alignment = align.contents()
            if self.alignment == 0 or self.alignment & (self.alignment - 1):
                raise ValueError("invalid alignment: must be a non-zero power of two")
        self.data_offset = off + (-off % self.alignment)
        self.tensors: list[Tensor] = []
        seen = set()
        for name, qtype, dims, rel in infos:
            if name in seen:
                raise ValueError(f"duplicated tensor {name}")
            seen.add(name)
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            block, size = GGML_QUANT_SIZES[qtype]
            self.tensors.append(Tensor(name, qtype, dims, n, n * size // block, self.data_offset + rel))

    def _str(self, off: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self._buf, off)
        end = off + 8 + n
        if end > self._size:
            raise EOFError("string past the end of the file")
        return str(self._buf[off + 8 : end], "utf-8"), end

    def _value(self, t: GGUFValueType, off: int):
        """(types, value, number of elements, offset after it) of a value of type t at off."""
        if t == GGUFValueType.STRING:
            s, off = self._str(off)
            return [t], s, 1, off
        if t in _SCALARS:
            fmt, _ = _SCALARS[t]
            (v,) = struct.unpack_from(fmt, self._buf, off)
            return [t], v, 1, off + struct.calcsize(fmt)
        if t == GGUFValueType.ARRAY:
            sub, n = struct.unpack_from("<IQ", self._buf, off)
            sub = GGUFValueType(sub)
            off += 12
            if sub == GGUFValueType.STRING:
                items, buf, size, unpack = [], self._buf, self._size, struct.unpack_from
                for _ in range(n):
                    (k,) = unpack("<Q", buf, off)
                    end = off + 8 + k
                    if end > size:
                        raise EOFError("string past the end of the file")
                    items.append(str(buf[off + 8 : end], "utf-8"))
                    off = end
                return [t, sub], items, n, off
            if sub in _SCALARS:
                _, dtype = _SCALARS[sub]
                arr = np.frombuffer(self._buf, dtype=np.dtype(dtype).newbyteorder("<"), count=n, offset=off)
                return [t, sub], arr, n, off + arr.nbytes
            if sub == GGUFValueType.ARRAY:  # nested arrays: flattened, as gguf-py does
                types = [t, sub]
                values: list = []
                for i in range(n):
                    ts, v, _, off = self._value(sub, off)
                    types = [t] + ts if i == 0 else types
                    values += v if isinstance(v, list) else v.tolist()
                return types, values, len(values), off
        raise ValueError(f"unknown GGUF value type {t}")
