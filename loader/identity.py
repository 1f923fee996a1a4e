"""Which file a path names, and whether its bytes may have changed since it was opened.

A served GGUF (or companion) can be rewritten in place (`dd conv=notrunc`), truncated or
replaced by a rename while hobbitd serves it and clients compute on their mmap of it.
FileIdentity is what a stat says of it: device, inode, size, mtime and ctime (ns).

What counts as a change (decided here, for hobbitd and clients alike):
- another device, inode or size, or another mtime: changed. A write(2) updates mtime before
  it copies its bytes (file_modified() in the kernel's write path), so a reader that stats
  after reading sees the new mtime whenever it may have read new bytes;
- ctime alone (chmod, chown, a link, or a `touch -d` that put mtime back after a write):
  WatchedFile compares a digest of the header and a few sampled blocks (`sample_digest`).
  Equal: a metadata change, the file is kept. Not a proof that no byte changed: only a
  write that restores mtime by hand and leaves the sampled blocks alone goes unnoticed.
Two writes within one tick of the kernel's coarse clock (a few ms) after a stat may leave
mtime as that stat saw it; hobbitd's stats before and after every read make that window a
race of one read, not a lasting one.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

HEAD_BYTES = 1 << 16  # the GGUF header and the start of its tensor table
SAMPLES = 8  # blocks sampled over the rest of the file
SAMPLE_BYTES = 4096


@dataclass(frozen=True)
class FileIdentity:
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def same_bytes(self, other: FileIdentity | None) -> bool:
        """Same file, size and mtime: nothing wrote it (ctime aside, see the module docstring)."""
        return other is not None and self.wire() == other.wire()

    def wire(self) -> list[int]:
        """[dev, ino, size, mtime_ns]: what WELCOME's model info carries as "file"."""
        return [self.dev, self.ino, self.size, self.mtime_ns]


def identity(path: str) -> FileIdentity | None:
    """What a stat of `path` says now; None when it is gone or unreadable."""
    try:
        return FileIdentity.of(os.stat(path))
    except OSError:
        return None


def sample_digest(path: str) -> bytes | None:
    """A cheap content check: blake2b of the first HEAD_BYTES and SAMPLES blocks spread
    evenly over the rest (under 100 KiB read); None when the file cannot be read."""
    h = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(size.to_bytes(8, "little"))
            h.update(f.read(HEAD_BYTES))
            for i in range(1, SAMPLES + 1):
                f.seek(HEAD_BYTES + (size - HEAD_BYTES) * i // (SAMPLES + 1))
                h.update(f.read(SAMPLE_BYTES))
    except OSError:
        return None
    return h.digest()


class WatchedFile:
    """A file served as opened: its identity then and a digest for ctime-only changes."""

    def __init__(self, path: str):
        self.path = path
        self.identity = identity(path)
        self.digest = sample_digest(path)

    def changed(self) -> bool:
        """Whether the file may no longer hold the bytes it held when opened (one stat; a
        digest only when ctime alone moved, and then a metadata change is adopted)."""
        now = identity(self.path)
        if now == self.identity:
            return False
        if now is None or self.identity is None or not now.same_bytes(self.identity):
            return True
        if sample_digest(self.path) != self.digest:
            return True
        self.identity = now  # chmod, chown, a link: the bytes are the ones opened
        return False
