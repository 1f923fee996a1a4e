"""A POSIX shared-memory segment (/dev/shm/NAME): the daemon creates and writes it,
clients map it read-only. Mode 0660: only the daemon's user and group can map it.

A segment outlives a process killed with SIGKILL. Its creator holds an exclusive flock on
it for as long as the process lives (the kernel drops it at death, however it dies), so
remove_stale() can tell a dead daemon's segment from a live one's without trusting pids.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import re
import secrets

import numpy as np
import psutil

SHM_DIR = "/dev/shm"


class Segment:
    """A mapped segment. `address` is the base pointer (page-aligned); `array` a uint8 view."""

    def __init__(self, name: str, size: int, create: bool = False, writable: bool = False):
        self.name, self.size = name, size
        self.path = os.path.join(SHM_DIR, name)
        self.owner = create
        self.closed = False
        self._lock_fd = None  # the creator's: flocked while this process lives
        if create:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o660)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.fchmod(fd, 0o660)  # not widened by the umask, not narrowed either
                os.ftruncate(fd, size)
                self._lock_fd = os.dup(fd)
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

    def discard(self, offset: int, length: int) -> None:
        """Give the pages wholly inside [offset, offset + length) back to the system (the
        creator's call: tmpfs frees them, every mapping then reads zeros there). Pages that
        hold bytes outside the range are kept, so a neighbour is never touched."""
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self.mm.madvise(mmap.MADV_REMOVE, start, end - start)

    def close(self) -> None:
        """Unmap (the creator: and unlink); a second call does nothing."""
        if self.closed:
            return
        self.closed = True
        del self.array  # our view: the mapping closes only when no view holds it
        try:
            self.mm.close()
        except BufferError:
            pass  # a live numpy view still references it; the mapping goes with the process
        if self.owner:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def new_name(prefix: str = "hobbit") -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


# new_name()'s, default prefix only (and the control block beside it, loader/control.py)
DAEMON_NAME = re.compile(r"hobbit-(\d+)-[0-9a-f]{8}(-ctl)?")


def remove_stale(pid: int | None = None) -> list[tuple[str, int]]:
    """Unlink the segments hobbitd processes left behind when they died: only names of
    new_name()'s default form (hobbit-PID-XXXXXXXX, and its -ctl), of `pid` only when
    given, and only when both the PID in the name is not a live process and nobody holds
    the creator's lock (a live daemon, in any pid namespace, always does). [(name, bytes)]
    removed; segments of other users (not removable) are left alone."""
    removed: list[tuple[str, int]] = []
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return removed
    for name in names:
        m = DAEMON_NAME.fullmatch(name)
        if m is None or (pid is not None and int(m.group(1)) != pid) or pid_alive(int(m.group(1))):
            continue
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held: its creator lives
            size = os.fstat(fd).st_size
            os.unlink(path)
            removed.append((name, size))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def pid_alive(pid: int, started: float | None = None) -> bool:
    """Whether process `pid` runs (also one of another user's; a zombie does not): the one
    "is this process alive" check (stale segments here, private daemons' folders in
    client/connect.py, hobbitd's sessions). `started`: its start time as psutil gave it
    (Process.create_time()) when it was first seen; a process started at another time is
    not it (pids are reused)."""
    if pid <= 0:
        return False
    try:
        p = psutil.Process(pid)
        if started is not None and p.create_time() != started:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True  # not ours to inspect: alive as far as we can tell
