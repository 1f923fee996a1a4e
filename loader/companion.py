"""The companion low-precision file: every expert of a model re-quantised to a smaller
type, made once by `hobbit-cli convert`, read by the daemon on low-precision misses.

File layout (little-endian):
  0   magic b"HOBBITLP"
  8   u32 format version
  12  u32 header length H
  16  u32 crc32 of the header
  20  header: UTF-8 JSON (source identity, types, slot format, per-expert crc32, data offset)
  ... zero padding to data_offset (a multiple of 4096)
  data_offset + (layer * E + expert) * slot_bytes: one expert laid out exactly as in a cache
  slot (three 4 KiB-aligned parts), so one aligned read fills one slot.

The header ties the file to its source GGUF (size, mtime, SHA-256 of the GGUF's metadata);
a changed GGUF makes the companion stale and it is refused. Every expert has a crc32 that
the reader checks before a slot is handed out. Written to a temp file, then renamed.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np

from ..compute import ggml
from ..protocol.errors import HobbitError, ModelError
from .layout import ExpertSource, SlotFormat, align, gguf_experts

MAGIC = b"HOBBITLP"
VERSION = 1
_HEAD = struct.Struct("<8sIII")


class CompanionError(ModelError):
    code = "bad_companion"


class StaleCompanionError(CompanionError):
    code = "stale_companion"


class ChecksumError(CompanionError):
    code = "checksum"


def source_identity(weights) -> dict:
    """Size, mtime and a hash of the GGUF's header (everything before the tensor data)."""
    st = os.stat(weights.path)
    data_start = min(t.offset for t in weights.tensors.values())
    h = hashlib.sha256(bytes(weights.reader.data[:data_start])).hexdigest()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": h}


def default_low_type(high_type: int, row_lengths) -> int:
    """Q4_0 for 8/16/32-bit experts; Q2_K for 4-bit ones where rows allow 256-blocks."""
    bits = ggml.type_size(high_type) * 8 / ggml.block_size(high_type)
    if bits > 6:
        return ggml.Q4_0
    return ggml.Q2_K if all(n % 256 == 0 for n in row_lengths) else ggml.Q4_0


def companion_path(gguf_path: str, low_type: int) -> str:
    """Next to the model if that folder is writable, else under the user's cache folder."""
    name = f"{os.path.basename(gguf_path)}.{ggml.type_name(low_type).lower()}.hobbit"
    here = os.path.join(os.path.dirname(os.path.abspath(gguf_path)), name)
    if os.path.exists(here) or os.access(os.path.dirname(here), os.W_OK):
        return here
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "hobbit", name)


def low_format(high: SlotFormat, low_type: int) -> SlotFormat:
    for shape in high.shapes:
        if shape[0] % ggml.block_size(low_type):
            raise HobbitError(f"cannot quantise experts to {ggml.type_name(low_type)}: rows of "
                              f"{shape[0]} values are not a multiple of its block of "
                              f"{ggml.block_size(low_type)}")
    nbytes = [ggml.row_size(low_type, s[0]) * s[1] for s in high.shapes]
    return SlotFormat.build([low_type] * 3, high.shapes, nbytes)


def convert(weights, low_type: int, out: str | None = None, progress: bool = True) -> str:
    """Write the companion file of `weights` (an open MoE GGUF) in `low_type`; return its path."""
    high = gguf_experts(weights)
    fmt = low_format(high.format, low_type)
    out = out or companion_path(weights.path, low_type)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    n_layer, n_exp = high.n_layer, high.n_expert
    crcs = [[0] * n_exp for _ in range(n_layer)]
    header = {"source": source_identity(weights), "source_name": os.path.basename(weights.path),
              "low_type": low_type, "n_layer": n_layer, "n_expert": n_exp,
              "format": fmt.to_wire(), "crc32": crcs}
    # the header's size does not depend on the crc values' digits once padded: reserve room
    reserve = len(json.dumps(header)) + 11 * n_layer * n_exp + 1024
    data_offset = align(_HEAD.size + reserve)
    tmp = f"{out}.tmp-{os.getpid()}"
    mm = weights.reader.data
    bar = _progress(n_layer * n_exp * high.expert_bytes, progress, f"convert to {ggml.type_name(low_type)}")
    try:
        with open(tmp, "wb") as f:
            f.truncate(data_offset + n_layer * n_exp * fmt.slot_bytes)
            f.seek(data_offset)
            slot = np.zeros(fmt.slot_bytes, np.uint8)
            for il in range(n_layer):
                for e in range(n_exp):
                    slot[:] = 0
                    for p, (off, n) in enumerate(high.ranges(il, e)):
                        shape = high.format.shapes[p]
                        x = ggml.dequantize(high.format.types[p], mm[off:off + n], shape[0] * shape[1])
                        q = ggml.quantize(low_type, x, shape[0])
                        o = fmt.part_offsets[p]
                        slot[o:o + q.size] = q
                    crcs[il][e] = zlib.crc32(slot)
                    f.write(slot.tobytes())
                    bar.update(high.expert_bytes)
            body = json.dumps({**header, "data_offset": data_offset}).encode()
            if _HEAD.size + len(body) > data_offset:
                raise AssertionError("companion header outgrew its reserved space")
            f.seek(0)
            f.write(_HEAD.pack(MAGIC, VERSION, len(body), zlib.crc32(body)) + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:
        _unlink(tmp)
        raise HobbitError(f"{out}: could not write the companion file ({e.strerror or e})") from None
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        bar.close()
    return out


def open_companion(weights, path: str) -> tuple[ExpertSource, list]:
    """Validate a companion file against its GGUF; return (source, crc32 table).
    Raises CompanionError (foreign, truncated, corrupt header) or StaleCompanionError."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size or head[:8] != MAGIC:
                raise CompanionError(f"{path}: not a hobbit companion file")
            _, version, n, crc = _HEAD.unpack(head)
            if version != VERSION:
                raise CompanionError(f"{path}: companion format version {version}, this hobbit "
                                     f"reads version {VERSION}; run hobbit-cli convert again")
            body = f.read(n)
    except FileNotFoundError:
        raise CompanionError(f"{path}: no such companion file (run hobbit-cli convert)") from None
    if len(body) != n or zlib.crc32(body) != crc:
        raise CompanionError(f"{path}: companion header is truncated or corrupt")
    h = json.loads(body)
    if h["source"] != source_identity(weights):
        raise StaleCompanionError(f"{path}: stale: {weights.path} changed after it was converted "
                                  "(run hobbit-cli convert again)")
    fmt = SlotFormat.from_wire(h["format"])
    n_layer, n_exp = h["n_layer"], h["n_expert"]
    need = h["data_offset"] + n_layer * n_exp * fmt.slot_bytes
    if os.path.getsize(path) < need:
        raise CompanionError(f"{path}: truncated: {os.path.getsize(path)} bytes, expected {need}")
    stride = n_exp * fmt.slot_bytes
    base = tuple(tuple(h["data_offset"] + il * stride + o for o in fmt.part_offsets)
                 for il in range(n_layer))
    # parts of one expert are one contiguous slot image: expert e is e*slot_bytes further on
    src = ExpertSource(path, "low", n_layer, n_exp, fmt, base, (fmt.slot_bytes,) * 3)
    return src, h["crc32"]


def slot_image_offset(src: ExpertSource, layer: int, expert: int) -> int:
    """File offset of one expert's whole slot image in a companion file."""
    return src.part_base[layer][0] + expert * src.format.slot_bytes


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled,
                leave=False)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass



def check_image(src: ExpertSource, crcs: list, layer: int, expert: int, address: int) -> None:
    """Raise ChecksumError unless the slot image at `address` matches the stored crc32."""
    import ctypes

    got = zlib.crc32((ctypes.c_char * src.format.slot_bytes).from_address(address))
    if got != crcs[layer][expert]:
        raise ChecksumError(f"{src.path}: checksum mismatch for layer {layer} expert {expert}: "
                            "the companion file is corrupt (run hobbit-cli convert again)")
