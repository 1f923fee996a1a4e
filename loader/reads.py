"""The expert cache's reads: each expert read into its slot on the IOEngine's threads, and
the prefetches a hint asks for, within what flash delivers while the client computes.

Reads is loader/cache.py's ExpertCache's read side and runs on its asyncio loop: a read's
completion comes back from a reader thread with loop.call_soon_threadsafe, settles the
slot (ready, or dropped on an error) and fires the cache's `freed` Signal. Failures are
RequestError carrying a wire error code (io, checksum, file_changed).

A read is served only from the file as the model has it (loader/freshness.py): a stat
after each read must still show the identity the file had when the read was submitted,
and the model's epoch must not have moved meanwhile, else the slot is dropped and the
read fails with file_changed.
"""

from __future__ import annotations

import asyncio
import time

from ..protocol.errors import FILE_CHANGED, FileChanged, RequestError
from .identity import identity
from .io_engine import PREFETCH, IOEngine, JobState, Priority, ReadJob, ReadSegment
from .model_cache import ModelCache
from .counts import Outcome
from .pool import Slot, SlotState
from .precision import HIGH


class Signal:
    """Wake every waiter. Unlike asyncio.Condition, fire() needs no lock, so plain callbacks
    (a release, a read completion) can call it."""

    def __init__(self):
        self._fut: asyncio.Future | None = None

    def fire(self) -> None:
        if self._fut is not None and not self._fut.done():
            self._fut.set_result(None)
        self._fut = None

    async def wait(self, timeout: float) -> bool:
        """True when fired within timeout seconds."""
        if self._fut is None:
            self._fut = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._fut), max(timeout, 0))
            return True
        except TimeoutError:
            return False


class Reads:
    def __init__(self, io: IOEngine, freed: Signal, prefetch_budget: bool = True):
        """freed: fired when a read completes or a prefetch is cancelled (a slot may be
        takeable); prefetch_budget: prefetch only as many bytes as flash reads while the
        client computes (else every predicted miss of the layer)."""
        self.io, self.freed, self.prefetch_budget = io, freed, prefetch_budget
        self.jobs: dict[tuple, ReadJob] = {}  # (model, precision, key) -> submitted, not completed

    def load(self, mo: ModelCache, slot: Slot, key: tuple, prec: str, priority: Priority) -> asyncio.Future:
        """Read expert `key` in precision `prec` into `slot` (state loading) on the I/O
        threads. The future resolves when the slot is ready; the slot's state is settled
        by _loaded, whoever is (still) waiting. A slot image (companion, repacked image) is
        checksummed the first time this daemon reads it, and on every read once the file is not the one
        opened (`ModelCache.changed`, a stat): a crc32 of every read cost a third of decode
        speed at a 25 % cache (BENCHMARKS.md)."""
        from .companion import check_image, slot_image_offset

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "unretrieved"
        mo.loads[prec, key] = fut
        src = mo.source_of(prec)
        base = slot.region.segment.address + slot.offset
        epoch, opened = mo.epoch, {w.path: w.identity for w in mo.files[prec]}
        crcs = None
        if mo.crcs_of(prec) is not None:  # a slot-image file: one aligned read, then its crc32
            segments = [ReadSegment(src.path, slot_image_offset(src, *key), src.format.slot_bytes, base)]
            if (prec, key) not in mo.verified or mo.changed(prec):
                crcs = mo.crcs_of(prec)
        else:
            segments = [
                ReadSegment(src.file_of(key[0], p), off, n, base + o)
                for p, ((off, n), o) in enumerate(zip(src.ranges(*key), src.format.offsets(key[0])))
            ]
        t0 = time.monotonic()

        def verify(job):  # on a reader thread; raises on a changed file or a crc32 mismatch
            for path in {seg.path for seg in segments}:
                was = opened.get(path)  # after the read: a write in between moved mtime
                if was is None or not was.same_bytes(identity(path)):
                    raise FileChanged(f"{path} changed while hobbitd read from it")
            if crcs is not None:
                check_image(src, crcs, key[0], key[1], base)
                mo.verified.add((prec, key))

        def done(job, error):  # on a reader thread
            try:
                loop.call_soon_threadsafe(self._loaded, mo, slot, key, prec, fut, t0, error, epoch, job)
            except RuntimeError:
                pass  # the loop is closed: the process is exiting

        jkey = (mo.name, prec, key)
        self.jobs[jkey] = self.io.submit(jkey, segments, priority, done, verify)
        return fut

    def _loaded(self, mo, slot, key, prec, fut, t0, error, epoch, job) -> None:
        from .companion import ChecksumError

        if self.jobs.get((mo.name, prec, key)) is job:  # not a newer read of the key's
            del self.jobs[mo.name, prec, key]
        if mo.loads.get((prec, key)) is fut:
            del mo.loads[prec, key]
        if error is None and mo.epoch != epoch:  # the file changed while this was read
            error = FileChanged(f"{mo.source_of(prec).path} changed while hobbitd read from it")
        if error is not None:
            mo.regions[prec].drop(slot)
            code = "checksum" if isinstance(error, ChecksumError) else "io"
            note = ""
            if isinstance(error, FileChanged):
                code = FILE_CHANGED
            elif mo.changed(prec):  # truncated or replaced while served: say so
                code, note = FILE_CHANGED, "; stale: the file changed after hobbitd opened it"
            fut.set_exception(
                RequestError(code, f"reading {mo.name} layer {key[0]} expert {key[1]} ({prec}): {error}{note}")
            )
        else:
            mo.regions[prec].ready(slot)
            mo.bytes_read += mo.source_of(prec).expert_bytes(key[0])
            mo.read_seconds += time.monotonic() - t0
            fut.set_result(slot)
        self.freed.fire()

    async def join(self, mo: ModelCache, prec: str, key: tuple) -> None:
        """Wait for the read in flight of `key` (a demand: a queued prefetch of it is
        promoted, so it overtakes the prefetch queue); RequestError if it fails."""
        job = self.jobs.get((mo.name, prec, key))
        if job is not None:
            self.io.promote(job.key)
        await asyncio.shield(mo.loads[prec, key])

    def running(self) -> bool:
        """A reader thread is writing into the shared memory right now."""
        return any(j.state == JobState.RUNNING for j in self.jobs.values())

    def load_all(self, mo: ModelCache, counted: bool = False) -> int:
        """Read every expert of mo missing from its high region, at prefetch priority
        (behind every demand read), when the region holds them all (mo.holds_all); the
        number of reads started. counted: count each as a miss (a client asked for all)."""
        if not mo.holds_all:
            return 0
        region, started = mo.regions[HIGH], 0
        self.io.plug()
        try:
            for key in ((il, e) for il in range(mo.n_layer) for e in range(mo.n_expert)):
                if region.lookup(key) is None and (slot := region.take(key, mo.policy, demand=False)) is not None:
                    if counted:
                        mo.count(Outcome.MISS, HIGH)
                    self.load(mo, slot, key, HIGH, PREFETCH)
                    started += 1
        finally:
            self.io.unplug()
        return started

    # ---- prefetch ------------------------------------------------------------------------

    def prefetch(self, mo: ModelCache, missing: list, compute_s: float | None) -> list[Slot]:
        """Read `missing` [(key, precision)], most important first, at prefetch priority,
        up to the budget (at least one); the slots taken, protected and marked prefetched."""
        budget = self._budget(mo, compute_s)
        taken = []
        self.io.plug()
        try:
            for i, (key, prec) in enumerate(missing):  # most important first
                budget -= mo.source_of(prec).expert_bytes(key[0])
                if budget < 0 and i > 0:
                    break
                slot = mo.regions[prec].take(key, mo.policy, demand=False)
                if slot is None:
                    break
                slot.protected = slot.prefetched = True
                taken.append(slot)
                mo.prefetched += 1
                self.load(mo, slot, key, prec, PREFETCH)
        finally:
            self.io.unplug()
        return taken

    def _budget(self, mo: ModelCache, compute_s: float | None) -> float:
        """Bytes worth prefetching now: the client's compute time per layer times the rate
        demand loads were served at."""
        if not self.prefetch_budget or compute_s is None or mo.demand_Bps is None:
            return float("inf")
        return compute_s * mo.demand_Bps

    def cancel_prefetch(self, mo: ModelCache, slot: Slot) -> None:
        """Drop a superseded prefetch that has not started reading; its slot is freed."""
        prec, key = slot.region.precision, slot.key
        if slot.state != SlotState.LOADING or key is None or not self.io.cancel((mo.name, prec, key)):
            return
        self.jobs.pop((mo.name, prec, key), None)
        fut = mo.loads.pop((prec, key), None)
        slot.region.drop(slot)
        if fut is not None and not fut.done():
            fut.set_exception(RequestError("io", "prefetch superseded"))
        self.freed.fire()
