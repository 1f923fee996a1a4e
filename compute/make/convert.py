"""`hobbit-cli convert`: write a model's low-precision companion file (loader/companion.py
defines the format and reads it), or with --repack its repacked image (the same format).
Each expert is dequantised and re-quantised (or repacked) through libggml, laid out as in a
cache slot, and checksummed; the file is written to a temp name,
synced, then renamed, so a crash leaves no half-written companion."""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from ...loader.companion import (
    REPACKED_KIND,
    companion_path,
    data_offset_for,
    header_bytes,
    low_format,
    repacked_path,
    source_identity,
)
from ...loader.layout import PARTS, gguf_experts
from ...protocol.errors import HobbitError, InputError
from ..engine import ggml
from ..engine.ggml import lib
from ..progress import progress_bar


def convert(weights, low_type: int, out: str | None = None, progress: bool = True, threads: int | None = None) -> str:
    """Write the companion file of `weights` (an open MoE GGUF) in `low_type`; return its
    path. threads: experts converted at once (None: every physical core)."""
    if low_type not in ggml.WEIGHT_TYPES or low_type in (ggml.F32, ggml.F16, ggml.BF16):
        raise InputError(
            f"cannot convert experts to {ggml.type_name(low_type)}: not a quantised "
            "type hobbit computes on (try Q4_0, Q4_K, Q3_K, Q2_K)"
        )
    if lib.ggml_quantize_requires_imatrix(low_type):
        raise InputError(
            f"cannot convert experts to {ggml.type_name(low_type)}: it needs an "
            "importance matrix (try Q4_0, Q4_K, Q3_K, Q2_K)"
        )
    high = gguf_experts(weights)
    fmt = low_format(high.format, low_type)
    out = out or companion_path(weights.path, low_type)
    n_layer, n_exp = high.n_layer, high.n_expert
    crcs = [[0] * n_exp for _ in range(n_layer)]
    header = {
        "source": source_identity(weights),
        "source_name": os.path.basename(weights.path),
        "low_type": low_type,
        "n_layer": n_layer,
        "n_expert": n_exp,
        "format": fmt.to_wire(),
        "crc32": crcs,
    }
    maps = dict(zip(weights.paths, (r.data for r in weights.readers)))  # a split model's parts
    bar = progress_bar(high.total_bytes, f"convert to {ggml.type_name(low_type)}", enabled=progress, unit="B")

    def one(key: tuple[int, int]) -> np.ndarray:
        """Expert (il, e) laid out as its slot: ggml's (de)quantisers run outside the GIL,
        so experts convert on every core at once."""
        il, e = key
        slot = np.zeros(fmt.slot_bytes, np.uint8)
        for p, (off, n) in enumerate(high.ranges(il, e)):
            mm = maps[high.file_of(il, p)]
            if p < len(PARTS):  # a weight matrix: re-quantised
                shape = high.format.shapes[p]
                x = ggml.dequantize(high.format.types(il)[p], mm[off : off + n], shape[0] * shape[1])
                q = ggml.quantize(low_type, x, shape[0])
            else:  # an expert bias: copied, F32
                q = mm[off : off + n]
            slot[fmt.part_offsets[p] : fmt.part_offsets[p] + q.size] = q
        return slot

    return write_slots(high, fmt, header, one, out, bar, threads, "companion file")


def convert_repacked(weights, out: str | None = None, progress: bool = True, threads: int | None = None) -> str:
    """Write the repacked image of `weights` (an open MoE GGUF): its experts' parts that
    ggml repacks on this CPU in ggml's repacked layout (engine/repack.py: ggml writes
    them), the others copied as they are, each expert laid out as its high-precision slot;
    return its path. threads: experts repacked at once (None: every physical core)."""
    from ..engine.repack import Repacker

    high = gguf_experts(weights)
    hf = high.format
    probe = Repacker()
    try:  # the same (type, shape) repacks the same way in every expert of a layer's part
        flags = [
            [p < len(PARTS) and probe.repacks(hf.types(il)[p], hf.shapes[p]) for p in range(len(hf.parts))]
            for il in range(high.n_layer)
        ]
    finally:
        probe.free()
    fmt = replace(hf, layer_repacked=tuple(tuple(f) for f in flags))
    out = out or repacked_path(weights.path)
    maps = dict(zip(weights.paths, (r.data for r in weights.readers)))
    local = threading.local()  # a Repacker per thread: its scratch tensors are re-pointed per call
    made: list = []

    def one(key: tuple[int, int]) -> np.ndarray:
        """Expert (il, e) as its slot, repacked parts written by ggml (outside the GIL)."""
        il, e = key
        if not hasattr(local, "rp"):
            local.rp = Repacker()
            made.append(local.rp)
        slot = np.zeros(fmt.slot_bytes, np.uint8)
        for p, ((off, n), at) in enumerate(zip(high.ranges(il, e), fmt.offsets(il))):
            part = maps[high.file_of(il, p)][off : off + n]
            if flags[il][p]:
                src = np.ascontiguousarray(part)
                assert local.rp.repack(hf.types(il)[p], hf.shapes[p], src.ctypes.data, slot[at:].ctypes.data)
            else:
                slot[at : at + n] = part
        return slot

    header = {
        "kind": REPACKED_KIND,
        "source": source_identity(weights),
        "source_name": os.path.basename(weights.path),
        "n_layer": high.n_layer,
        "n_expert": high.n_expert,
        "format": fmt.to_wire(),
        "crc32": [[0] * high.n_expert for _ in range(high.n_layer)],
    }
    bar = progress_bar(high.total_bytes, "repack", enabled=progress, unit="B")
    try:
        return write_slots(high, fmt, header, one, out, bar, threads, "repacked image")
    finally:
        for rp in made:
            rp.free()


def write_slots(high, fmt, header: dict, one, out: str, bar, threads: int | None, what: str) -> str:
    """Write a slot-image file (loader/companion.py's format) of every expert of `high`:
    one(key) makes expert (layer, expert)'s slot (uint8, fmt.slot_bytes) on `threads` at
    once; the crc32 of each goes into header["crc32"]. Written to a temp name, synced, then
    renamed, so a crash leaves no half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    n_layer, n_exp = high.n_layer, high.n_expert
    crcs = header["crc32"]
    data_offset = data_offset_for(header)
    tmp = f"{out}.tmp-{os.getpid()}"
    keys = [(il, e) for il in range(n_layer) for e in range(n_exp)]
    threads = threads or ggml.physical_cores()
    window = 4 * threads  # experts converted ahead of the writer, at most
    try:
        with open(tmp, "wb") as f, ThreadPoolExecutor(threads) as pool:
            f.truncate(data_offset + n_layer * n_exp * fmt.slot_bytes)
            f.seek(data_offset)
            for start in range(0, len(keys), window):
                batch = keys[start : start + window]
                for (il, e), slot in zip(batch, pool.map(one, batch)):
                    crcs[il][e] = zlib.crc32(slot)
                    f.write(slot.tobytes())
                    bar.update(high.expert_bytes(il))
            f.seek(0)
            f.write(header_bytes({**header, "data_offset": data_offset}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        bar.close(done=True)
    except OSError as e:
        _unlink(tmp)
        raise HobbitError(f"{out}: could not write the {what} ({e.strerror or e})") from None
    except BaseException:
        _unlink(tmp)
        raise
    finally:
        bar.close()
    return out


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
