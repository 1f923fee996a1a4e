"""A guard over the GGUF a process computes on: no forward uses bytes that changed, and a
file truncated or rewritten under it ends the run with one line instead of SIGBUS.

A Model's non-expert weights are views of the mmapped file. Truncated under the process,
a touched page past the new end raises SIGBUS (exit 135); rewritten in place, the mapping
shows the new bytes mixed with what was computed from the old; replaced by a rename, the
mapping keeps the old file while hobbitd serves the new one. So each forward is checked
before and after (`enter`, `exit`): a stat must show the identity the file had when it was
mapped (loader/identity.py; dev, inode, size, mtime), and when hobbitd serves the experts,
its file must be that one too (WELCOME's "file"). A change is a FileChanged naming the file.

Against the race of a change during a forward the process holds a read lease on the file
(fcntl F_SETLEASE, where the kernel grants it: the file's owner, a local filesystem, nobody
writing it at the time). A process that opens the file for writing or truncates it then
waits until the lease is given up (at most /proc/sys/fs/lease-break-time, 45 s by default),
and the kernel sends us SIGIO: the lease is given up at once when no forward runs, else
when the running one ends, and the next forward (or that one's exit) fails with one line.
Without a lease (another user's file, NFS, a writer already there) only the stats guard,
and a truncation during a forward may still end the process with SIGBUS (README).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import signal
import threading

from ...loader.identity import FileIdentity, identity
from ...protocol.errors import FileChanged

_leases: dict[str, _Lease] = {}  # realpath -> the lease this process holds on it
_handler_installed = False


class _Lease:
    """A read lease on one file, shared by the guards of this process on it."""

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self.users = 0  # guards holding it
        self.active = 0  # forwards running on the file
        self.broken = False  # another process wants to write it

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the fd gives up the lease: the writer goes on
            self.fd = -1
        _leases.pop(self.path, None)


def _on_sigio(signum, frame) -> None:
    """A lease is being broken: mark it, give it up now unless a forward runs on it."""
    for lease in list(_leases.values()):
        try:
            held = fcntl.fcntl(lease.fd, fcntl.F_GETLEASE)
        except OSError:
            continue
        if held != fcntl.F_RDLCK:  # during a break F_GETLEASE gives the target, F_UNLCK
            lease.broken = True
            if not lease.active:
                lease.release()


def _release_all() -> None:
    for lease in list(_leases.values()):
        lease.release()


def _take_lease(path: str) -> _Lease | None:
    """This process's lease on `path`, taken if need be; None where it cannot be had."""
    global _handler_installed
    lease = _leases.get(path)
    if lease is not None:
        return lease
    if not _handler_installed:
        if threading.current_thread() is not threading.main_thread():
            return None  # signal handlers are set in the main thread only
        signal.signal(signal.SIGIO, _on_sigio)  # before any lease: SIGIO's default kills
        # and every lease given up before the interpreter's exit puts SIGIO's default back
        atexit.register(_release_all)
        _handler_installed = True
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError:  # not the owner, a filesystem without leases, or a writer has it open
        os.close(fd)
        return None
    lease = _leases[path] = _Lease(path, fd)
    return lease


class FileGuard:
    """The guard of one Model over its mmapped GGUF, every part of a split one (see the
    module docstring)."""

    def __init__(self, paths: tuple, mapped: tuple, lease: bool = True):
        """paths, mapped: the model's files and each one's identity when it was mapped
        (GGUFFile.paths, .identities); lease: hold leases too (else the stats alone guard)."""
        self.paths = tuple(os.path.realpath(p) for p in paths)
        self.mapped: tuple[FileIdentity | None, ...] = tuple(mapped) or (None,) * len(paths)
        self.leases: list[_Lease] = []
        for path in self.paths if lease else ():
            held = _take_lease(path)
            if held is not None:
                held.users += 1
                self.leases.append(held)

    def check(self, served: list | None = None) -> None:
        """FileChanged unless the files are still the ones mapped (and, `served` given:
        WELCOME's "file" of hobbitd, the first one is the one hobbitd serves)."""
        for held in self.leases:
            if held.broken:
                raise FileChanged(
                    f"{held.path}: another process is writing or truncating the model file; run again after"
                )
        for path, was in zip(self.paths, self.mapped):
            if was is None or not was.same_bytes(identity(path)):
                raise FileChanged(f"{path}: the model file changed while in use (rewritten, truncated or replaced)")
        first = self.mapped[0]
        if served is not None and first is not None and served != first.wire():
            raise FileChanged(
                f"{self.paths[0]}: hobbitd serves another version of the model file than this process mapped"
            )

    def enter(self, served: list | None = None) -> None:
        """A forward starts: check(served), then count it as running."""
        self.check(served)
        for held in self.leases:
            held.active += 1

    def exit(self, served: list | None = None, ok: bool = True) -> None:
        """The forward ended (ok: its result is to be used, so check the files again)."""
        for held in self.leases:
            held.active -= 1
            if held.broken and not held.active:
                held.release()
        if ok:
            self.check(served)

    def close(self) -> None:
        leases, self.leases = self.leases, []
        for held in leases:
            held.users -= 1
            if held.users <= 0:
                held.release()
