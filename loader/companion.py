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

The repacked image (`hobbit-cli convert --repack`, issue #30) is the same format with
"kind": "repacked" in its header: the GGUF's own experts, each part ggml repacks on the
CPU that made it in ggml's repacked layout (its SlotFormat's layer_repacked), the others
as they are, laid out exactly as a high-precision slot (layer_shifts included). hobbitd
serves high precision from it; the format code here is the one for both.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import replace

from ..protocol.errors import HobbitError, ModelError
from . import ggml_types as gt
from .calibration import calib_path, load_calibration
from .layout import PARTS, ExpertSource, SlotFormat, align

MAGIC = b"HOBBITLP"
LOW_KIND, REPACKED_KIND = "low", "repacked"  # the header's "kind" (absent: low)
VERSION = 3  # 2: per-layer expert types in the slot format; 3: its parts (biases)
_HEAD = struct.Struct("<8sIII")


class CompanionError(ModelError):
    code = "bad_companion"


class StaleCompanionError(CompanionError):
    code = "stale_companion"


class ChecksumError(CompanionError):
    code = "checksum"


def source_identity(weights) -> dict:
    """Size, mtime and a hash of the GGUF's header (everything before the tensor data); of
    a split model: its files' total size, their latest mtime and a hash of every header."""
    if len(weights.paths) == 1:
        st = os.stat(weights.path)
        data_start = min(t.offset for t in weights.tensors.values())
        h = hashlib.sha256(bytes(weights.reader.data[:data_start])).hexdigest()
        return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "header_sha256": h}
    stats = [os.stat(p) for p in weights.paths]
    sha = hashlib.sha256()
    for r in weights.readers:
        sha.update(bytes(r.data[: r.data_offset]))
    return {
        "size": sum(st.st_size for st in stats),
        "mtime_ns": max(st.st_mtime_ns for st in stats),
        "header_sha256": sha.hexdigest(),
    }


MIN_SAVING = 1.5  # a companion must be this many times smaller than every layer's experts


# Companion types, best first: by bench companions' measurement (BENCHMARKS.md) Q4_K diverges
# less than Q4_0 at the same bytes, and Q3_K about 3.4x less than Q2_K for 1.3x the bytes.
LOW_TYPES = (gt.Q4_K, gt.Q4_0, gt.Q3_K, gt.Q2_K)


def low_type_choices(high: SlotFormat) -> list[int]:
    """LOW_TYPES that suit experts of format `high`, best first: whose blocks fit the rows
    and which are at least MIN_SAVING times smaller than every layer's experts (a mix is
    judged by its smallest type, so every layer shrinks)."""
    return _suitable(high, LOW_TYPES, MIN_SAVING)


# The types calibration measures as a file's low precision (issue #34), best first: every
# one whose blocks fit the rows and which saves at least MIN_CANDIDATE_SAVING (Q8_0 -> Q6_K
# is 1.3x); calibration keeps the one that models the fewest bytes read within its KLD bound.
CANDIDATE_TYPES = (gt.Q6_K, gt.Q5_K, gt.Q5_0, gt.Q4_K, gt.IQ4_NL, gt.Q4_0, gt.Q3_K, gt.Q2_K)
MIN_CANDIDATE_SAVING = 1.25


def low_type_candidates(high: SlotFormat) -> list[int]:
    """CANDIDATE_TYPES that suit experts of format `high` (blocks fit every row, at least
    MIN_CANDIDATE_SAVING times smaller than the smallest of its types), best first."""
    return _suitable(high, CANDIDATE_TYPES, MIN_CANDIDATE_SAVING)


def _suitable(high: SlotFormat, types: tuple, saving: float) -> list[int]:
    """The types of `types` (in order) whose blocks fit every row of `high`'s weight parts
    and which are at least `saving` times smaller than the smallest of its types."""
    bits = min(gt.bits_per_weight(t) for t in high.type_set)
    return [
        low
        for low in types
        if all(shape[0] % gt.block_size(low) == 0 for shape in high.shapes[: len(PARTS)])
        and bits / gt.bits_per_weight(low) >= saving
    ]


def default_low_type(high: SlotFormat) -> int | None:
    """The companion type for experts of format `high`, or None when no type is at least
    MIN_SAVING times smaller: Q4_K (Q4_0 where rows are not 256-blocks) for 8/16/32-bit
    experts, Q3_K for 5- and 6-bit ones, Q2_K for 4-bit ones (K-quant mixes, IQ4, MXFP4),
    none for 2- and 3-bit ones."""
    choices = low_type_choices(high)
    return choices[0] if choices else None


def made_companion(gguf_path: str, high: SlotFormat) -> str | None:
    """The companion hobbitd serves when no type is named: the one calibration chose last
    (its calibration says "chosen"; the newest such file), else the best suitable type that
    exists (the one `convert` makes by default, else another made earlier); None."""
    types = dict.fromkeys([*low_type_choices(high), *low_type_candidates(high)])
    made = [p for p in (companion_path(gguf_path, low) for low in types) if os.path.exists(p)]
    chosen = [p for p in made if (load_calibration(p) or {}).get("chosen")]
    if chosen:
        return max(chosen, key=lambda p: os.stat(calib_path(p)).st_mtime_ns)
    defaults = [p for p in (companion_path(gguf_path, low) for low in low_type_choices(high)) if p in made]
    return defaults[0] if defaults else None


def auto_low_type(high: SlotFormat, path: str) -> int:
    """default_low_type, or ModelError naming the file when there is none."""
    low = default_low_type(high)
    if low is None:
        names = "/".join(gt.type_name(t) for t in high.type_set)
        raise ModelError(
            f"{path}: its {names} experts have no type {MIN_SAVING:g}x smaller to "
            "convert to; hobbitd serves them in high precision (or give --low TYPE)"
        )
    return low


def companion_path(gguf_path: str, low_type: int) -> str:
    """Next to the model if that folder is writable, else under the user's cache folder."""
    return _image_path(gguf_path, gt.type_name(low_type).lower())


def repacked_path(gguf_path: str) -> str:
    """Where the repacked image of a model's experts is (made), as companion_path."""
    return _image_path(gguf_path, REPACKED_KIND)


def _image_path(gguf_path: str, tag: str) -> str:
    name = f"{os.path.basename(gguf_path)}.{tag}.hobbit"
    here = os.path.join(os.path.dirname(os.path.abspath(gguf_path)), name)
    if os.path.exists(here) or os.access(os.path.dirname(here), os.W_OK):
        return here
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(cache, "hobbit", name)


def low_format(high: SlotFormat, low_type: int) -> SlotFormat:
    """The companion's slot format: the weight matrices in low_type, the expert biases (if
    any) as they are, F32 (a few KiB per expert)."""
    n = len(PARTS)
    for shape in high.shapes[:n]:
        if shape[0] % gt.block_size(low_type):
            raise HobbitError(
                f"cannot quantise experts to {gt.type_name(low_type)}: rows of "
                f"{shape[0]} values are not a multiple of its block of "
                f"{gt.block_size(low_type)}"
            )
    nbytes = [gt.row_size(low_type, s[0]) * s[1] for s in high.shapes[:n]]
    return SlotFormat.build(
        high.shapes,
        [[low_type] * n + list(t[n:]) for t in high.layer_types],
        [nbytes + list(b[n:]) for b in high.layer_nbytes],
        high.parts,
    )


def header_bytes(header: dict) -> bytes:
    """The file's first bytes for a header dict (which must hold `data_offset`)."""
    body = json.dumps(header).encode()
    if _HEAD.size + len(body) > header["data_offset"]:
        raise ValueError("companion header outgrew its reserved space")
    return _HEAD.pack(MAGIC, VERSION, len(body), zlib.crc32(body)) + body


def data_offset_for(header: dict) -> int:
    """Where expert data starts for a header whose crc32 table is still zeros: room for
    the header once every crc has its full ten digits, page-aligned."""
    n = header["n_layer"] * header["n_expert"]
    return align(_HEAD.size + len(json.dumps(header)) + 11 * n + 1024)


def open_companion(weights, path: str) -> tuple[ExpertSource, list]:
    """Validate a companion file against its GGUF; return (source, crc32 table).
    Raises CompanionError (foreign, truncated, corrupt header) or StaleCompanionError."""
    return _open_slot_file(weights, path, LOW_KIND, "low")


def open_repacked(weights, path: str, high: ExpertSource) -> tuple[ExpertSource, list]:
    """Validate a repacked image (the GGUF's experts in ggml's repacked layout, made by
    `hobbit-cli convert --repack`) against its GGUF, whose experts are `high`; return (source,
    crc32 table), its format high's with layer_repacked set. Raises CompanionError or
    StaleCompanionError, as open_companion."""
    src, crcs = _open_slot_file(weights, path, REPACKED_KIND, "high")
    if replace(src.format, layer_repacked=()) != high.format:
        raise StaleCompanionError(
            f"{path}: stale: its experts' layout is not {weights.path}'s (run hobbit-cli convert --repack again)"
        )
    return src, crcs


def _open_slot_file(weights, path: str, kind: str, precision: str) -> tuple[ExpertSource, list]:
    """A slot-image file of `kind` (its header's "kind", absent in companions) validated
    against its GGUF: its ExpertSource in `precision` and its crc32 table."""
    what = "repacked image" if kind == REPACKED_KIND else "companion file"
    again = "hobbit-cli convert" + (" --repack" if kind == REPACKED_KIND else "")
    try:
        with open(path, "rb") as f:
            head = f.read(_HEAD.size)
            if len(head) < _HEAD.size or head[:8] != MAGIC:
                raise CompanionError(f"{path}: not a hobbit {what}")
            _, version, n, crc = _HEAD.unpack(head)
            if version != VERSION:
                raise CompanionError(
                    f"{path}: {what} format version {version}, this hobbit reads version {VERSION}; run {again} again"
                )
            body = f.read(n)
    except FileNotFoundError:
        raise CompanionError(f"{path}: no such {what} (run {again})") from None
    if len(body) != n or zlib.crc32(body) != crc:
        raise CompanionError(f"{path}: {what} header is truncated or corrupt")
    h = json.loads(body)
    if h.get("kind", LOW_KIND) != kind:
        raise CompanionError(f"{path}: not a {what}")
    if h["source"] != source_identity(weights):
        raise StaleCompanionError(f"{path}: stale: {weights.path} changed after it was converted (run {again} again)")
    fmt = SlotFormat.from_wire(h["format"])
    n_layer, n_exp = h["n_layer"], h["n_expert"]
    need = h["data_offset"] + n_layer * n_exp * fmt.slot_bytes
    if os.path.getsize(path) < need:
        raise CompanionError(f"{path}: truncated: {os.path.getsize(path)} bytes, expected {need}")
    stride = n_exp * fmt.slot_bytes
    base = tuple(tuple(h["data_offset"] + il * stride + o for o in fmt.offsets(il)) for il in range(n_layer))
    # parts of one expert are one contiguous slot image: expert e is e*slot_bytes further on
    src = ExpertSource(path, precision, n_layer, n_exp, fmt, base, ((fmt.slot_bytes,) * len(fmt.parts),) * n_layer)
    return src, h["crc32"]


def slot_image_offset(src: ExpertSource, layer: int, expert: int) -> int:
    """File offset of one expert's whole slot image in a companion file or repacked image."""
    return src.part_base[layer][0] - src.format.offsets(layer)[0] + expert * src.format.slot_bytes


def check_image(src: ExpertSource, crcs: list, layer: int, expert: int, address: int) -> None:
    """Raise ChecksumError unless the slot image at `address` matches the stored crc32."""
    import ctypes

    got = zlib.crc32((ctypes.c_char * src.format.slot_bytes).from_address(address))
    if got != crcs[layer][expert]:
        raise ChecksumError(
            f"{src.path}: checksum mismatch for layer {layer} expert {expert}: "
            + (
                "the repacked image is corrupt (run hobbit-cli convert --repack again)"
                if src.precision == "high"
                else "the companion file is corrupt (run hobbit-cli convert again)"
            )
        )
