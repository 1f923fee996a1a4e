"""The expert cache in-process (loader/cache.py): no daemon, no ZeroMQ, but real shared
memory, a real GGUF and the I/O engine's real reader threads. Hits and misses, pins,
eviction under each policy, a cancelled prefetch, and reads that fail (a truncated source,
a corrupt companion) without the cache ever serving their slot."""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
from contextlib import contextmanager

import pytest

from hobbit.loader import companion
from hobbit.loader.cache import ExpertCache
from hobbit.loader.io_engine import IOEngine
from hobbit.loader.served import ModelOptions, open_served_all, plan_cache
from hobbit.loader.precision import HIGH, LOW
from hobbit.loader.shm import Segment, new_name
from hobbit.protocol.errors import RequestError

OWNER, OTHER = 1, 2


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A synthetic MoE of 2 layers x 4 experts (~420 KiB each: Q8_0, 256 x 512) with a
    256-token vocabulary: the cache never reads the vocabulary, and parsing SmolLM2's 49k
    tokens would take seconds per open. (conftest's `synth` fixture names its files after
    the options, which a vocab_from path cannot be part of: so make_synthetic directly.)"""
    import gguf

    from hobbit.compute.make.synth import SynthOptions, make_synthetic

    folder = tmp_path_factory.mktemp("model")
    vocab = str(folder / "vocab.gguf")
    w = gguf.GGUFWriter(vocab, "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(256)])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    path = str(folder / "m.gguf")
    make_synthetic(path, SynthOptions(layers=2, experts=4, vocab_from=vocab))
    return path


@contextmanager
def cache_of(path, slots=4, slot_wait=0.2, io_threads=2, **options):
    """An ExpertCache of `path` with `slots` slots (the minimum is one layer: 4), high
    precision only unless options say otherwise; owners 1 and 2 opened."""
    opts = ModelOptions(**{"low_type": "none", "policy": "lru", **options})
    models = open_served_all([path], opts)
    mo = models["m"]
    fmt = (mo.low if opts.low_only else mo.source).format
    plan, total = plan_cache(models, slots * fmt.slot_bytes, 0.25)
    shm = Segment(new_name("hobbit-test"), total, create=True)
    io = IOEngine(io_threads)
    try:
        cache = ExpertCache(models, plan, shm, io, slot_wait=slot_wait, prefetch_budget=False)
        cache.open_owner(OWNER)
        cache.open_owner(OTHER)
        yield cache, mo
    finally:
        io.close()
        shm.close()


def in_loop(test):
    """Run an async test on one event loop (the cache lives on one loop)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(asyncio.wait_for(test(*args, **kwargs), 60))

    return run


def copy_model(model, tmp_path) -> str:
    """A private copy named m.gguf (so the model is "m"; tests may damage it)."""
    path = str(tmp_path / "m.gguf")
    shutil.copy(model, path)
    return path


def slot_bytes_of(cache, slot) -> bytes:
    """What a slot holds, part by part (without the alignment padding)."""
    fmt, base = slot.region.format, slot.offset
    return b"".join(
        slot.region.segment.array[base + o : base + o + n].tobytes()
        for o, n in zip(fmt.offsets(slot.key[0]), fmt.part_nbytes(slot.key[0]))
    )


def file_bytes_of(src, layer, expert) -> bytes:
    with open(src.path, "rb") as f:
        out = b""
        for off, n in src.ranges(layer, expert):
            f.seek(off)
            out += f.read(n)
        return out


def flip_byte(path, offset, rot: bool = False) -> None:
    """Damage a file in place: one bit of the byte at `offset` (its mtime changes too; rot:
    put the mtime back, as bit rot on the medium would leave it)."""
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))
    if rot:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


async def acquire(cache, mo, layer, experts, owner=OWNER):
    return await cache.acquire(owner, mo, layer, experts, [0.0] * len(experts))


def release(cache, mo, slots, owner=OWNER):
    cache.release(owner, mo, [(s.region.precision, s.index) for s in slots])


@in_loop
async def test_a_miss_is_read_and_then_hits_without_a_read(model, tmp_path):
    with cache_of(copy_model(model, tmp_path)) as (cache, mo):
        assert cache.try_hit(OWNER, mo, 0, [1, 2], [0.0, 0.0]) is None  # nothing cached
        assert mo.requested == 0

        slots = await acquire(cache, mo, 0, [1, 2])
        assert [s.key for s in slots] == [(0, 1), (0, 2)]
        assert all(s.state == "ready" and s.region.precision == HIGH for s in slots)
        for s, e in zip(slots, [1, 2]):
            assert slot_bytes_of(cache, s) == file_bytes_of(mo.source, 0, e)
        assert (mo.misses, mo.hits, mo.bytes_read) == (2, 0, 2 * mo.source.expert_bytes(0))
        reads = cache.io.reads

        again = cache.try_hit(OWNER, mo, 0, [2, 1], [0.0, 0.0])
        assert again == slots[::-1]
        assert (mo.misses, mo.hits, mo.requested) == (2, 2, 4)
        assert cache.io.reads == reads  # served from memory
        assert cache.owners[OWNER].hits == 2 and cache.owners[OWNER].misses == 2
        assert cache.try_hit(OWNER, mo, 0, [1, 3], [0.0, 0.0]) is None  # 3 is a miss
        assert mo.requested == 4  # a refused fast path counts nothing


@in_loop
async def test_a_cache_that_holds_the_model_keeps_each_expert_in_its_home_slot(model, tmp_path):
    """Slot layer * E + expert, whatever order the experts are asked for in: each layer's
    experts lie side by side in expert order, as in the file, and a one-graph forward
    views just a layer's slots (compute/engine/pool.py, Pool.point_resident)."""
    with cache_of(copy_model(model, tmp_path), slots=8) as (cache, mo):
        for layer, experts in ((1, [3, 0]), (0, [2]), (1, [1, 2]), (0, [0, 3, 1])):
            release(cache, mo, await acquire(cache, mo, layer, experts))
        got = {s.key: s.index for s in mo.regions[HIGH].slots}
        assert got == {(layer, e): layer * 4 + e for layer in range(2) for e in range(4)}


@in_loop
async def test_a_request_that_waits_for_slots_holds_none_meanwhile(model, tmp_path):
    """All or nothing: a request finding too few slots does not sit on the ones it could
    take while it waits (two such requests would wait for each other until cache_full);
    it gets all of them once a release makes room."""
    with cache_of(copy_model(model, tmp_path), slots=4, slot_wait=5) as (cache, mo):
        held = await acquire(cache, mo, 0, [0, 1, 2])  # 3 of 4 slots
        waiting = asyncio.ensure_future(acquire(cache, mo, 1, [0, 1], owner=OTHER))
        await asyncio.sleep(0.2)  # its two misses, one slot free
        assert not waiting.done()
        assert sum(bool(s.pins) for s in mo.regions[HIGH].slots) == 3  # only OWNER's
        assert cache.owners[OTHER].pins == {} or not any(cache.owners[OTHER].pins.values())
        release(cache, mo, held[:1])
        got = await waiting
        assert sorted(s.key for s in got) == [(1, 0), (1, 1)]
        assert all(s.pins == {OTHER: 1} for s in got)
        # its tries count as one request: each expert once, a hit, a wait or a miss
        assert mo.requested == 5 and mo.hits + mo.waits + mo.misses == 5


@in_loop
async def test_a_pinned_slot_is_kept_until_released(model, tmp_path):
    with cache_of(copy_model(model, tmp_path)) as (cache, mo):
        held = await acquire(cache, mo, 0, [0, 1, 2, 3])  # all 4 slots pinned by OWNER
        assert all(s.pins == {OWNER: 1} for s in held)
        with pytest.raises(RequestError) as e:
            await acquire(cache, mo, 1, [0], owner=OTHER)
        assert e.value.code == "cache_full"
        assert [s.key for s in held] == [(0, 0), (0, 1), (0, 2), (0, 3)]  # none overwritten

        release(cache, mo, [held[2]])
        release(cache, mo, [held[2]])  # twice: ignored, never negative
        assert held[2].pins == {} and cache.owners[OWNER].pins[held[2]] == 0
        (got,) = await acquire(cache, mo, 1, [0], owner=OTHER)
        assert got is held[2] and got.key == (1, 0) and got.pins == {OTHER: 1}
        assert slot_bytes_of(cache, got) == file_bytes_of(mo.source, 1, 0)

        assert cache.close_owner(OWNER) == 3  # its other three pins go with it
        assert all(not s.pins for s in held if s is not got)
        assert cache.try_hit(OWNER, mo, 0, [0], [0.0]) == [held[0]]  # a closed owner pins nothing
        assert held[0].pins == {}


@pytest.mark.parametrize("policy, victim", [("lru", 0), ("hobbit", 1)])
@in_loop
async def test_eviction_follows_the_policy(model, tmp_path, policy, victim):
    """Expert 0 is used three times, then 1, 2, 3 once each. LRU evicts 0 (used longest
    ago); HOBBIT's policy keeps 0 (used most) and evicts 1, the oldest of the rest."""
    with cache_of(copy_model(model, tmp_path), policy=policy) as (cache, mo):
        mo.policy.begin(OWNER, 0, 4, 0)
        for experts in ([0], [0], [0], [1], [2], [3]):
            release(cache, mo, await acquire(cache, mo, 0, experts))
        before = {key: s.index for key, s in mo.regions[HIGH].by_key.items()}
        (got,) = await acquire(cache, mo, 1, [0])
        assert got.index == before[0, victim]
        assert mo.regions[HIGH].lookup((0, victim)) is None
        assert sorted(mo.regions[HIGH].by_key) == sorted({(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)} - {(0, victim)})
        assert mo.hits == 2 and mo.misses == 5


@in_loop
async def test_a_superseded_prefetch_is_cancelled_before_it_reads(model, tmp_path):
    with cache_of(copy_model(model, tmp_path), slots=5) as (cache, mo):
        cache.io.plug()  # hold the readers: the prefetches stay queued
        cache.hint(OWNER, mo, [1], [[0, 1, 2]], [[0.0, 0.1, 0.2]], None)
        queued = [mo.regions[HIGH].lookup((1, e)) for e in (0, 1, 2)]
        assert all(s.state == "loading" and s.protected and s.prefetched for s in queued)
        assert mo.prefetched == 3 and cache.io.pending() == 3

        cache.hint(OWNER, mo, [1], [[3]], [[0.0]], None)  # a newer prediction
        region = mo.regions[HIGH]
        assert all(region.lookup((1, e)) is None for e in (0, 1, 2))
        assert sorted(s.state for s in region.slots) == ["free"] * 4 + ["loading"]
        assert [s.key for s in region.slots if s.protected] == [(1, 3)]
        assert mo.prefetched == 4 and cache.io.pending() == 1
        cache.io.unplug()
        (got,) = await acquire(cache, mo, 1, [3])  # waits for the prefetch's read
        assert got.key == (1, 3) and slot_bytes_of(cache, got) == file_bytes_of(mo.source, 1, 3)
        assert (mo.waits + mo.hits, mo.misses, mo.prefetch_used) == (1, 0, 1)
        assert mo.bytes_read == mo.source.expert_bytes(0)  # the cancelled three never read
        assert not got.protected


@in_loop
async def test_a_read_from_a_truncated_file_fails_and_its_slot_is_never_served(model, tmp_path):
    """The file cut short under the cache: the short read fails typed (file_changed: the file
    is not the one opened), its slot is never served, and no other read of the changed file
    is served either (loader/reads.py checks the file after every read)."""
    path = copy_model(model, tmp_path)
    with cache_of(path) as (cache, mo):
        last = max((off + n, layer, e) for layer in range(2) for e in range(4) for off, n in mo.source.ranges(layer, e))
        _, layer, e = last
        cut = last[0] - 1
        os.truncate(path, cut)  # the expert stored last loses its last byte
        with pytest.raises(RequestError) as err:
            await acquire(cache, mo, layer, [e])
        assert err.value.code == "file_changed" and f"layer {layer} expert {e}" in str(err.value)
        assert "short read" in str(err.value) and "stale" in str(err.value)
        assert mo.regions[HIGH].lookup((layer, e)) is None
        assert all(not s.pins and s.state != "loading" for s in mo.regions[HIGH].slots)
        assert cache.try_hit(OWNER, mo, layer, [e], [0.0]) is None
        with pytest.raises(RequestError):  # still unreadable, not cached
            await acquire(cache, mo, layer, [e])

        other = next(
            (lo, eo) for lo in range(2) for eo in range(4) if max(off + n for off, n in mo.source.ranges(lo, eo)) <= cut
        )
        with pytest.raises(RequestError) as err:  # whole, but from a file that changed
            await acquire(cache, mo, other[0], [other[1]])
        assert err.value.code == "file_changed" and "changed while hobbitd read from it" in str(err.value)
        assert mo.regions[HIGH].lookup(other) is None


@in_loop
async def test_a_corrupt_companion_expert_fails_its_checksum(model, tmp_path):
    from hobbit.compute.make.convert import convert
    from hobbit.compute.engine import ggml
    from hobbit.compute.engine.weights import open_model

    path = copy_model(model, tmp_path)
    comp = convert(open_model(path), ggml.Q4_0, progress=False)
    with cache_of(path, low_type="Q4_0", low_only=True) as (cache, mo):
        flip_byte(comp, companion.slot_image_offset(mo.low, 1, 2) + 100, rot=True)
        with pytest.raises(RequestError) as err:
            await acquire(cache, mo, 1, [2])
        assert err.value.code == "checksum" and "layer 1 expert 2" in str(err.value)
        assert mo.regions[LOW].lookup((1, 2)) is None
        assert all(not s.pins for s in mo.regions[LOW].slots)

        (slot,) = await acquire(cache, mo, 1, [3])  # a sound expert is served
        assert slot.region.precision == LOW
        assert ("low", (1, 3)) in mo.verified and ("low", (1, 2)) not in mo.verified  # checked once, when read
        with open(comp, "rb") as f:
            f.seek(companion.slot_image_offset(mo.low, 1, 3))
            want = f.read(mo.low.format.slot_bytes)
        assert slot.region.segment.array[slot.offset : slot.offset + len(want)].tobytes() == want
        with pytest.raises(RequestError) as err:  # still refused, never cached
            await acquire(cache, mo, 1, [2])
        assert err.value.code == "checksum"


@in_loop
async def test_a_verified_expert_is_checked_again_once_its_file_changed(model, tmp_path):
    """An image is checksummed when first read; after that only if the companion is no
    longer the file hobbitd opened, so a damaged rewrite is still never served."""
    from hobbit.compute.make.convert import convert
    from hobbit.compute.engine import ggml
    from hobbit.compute.engine.weights import open_model

    path = copy_model(model, tmp_path)
    comp = convert(open_model(path), ggml.Q4_0, progress=False)
    with cache_of(path, low_type="Q4_0", low_only=True) as (cache, mo):
        release(cache, mo, await acquire(cache, mo, 0, [0, 1, 2, 3]))  # read and verified
        assert {("low", (0, e)) for e in range(4)} <= mo.verified
        release(cache, mo, await acquire(cache, mo, 1, [0, 1, 2, 3]))  # evicts layer 0
        assert mo.regions[LOW].lookup((0, 2)) is None
        flip_byte(comp, companion.slot_image_offset(mo.low, 0, 2) + 100)  # a new mtime
        with pytest.raises(RequestError) as err:
            await acquire(cache, mo, 0, [2])
        assert err.value.code == "file_changed" and "changed while hobbitd read" in str(err.value), err.value
        flip_byte(comp, companion.slot_image_offset(mo.low, 0, 2) + 100)  # mended, still not the file opened
        with pytest.raises(RequestError) as err:
            await acquire(cache, mo, 0, [2])
        assert err.value.code == "file_changed", err.value


@in_loop
async def test_a_model_opened_on_demand_takes_its_share_from_the_least_used(model, tmp_path):
    """plan_added: of two served models, the idle one gives up its spare slots before the
    busy one gives any (the slots used longest ago go first); with nothing used yet both
    give alike. Every region keeps one layer's experts (4 slots)."""
    from hobbit.loader.served import open_served, plan_added

    opts = ModelOptions(low_type="none", policy="lru")
    paths = {}
    for name in ("a", "b", "c"):
        paths[name] = str(tmp_path / f"{name}.gguf")
        shutil.copy(model, paths[name])
    models = open_served_all([paths["a"], paths["b"]], opts)
    slot_bytes = models["a"].source.format.slot_bytes
    size = 16 * slot_bytes
    plan, total = plan_cache(models, size, 0.25)
    shm = Segment(new_name("hobbit-test"), total, create=True)
    io = IOEngine(2)
    try:
        cache = ExpertCache(models, plan, shm, io, prefetch_budget=False)
        cache.open_owner(OWNER)
        a, b = models["a"], models["b"]
        assert a.regions[HIGH].n_slots == b.regions[HIGH].n_slots == 8
        new = open_served(paths["c"], "c", opts)

        shrink, _, _ = plan_added(models, new, size, 0.25)  # nothing used yet: alike
        assert abs(shrink["a", HIGH] - shrink["b", HIGH]) <= 1, shrink

        for layer in (0, 1):  # a is used, b is not
            release(cache, a, await acquire(cache, a, layer, [0, 1, 2, 3]))
        shrink, new_plan, _ = plan_added(models, new, size, 0.25)
        given = sum(n for *_, n in new_plan)
        assert given >= 4
        assert shrink["b", HIGH] == 4, shrink  # the idle one down to one layer
        assert shrink["a", HIGH] == 8 - (given - 4), shrink  # the busy one the rest only
    finally:
        io.close()
        shm.close()
