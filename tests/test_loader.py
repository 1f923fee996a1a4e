"""Expert store, companion file and I/O engine on real files."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from hobbit.compute.engine import ggml
from hobbit.compute.engine.weights import open_model
from hobbit.compute.make.convert import convert
from hobbit.loader import companion
from hobbit.loader.io_engine import DEMAND, PREFETCH, IOEngine
from hobbit.loader.layout import PAGE, gguf_experts
from hobbit.loader.shm import Segment, new_name

SMALL = dict(layers=2, d_model=256, d_ff=512, experts=4, top_k=2, heads=4, kv_heads=2, type="Q8_0")


def _buffer(nbytes):
    """Page-aligned scratch memory (an anonymous shm segment, as the daemon uses)."""
    seg = Segment(new_name("hobbit-test"), nbytes, create=True)
    return seg


def _read_all(engine, segments, verify=None):
    done = threading.Event()
    result = {}

    def finish(job, err):
        result["err"] = err
        done.set()

    engine.submit(("k", id(segments)), segments, DEMAND, finish, verify)
    assert done.wait(30)
    return result["err"]


@pytest.mark.parametrize("direct", [True, False])
def test_io_engine_reads_expert_parts_into_slots_exactly(synth, direct):
    w = open_model(synth(**SMALL))
    src = gguf_experts(w)
    fmt = src.format
    seg = _buffer(fmt.slot_bytes)
    engine = IOEngine(2, direct=direct)
    try:
        # at the page-aligned start of each part's room (a part that starts mid-page in the
        # file is moved after its direct read), then where the slot format puts it (read in
        # place: this model's experts are whole pages, so each part's shift is its tensor's)
        assert any(x for shifts in fmt.layer_shifts for x in shifts)
        for in_place, where in ((False, lambda layer: fmt.part_offsets), (True, fmt.offsets)):
            moved = engine.moved_bytes
            for layer, e in [(0, 0), (1, 3), (0, 2)]:
                segs = [(src.path, off, n, seg.address + o) for (off, n), o in zip(src.ranges(layer, e), where(layer))]
                assert _read_all(engine, segs) is None
                for (off, n), o in zip(src.ranges(layer, e), where(layer)):
                    assert seg.array[o : o + n].tobytes() == bytes(w.reader.data[off : off + n])
            if direct and engine.direct_reads:
                assert (engine.moved_bytes == moved) == in_place
        if direct:
            assert engine.direct_reads > 0 or not os.path.exists("/proc")  # tmpfs may refuse
    finally:
        engine.close()
        seg.close()


@pytest.mark.parametrize("direct", [True, False])
def test_io_engine_merges_reads_that_touch_and_fills_each_slot_exactly(synth, direct):
    w = open_model(synth(**SMALL))
    src = gguf_experts(w)
    fmt = src.format
    experts = [(0, 0), (0, 1), (0, 3), (1, 0)]  # (0, 0) and (0, 1) touch in each tensor
    seg = _buffer(fmt.slot_bytes * len(experts))
    engine = IOEngine(2, direct=direct)
    errors, done = {}, threading.Event()

    def finish(job, err):
        errors[job.key] = err
        if len(errors) == len(experts):
            done.set()

    try:
        engine.plug()  # queued together, as one request's misses are
        for i, key in enumerate(experts):
            base = seg.address + i * fmt.slot_bytes
            engine.submit(
                key,
                [(src.path, off, n, base + fmt.part_offsets[p]) for p, (off, n) in enumerate(src.ranges(*key))],
                DEMAND,
                finish,
            )
        engine.unplug()
        assert done.wait(30) and set(errors.values()) == {None}
        for i, key in enumerate(experts):
            for p, (off, n) in enumerate(src.ranges(*key)):
                o = i * fmt.slot_bytes + fmt.part_offsets[p]
                assert seg.array[o : o + n].tobytes() == bytes(w.reader.data[off : off + n]), (key, p)
        assert engine.reads < 3 * len(experts)  # 12 parts, fewer reads
    finally:
        engine.close()
        seg.close()


def test_io_engine_fails_every_job_of_a_merged_read_of_a_truncated_file(synth, tmp_path):
    w = open_model(synth(**SMALL))
    src = gguf_experts(w)
    cut = tmp_path / "cut.gguf"
    last = src.ranges(1, 3)[-1]
    cut.write_bytes(bytes(w.reader.data[: last[0] + last[1] // 2]))  # ends inside (1, 3)'s down
    fmt = src.format
    seg = _buffer(fmt.slot_bytes * 2)
    engine = IOEngine(1, direct=False)
    errors, done = {}, threading.Event()

    def finish(job, err):
        errors[job.key] = err
        if len(errors) == 2:
            done.set()

    try:
        engine.plug()
        for i, key in enumerate([(1, 2), (1, 3)]):
            base = seg.address + i * fmt.slot_bytes
            engine.submit(
                key,
                [(str(cut), off, n, base + fmt.part_offsets[p]) for p, (off, n) in enumerate(src.ranges(*key))],
                DEMAND,
                finish,
            )
        engine.unplug()
        assert done.wait(30)
        assert all(isinstance(e, EOFError) for e in errors.values()), errors
    finally:
        engine.close()
        seg.close()


def test_io_engine_serves_demand_before_prefetch(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(PAGE * 64))
    seg = _buffer(PAGE * 64 * 2)
    engine = IOEngine(1, bytes_per_s=PAGE * 64 * 20, direct=False)  # slow enough to queue
    order = []
    lock = threading.Lock()
    all_done = threading.Event()

    def finish(job, err):
        with lock:
            order.append(job.key)
            if len(order) == 6:
                all_done.set()

    try:
        for i in range(5):
            engine.submit(f"prefetch{i}", [(str(path), 0, PAGE * 8, seg.address + i * PAGE * 9)], PREFETCH, finish)
        engine.submit("demand", [(str(path), 0, PAGE * 8, seg.address + 5 * PAGE * 9)], DEMAND, finish)
        assert all_done.wait(30)
        # the first prefetch may already be running; the demand overtakes all queued ones
        assert order.index("demand") <= 1
    finally:
        engine.close()
        seg.close()


def test_companion_holds_requantised_experts(synth, tmp_path):
    w = open_model(synth(**SMALL))
    out = convert(w, ggml.Q4_0, out=str(tmp_path / "c.hobbit"), progress=False)
    src, crcs = companion.open_companion(w, out)
    high = gguf_experts(w)
    data = np.fromfile(out, dtype=np.uint8)
    for layer, e in [(0, 0), (1, 3)]:
        for p, (off, n) in enumerate(high.ranges(layer, e)):
            shape = high.format.shapes[p]
            x = ggml.dequantize(high.format.types(layer)[p], w.reader.data[off : off + n], shape[0] * shape[1])
            want = ggml.quantize(ggml.Q4_0, x, shape[0])
            loff, ln = src.ranges(layer, e)[p]
            assert ln == want.size and data[loff : loff + ln].tobytes() == want.tobytes()
            assert loff % PAGE == 0


def test_companion_checksum_catches_a_flipped_byte(synth, tmp_path):
    w = open_model(synth(**SMALL))
    out = convert(w, ggml.Q4_0, out=str(tmp_path / "c.hobbit"), progress=False)
    src, crcs = companion.open_companion(w, out)
    off = companion.slot_image_offset(src, 1, 2)
    with open(out, "r+b") as f:
        f.seek(off + 100)
        b = f.read(1)
        f.seek(off + 100)
        f.write(bytes([b[0] ^ 0x40]))
    seg = _buffer(src.format.slot_bytes)
    engine = IOEngine(1)
    try:
        good = companion.slot_image_offset(src, 0, 0)
        ok = _read_all(
            engine,
            [(out, good, src.format.slot_bytes, seg.address)],
            lambda job: companion.check_image(src, crcs, 0, 0, seg.address),
        )
        assert ok is None
        err = _read_all(
            engine,
            [(out, off, src.format.slot_bytes, seg.address)],
            lambda job: companion.check_image(src, crcs, 1, 2, seg.address),
        )
        assert isinstance(err, companion.ChecksumError) and "layer 1 expert 2" in str(err)
    finally:
        engine.close()
        seg.close()


def test_companion_of_a_changed_gguf_is_refused_as_stale(synth, tmp_path):
    import shutil

    model = tmp_path / "m.gguf"
    shutil.copy(synth(**SMALL), model)
    out = convert(open_model(str(model)), ggml.Q4_0, progress=False)
    assert out.startswith(str(tmp_path))
    companion.open_companion(open_model(str(model)), out)  # fresh: accepted
    os.utime(model, ns=(os.stat(model).st_atime_ns, os.stat(model).st_mtime_ns + 10**9))
    with pytest.raises(companion.StaleCompanionError, match="stale"):
        companion.open_companion(open_model(str(model)), out)


def test_companion_truncated_or_foreign_is_refused(synth, tmp_path):
    w = open_model(synth(**SMALL))
    out = convert(w, ggml.Q4_0, out=str(tmp_path / "c.hobbit"), progress=False)
    with open(out, "r+b") as f:
        f.truncate(os.path.getsize(out) - PAGE)
    with pytest.raises(companion.CompanionError, match="truncated"):
        companion.open_companion(w, out)
    foreign = tmp_path / "foreign.hobbit"
    foreign.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(companion.CompanionError, match="not a hobbit companion"):
        companion.open_companion(w, str(foreign))


def test_convert_on_a_full_disk_fails_cleanly(synth, tmp_path):
    """ENOSPC mid-write: one clear error, and neither a partial nor a temp file is left."""
    import subprocess

    from hobbit.protocol.errors import HobbitError

    w = open_model(synth(**SMALL))
    disk = tmp_path / "tiny"
    disk.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root to mount a tiny tmpfs as a full disk")
    try:
        with pytest.raises(HobbitError, match="could not write the companion file"):
            convert(w, ggml.Q4_0, out=str(disk / "c.hobbit"), progress=False)
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_fast_header_reader_reads_what_gguf_py_reads(smollm2, synth):
    """loader.gguf_reader against gguf-py's GGUFReader: the same keys in order, value types,
    values and element counts, and the same tensor table, on SmolLM2 (49k-token vocabulary,
    merges, a chat template) and a synthetic MoE (stacked 3-D experts)."""
    import gguf

    from hobbit.loader.gguf_reader import GGUFHeaderReader

    for path in (smollm2, synth(arch="qwen3moe", layers=2, type="Q4_0")):
        ours, ref = GGUFHeaderReader(path), gguf.GGUFReader(path, "r")
        assert list(ours.fields) == list(ref.fields)
        for key, f in ref.fields.items():
            g = ours.fields[key]
            assert g.types == f.types and len(g.data) == len(f.data), key
            assert g.contents() == f.contents() and type(g.contents()) is type(f.contents()), key
        assert ours.data_offset == ref.data_offset and len(ours.tensors) == len(ref.tensors)
        for a, b in zip(ours.tensors, ref.tensors):
            assert (a.name, a.tensor_type, a.shape, a.n_elements, a.n_bytes, a.data_offset) == (
                b.name,
                b.tensor_type,
                tuple(int(d) for d in b.shape),
                b.n_elements,
                b.n_bytes,
                b.data_offset,
            ), a.name


def test_a_watched_file_changes_with_its_bytes_not_with_its_metadata(tmp_path):
    """loader/identity.py: a chmod (ctime alone) is no change; a write is one, also when its
    mtime is put back by hand (the sampled digest then differs); a rename over the path is one."""
    from hobbit.loader.identity import WatchedFile

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(range(256)) * 1024)
    w = WatchedFile(str(path))
    os.chmod(path, 0o600)
    assert not w.changed()
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"\xff" * 16)  # in the header the digest reads
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert w.changed()
    w = WatchedFile(str(path))
    other = tmp_path / "g.bin"
    other.write_bytes(path.read_bytes())
    os.replace(other, path)
    assert w.changed()
