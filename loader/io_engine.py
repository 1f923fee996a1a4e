"""The I/O engine: reads expert bytes from flash straight into cache slots.

Direct I/O (O_DIRECT) with page-aligned offsets, lengths and buffers, so reads bypass the
page cache and land in shared memory without a copy; where the filesystem refuses
O_DIRECT (tmpfs, some network filesystems) it falls back to buffered reads. Reader threads
take jobs from one priority queue: demand loads overtake prefetches, a queued prefetch can
be promoted when it is demanded or dropped when superseded. A reader takes, with the job
it pops, the queued jobs whose bytes continue it in the same file and reads them at once. An optional bandwidth cap
emulates slower flash (SD card, eMMC).
"""

from __future__ import annotations

import ctypes
import enum
import heapq
import itertools
import mmap
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

from .layout import PAGE, align


class Priority(enum.IntEnum):
    """A read's place in the queue: lower first."""

    DEMAND = 0  # a request waits for it
    PREFETCH = 1  # a guess: read while nobody waits


DEMAND, PREFETCH = Priority.DEMAND, Priority.PREFETCH


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"  # taken by a reader (alone or merged into another's read)
    CANCELLED = "cancelled"  # dropped, or replaced by its promotion: its heap entry is skipped
    DONE = "done"


class ReadSegment(NamedTuple):
    """One contiguous read: `nbytes` at `offset` of the file at `path`, into memory at `dest`."""

    path: str
    offset: int
    nbytes: int
    dest: int


MERGE_BYTES = 16 << 20  # longest merged read (and bounce buffer per reader thread)
MERGE_PART = 1 << 20  # parts this long already read at full speed: not merged (no copy)


@dataclass(order=True)
class ReadJob:
    """Read `segments` [ReadSegment], then call
    done(job, error) from the reader thread (error None on success). `verify(job)` may
    raise to reject what was read (e.g. a checksum). A destination is page-aligned, or
    as far past a page boundary as its file offset is (the bytes from that boundary are
    the caller's too: it is read in place); either way with align(nbytes) + PAGE bytes of
    room from the page boundary."""

    priority: Priority
    seq: int
    key: object = field(compare=False)
    segments: list[ReadSegment] = field(compare=False)
    done: Callable = field(compare=False)
    verify: Callable | None = field(compare=False, default=None)
    state: JobState = field(compare=False, default=JobState.QUEUED)


class IOEngine:
    def __init__(self, n_threads: int = 4, bytes_per_s: float | None = None, direct: bool = True):
        self.bytes_per_s = bytes_per_s
        self.direct = direct
        self._heap: list[ReadJob] = []
        self._jobs: dict = {}  # key -> queued or running job
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._fds: dict[str, tuple[int, bool]] = {}
        self._fd_lock = threading.Lock()
        self._next_free = 0.0  # bandwidth cap: when the emulated device is idle again
        self._stop = False
        self._plugged = 0  # > 0: readers wait, so jobs submitted now can merge
        self.bytes_read = 0
        self.read_seconds = 0.0  # summed over threads
        self.reads = 0
        self.direct_reads = 0
        self.moved_bytes = 0  # moved into place after a direct read (not read in place)
        self._threads = [
            threading.Thread(target=self._run, name=f"hobbit-io-{i}", daemon=True) for i in range(n_threads)
        ]
        for t in self._threads:
            t.start()

    # ---- queue ---------------------------------------------------------------------------

    def submit(self, key, segments, priority: Priority, done, verify=None) -> ReadJob:
        """Queue a ReadJob for `segments` (ReadSegments, or tuples of their four fields)
        under `key` (unique among the jobs not completed)."""
        job = ReadJob(Priority(priority), next(self._seq), key, [ReadSegment(*s) for s in segments], done, verify)
        with self._cv:
            self._jobs[key] = job
            heapq.heappush(self._heap, job)
            self._cv.notify()
        return job

    def plug(self) -> None:
        """Hold the readers until unplug(): the reads submitted meanwhile (one request's
        experts) are then taken together and merged where they touch. Keep it short: the
        daemon unplugs on its next loop turn."""
        with self._cv:
            self._plugged += 1

    def unplug(self) -> None:
        with self._cv:
            self._plugged -= 1
            if not self._plugged:
                self._cv.notify_all()

    def promote(self, key) -> bool:
        """Make a queued prefetch a demand load. False if it is not queued any more."""
        with self._cv:
            job = self._jobs.get(key)
            if job is None or job.state != JobState.QUEUED:
                return False
            if job.priority != DEMAND:
                job.state = JobState.CANCELLED  # the old heap entry is skipped when popped
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
            if job is None or job.state != JobState.QUEUED or (prefetch_only and job.priority != PREFETCH):
                return False
            job.state = JobState.CANCELLED
            del self._jobs[key]
            return True

    def forget(self, path: str) -> None:
        """Open `path` again at its next read (it was replaced or rewritten: the fd held may
        name the old file). A read running on the old fd may fail or read the new file; the
        caller drops what such reads bring (loader/reads.py's checks)."""
        with self._fd_lock:
            fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd[0])

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
        bounce = _Bounce()
        while True:
            with self._cv:
                while not self._stop and (not self._heap or self._plugged):
                    self._cv.wait()
                if self._stop:
                    return
                job = heapq.heappop(self._heap)
                if job.state != JobState.QUEUED:
                    continue
                job.state = JobState.RUNNING
                batch = self._take_adjacent(job)
            errors = {}
            try:
                for run in _runs(batch):
                    self._read_run(run, bounce)
            except Exception as e:  # reported to the callers, never kills the reader
                errors = dict.fromkeys(map(id, batch), e)
            for j in batch:
                if j.verify and id(j) not in errors:
                    try:
                        j.verify(j)
                    except Exception as e:
                        errors[id(j)] = e
            with self._cv:
                for j in batch:
                    j.state = JobState.DONE
                    if self._jobs.get(j.key) is j:
                        del self._jobs[j.key]
            for j in batch:
                j.done(j, errors.get(id(j)))

    def _take_adjacent(self, job: ReadJob) -> list[ReadJob]:
        """`job` plus the queued jobs whose segments continue its segments in the same
        file (transitively, up to MERGE_BYTES): the experts of one layer sit side by side
        in each tensor, so one request's short reads become a few long ones, which flash
        serves much faster. Parts of MERGE_PART or more are read alone, straight into their
        slots. Called with the lock held."""
        if not _short(job):
            return [job]
        batch, size = [job], _nbytes(job)
        ends = {(s.path, s.offset + s.nbytes) for s in job.segments}
        starts = {(s.path, s.offset) for s in job.segments}
        grew = True
        while grew and size < MERGE_BYTES:
            grew = False
            for other in self._heap:
                if (
                    other.state != JobState.QUEUED
                    or not _short(other)
                    or not any(
                        (s.path, s.offset) in ends or (s.path, s.offset + s.nbytes) in starts for s in other.segments
                    )
                ):
                    continue
                other.state = JobState.RUNNING  # its heap entry is skipped when popped
                batch.append(other)
                size += _nbytes(other)
                ends |= {(s.path, s.offset + s.nbytes) for s in other.segments}
                starts |= {(s.path, s.offset) for s in other.segments}
                grew = True
        return batch

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
            time.sleep(finish - now)  # the emulated device is busy until then

    def _read_run(self, run: list[ReadSegment], bounce: _Bounce) -> None:
        """Read segments that follow each other in one file: one segment straight into its
        destination, several with one read into the bounce buffer and a copy to each
        destination."""
        path, start = run[0].path, run[0].offset
        end = run[-1].offset + run[-1].nbytes
        fd, direct = self._fd(path)
        self._throttle(end - start)
        t0 = time.perf_counter()
        skip = start % PAGE if direct else 0
        length = align(end - start + skip) if direct else end - start
        in_place, moved = False, 0
        if len(run) == 1:
            dest = run[0].dest  # room for align(n) + PAGE bytes: see ReadJob
            in_place = skip > 0 and (dest - skip) % PAGE == 0
            if in_place:  # the data lands at dest: no move after the read
                dest -= skip
        else:
            dest = bounce.get(length)
        got = _pread_into(fd, dest, length, start - skip)
        if got < skip + end - start:
            raise EOFError(f"{path}: short read at {start}: file truncated?")
        if len(run) == 1:
            if skip and not in_place:
                ctypes.memmove(dest, dest + skip, end - start)  # the part starts mid-page
                moved = end - start
        else:
            for seg in run:
                ctypes.memmove(seg.dest, dest + skip + seg.offset - start, seg.nbytes)
        dt = time.perf_counter() - t0
        with self._fd_lock:
            self.bytes_read += end - start
            self.read_seconds += dt
            self.reads += 1
            self.direct_reads += direct
            self.moved_bytes += moved


def _nbytes(job: ReadJob) -> int:
    return sum(s.nbytes for s in job.segments)


def _short(job: ReadJob) -> bool:
    return max(s.nbytes for s in job.segments) < MERGE_PART


def _runs(batch: list[ReadJob]) -> list[list[ReadSegment]]:
    """The batch's segments sorted by file and offset, cut where they stop touching."""
    segs = sorted((s for j in batch for s in j.segments), key=lambda s: (s.path, s.offset))
    runs: list[list[ReadSegment]] = []
    for seg in segs:
        last = runs[-1][-1] if runs else None
        if last is not None and last.path == seg.path and last.offset + last.nbytes == seg.offset:
            runs[-1].append(seg)
        else:
            runs.append([seg])
    return runs


class _Bounce:
    """A reader thread's page-aligned buffer for merged reads (grown on demand)."""

    def __init__(self):
        self.mm, self.address = None, 0

    def get(self, nbytes: int) -> int:
        if self.mm is None or len(self.mm) < nbytes:
            self.mm = mmap.mmap(-1, align(nbytes))
            self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        return self.address


def _pread_into(fd: int, addr: int, length: int, offset: int) -> int:
    """pread into raw memory; loops over short reads (direct I/O may split large reads)."""
    done = 0
    while done < length:
        buf = (ctypes.c_char * (length - done)).from_address(addr + done)
        got = os.preadv(fd, [memoryview(buf).cast("B")], offset + done)
        if got == 0:
            break
        done += got
        if got % PAGE and done < length:  # EOF inside a page: nothing more to read
            break
    return done
