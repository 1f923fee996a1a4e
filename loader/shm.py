"""A POSIX shared-memory segment (/dev/shm/NAME): the daemon creates and writes it,
clients map it read-only. Mode 0660: only the daemon's user and group can map it."""
from __future__ import annotations

import mmap
import os
import secrets

import numpy as np

SHM_DIR = "/dev/shm"


class Segment:
    """A mapped segment. `address` is the base pointer (page-aligned); `array` a uint8 view."""

    def __init__(self, name: str, size: int, create: bool = False, writable: bool = False):
        self.name, self.size = name, size
        self.path = os.path.join(SHM_DIR, name)
        self.owner = create
        if create:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o660)
            try:
                os.fchmod(fd, 0o660)   # not widened by the umask, not narrowed either
                os.ftruncate(fd, size)
            except OSError:
                os.close(fd)
                os.unlink(self.path)
                raise
        else:
            fd = os.open(self.path, os.O_RDWR if writable else os.O_RDONLY)
            if os.fstat(fd).st_size < size:
                os.close(fd)
                raise OSError(f"shared memory {name} is smaller than announced")
        try:
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if create or writable else 0)
            self.mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self.mm, dtype=np.uint8)
        self.address = self.array.ctypes.data

    def close(self) -> None:
        if self.mm is None:
            return
        self.array = None
        try:
            self.mm.close()
        except BufferError:
            pass   # a live numpy view still references it; the mapping goes with the process
        self.mm = None
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def new_name(prefix: str = "hobbit") -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
