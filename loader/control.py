"""The control block: a small shared-memory segment beside the cache that clients may
write, so that a client uses a cached expert without asking hobbitd.

It holds, per served model and precision, the slot directory — directory[layer, expert]:
the index of the slot holding that expert ready, else -1 — which only hobbitd writes, and
one row of pin counts per client (rows[r, slot id]), which only client r writes (hobbitd
zeroes a row when its session ends, before giving the row to another session).

A client pins a hit itself: it adds 1 to its row, then reads the directory again; the pin
holds when the entry is unchanged. hobbitd evicts a slot only after unpublishing it (entry
-1), a memory barrier on every CPU running a client (membarrier), and finding every row's
count for it zero; otherwise it publishes the slot again and picks another victim. Either
the client's second read sees -1 (it drops its pin and asks hobbitd) or hobbitd sees the
pin: the asymmetric Dekker pattern, the heavy barrier on the rare side (an eviction), none
on the client's. A slot is published only after its read completed, so a client that
finds it reads complete bytes. Linux only (membarrier, since 4.16): without it hobbitd
offers no control block and clients ask for every expert.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .shm import Segment

PIN_ROWS = 64  # clients that may pin hits themselves; later ones ask hobbitd
MAGIC = b"HOBBITCB"
HEADER = 64

# membarrier(2)
_CMD_GLOBAL_EXPEDITED = 1 << 1
_CMD_REGISTER_GLOBAL_EXPEDITED = 1 << 2
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}.get(os.uname().machine)
_libc = ctypes.CDLL(None, use_errno=True)


def _membarrier(cmd: int) -> bool:
    if _SYS_MEMBARRIER is None:
        return False
    return _libc.syscall(_SYS_MEMBARRIER, cmd, 0, 0) == 0


def fence_available() -> bool:
    """hobbitd: whether it can order its unpublish before reading the pin rows."""
    if _SYS_MEMBARRIER is None:
        return False
    supported = _libc.syscall(_SYS_MEMBARRIER, 0, 0, 0)  # MEMBARRIER_CMD_QUERY
    return supported > 0 and bool(supported & _CMD_GLOBAL_EXPEDITED)


def register_client() -> bool:
    """A client: take part in hobbitd's barriers (needed before pinning hits itself)."""
    return _membarrier(_CMD_REGISTER_GLOBAL_EXPEDITED)


def fence() -> None:
    """A full memory barrier on every CPU running a registered client."""
    if not _membarrier(_CMD_GLOBAL_EXPEDITED):
        raise OSError(ctypes.get_errno(), "membarrier failed")


class RegionAt(NamedTuple):
    """Where one region's entries are in a control block."""

    directory: int  # byte offset of its int32 [n_layer, n_expert] directory
    first_slot: int  # its slot 0's column in the pin rows


@dataclass(frozen=True)
class ControlLayout:
    size: int  # bytes of the block
    rows_offset: int  # byte offset of the int32 [PIN_ROWS, n_slots] rows
    n_slots: int  # the slots of every region, one column each
    regions: dict[tuple[str, str], RegionAt]  # (model, precision) -> its entries


def layout(regions: list[tuple[str, str, int, int, int]]) -> ControlLayout:
    """Where things are in a control block for regions [(model, precision, n_layer,
    n_expert, n_slots)]; offsets in bytes, int32 entries."""
    at, first, out = HEADER, 0, {}
    for model, prec, n_layer, n_expert, n_slots in regions:
        out[model, prec] = RegionAt(at, first)
        at += 4 * n_layer * n_expert
        first += n_slots
    at = -(-at // 64) * 64
    return ControlLayout(at + 4 * PIN_ROWS * max(first, 1), at, first, out)


class ControlBlock:
    """A mapped control block (hobbitd creates it; clients attach to it writable)."""

    def __init__(self, seg: Segment, rows_offset: int, n_slots: int, lay: ControlLayout | None = None):
        self.seg, self.layout = seg, lay
        self.rows_offset, self.n_slots = rows_offset, n_slots
        self.rows = np.ndarray((PIN_ROWS, max(n_slots, 1)), np.int32, seg.mm, rows_offset)
        self.free_rows = list(range(PIN_ROWS - 1, -1, -1))

    @classmethod
    def create(cls, name: str, lay: ControlLayout) -> ControlBlock:
        seg = Segment(name, lay.size, create=True)
        seg.mm[:HEADER] = (MAGIC + struct.pack("<II", PIN_ROWS, lay.n_slots)).ljust(HEADER, b"\0")
        return cls(seg, lay.rows_offset, lay.n_slots, lay)

    @classmethod
    def attach(cls, name: str, size: int, rows_offset: int, n_slots: int) -> ControlBlock:
        seg = Segment(name, size, writable=True)
        if bytes(seg.mm[: len(MAGIC)]) != MAGIC:
            seg.close()
            raise OSError(f"shared memory {name} is not a hobbit control block")
        return cls(seg, rows_offset, n_slots)

    def to_wire(self) -> dict:
        """What a client needs to attach this block: attach()'s arguments (the protocol's
        control {shm, size, rows_offset, n_slots})."""
        return {"shm": self.seg.name, "size": self.seg.size, "rows_offset": self.rows_offset, "n_slots": self.n_slots}

    def directory(self, offset: int, n_layer: int, n_expert: int) -> np.ndarray:
        """The int32 [n_layer, n_expert] directory at `offset` (a view into the block)."""
        return np.ndarray((n_layer, n_expert), np.int32, self.seg.mm, offset)

    def take_row(self) -> int | None:
        return self.free_rows.pop() if self.free_rows else None

    def free_row(self, row: int) -> None:
        """A session ended: its pins go (its process is gone or will not use them)."""
        self.rows[row] = 0
        self.free_rows.append(row)

    def close(self) -> None:
        """Unmap the block; a second call does nothing."""
        if self.seg.closed:
            return
        del self.rows  # a view: the segment unmaps only when no view holds it
        self.seg.close()


class SharedSlots:
    """hobbitd's side of one region in the control block: publish ready slots, evict
    only slots no client pinned."""

    def __init__(self, cb: ControlBlock, at: RegionAt, n_layer: int, n_expert: int, n_slots: int):
        self.offset, self.first_slot = at  # what a client needs to find them
        self.dir = cb.directory(at.directory, n_layer, n_expert)
        self.pins = cb.rows[:, at.first_slot : at.first_slot + n_slots]
        self.dir[:] = -1

    def publish(self, slot) -> None:
        """slot is ready: clients may pin it."""
        self.dir[slot.key] = slot.index

    def unpublish(self, slot) -> None:
        if slot.key is not None and self.dir[slot.key] == slot.index:
            self.dir[slot.key] = -1

    def retire(self, slots: list) -> None:
        """Unpublish slots for good (their region shrank): after the fence no client pins
        them any more, and pinned() shows who still does."""
        for slot in slots:
            self.unpublish(slot)
        fence()

    def pinned(self) -> np.ndarray:
        """bool [n_slots]: pinned by some client row (a snapshot)."""
        return np.asarray((self.pins > 0).any(axis=0))

    def evict(self, candidates: list, policy):
        """The policy's victim among `candidates` (evictable as hobbitd sees them) that no
        client pins, unpublished so that no client can pin it any more; None if all are."""
        held = self.pinned()
        candidates = [s for s in candidates if not held[s.index]]
        while candidates:
            victim = policy.victim(candidates)
            self.unpublish(victim)
            fence()  # our -1 is visible to every client, their pins so far to us
            if not (self.pins[:, victim.index] > 0).any():
                return victim
            self.publish(victim)  # a client pinned it meanwhile: it stays
            candidates.remove(victim)
        return None
