"""The I/O engine: reads expert bytes from flash straight into cache slots.

Direct I/O (O_DIRECT) with page-aligned offsets, lengths and buffers, so reads bypass the
page cache and land in shared memory without a copy; where the filesystem refuses
O_DIRECT (tmpfs, some network filesystems) it falls back to buffered reads. Reader threads
take jobs from one priority queue: demand loads overtake prefetches, a queued prefetch can
be promoted when it is demanded or dropped when superseded. An optional bandwidth cap
emulates slower flash (SD card, eMMC).
"""
from __future__ import annotations

import ctypes
import heapq
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .layout import PAGE, align

DEMAND, PREFETCH = 0, 1


@dataclass(order=True)
class ReadJob:
    """Read `segments` [(path, file offset, nbytes, destination address)], then call
    done(job, error) from the reader thread (error None on success). `verify(job)` may
    raise to reject what was read (e.g. a checksum). Destinations must be page-aligned
    with align(nbytes) + PAGE bytes of room."""
    priority: int
    seq: int
    key: object = field(compare=False)
    segments: list = field(compare=False)
    done: Callable = field(compare=False)
    verify: Callable | None = field(compare=False, default=None)
    state: str = field(compare=False, default="queued")   # queued, running, cancelled, done


class IOEngine:
    def __init__(self, n_threads: int = 4, bytes_per_s: float | None = None, direct: bool = True):
        self.bytes_per_s = bytes_per_s
        self.direct = direct
        self._heap: list[ReadJob] = []
        self._jobs: dict = {}            # key -> queued or running job
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._fds: dict[str, tuple[int, bool]] = {}
        self._fd_lock = threading.Lock()
        self._next_free = 0.0            # bandwidth cap: when the emulated device is idle again
        self._stop = False
        self.bytes_read = 0
        self.read_seconds = 0.0          # summed over threads
        self.reads = 0
        self.direct_reads = 0
        self._threads = [threading.Thread(target=self._run, name=f"hobbit-io-{i}", daemon=True)
                         for i in range(n_threads)]
        for t in self._threads:
            t.start()

    # ---- queue ---------------------------------------------------------------------------

    def submit(self, key, segments, priority: int, done, verify=None) -> ReadJob:
        job = ReadJob(priority, next(self._seq), key, segments, done, verify)
        with self._cv:
            self._jobs[key] = job
            heapq.heappush(self._heap, job)
            self._cv.notify()
        return job

    def promote(self, key) -> bool:
        """Make a queued prefetch a demand load. False if it is not queued any more."""
        with self._cv:
            job = self._jobs.get(key)
            if job is None or job.state != "queued":
                return False
            if job.priority != DEMAND:
                job.state = "cancelled"            # the old heap entry is skipped when popped
                new = ReadJob(DEMAND, next(self._seq), key, job.segments, job.done, job.verify)
                self._jobs[key] = new
                heapq.heappush(self._heap, new)
                self._cv.notify()
            return True

    def cancel(self, key, prefetch_only: bool = True) -> bool:
        """Drop a queued job (a superseded prefetch); a running one completes, and a
        prefetch promoted to a demand is kept unless prefetch_only is False."""
        with self._cv:
            job = self._jobs.get(key)
            if job is None or job.state != "queued" or (prefetch_only and job.priority != PREFETCH):
                return False
            job.state = "cancelled"
            del self._jobs[key]
            return True

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=5)
        with self._fd_lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()

    # ---- readers -------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._heap:
                    self._cv.wait()
                if self._stop:
                    return
                job = heapq.heappop(self._heap)
                if job.state != "queued":
                    continue
                job.state = "running"
            error = None
            try:
                for path, off, n, dest in job.segments:
                    self._read(path, off, n, dest)
                if job.verify:
                    job.verify(job)
            except Exception as e:  # reported to the caller, never kills the reader
                error = e
            with self._cv:
                job.state = "done"
                if self._jobs.get(job.key) is job:
                    del self._jobs[job.key]
            job.done(job, error)

    def _fd(self, path: str) -> tuple[int, bool]:
        with self._fd_lock:
            if path not in self._fds:
                fd, direct = None, False
                if self.direct and hasattr(os, "O_DIRECT"):
                    try:
                        fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
                    except OSError:
                        fd = None
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                self._fds[path] = (fd, direct)
            return self._fds[path]

    def _throttle(self, n: int) -> None:
        if not self.bytes_per_s:
            return
        with self._fd_lock:
            now = time.monotonic()
            finish = max(now, self._next_free) + n / self.bytes_per_s
            self._next_free = finish
        if finish > now:
            time.sleep(finish - now)   # the emulated device is busy until then

    def _read(self, path: str, off: int, n: int, dest: int) -> None:
        fd, direct = self._fd(path)
        self._throttle(n)
        t0 = time.perf_counter()
        if direct:
            skip = off % PAGE
            length = align(n + skip)
            got = _pread_into(fd, dest, length, off - skip)
            if got < skip + n and got >= 0:
                raise EOFError(f"{path}: short read at {off}: file truncated?")
            if skip:
                ctypes.memmove(dest, dest + skip, n)   # the part starts mid-page in the file
        else:
            got = _pread_into(fd, dest, n, off)
            if got < n:
                raise EOFError(f"{path}: short read at {off}: file truncated?")
        dt = time.perf_counter() - t0
        with self._fd_lock:
            self.bytes_read += n
            self.read_seconds += dt
            self.reads += 1
            self.direct_reads += direct


def _pread_into(fd: int, addr: int, length: int, offset: int) -> int:
    """pread into raw memory; loops over short reads (direct I/O may split large reads)."""
    done = 0
    while done < length:
        buf = (ctypes.c_char * (length - done)).from_address(addr + done)
        got = os.preadv(fd, [memoryview(buf).cast("B")], offset + done)
        if got == 0:
            break
        done += got
        if got % PAGE and done < length:      # EOF inside a page: nothing more to read
            break
    return done
