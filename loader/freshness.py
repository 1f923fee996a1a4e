"""A served model's file changed: forget what was cached of it, and take the file again.

When hobbitd sees a served file changed (loader/identity.py decides what counts), nothing
cached before may be served with what is read after: invalidate() drops every slot of the
model (ready slots nobody pins are freed, pinned ones are hidden until released, reads in
flight land in slots nobody finds and are dropped by the epoch check in loader/reads.py)
and moves the model's epoch on. adopt() then serves the file opened again in the model's
place when it fits the regions the model has; otherwise the caller fails its requests.
Runs on the cache's event loop, like loader/cache.py.
"""

from __future__ import annotations

from .control import fence
from .model_cache import ModelCache
from .pool import SlotState


def invalidate(mo: ModelCache) -> int:
    """Drop every expert cached of mo and move its epoch on; the slots freed at once (the
    others, pinned by a client computing on them, are unpublished and out of every lookup,
    and evicted as usual once released)."""
    mo.epoch += 1
    mo.file_changes += 1
    mo.verified.clear()
    freed = 0
    for region in mo.regions.values():
        held = [s for s in region.slots[: region.n_slots] if s.key is not None]
        for slot in held:
            slot.protected = slot.prefetched = False
            if region.by_key.get(slot.key) is slot:
                del region.by_key[slot.key]
            if region.shared is not None:
                region.shared.unpublish(slot)
        if region.shared is not None and held:
            fence()  # our unpublish is visible to every client, their pins so far to us
        rows = region.shared.pinned() if region.shared is not None else None
        for slot in held:
            if slot.state == SlotState.READY and not slot.pins and not (rows is not None and rows[slot.index]):
                region.drop(slot)
                freed += 1
    return freed


def adopt(mo: ModelCache, new: ModelCache) -> str | None:
    """Serve `new` (mo's files opened again, loader/served.py's open_served) as mo: None when
    done, else why it cannot be (one line): its experts must fit mo's slots as they are."""
    if (new.n_layer, new.n_expert, new.source.format) != (mo.n_layer, mo.n_expert, mo.source.format):
        # (a repacked image gone stale changes the format too: its slots are in another layout)
        return (
            f"{mo.path} changed to a model of another layout ({new.n_layer} layers x {new.n_expert} experts "
            f"of other types or sizes); restart hobbitd to serve it"
        )
    if (new.low is None) != (mo.low is None) or (new.low and mo.low and new.low.format != mo.low.format):
        return f"{mo.path} changed and its low-precision companion no longer matches; run hobbit-cli convert again"
    if new.thresholds != mo.thresholds:
        return f"{mo.path} changed and its calibration with it; restart hobbitd to serve it"
    mo.source, mo.low, mo.crcs, mo.files = new.source, new.low, new.crcs, new.files
    mo.image, mo.image_crcs = new.image, new.image_crcs
    mo.verified = set()
    return None
