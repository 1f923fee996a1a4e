"""The expert cache: which slot holds which expert, pins, requests and hints.

ExpertCache serves the models it is given (loader/served.py opens them and plans their
regions) from one shared-memory Segment, reading through an IOEngine (loader/reads.py:
the reads and prefetches). It runs on one asyncio loop: every method must be called from
that loop (the engine's reader threads hand completions back with
loop.call_soon_threadsafe), so the loop never blocks on flash. It speaks no protocol:
failures are RequestError carrying a wire error code. Every expert asked for is counted
(loader/counts.py) for its model and for its owner.

Pins. Slots are pinned by owners, integer ids the caller chooses (hobbitd: one per client
session, never reused). A slot returned by try_hit or acquire is pinned once for the owner:
it is never evicted or overwritten until the owner release()s it or is closed. A miss pins
its slot as soon as it is taken (before the read), so the slot cannot be given away between
the read and the answer. A closed (or never opened) owner gets slots but holds no pins.

Hits a client pinned itself. With a control block (loader/control.py) every ready slot is
published there; a client with a pin row pins its hits in its row without asking, and
reports them afterwards (count_hits) for the counts and the policy. Slots pinned in a row
are never evicted; a closed owner's row is zeroed.

The caller creates and closes the Segment, the control block and the IOEngine; the cache
never closes them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from ..protocol.errors import RequestError
from .control import ControlBlock, SharedSlots
from .counts import Counts, Outcome
from .io_engine import DEMAND, IOEngine
from .model_cache import ModelCache
from .pool import Region, RegionPlan, Slot, SlotState
from .precision import HIGH, SKIP
from .reads import Reads, Signal
from .shm import Segment

EWMA = 0.2  # weight of a new sample in the prefetch budget's running averages


@dataclass(eq=False)
class Owner(Counts):
    """What one owner holds; as Counts, what it asked for (per client, for hobbit-cli top)."""

    pins: Counter = field(default_factory=Counter)  # Slot -> pins held
    protected: list = field(default_factory=list)  # slots its last hint protects
    resident: set = field(default_factory=set)  # models whose every expert it pins
    row: int | None = None  # its pin row in the control block, if it pins hits itself


class NoSlot(Exception):
    """No slot of `precision` could be taken for a miss (all pinned or loading)."""

    def __init__(self, precision: str):
        super().__init__(precision)
        self.precision = precision


class ExpertCache:
    def __init__(
        self,
        models: dict[str, ModelCache],
        plan: list[RegionPlan],
        shm: Segment,
        io: IOEngine,
        *,
        control: ControlBlock | None = None,
        slot_wait: float = 30.0,
        prefetch: bool = True,
        prefetch_budget: bool = True,
        preload: bool = True,
    ):
        """`plan`: loader.served.plan_cache's regions, placed in `shm`; control: the
        control block laid out for them (control.layout), or None: every hit is asked for.
        slot_wait: seconds a miss waits for an unpinned slot before cache_full; prefetch:
        act on hints at all; prefetch_budget: only as many bytes as flash reads while the
        client computes; preload: read a model whose experts all fit whole when it is opened
        (preload())."""
        self.models, self.io, self.control = models, io, control
        self.slot_wait, self.prefetch, self.preloads = slot_wait, prefetch, preload
        self._place(plan, shm, control)
        self.extra_controls: list[ControlBlock] = []  # those of models opened on demand
        self.owners: dict[int, Owner] = {}
        self.stopping = False
        self._freed = Signal()  # a slot may have become takeable (release, read done)
        self.reads = Reads(io, self._freed, prefetch_budget)

    def _place(self, plan: list[RegionPlan], shm: Segment, control: ControlBlock | None) -> None:
        for r in plan:
            mo = self.models[r.model]
            region = mo.regions[r.precision] = Region(
                r.model, r.precision, r.format, r.offset, r.n_slots, shm, mo.n_expert
            )
            if control is not None:
                assert control.layout is not None  # the daemon's block: made with its layout
                region.shared = SharedSlots(
                    control, control.layout.regions[r.model, r.precision], mo.n_layer, mo.n_expert, r.n_slots
                )

    # ---- models opened on demand ---------------------------------------------------------

    def add_model(self, mo: ModelCache, plan: list[RegionPlan], shm: Segment, control: ControlBlock | None) -> None:
        """Serve mo too: its regions `plan` (loader.served.plan_added) in a segment and a
        control block of its own (the caller's, closed by the caller)."""
        self.models[mo.name] = mo
        self._place(plan, shm, control)
        if control is not None:
            self.extra_controls.append(control)

    def shrink(self, sizes: dict) -> None:
        """Give up slots {(model, precision): n_slots to keep} for a model opened on demand.
        What nobody holds goes at once; slots still pinned go when released (sweep)."""
        for (name, prec), n in sizes.items():
            self.models[name].regions[prec].shrink(n)

    def sweep(self) -> int:
        """Give back the memory of given-up slots nothing holds any more; their count."""
        return sum(r.sweep() for mo in self.models.values() for r in mo.regions.values() if r.retiring)

    # ---- owners and pins -----------------------------------------------------------------

    def model(self, name: str) -> ModelCache:
        """The model served as `name`; RequestError unknown_model otherwise."""
        mo = self.models.get(name)
        if mo is None:
            raise RequestError("unknown_model", f"no model {name!r} (serving: {', '.join(self.models)})")
        return mo

    def open_owner(self, owner: int, row: bool = False) -> Owner:
        """A new owner; row: give it a pin row, if the control block has one free."""
        o = self.owners.setdefault(owner, Owner())
        if row and o.row is None and self.control is not None:
            o.row = self.control.take_row()
        return o

    def close_owner(self, owner: int) -> int:
        """Release every pin and protection `owner` holds, forget it; the pins released."""
        o = self.owners.pop(owner, None)
        if o is None:
            return 0
        for slot in o.pins:
            slot.pins.pop(owner, None)
        if o.row is not None and self.control is not None:  # rows come from self.control
            for cb in self.extra_controls:
                cb.rows[o.row] = 0
            self.control.free_row(o.row)
        for slot in o.protected:
            slot.protected = False
        for mo in self.models.values():
            mo.policy.forget(owner)
        self._freed.fire()
        return sum(o.pins.values())

    def release(self, owner: int, mo: ModelCache, slots) -> None:
        """Drop one of owner's pins on each (precision, index) of mo; slots it does not
        hold (released twice, lost with a closed owner, out of range) are ignored."""
        for prec, index in slots:
            region = mo.regions.get(prec)
            if region is not None and isinstance(index, int) and 0 <= index < len(region.slots):
                self._unpin(owner, region.slots[index])  # also a slot given up since
        self._freed.fire()

    def _pin(self, owner: int, slot: Slot) -> None:
        o = self.owners.get(owner)
        if o is not None:  # a closed owner would never release it
            slot.pins[owner] += 1
            o.pins[slot] += 1

    def _unpin(self, owner: int, slot: Slot) -> None:
        """Drop one of owner's pins on slot; nothing if it holds none (never negative)."""
        o = self.owners.get(owner)
        if o is None:
            return
        if o.pins[slot] <= 0:
            o.pins.pop(slot, None)
            return
        o.pins[slot] -= 1
        if not o.pins[slot]:
            del o.pins[slot]
        slot.pins[owner] -= 1
        if slot.pins[owner] <= 0:
            del slot.pins[owner]  # a zero count would still read as pinned

    def check_pins(self, owner: int, mo: ModelCache, n_new: int, share: float) -> None:
        """RequestError pin_limit if owner, pinning `n_new` more slots of mo, would hold
        more than `share` of mo's slots (never less than one layer's experts, which one
        forward may need at once), counting what it pinned in its own row: one client must
        not pin the cache and starve the others. An owner with every expert resident (it pins
        them all by design) is not limited."""
        o = self.owners.get(owner)
        if o is None or mo.name in o.resident:
            return
        limit = max(mo.n_expert, int(share * sum(r.n_slots for r in mo.regions.values())))
        held = sum(n for slot, n in o.pins.items() if slot.region.model == mo.name)
        if o.row is not None:  # and the hits it pinned itself, in its row
            held += sum(int((r.shared.pins[o.row] > 0).sum()) for r in mo.regions.values() if r.shared is not None)
        if held + n_new > limit:
            raise RequestError(
                "pin_limit",
                f"this client holds {held} pinned slots of "
                f"{mo.name} and asks for {n_new} more: over the limit of "
                f"{limit} per client; release slots before asking for more",
            )

    def _count(self, owner: int, mo: ModelCache, outcome: Outcome, precision: str | None = None, n: int = 1) -> None:
        """Count for mo and for owner (a closed owner's request still counts for the model;
        its own counts are dropped)."""
        mo.count(outcome, precision, n)
        o = self.owners.get(owner)
        if o is not None:
            o.count(outcome, precision, n)

    # ---- requests ------------------------------------------------------------------------

    def try_hit(self, owner: int, mo: ModelCache, layer: int, experts: list, scores: list):
        """The fast path: when every expert of the request is cached and ready in the
        precision the rule picks, [Slot, or None for a skipped expert], each pinned once
        for owner. Otherwise None, and nothing is changed. Never waits, never reads."""
        precs = [mo.decide((layer, e), float(sc)) for e, sc in zip(experts, scores)]
        slots = [None if p is SKIP else mo.regions[p].lookup((layer, e)) for e, p in zip(experts, precs)]
        if any(s is None or s.state != SlotState.READY for s, p in zip(slots, precs) if p is not SKIP):
            return None
        self._count_request(owner, mo, precs)
        for slot, sc in zip(slots, scores):
            if slot is not None:  # None: skipped by the rule; every other one is ready
                self._hit(owner, mo, slot, sc <= mo.thresholds.t1, waited=False)
        return slots

    async def acquire(self, owner: int, mo: ModelCache, layer: int, experts: list, scores: list) -> list:
        """[Slot, or None for an expert the rule skips] for the request, each pinned once
        for owner: decide each expert's precision, get them concurrently (misses are read).
        All or nothing: when some expert finds no slot to take, the others are unpinned
        again before waiting (up to slot_wait) for a release and asking again, so two
        requests that each hold part of the cache never wait for each other. On any failure
        raise the first (RequestError: cache_full, io, checksum, shutting_down), nothing
        left pinned."""
        t0, bytes0 = time.monotonic(), mo.bytes_read
        precs = [mo.decide((layer, e), float(sc)) for e, sc in zip(experts, scores)]
        self._count_request(owner, mo, precs)
        deadline = t0 + self.slot_wait
        counted: set = set()  # experts counted (and told the policy) by an earlier try
        while True:
            self.io.plug()  # the misses' reads start together, so adjacent ones merge
            acquired = asyncio.gather(
                *(
                    self._acquire(owner, mo, (layer, e), p, sc <= mo.thresholds.t1, counted)
                    for e, p, sc in zip(experts, precs, scores)
                    if p is not SKIP
                ),
                return_exceptions=True,
            )
            asyncio.get_running_loop().call_soon(self.io.unplug)  # after each one's first step
            got = await acquired
            failed = [g for g in got if isinstance(g, BaseException)]
            if not failed:
                break
            for g in got:
                if isinstance(g, Slot):
                    self._unpin(owner, g)
            self._freed.fire()
            no_slot = [g for g in failed if isinstance(g, NoSlot)]
            if len(no_slot) < len(failed):
                raise next(g for g in failed if not isinstance(g, NoSlot))
            if not await self._freed.wait(deadline - time.monotonic()):
                region = mo.regions[no_slot[0].precision]
                raise RequestError(
                    "cache_full",
                    f"no free slot for {mo.name} within "
                    f"{self.slot_wait:g} s: all {region.n_slots} "
                    f"{region.precision} slots are pinned",
                )
        now = time.monotonic()
        if mo.bytes_read > bytes0 and now > t0:
            rate = (mo.bytes_read - bytes0) / (now - t0)
            mo.demand_Bps = rate if mo.demand_Bps is None else (1 - EWMA) * mo.demand_Bps + EWMA * rate
        it = iter(got)
        return [None if p is SKIP else next(it) for p in precs]

    def resident(self, owner: int, mo: ModelCache) -> dict:
        """Every expert of mo, for a client that computes a whole forward at once.

        When mo's high region holds all its experts (mo.holds_all) and all are ready, each
        is pinned once for owner (the first time only) until it is closed, and the answer
        is {"slots": [[slot index per expert] per layer], ...}. Otherwise "slots" is None:
        while some are missing they are read at prefetch priority (ask again later); with
        "total" 0 the region cannot hold them all and the client asks per layer."""
        total = mo.n_layer * mo.n_expert
        if not mo.holds_all:
            return {"slots": None, "ready": 0, "total": 0}
        region = mo.regions[HIGH]
        keys = [(il, e) for il in range(mo.n_layer) for e in range(mo.n_expert)]
        slots = [region.lookup(k) for k in keys]
        ready = sum(s is not None and s.state == SlotState.READY for s in slots)
        if ready == total:
            o = self.owners.get(owner)
            if o is not None and mo.name not in o.resident:
                o.resident.add(mo.name)
                for slot in slots:
                    self._pin(owner, slot)
            E = mo.n_expert
            return {
                "slots": [[s.index for s in slots[il * E : (il + 1) * E]] for il in range(mo.n_layer)],
                "ready": ready,
                "total": total,
            }
        if not self.stopping:
            self.reads.load_all(mo, counted=True)  # misses nobody waits on yet
        return {"slots": None, "ready": ready, "total": total}

    def preload(self, mo: ModelCache) -> int:
        """When mo's high region holds all its experts and preloading is on: read each one
        not there yet (load_all), so a model that fits the cache is whole before a client
        needs it (hobbitd at start, when a model is opened on demand or its file changed).
        The number of reads started."""
        return self.reads.load_all(mo) if self.preloads and not self.stopping else 0

    def count_used(self, owner: int, mo: ModelCache, uses: int) -> None:
        """A forward on resident experts used `uses` of them: hits in high precision."""
        uses = max(0, int(uses))
        self._count(owner, mo, Outcome.REQUESTED, n=uses)
        self._count(owner, mo, Outcome.HIT, HIGH, uses)

    def count_hits(self, owner: int, mo: ModelCache, hits: list) -> None:
        """Hits owner pinned itself (control block): hits [[layer, experts, slots, scores]],
        slots [precision, index] or None (skipped by the rule), as the client found them;
        counted and told to the policy as if requested. Malformed entries are ignored (the
        client does not wait for an answer); a slot that holds another expert by now is
        counted but not touched."""
        for entry in hits:
            if not (isinstance(entry, list) and len(entry) == 4):
                continue
            layer, experts, slots, scores = entry
            try:
                mo.check(layer, experts)
            except (RequestError, TypeError):
                continue
            if not (
                isinstance(slots, list)
                and isinstance(scores, list)
                and len(slots) == len(scores) == len(experts)
                and all(isinstance(x, (int, float)) for x in scores)
            ):
                continue
            precs = [None if h is None else h[0] if isinstance(h, list) and len(h) == 2 else False for h in slots]
            if False in precs:
                continue
            self._count_request(owner, mo, precs)
            for e, h, sc in zip(experts, slots, scores):
                if h is None:
                    continue
                region = mo.regions.get(h[0])
                index = h[1]
                if region is None or not isinstance(index, int) or not 0 <= index < region.n_slots:
                    continue
                slot = region.slots[index]
                if slot.key == (layer, e) and slot.state == SlotState.READY:
                    self._hit(owner, mo, slot, float(sc) <= mo.thresholds.t1, waited=False, pin=False)
                else:
                    self._count(owner, mo, Outcome.HIT, h[0])

    def _count_request(self, owner: int, mo: ModelCache, precs: list) -> None:
        self._count(owner, mo, Outcome.REQUESTED, n=len(precs))
        self._count(owner, mo, Outcome.SKIP, n=precs.count(SKIP))

    def _hit(
        self,
        owner: int,
        mo: ModelCache,
        slot: Slot,
        important: bool,
        waited: bool,
        pin: bool = True,
        count: bool = True,
    ) -> None:
        """Serve a ready slot: pin it (unless the client did), tell the policy, count the hit
        (unless count is False: a request's retry, counted at its first try)."""
        if pin:
            self._pin(owner, slot)
        if not count:
            return
        self._use(mo, slot, owner, important)
        slot.protected = False  # used: the hint that protected it is fulfilled
        if slot.prefetched:  # a prefetch that paid off
            slot.prefetched = False
            mo.prefetch_used += 1
        self._count(owner, mo, Outcome.WAIT if waited else Outcome.HIT, slot.region.precision)

    async def _acquire(self, owner: int, mo: ModelCache, key: tuple, prec: str, important: bool, counted: set) -> Slot:
        """The slot holding `key` in mo's `prec` region, ready and pinned once for owner;
        NoSlot when a miss finds every slot pinned or loading. counted: the keys this
        request has counted as a hit or miss already (acquire() tries again after a
        NoSlot); key joins it once counted here."""
        region = mo.regions[prec]
        waited = False
        while True:
            slot = region.lookup(key)
            if slot is not None and slot.state == SlotState.READY:
                self._hit(owner, mo, slot, important, waited, count=key not in counted)
                counted.add(key)
                return slot
            if slot is not None:  # loading (for someone else, or a prefetch): share that read
                waited = True
                await self.reads.join(mo, prec, key)
                continue
            if self.stopping:  # hits still count while draining; no new reads or waits
                raise RequestError("shutting_down", "hobbitd is shutting down")
            slot = region.take(key, mo.policy)
            if slot is None:  # every slot pinned or loading: acquire() waits
                raise NoSlot(prec)
            fresh = key not in counted
            counted.add(key)
            if fresh:
                self._count(owner, mo, Outcome.MISS, prec)
            self._pin(owner, slot)  # pinned before the read: nobody can take it meanwhile
            try:
                await asyncio.shield(self.reads.load(mo, slot, key, prec, DEMAND))
            except BaseException:
                self._unpin(owner, slot)
                raise
            if fresh:
                self._use(mo, slot, owner, important)
            return slot

    @staticmethod
    def _use(mo: ModelCache, slot: Slot, owner: int, important: bool) -> None:
        """owner used slot now: tell the policy, and note the time (a model opened on
        demand takes the slots used longest ago, loader.served.plan_added)."""
        mo.policy.touch(slot, owner, important)
        slot.used_at = time.monotonic()

    # ---- reads (loader/reads.py) and draining -------------------------------------------

    def reads_running(self) -> bool:
        """A reader thread is writing into the shared memory right now."""
        return self.reads.running()

    def stop(self) -> None:
        """Start draining: no new reads or waits; requests waiting for a slot fail with
        shutting_down, hits are still served."""
        self.stopping = True
        self._freed.fire()

    # ---- prefetch ------------------------------------------------------------------------

    def hint(
        self, owner: int, mo: ModelCache, layers: list, experts: list, scores: list, compute_s: float | None
    ) -> None:
        """Layer-level adaptive prefetch. The hint lists the experts owner predicts for its
        coming layers, nearest first, with their scores (checked by the caller). Walk them:
        a layer whose predicted experts are all cached (in the precision the rule would use)
        is skipped; the first layer with a predicted miss gets its missing experts read at
        prefetch priority, protected from eviction until used or superseded, and the walk
        stops. A new hint supersedes the owner's last one.

        Budget: a prefetch pays only while the client computes; beyond that its reads
        compete with the demand loads for flash, and a wrong guess costs a whole read. So
        (unless prefetch_budget is off) the missing experts are read, most important first,
        only up to the bytes flash can deliver in `compute_s` (the client's seconds of
        compute between two requests, None: unknown), and at least one."""
        o = self.owners.get(owner)
        if o is None:  # a closed owner could never lift the protection
            return
        for slot in o.protected:  # superseded by this newer prediction
            slot.protected = False
            self.reads.cancel_prefetch(mo, slot)
        o.protected = []
        if not self.prefetch or self.stopping or self.io.pending():
            return  # reads are queued already: a guess must not delay a demand load
        for layer, layer_experts, layer_scores in zip(layers, experts, scores):
            missing = []
            for e, sc in zip(layer_experts, layer_scores):
                key = (layer, e)
                prec = mo.decide(key, float(sc))
                if prec is SKIP:
                    continue
                slot = mo.regions[prec].lookup(key)
                if slot is None:
                    missing.append((key, prec))
                else:
                    slot.protected = True  # keep what the next layers will use
                    o.protected.append(slot)
            if missing:
                o.protected += self.reads.prefetch(mo, missing, compute_s)
                return
